"""The ranks of a tensor-parallel engine: start-up, the step loop of ranks 1..N-1, and failure.

Rank 0 runs the whole engine (scheduler, block manager, sampler) and holds shard 0 of the model.
Each step it broadcasts `StepInputs` (token ids, positions, the attention metadata of every KV group,
the page copies, the rows that need logits); every other rank runs its shard of the same forward
pass and joins the collectives, and never sees a Sequence.

Start-up, the same for ranks we spawn and ranks a launcher (torchrun) starts:
  rank 0   TCP store (or the launcher's) <- RankInit; waits for every rank to join, watching for errors
  rank r   reads RankInit; joins the process group; loads its shard; says ready; loops on steps
A rank that fails writes its error to the store and exits; a rank that dies closes its sockets. Either
way rank 0's next collective fails at once, and `Ranks.failure` names the rank and the cause.
"""
from __future__ import annotations

import atexit
import logging
import os
import pickle
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
import weakref
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from tokenmill.attention import AttentionMetadata
from tokenmill.parallel.comm import TPGroup

logger = logging.getLogger("tokenmill")

COMPUTE_TIMEOUT = timedelta(minutes=5)       # a collective inside a step: peers are at most one layer apart
CONTROL_TIMEOUT = timedelta(days=365)        # ranks 1..N-1 wait this long for the next step of an idle server
JOIN_TIMEOUT_S = 120.0                       # rank 0 waits this long for every rank to join / load
DEFAULT_PORT = 29500                         # torchrun's, for a launcher that sets no MASTER_PORT


class TensorParallelError(RuntimeError):
    """A rank failed or died: the group cannot go on, so the engine ends."""


@dataclass(frozen=True)
class RankInit:
    """What ranks 1..N-1 build from (sent by rank 0 through the store)."""
    config: Any                  # EngineConfig
    layout: Any                  # kv_cache.KVLayout
    num_blocks: int
    max_model_len: int
    threads: int
    dtype: torch.dtype           # the activation dtype rank 0 runs (what "auto" resolved to there)
    cache_dtype: torch.dtype     # its KV pages' dtype (likewise)


@dataclass
class StepInputs:
    input_ids: torch.Tensor                  # [T]
    positions: torch.Tensor                  # [T]
    metas: list[AttentionMetadata]           # one per KV group
    logit_rows: torch.Tensor                 # [N] rows of the hidden states that need logits
    block_copies: list[tuple[int, int]] = field(default_factory=list)


def launcher_env() -> tuple[int, int] | None:
    """(rank, world size) when a launcher such as torchrun started this process as one of several ranks."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1:
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _store(rank: int, world: int, host: str, port: int) -> dist.Store:
    """The rendezvous store. Rank 0 hosts it, unless torchrun's agent already does (workers then connect)."""
    master = rank == 0 and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True"
    try:
        store = dist.TCPStore(host, port, world, master, timeout=timedelta(seconds=JOIN_TIMEOUT_S),
                              wait_for_workers=False)
    except Exception as e:      # noqa: BLE001 -- torch raises several types here (DistNetworkError, RuntimeError)
        what = "listen on" if master else "reach rank 0 at"
        raise TensorParallelError(f"tensor parallelism: rank {rank} cannot {what} {host}:{port} ({e}); "
                                  f"{'the port is taken: free it or set MASTER_PORT' if master else 'is rank 0 up?'}") \
            from None
    return dist.PrefixStore("tokenmill", store)


def _join_group(store: dist.Store, rank: int, world: int, device: torch.device) -> TPGroup:
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, store=dist.PrefixStore("pg", store), rank=rank, world_size=world,
                            timeout=COMPUTE_TIMEOUT)
    return TPGroup(rank, world, dist.group.WORLD)


def _send(message: StepInputs | None, control) -> None:
    """Rank 0: one pickled message to every rank (its length, then its bytes), each broadcast bounded by
    COMPUTE_TIMEOUT, so that a rank that hangs rather than dies still ends the engine."""
    payload = torch.frombuffer(bytearray(pickle.dumps(message)), dtype=torch.uint8)
    for t in (torch.tensor([payload.numel()], dtype=torch.int64), payload):
        dist.broadcast(t, src=0, group=control, async_op=True).wait(COMPUTE_TIMEOUT)


def _receive(control) -> StepInputs | None:
    size = torch.zeros(1, dtype=torch.int64)
    dist.broadcast(size, src=0, group=control)
    payload = torch.empty(int(size), dtype=torch.uint8)
    dist.broadcast(payload, src=0, group=control)
    return pickle.loads(payload.numpy().tobytes())


def _control_group():
    """A gloo group for the step broadcasts, with a timeout that an idle server never reaches."""
    return dist.new_group(list(range(dist.get_world_size())), timeout=CONTROL_TIMEOUT, backend="gloo")


def rank_device(config, rank: int) -> torch.device:
    """CUDA: the configured device's index plus this rank's local rank (spawned ranks are given
    theirs), made the current device; CPU: the CPU."""
    device = config.torch_device
    if device.type != "cuda":
        return device
    local = int(os.environ.get("LOCAL_RANK", rank)) if rank else 0
    device = torch.device("cuda", ((device.index or 0) + local) % torch.cuda.device_count())
    torch.cuda.set_device(device)
    return device


# ---- rank 0 ------------------------------------------------------------------------------------------
class Ranks:
    """Rank 0's handle on the other ranks: start them, send each step, name the one that failed, stop them."""

    def __init__(self, config, init: RankInit):
        tp = config.tensor_parallel_size
        env = launcher_env()
        self.launched = env is not None
        if dist.is_initialized():
            raise RuntimeError("tensor parallelism: this process already runs a tensor-parallel engine (or another "
                               "torch.distributed group); call shutdown() on it first")
        host = os.environ.get("MASTER_ADDR", "127.0.0.1")
        port = int(os.environ.get("MASTER_PORT", DEFAULT_PORT if env is not None else _free_port()))
        self.lifeline: int | None = None
        self.threads_before: int | None = None      # set by the engine when it lowered rank 0's threads
        self.procs: dict[int, subprocess.Popen] = {}
        self.world = tp
        self.group_started = False
        self.closed = False
        self.reason = ""
        self.store = _store(0, tp, host, port)
        self.store.set("init", pickle.dumps(init))
        atexit.register(_close_at_exit, weakref.ref(self))
        try:
            if not self.launched:
                read, self.lifeline = os.pipe()
                try:
                    for r in range(1, tp):
                        self.procs[r] = _spawn(r, tp, host, port, read)
                finally:
                    os.close(read)
            self._wait_for("joined", tp)
            self.device = rank_device(config, 0)
            self.group_started = True
            self.group = _join_group(self.store, 0, tp, self.device)
            self.control = _control_group()
        except BaseException:
            self.close(kill=True)
            raise

    def wait_ready(self) -> None:
        """After rank 0 built its own shard: every other rank has built its own."""
        try:
            self._wait_for("ready", self.group.size)
        except BaseException:
            self.close(kill=True)
            raise

    def _wait_for(self, key: str, world: int) -> None:
        deadline = time.monotonic() + JOIN_TIMEOUT_S
        pending = set(range(1, world))
        while pending:
            self._raise_failed()
            pending = {r for r in pending if not self.store.check([f"{key}/{r}"])}
            if pending and time.monotonic() > deadline:
                raise TensorParallelError(f"tensor parallelism: rank(s) {sorted(pending)} did not report "
                                          f"{key!r} within {JOIN_TIMEOUT_S:.0f} s")
            time.sleep(0.02)

    def _dead(self) -> dict[int, str]:
        """Rank -> why it is gone: the error it reported, or how its process ended."""
        dead = {}
        for r in range(1, self.world if self.store is not None else 0):
            if self.store.check([f"error/{r}"]):
                dead[r] = self.store.get(f"error/{r}").decode(errors="replace")
        for r, proc in self.procs.items():
            if r not in dead and proc.poll() is not None:
                code = proc.returncode
                dead[r] = f"its process {proc.pid} was killed by {signal.Signals(-code).name}" if code < 0 \
                    else f"its process {proc.pid} exited with code {code}"
        return dead

    def _raise_failed(self) -> None:
        dead = self._dead()
        if dead:
            raise TensorParallelError("; ".join(f"tensor-parallel rank {r} failed: {why}" for r, why in sorted(dead.items())))

    def step(self, inputs: StepInputs) -> None:
        """Send one step to every other rank (which then runs it alongside rank 0)."""
        if self.closed:
            raise TensorParallelError(f"the tensor-parallel group is closed{f' ({self.reason})' if self.reason else ''}")
        if inputs.input_ids.device.type != "cpu":       # tensors travel over the gloo control group
            inputs = StepInputs(inputs.input_ids.cpu(), inputs.positions.cpu(), [m.to("cpu") for m in inputs.metas],
                                inputs.logit_rows.cpu(), inputs.block_copies)
        try:
            _send(inputs, self.control)
        except BaseException as e:        # noqa: BLE001 -- Ctrl-C mid-send leaves the ranks out of step too
            error = self.failure(e)
            if isinstance(e, Exception):
                raise error from e
            raise

    def failure(self, error: BaseException) -> TensorParallelError:
        """The error to end the engine with after `error` broke a step: the ranks are out of step now.
        Names the rank that failed when one did (a killed process closes its sockets before its
        exit code is visible: wait a moment for it)."""
        deadline = time.monotonic() + 3.0
        dead = self._dead()
        while not dead and time.monotonic() < deadline and (self.procs or self.launched):
            time.sleep(0.05)
            dead = self._dead()
        why = "; ".join(f"tensor-parallel rank {r} failed: {w}" for r, w in sorted(dead.items()))
        self.close(kill=True)
        self.reason = why or f"tensor-parallel step failed on rank 0: {type(error).__name__}: {error}"
        return TensorParallelError(self.reason)

    def close(self, kill: bool = False) -> None:
        """Stop every rank; `kill`: the group is broken, so terminate rather than ask."""
        if self.closed:
            return
        self.closed = True
        if not kill and hasattr(self, "control"):
            try:
                _send(None, self.control)
            except Exception:       # noqa: BLE001 -- a rank already gone: terminate below
                kill = True
        for proc in self.procs.values():
            for stop, wait in ((None, 0 if kill else 10), (proc.terminate, 5), (proc.kill, None)):
                if proc.poll() is not None:
                    break
                if stop is not None:
                    stop()
                try:
                    proc.wait(wait)
                except subprocess.TimeoutExpired:
                    pass
        if self.lifeline is not None:
            os.close(self.lifeline)
            self.lifeline = None
        if self.group_started and dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:       # noqa: BLE001 -- a broken group may not tear down cleanly
                pass
        # the store's threads end here, not in the interpreter's teardown (where they aborted the process)
        self.control = self.store = None
        if self.threads_before is not None:          # rank 0's process goes on with its own thread count
            torch.set_num_threads(self.threads_before)


def _close_at_exit(ref: weakref.ref) -> None:
    ranks = ref()
    if ranks is not None:
        ranks.close()


# ---- ranks 1..N-1 ------------------------------------------------------------------------------------
def _spawn(rank: int, world: int, host: str, port: int, lifeline: int) -> subprocess.Popen:
    """Rank r in a fresh interpreter (the spawn start method's isolation, without re-running the
    caller's __main__: a script needs no `if __name__ == "__main__"` guard), importing this tokenmill,
    in its own session (a Ctrl-C at the terminal is rank 0's to handle), holding the read end of
    `lifeline`, a pipe whose write end only rank 0's process holds."""
    env = dict(os.environ, LOCAL_RANK=str(rank))
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    code = (f"from tokenmill.parallel.ranks import spawned_rank; "
            f"spawned_rank({rank}, {world}, {host!r}, {port}, {lifeline})")
    return subprocess.Popen([sys.executable, "-c", code], env=env, pass_fds=(lifeline,), start_new_session=True)


def spawned_rank(rank: int, world: int, host: str, port: int, lifeline: int) -> None:
    """Entry point of a rank the engine spawned: it dies with rank 0's process, however that ends (the
    lifeline reads EOF when the last holder of its write end is gone: no orphans)."""
    def watch() -> None:
        os.read(lifeline, 1)
        os._exit(1)
    threading.Thread(target=watch, name="tokenmill-lifeline", daemon=True).start()
    os._exit(run_rank(rank, world, host, port))


def run_rank(rank: int, world: int, host: str, port: int) -> int:
    """Load this rank's shard and run steps until rank 0 stops; returns the exit code."""
    store = _store(rank, world, host, port)
    try:
        init: RankInit = pickle.loads(store.get("init"))
        torch.set_num_threads(init.threads)
        store.set(f"joined/{rank}", b"1")
        device = rank_device(init.config, rank)
        group = _join_group(store, rank, world, device)
        control = _control_group()
        worker = ShardWorker(init, group, device)
        store.set(f"ready/{rank}", b"1")
        worker.loop(control)
        dist.destroy_process_group()
        return 0
    except BaseException as e:       # noqa: BLE001 -- reported to rank 0, which names this rank
        detail = f"{type(e).__name__}: {e}"
        try:
            store.set(f"error/{rank}", detail.encode())
        except Exception:       # noqa: BLE001 -- rank 0 is gone too
            pass
        logger.error("tensor-parallel rank %d failed: %s\n%s", rank, detail, traceback.format_exc())
        return 1


class ShardWorker:
    """A rank's shard of the model and its own KV pages (its KV heads), driven by rank 0's steps."""

    def __init__(self, init: RankInit, group: TPGroup, device: torch.device):
        from tokenmill.attention import get_backend
        from tokenmill.kv_cache import allocate_kv_cache
        from tokenmill.model.load import build_model, open_checkpoint
        from tokenmill.model_files import resolve_model
        config = init.config
        ckpt = open_checkpoint(resolve_model(config.model))
        dtype = init.dtype
        self.model = build_model(ckpt, dtype, init.max_model_len, device, ckpt.method(config.quantization),
                                 progress=False, tp=group)
        self.kv_caches = allocate_kv_cache(ckpt.config, init.num_blocks, config.block_size, init.cache_dtype, device,
                                           init.layout.num_slots, group.size)
        self.layer_caches = [self.kv_caches[slot] for _, slot in init.layout.layer_places]
        self.layout = init.layout
        self.backend = get_backend(config.backend_name)
        self.device = device

    @torch.inference_mode()
    def loop(self, control) -> None:
        from tokenmill.kv_cache import copy_blocks
        while True:
            step = _receive(control)
            if step is None:
                return
            copy_blocks(self.kv_caches, step.block_copies)
            metas = [m.to(self.device) for m in step.metas]
            hidden = self.model(step.input_ids.to(self.device), step.positions.to(self.device), self.layer_caches,
                                self.backend, [metas[group] for group, _ in self.layout.layer_places])
            self.model.compute_logits(hidden[step.logit_rows.to(self.device)])


def run_launched_rank(config) -> None:
    """A process a launcher started as rank r > 0: serve rank 0's steps, then exit the process."""
    rank, world = launcher_env()
    host, port = os.environ.get("MASTER_ADDR", "127.0.0.1"), int(os.environ.get("MASTER_PORT", DEFAULT_PORT))
    logger.info("tensor-parallel rank %d of %d: waiting for rank 0 at %s:%d", rank, world, host, port)
    raise SystemExit(run_rank(rank, world, host, port))
