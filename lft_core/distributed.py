"""Running under PyTorch's launcher: ``torchrun ... -m lft_core <command>``.

torchrun starts one process per rank and tells each its place through the environment (``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``). ``init_from_env`` reads that, joins the
process group (``nccl`` when CUDA is there, else ``gloo``) and makes the result the ``current()`` context that
training and caching consult. A plain ``python -m lft_core`` is the world-size-1 case of the same code: every
collective below is then a no-op, so one code path serves both.

What each rank does is decided in the callers (``training``, ``activations``): data is split by a fixed rule
over window indices, rank 0 alone writes checkpoints, configs, progress and JSON, the others stay silent.
A rank that dies makes torchrun's agent stop the others (no rank is left waiting), and a collective that
waits longer than ``LFT_DIST_TIMEOUT`` seconds (default 1800) fails instead of hanging. An error every rank
meets is said once, by rank 0 (``before_error``: the others hold their line back until the agent ends them),
and also written where the agent's failure summary reads it (``record_error``).
"""
from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch

from lft_core.errors import LFTError


@dataclass(frozen=True)
class Dist:
    """This process's place in the run: ``rank`` of ``world`` processes, ``local_rank`` on its machine."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def main(self) -> bool:
        """True on the rank that writes (rank 0; the only rank of a plain run)."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    def device(self) -> str:
        """The device this rank computes on: its own GPU under torchrun with CUDA, else ``cuda``/``cpu``."""
        if torch.cuda.is_available():
            return f"cuda:{self.local_rank}" if self.active else "cuda"
        return "cpu"

    # -- collectives (no-ops in a world of one) -------------------------------------------------------
    def barrier(self) -> None:
        if self.active:
            torch.distributed.barrier()

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank (picklable Python values; the values are ours, never a user's file)."""
        if not self.active:
            return obj
        box = [obj if self.main else None]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def mean(self, value: float) -> float:
        """The mean over ranks of a float."""
        if not self.active:
            return value
        buf = torch.tensor([value], dtype=torch.float64, device=self._comm_device())
        torch.distributed.all_reduce(buf)
        return float(buf.item()) / self.world

    def any(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is true on some rank (a stop asked on one rank stops all)."""
        if not self.active:
            return flag
        buf = torch.tensor([1.0 if flag else 0.0], device=self._comm_device())
        torch.distributed.all_reduce(buf, op=torch.distributed.ReduceOp.MAX)
        return bool(buf.item() > 0)

    def _comm_device(self) -> torch.device:
        return torch.device(f"cuda:{self.local_rank}") if self.backend == "nccl" else torch.device("cpu")


_CURRENT = Dist()


def device_label(device: str) -> str:
    """What a flow's record and a shipped flow's provenance say it was trained on: ``cuda (NVIDIA H100 80GB HBM3)``
    or ``cpu (2 threads)``."""
    import torch

    if str(device).startswith("cuda") and torch.cuda.is_available():
        return f"cuda ({torch.cuda.get_device_name(torch.device(device))})"
    return f"cpu ({torch.get_num_threads()} threads)"


def current() -> Dist:
    """The context of this process (``Dist()`` unless ``init_from_env`` joined a torchrun group)."""
    return _CURRENT


def launched_by_torchrun() -> bool:
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def env_rank() -> tuple[int, int] | None:
    """(RANK, WORLD_SIZE) as torchrun set them for this process (None in a plain run or when unreadable): known
    before the process group is joined, so an error raised before (or while) joining still says its rank."""
    if not launched_by_torchrun():
        return None
    try:
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    except ValueError:
        return None


ERROR_GRACE_S = 5.0
"""How long a rank other than 0 holds back its error line (see ``before_error``)."""


def before_error() -> None:
    """Called by the CLI just before it prints an ``error:`` line and exits 2. Under torchrun, a rank other than 0
    first waits ``ERROR_GRACE_S`` seconds: bad input reaches every rank, and rank 0 then says it. When rank 0
    fails, torchrun's agent ends the other ranks (SIGTERM) during their wait, so the line is printed once, by
    rank 0, and the agent's summary names rank 0 (exit code 2) as the root cause. An error that only this rank
    meets (rank 0 waits for it in a collective) is printed after the wait, as ``rank R: error: ...``."""
    where = env_rank()
    if where is not None and where[0] != 0 and where[1] > 1:
        sys.stdout.flush()
        try:
            time.sleep(ERROR_GRACE_S)
        except KeyboardInterrupt:  # Ctrl-C reaches every rank: say it now rather than show a traceback
            pass


def record_error(line: str) -> None:
    """Under torchrun, also write the error line where torchrun's agent looks for a rank's error
    (``TORCHELASTIC_ERROR_FILE``, set per rank by the agent, in the ``@record`` format), so the agent's failure
    summary shows it (``traceback : error: ...``) instead of a link to its docs. Nothing in a plain run."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path or not launched_by_torchrun():
        return
    data = {"message": {"message": line, "extraInfo": {"py_callstack": line, "timestamp": str(int(time.time()))}}}
    try:
        with open(path, "w") as f:
            json.dump(data, f)
    except OSError:
        pass  # the summary then shows torchrun's own text; our line is on stderr either way


def init_from_env() -> Dist:
    """Join the process group torchrun describes in the environment; a world of one joins nothing.

    The backend is ``nccl`` when CUDA is available (each rank on GPU ``LOCAL_RANK``), else ``gloo``;
    ``LFT_DIST_BACKEND`` overrides it."""
    global _CURRENT
    if not launched_by_torchrun():
        return _CURRENT
    try:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    except ValueError:
        raise LFTError("RANK, WORLD_SIZE and LOCAL_RANK must be integers (they are set by torchrun)") from None
    if world <= 1:
        _CURRENT = Dist(rank=0, world=1, local_rank=local_rank)
        return _CURRENT
    backend = os.environ.get("LFT_DIST_BACKEND") or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl":
        if local_rank >= torch.cuda.device_count():
            raise LFTError(f"rank {rank} wants GPU {local_rank}, but this machine has {torch.cuda.device_count()}: "
                           f"run at most one rank per GPU (--nproc-per-node)")
        torch.cuda.set_device(local_rank)
    timeout = timedelta(seconds=float(os.environ.get("LFT_DIST_TIMEOUT", "1800")))
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend=backend, timeout=timeout)
    _CURRENT = Dist(rank=rank, world=world, local_rank=local_rank, backend=backend)
    return _CURRENT


def shutdown() -> None:
    """Leave the process group (at the end of a command)."""
    global _CURRENT
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    _CURRENT = Dist()


def lost_a_peer(error: BaseException) -> bool:
    """True when ``error`` is a collective failing because another rank went away (died, was killed, timed
    out): PyTorch's distributed errors, and gloo's and NCCL's connection errors, which arrive as RuntimeError."""
    if isinstance(error, getattr(torch.distributed, "DistError", ())):
        return True
    text = str(error)
    return isinstance(error, RuntimeError) and any(
        s in text for s in ("gloo", "NCCL", "Connection reset", "Connection closed", "Broken pipe"))


def shard_of(n: int, dist: Dist | None = None) -> range:
    """The contiguous share of ``n`` items (e.g. batches of windows) that ``dist``'s rank handles: rank r
    of W gets items [r·n/W, (r+1)·n/W) (floor), so the shares are disjoint, in order and cover 0..n-1."""
    dist = dist or current()
    return range(dist.rank * n // dist.world, (dist.rank + 1) * n // dist.world)


def agree(fn, dist: Dist | None = None) -> Any:
    """Run ``fn`` on rank 0 and share its outcome: its return value on every rank, or, when it raises an
    LFTError, that error raised on every rank (so a refusal such as "the name is taken" ends every rank at
    once with the same message instead of leaving the others waiting in a collective)."""
    dist = dist or current()
    if not dist.active:
        return fn()
    outcome: tuple[str, Any] = ("ok", None)
    if dist.main:
        try:
            outcome = ("ok", fn())
        except LFTError as e:
            outcome = ("error", str(e))
    outcome = dist.broadcast(outcome)
    if outcome[0] == "error":
        raise LFTError(outcome[1])
    return outcome[1]
