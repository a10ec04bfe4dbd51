"""tokenmill: a small, readable LLM inference engine."""
import logging
import os

from tokenmill.outputs import BeamSearchOutput, BeamSearchSequence, CompletionOutput, Logprob, RequestOutput
from tokenmill.sampling_params import BeamSearchParams, SamplingParams

__version__ = "0.1.0"


def _configure_logging() -> None:
    # Library users see start-up facts (model, KV pages) without configuring logging;
    # TOKENMILL_LOG_LEVEL=WARNING quiets it.
    logger = logging.getLogger("tokenmill")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s tokenmill: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(os.environ.get("TOKENMILL_LOG_LEVEL", "INFO").upper())
        logger.propagate = False


_configure_logging()


def __getattr__(name: str):
    # LLM / LLMEngine pull in torch and the model code; import them on first use
    if name in ("LLM", "LLMEngine"):
        from tokenmill import engine
        return getattr(engine, name)
    if name == "EngineConfig":
        from tokenmill.config import EngineConfig
        return EngineConfig
    raise AttributeError(f"module 'tokenmill' has no attribute {name!r}")


__all__ = ["LLM", "LLMEngine", "EngineConfig", "SamplingParams", "RequestOutput", "CompletionOutput", "Logprob",
           "BeamSearchParams", "BeamSearchOutput", "BeamSearchSequence"]
