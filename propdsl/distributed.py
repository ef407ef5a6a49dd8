"""Data-parallel runs on torch.distributed: the process group, sharding and the collectives.

`torchrun --nproc-per-node N -m propdsl train SPEC` (or `propdsl train SPEC --nproc N`) starts N
processes; each reads the usual torchrun variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
MASTER_PORT) and `init_from_env` joins them into one process group: gloo for CPU tensors and, where
CUDA is present, NCCL for CUDA tensors (each process then uses the GPU of its LOCAL_RANK).

Sharding is by position in a batch: `shard_range(n)` is this rank's contiguous part of n items
(the first ranks take one more where n does not divide), `shard(items)` that part, `gather(parts)`
the parts of every rank concatenated in rank order, i.e. in the order of the whole. A sharded
computation is the same as one process's when every sample is computed independently of the others
and its random draws are the same: `global_draws(n, offset)` makes every random draw of the
attacks and of the explanation noise (`draw`) take the whole batch's numbers from the generator and
keep this rank's rows, so the generator advances as in one process and sample i gets the numbers it
gets there, whichever rank computes it.

Without a process group (one process) everything here is the identity: `rank()` 0, `world()` 1,
`shard_range(n)` (0, n), `gather(part)` part.

This module imports only torch and `propdsl.errors`: the region and attack code uses `draw`.
"""

from __future__ import annotations

import contextlib
import contextvars
import datetime
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from torch import Tensor

from propdsl.errors import PropdslError

T = TypeVar("T")

# How long a collective waits for a process that neither answers nor dies (a crashed process
# closes its sockets and fails the others at once; this covers a hung one).
TIMEOUT = datetime.timedelta(minutes=10)


class RankLost(PropdslError):
    """A collective failed: another process of the job died (its connection closed) or hung past
    `TIMEOUT`. The launcher names the process that died."""


_PEER_LOST = False  # a collective of this process met a vanished peer (`RankLost`)


def peer_lost() -> bool:
    """Whether this process lost contact with another process of its job: its group is then
    not torn down (gloo's teardown with a dead peer aborted the process, SIGABRT, and the
    launcher then named the wrong process)."""
    return _PEER_LOST


@contextlib.contextmanager
def _collective(what: str) -> Iterator[None]:
    """Turn the backend's error for a vanished peer into `RankLost` (never an internal error)."""
    global _PEER_LOST
    try:
        yield
    except RuntimeError as err:
        _PEER_LOST = True
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise RankLost(
            f"rank {rank()} lost contact with another process of the job during {what} (it "
            f"died or hung): {first}"
        ) from None


class RankStopped(PropdslError):
    """Another process of the job failed; this one stops too. `message` is that failure's (the
    CLI prints it on rank 0 only, so a job's error reads once)."""


def active() -> bool:
    """Whether this process is one of several in an initialised process group."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return _dist().get_rank() if active() else 0


def world() -> int:
    return _dist().get_world_size() if active() else 1


def is_main() -> bool:
    """Rank 0 (or the only process): the one that writes run folders and prints results."""
    return rank() == 0


def _dist():
    import torch.distributed as dist

    return dist


def env_world() -> int:
    """WORLD_SIZE as torchrun set it (1 outside torchrun)."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


def backend(cuda: bool | None = None) -> str:
    """gloo for CPU tensors, and NCCL for CUDA tensors where CUDA is available."""
    if cuda is None:
        cuda = torch.cuda.is_available()
    return "cpu:gloo,cuda:nccl" if cuda else "gloo"


def init_from_env() -> bool:
    """Join the process group torchrun describes (WORLD_SIZE > 1); False when there is none.

    Each process runs one torch thread unless the command says otherwise (`--threads`): N
    processes with several threads each oversubscribe the cores (on 2 cores a training loop ran
    tens of times slower)."""
    if env_world() <= 1 or active():
        return active()
    dist = _dist()
    if not dist.is_available():  # pragma: no cover - every torch wheel we support has it
        raise PropdslError("this torch build has no torch.distributed")
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    dist.init_process_group(backend=backend(cuda), timeout=TIMEOUT)
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(1)
    return True


def local_device() -> torch.device:
    """The GPU of this process in a distributed job: its LOCAL_RANK's. A usage error when the
    machine has fewer GPUs than processes (two processes on one GPU fail in NCCL)."""
    from propdsl.errors import UsageError

    local = int(os.environ.get("LOCAL_RANK", "0"))
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", str(local + 1)))
    count = torch.cuda.device_count()
    if per_node > count:
        raise UsageError(
            f"{per_node} processes on this machine but {count} GPU(s): start one process per GPU "
            "(--nproc / --nproc-per-node), or train on the CPU (--device cpu)"
        )
    return torch.device("cuda", local)


def finish(ok: bool) -> None:
    """The end of a command in a distributed job: after one that succeeded on this rank (`ok`),
    wait for the other ranks at a barrier; a peer already gone ends the wait at once."""
    dist = _dist()
    if ok and dist.is_available() and dist.is_initialized():
        try:
            dist.barrier()
        except Exception:  # noqa: BLE001 - a peer that failed: nothing left to wait for
            pass


def shutdown(ok: bool = False) -> None:
    """Leave the process group. After a command that succeeded on this rank (`ok`), first wait
    for the others at a barrier, so that no rank tears its group down while a peer's last
    collective is still in flight (a gloo worker then aborted a process at exit, rarely, on a
    loaded machine); a peer already gone ends the wait at once."""
    dist = _dist()
    if dist.is_available() and dist.is_initialized():
        if ok:
            try:
                dist.barrier()
            except Exception:  # noqa: BLE001 - a peer that failed: nothing left to wait for
                pass
        dist.destroy_process_group()


# -- sharding ----------------------------------------------------------------------------------


def shard_range(n: int, r: int | None = None, size: int | None = None) -> tuple[int, int]:
    """[lo, hi) of rank r's contiguous part of n items (this rank's by default): sizes differ by
    at most one, the first ranks take the larger parts."""
    r = rank() if r is None else r
    size = world() if size is None else size
    base, extra = divmod(n, size)
    lo = r * base + min(r, extra)
    return lo, lo + base + (1 if r < extra else 0)


def shard(items: Sequence[T]) -> Sequence[T]:
    """This rank's contiguous part of `items` (a list, a tensor along dim 0, a range)."""
    lo, hi = shard_range(len(items))
    return items[lo:hi]


def gather(part: list[T]) -> list[T]:
    """Every rank's `part` (lists, in rank order), concatenated on every rank: with `shard`
    the original order. Items travel pickled (tensors go to the CPU first)."""
    if not active():
        return list(part)
    parts: list[Any] = [None] * world()
    with _collective("a gather"):
        _dist().all_gather_object(parts, [_cpu(p) for p in part])
    return [item for p in parts for item in p]


def gather_rows(t: Tensor) -> Tensor:
    """Every rank's rows of `t` concatenated along dim 0 (on every rank, on t's device)."""
    if not active():
        return t
    parts: list[Any] = [None] * world()
    with _collective("a gather"):
        _dist().all_gather_object(parts, t.detach().cpu())
    return torch.cat(parts).to(t.device)


def _cpu(x: Any) -> Any:
    return x.detach().cpu() if isinstance(x, Tensor) else x


# -- agreement and collectives ---------------------------------------------------------------


def broadcast(value: T) -> T:
    """Rank 0's `value` on every rank (pickled)."""
    if not active():
        return value
    box = [value]
    with _collective("a broadcast"):
        _dist().broadcast_object_list(box, src=0)
    return box[0]


def from_main(fn: Callable[[], T]) -> T:
    """Run `fn` on rank 0 only and hand its result to every rank; when it raises, rank 0
    re-raises the error and every other rank raises `RankStopped` with its message, so no
    process waits for one that gave up."""
    if not active():
        return fn()
    error: BaseException | None = None
    payload: tuple[str, Any] = ("ok", None)
    if is_main():
        try:
            payload = ("ok", fn())
        except BaseException as err:  # noqa: BLE001 - re-raised below, after the others know
            error = err
            payload = ("error", _describe(err))
    kind, value = broadcast(payload)
    if error is not None:
        raise error
    if kind == "error":
        raise RankStopped(value)
    return value


def _describe(err: BaseException) -> str:
    if isinstance(err, KeyboardInterrupt):
        return "interrupted"
    text = str(err)
    return text if isinstance(err, PropdslError) else f"{type(err).__name__}: {text}"


def all_reduce_(t: Tensor) -> Tensor:
    """Sum `t` over the ranks, in place (no-op in one process)."""
    if active():
        with _collective("an all-reduce"):
            _dist().all_reduce(t)
    return t


def sync_gradients(params: Sequence[torch.nn.Parameter], stats: Tensor) -> Tensor:
    """Sum the gradients of `params` and the vector `stats` over the ranks with one all-reduce;
    returns the summed stats. A parameter without a gradient counts as zeros (a rank with no
    samples in a batch sends zeros)."""
    if not active():
        return stats
    flat = [
        (p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
        for p in params
        if p.requires_grad
    ]
    device = flat[0].device if flat else stats.device
    buffer = torch.cat(
        [*flat, stats.to(device=device, dtype=flat[0].dtype if flat else stats.dtype)]
    )
    with _collective("the gradient all-reduce"):
        _dist().all_reduce(buffer)
    offset = 0
    for p in params:
        if not p.requires_grad:
            continue
        k = p.numel()
        p.grad = buffer[offset : offset + k].view_as(p).clone()
        offset += k
    return buffer[offset:].to(stats.device, stats.dtype)


# -- random draws of a sharded batch ------------------------------------------------------------

_SLICE: contextvars.ContextVar[tuple[int, int, int] | None] = contextvars.ContextVar(
    "propdsl_global_draws", default=None
)


@contextlib.contextmanager
def global_draws(total: int, offset: int, count: int) -> Iterator[None]:
    """Within: a draw over a batch of `count` samples (rows offset..offset+count of a batch of
    `total`) takes the whole batch's random numbers and keeps its own rows (see `draw`)."""
    token = _SLICE.set((total, offset, count))
    try:
        yield
    finally:
        _SLICE.reset(token)


@dataclass(frozen=True)
class Shard:
    """This rank's rows [lo, hi) of a batch of `total`. A batch with fewer samples than ranks is
    not split (`sharded` False): every rank computes all of it, drawing the same numbers, so no
    rank is left without samples."""

    lo: int
    hi: int
    total: int
    sharded: bool

    @property
    def weight(self) -> float:
        """This rank's share of a batch mean: summed over the ranks, the shares are one."""
        return (self.hi - self.lo) / self.total if self.sharded else 1.0 / world()

    def gather(self, t: Tensor) -> Tensor:
        """The whole batch's rows from every rank's part `t` (the part itself unsharded)."""
        return gather_rows(t) if self.sharded else t


@contextlib.contextmanager
def sharded_batch(total: int) -> Iterator[Shard]:
    """This rank's `Shard` of a batch of `total` samples; within, random draws over it take the
    whole batch's numbers (`global_draws`), so each sample gets those of one process."""
    if not active() or total < world():
        yield Shard(0, total, total, False)
        return
    lo, hi = shard_range(total)
    with global_draws(total, lo, hi - lo):
        yield Shard(lo, hi, total, True)


def draw(
    fn: Callable[..., Tensor], shape: Sequence[int], *args: Any, batch_dim: int = 0, **kw: Any
) -> Tensor:
    """`fn(*args, shape, **kw)` (torch.rand, torch.randn, ...), drawn for the whole batch where a
    sharded batch is in force (`global_draws`) and the shape's `batch_dim` is this rank's sample
    count; then this rank's rows. Elsewhere a plain draw."""
    shape = tuple(int(s) for s in shape)
    current = _SLICE.get()
    if current is None or len(shape) <= batch_dim or shape[batch_dim] != current[2]:
        return fn(*args, shape, **kw)
    total, offset, count = current
    whole = list(shape)
    whole[batch_dim] = total
    return fn(*args, tuple(whole), **kw).narrow(batch_dim, offset, count)


# -- one machine, N processes ------------------------------------------------------------------


class JobFailed(PropdslError):
    """A process of a `launch`ed job failed. `exit_code`: the code to exit with (rank 0's own,
    when it failed with one: it has printed its error); `died`: a line naming a process that a
    signal killed (None when every failed process exited with an error of its own)."""

    def __init__(self, message: str, exit_code: int, died: str | None):
        super().__init__(message)
        self.exit_code = exit_code
        self.died = died


def launch(args: Sequence[str], nproc: int) -> None:
    """Run `python -m propdsl ARGS` in `nproc` processes on this machine, as `torchrun
    --standalone --nproc-per-node NPROC -m propdsl ARGS` does (torch's elastic launcher, no
    restarts): they rendezvous on a free local port. When a process fails or dies, the launcher
    stops the others and this raises `JobFailed`. Each process runs one torch thread unless
    OMP_NUM_THREADS (or the command's --threads) says otherwise."""
    import logging
    import signal
    import sys
    import uuid

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=nproc,
        run_id=f"propdsl-{uuid.uuid4().hex[:8]}",
        rdzv_backend="c10d",
        rdzv_endpoint="localhost:0",
        max_restarts=0,
        monitor_interval=0.1,
    )
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    # The launcher's own log lines (which process it stops, a box of failures) repeat what the
    # error below says; the processes print their own errors.
    # (its modules' loggers set their own levels: quiet each of them while the job runs)
    import torch.distributed.elastic.agent.server.api  # noqa: F401 - creates the agent's logger

    names = ["torch.distributed.elastic"] + [
        n for n in logging.Logger.manager.loggerDict if n.startswith("torch.distributed.elastic.")
    ]
    levels = {n: logging.getLogger(n).level for n in names}
    for n in names:
        logging.getLogger(n).setLevel(logging.CRITICAL)
    try:
        elastic_launch(config, sys.executable)("-m", "propdsl", *args)
    except SignalException:
        # Ctrl-C or SIGTERM: the launcher passed it on to the processes, which stop as one
        # process does (rank 0 says what the run folder keeps)
        raise KeyboardInterrupt from None
    except ChildFailedError as err:
        failures = err.failures
        died = None
        exited = [r for r, f in sorted(failures.items()) if f.exitcode > 0]
        # SIGTERM is how the launcher stops the others once one failed: it names a death only
        # when no process failed by itself. A SIGABRT is how the backend's teardown may end a
        # process whose peer has gone: a consequence, named after any other signal, and not
        # at all when rank 0 failed by itself (it printed the job's error; its exit code is
        # the job's). A rank 0 killed by a signal is always named: the others print nothing.
        killed = sorted(
            failures.items(),
            key=lambda f: (
                f[1].exitcode == -signal.SIGTERM,
                f[1].exitcode == -signal.SIGABRT,
                f[0],
            ),
        )
        for r, failure in killed:
            if failure.exitcode >= 0 or (failure.exitcode == -signal.SIGTERM and exited):
                continue
            if failure.exitcode == -signal.SIGABRT and 0 in exited:
                continue
            try:
                name = signal.Signals(-failure.exitcode).name
            except ValueError:
                name = f"signal {-failure.exitcode}"
            died = f"process rank {r} (pid {failure.pid}) was killed by {name}"
            break
        first = failures[0] if 0 in exited else failures[exited[0] if exited else min(failures)]
        code = first.exitcode if first.exitcode > 0 else 1
        ranks = ", ".join(str(r) for r in sorted(failures))
        raise JobFailed(
            died or f"process rank {ranks} failed (exit code {first.exitcode})", code, died
        ) from None
    finally:
        for n, old in levels.items():
            logging.getLogger(n).setLevel(old)
