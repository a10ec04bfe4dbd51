"""`tokenmill serve` builds the engine and steps it on one thread (EngineThread): PyTorch's OpenMP pool
belongs to the thread that starts its parallel regions, and a second pool made each step ~1.7x slower
on a 2-core machine (the figures are in EngineThread's docstring; speed is shown by benchmarks, not here)."""
from __future__ import annotations

import asyncio
import threading

import pytest

from tokenmill import SamplingParams
from tokenmill.config import EngineConfig
from tokenmill.engine import LLMEngine
from tokenmill.server.async_engine import AsyncEngine, EngineThread, StepObserver


class ThreadSeen(StepObserver):
    def __init__(self) -> None:
        self.threads: set[threading.Thread] = set()

    def on_tokens(self, num_tokens, inter_token_seconds) -> None:
        self.threads.add(threading.current_thread())


def test_the_thread_that_builds_the_engine_steps_it(tiny_llama):
    built_on = []

    def build() -> LLMEngine:
        built_on.append(threading.current_thread())
        return LLMEngine(EngineConfig(model=str(tiny_llama[0]), num_kv_blocks=32), progress=False)

    thread = EngineThread(build)
    engine = thread.built()
    seen = ThreadSeen()

    async def run() -> list[int]:
        async_engine = AsyncEngine(engine, observer=seen, thread=thread)
        async_engine.start()
        stream = async_engine.submit("r", [1, 2, 3], [1, 2, 3], SamplingParams(max_tokens=5, ignore_eos=True))
        last = None
        async for out in stream:
            last = out
        await async_engine.stop()
        return last.outputs[0].token_ids

    assert len(asyncio.run(run())) == 5
    assert built_on == [thread] and seen.threads == {thread}
    thread.join(5)
    assert not thread.is_alive()


def test_an_engine_that_fails_to_build_raises_in_the_caller():
    def build() -> LLMEngine:
        raise ValueError("max_model_len 99999 is larger than the model's 8192 positions")

    with pytest.raises(ValueError, match="max_model_len 99999"):
        EngineThread(build).built()


def test_a_thread_never_handed_a_loop_can_be_ended(tiny_llama):
    thread = EngineThread(lambda: LLMEngine(EngineConfig(model=str(tiny_llama[0]), num_kv_blocks=32), progress=False))
    thread.built()
    thread.hand_over(None)
    thread.join(5)
    assert not thread.is_alive()
