"""tokenmill: a small, readable LLM inference engine."""
from tokenmill.outputs import CompletionOutput, Logprob, RequestOutput
from tokenmill.sampling_params import SamplingParams

__version__ = "0.1.0"


def __getattr__(name: str):
    # LLM / LLMEngine pull in torch and the model code; import them on first use
    if name in ("LLM", "LLMEngine"):
        from tokenmill import engine
        return getattr(engine, name)
    if name == "EngineConfig":
        from tokenmill.config import EngineConfig
        return EngineConfig
    raise AttributeError(f"module 'tokenmill' has no attribute {name!r}")


__all__ = ["LLM", "LLMEngine", "EngineConfig", "SamplingParams", "RequestOutput", "CompletionOutput", "Logprob"]
