"""A generation across processes started by `torchrun`: process group, roles, setup, failures.

Every rank runs `generate`: it joins the process group (NCCL on GPUs, gloo on CPUs, with a timeout on
every collective and point-to-point operation), takes its role from the parallel layout, loads only
the models that role needs, applies sequence parallelism and sharded weights to its DiT, and runs its
part of the pipeline (`liveavatar.distributed.pipeline`). Rank 0 checks the inputs and encodes the
conditioning, which it sends to every rank; the decoding rank checks the output file and writes the
video. A bad input on any rank stops every rank before a model is loaded.

When a rank fails, the first rank to notice records one line in the rendezvous store, naming the
failed rank, its role and the cause (`rank 2, denoise stage 2 (step 2): ...`), and prints it; the
others stop without repeating it (torchrun ends them with SIGTERM). Every rank writes a heartbeat to
the store (hosted by torchrun's agent, so it outlives the ranks): a rank that was killed or froze is
named by the rank that notices its silence, at once when torchrun stops the others, at the latest
when a wait on it reaches the timeout (`--dist_timeout`). The decoding rank keeps its partial video
playable in every case.
"""

from __future__ import annotations

import datetime
import os
import sys
import time

import torch
import torch.distributed as dist

from liveavatar.distributed.layout import ParallelLayout, Role
from liveavatar.errors import UserError

FAILURE_KEY = "liveavatar/failure"
HEARTBEAT = 0.5  # seconds between a rank's signs of life in the rendezvous store
STALE = 2.0  # a rank silent this long has stopped (killed, crashed or frozen)


class Heartbeat:
    """A daemon thread that writes this rank's time to the rendezvous store (hosted by torchrun's
    agent, so it outlives any rank); `stale()` says which ranks went silent."""

    def __init__(self, rank: int, world: int):
        import threading

        from torch.distributed import distributed_c10d as c10d

        self.rank, self.world, self.store = rank, world, c10d._get_default_store()
        self.stop = threading.Event()
        self.beat()
        self.thread = threading.Thread(target=self._run, daemon=True, name="liveavatar-heartbeat")
        self.thread.start()

    def beat(self) -> None:
        self.store.set(f"liveavatar/alive/{self.rank}", repr(time.time()))

    def _run(self) -> None:
        while not self.stop.wait(HEARTBEAT):
            try:
                self.beat()
            except Exception:  # the store went away: the job is ending
                return

    def stale(self, wait: float = STALE + 1.0) -> list[int]:
        """Ranks silent for more than STALE seconds, waiting up to `wait` s for one to show up."""
        t0 = time.time()
        while True:
            silent = []
            for r in range(self.world):
                try:
                    beat = self.store.get(f"liveavatar/alive/{r}").decode()
                    if r != self.rank and beat != "stopped" and time.time() - float(beat) > STALE:
                        silent.append(r)
                except Exception:
                    pass
            if silent or time.time() - t0 > wait:
                return silent
            time.sleep(0.2)

    def stopping(self) -> None:
        """This rank stops on purpose (told to, or done): never counted as silent."""
        self.stop.set()
        try:
            self.store.set(f"liveavatar/alive/{self.rank}", "stopped")
        except Exception:
            pass

    def close(self) -> None:
        self.stopping()


def in_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init(timeout_s: float) -> tuple[int, int, torch.device]:
    """Join the process group torchrun describes: (rank, world size, this rank's device)."""
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local % torch.cuda.device_count())
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return rank, world, device


def record_failure(text: str, rank: int) -> bool:
    """Record `text` as the cause of the failure unless another rank did first; True if ours."""
    mine = f"{rank}|{text}"
    try:
        from torch.distributed import distributed_c10d as c10d

        store = c10d._get_default_store()
        return store.compare_set(FAILURE_KEY, "", mine).decode() == mine
    except Exception:  # the store is gone with the rank that hosted it: say it anyway
        return True


def agree(ok: bool) -> bool:
    """Every rank's check result -> whether all passed (a collective: every rank must call it)."""
    flag = torch.tensor([1 if ok else 0], dtype=torch.int64, device=_comm_device())
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def _comm_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def broadcast_ints(values: list[int] | None, n: int) -> list[int]:
    """Rank 0's `n` integers on every rank."""
    t = torch.tensor(values if values is not None else [0] * n, dtype=torch.int64, device=_comm_device())
    dist.broadcast(t, 0)
    return t.tolist()


def broadcast_tensor(t: torch.Tensor | None, shape: tuple[int, ...], dtype: torch.dtype, device) -> torch.Tensor:
    """Rank 0's tensor of `shape` on every rank (on `device`)."""
    buf = t.to(device, dtype).contiguous() if t is not None else torch.empty(shape, dtype=dtype, device=device)
    dist.broadcast(buf, 0)
    return buf


def stage_groups(layout: ParallelLayout) -> dict[int, object]:
    """The process group of each denoise stage (every rank creates every group, in order)."""
    return {s: dist.new_group(layout.group(s)) for s in range(layout.stages)}


def report(layout: ParallelLayout | None, role: Role | None, rank: int, exc: BaseException | None,
           heartbeat: Heartbeat | None) -> None:
    """One line naming the rank that failed and why; only the first rank to record a failure prints
    it. `exc` None: this rank was told to stop (SIGTERM) and looks for the rank that went silent."""
    who = role.describe() if role is not None else f"rank {rank}"
    silent = heartbeat.stale() if heartbeat is not None and not isinstance(exc, UserError) else []
    if silent and layout is not None:  # the cause is another rank that stopped answering
        names = "; ".join(layout.role(r).describe() for r in silent)
        line = f"{names}: stopped answering (killed, crashed or frozen)"
    elif isinstance(exc, UserError):
        line = f"{who}: {' '.join(str(exc).split())}"
    elif exc is not None:
        line = f"{who}: {type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
    else:
        return  # stopped from outside with no rank gone: torchrun or the user says why
    if record_failure(line, rank):
        print(f"error: {line}", file=sys.stderr, flush=True)


__all__ = ["Heartbeat", "agree", "broadcast_ints", "broadcast_tensor", "in_torchrun", "init",
           "record_failure", "report", "stage_groups"]
