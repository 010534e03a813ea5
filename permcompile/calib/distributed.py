"""Several processes (GPUs, or CPU ranks with gloo) sharing the calibration work: data parallel over batches.

Why data parallel: blocks are processed in order (block i's inputs come from the pruned blocks before it),
so splitting the *model* across ranks would leave all but one idle; splitting the *calibration batches*
keeps every rank busy on the same block. Each rank runs its share of the batches through the block (only
that block on its device: memory per rank is one block plus its share of activations, the model itself
stays in host memory), the per-layer statistics (``XᵀX``, ``Σx²``, token counts) are summed across ranks
with ``all_reduce``, and every rank then makes the same deterministic decision (permutation, mask, OBS
update) from the same sums, so all ranks end with the same weights and rank 0 writes the output.

Nothing here starts processes: ``torchrun ... -m permcompile optimize`` initialises the group
(permcompile/launch.py), or a caller does (``torch.distributed.init_process_group``, as the tests do);
without an initialised group everything is a no-op.
"""
from __future__ import annotations

import torch

from ..errors import PermcompileError


def world() -> tuple[int, int]:
    """``(rank, world size)`` of the default process group, ``(0, 1)`` when there is none."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def shard(batches: list) -> list:
    """This rank's share of ``batches`` (every ``world``-th batch, starting at ``rank``)."""
    rank, size = world()
    if size == 1:
        return batches
    if len(batches) < size:
        from ..errors import UsageError

        raise UsageError(f"{len(batches)} calibration batches cannot be shared by {size} processes: "
                         "give more calibration samples")
    from .data import CalibrationBatches

    # each share remembers its batches' places in the whole set: a pass that holds some batches out (the
    # reconstruction's held-out check) must hold out the same ones in every process
    whole = batches if isinstance(batches, CalibrationBatches) else CalibrationBatches(batches)
    return whole.share(rank, size)


def all_reduce_sum_(tensors: list[torch.Tensor]) -> None:
    """Sum each tensor over the ranks, in place (the same order on every rank; a no-op in one process)."""
    if world()[1] == 1:
        return
    import torch.distributed as dist

    nccl = dist.get_backend() == "nccl"  # NCCL reduces CUDA tensors only, gloo CPU ones (and some CUDA)
    for t in tensors:
        if nccl and t.device.type != "cuda":
            buf = t.to(f"cuda:{torch.cuda.current_device()}")
            dist.all_reduce(buf, op=dist.ReduceOp.SUM)
            t.copy_(buf)
        elif not nccl and t.device.type != "cpu":
            buf = t.cpu()
            dist.all_reduce(buf, op=dist.ReduceOp.SUM)
            t.copy_(buf)
        else:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)


def all_reduce_counts(counts: list[int]) -> list[int]:
    """Sum integer counts over the ranks."""
    if world()[1] == 1:
        return list(counts)
    t = torch.tensor(counts, dtype=torch.float64)
    all_reduce_sum_([t])
    return [int(round(float(x))) for x in t]


def same_on_every_rank(value: int, message: str) -> None:
    """Raise ``UsageError(message)`` on every rank unless every rank holds the same ``value`` (one process: no-op).

    E.g. ``--resume``: each rank restores its own checkpoint, and all must restart at the same block."""
    size = world()[1]
    if size == 1:
        return
    total, squares = all_reduce_counts([value, value * value])
    if total * total != size * squares:  # equality in Cauchy-Schwarz: all values equal
        from ..errors import UsageError

        raise UsageError(message)


# --- results rank 0 computes alone, and the check that every rank ended with the same weights ---------------

class RankFailed(PermcompileError):
    """Another rank failed: this one stops too, with that rank's exit status."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code


# The rendezvous store, when permcompile/launch.py initialised the group: rank 0 publishes there what the
# others wait for, so a wait may outlast the collective timeout (rank 0's permutation search, its export).
_STORE = None
_SEQ = [0]  # every rank makes the same calls in the same order: the n-th result is key "result/n"
WAIT_FOR_RANK0_S = 24 * 3600.0  # rank 0's permutation search, export, verify and TensorRT build of a large model


def use_store(store) -> None:
    """Where :func:`from_rank0` publishes (None: a collective broadcast on the default group)."""
    global _STORE
    _STORE = store
    _SEQ[0] = 0


def publish(key: str, value) -> None:
    """Rank 0: put ``value`` (picklable) in the store under ``key``."""
    import pickle

    if _STORE is not None:
        _STORE.set(key, pickle.dumps(value))


def wait_for(key: str, timeout_s: float = WAIT_FOR_RANK0_S):
    """Ranks > 0: the value rank 0 publishes under ``key``; :class:`RankFailed` if rank 0 published its exit
    status (``status``) instead, or nothing came within ``timeout_s``. Polls, so a dead rank 0 is noticed
    too (its store, or torchrun's agent, closes the connection: an error here)."""
    import pickle
    import time

    deadline = time.monotonic() + timeout_s
    pause = 0.05
    while True:
        if _STORE.check([key]):
            return pickle.loads(_STORE.get(key))  # our own rank 0 wrote it
        if key != "status" and _STORE.check(["status"]):
            code, message = pickle.loads(_STORE.get("status"))
            raise RankFailed(f"rank 0 failed ({message})" if code else "rank 0 ended early", code or 1)
        if time.monotonic() > deadline:
            raise RankFailed(f"rank 0 gave no result ({key}) within {timeout_s:.0f} s")
        time.sleep(pause)
        pause = min(1.0, pause * 2)


def from_rank0(fn):
    """``fn()`` run on rank 0 only and its (picklable) result given to every rank; ``fn()`` itself in one
    process. Used where ranks could disagree (a search on the calibration batches, non-deterministic kernels)
    and the work is not shared anyway: the others wait instead of repeating it."""
    rank, size = world()
    if size == 1:
        return fn()
    import torch.distributed as dist

    _SEQ[0] += 1
    key = f"result/{_SEQ[0]}"
    if _STORE is None:  # a group the caller initialised (tests): a broadcast, bounded by the group's timeout
        box = [None]
        if rank == 0:
            try:
                box = [("ok", fn())]
            except BaseException as exc:
                dist.broadcast_object_list([("error", f"{type(exc).__name__}: {exc}")], src=0)
                raise
        dist.broadcast_object_list(box, src=0)
        kind, value = box[0]
        if kind == "error":
            raise RankFailed(f"rank 0 failed: {value}")
        return value
    if rank > 0:
        kind, value = wait_for(key)
        if kind == "error":
            raise RankFailed(f"rank 0 failed: {value}")
        return value
    try:
        value = fn()
    except BaseException as exc:
        publish(key, ("error", f"{type(exc).__name__}: {exc}"))
        raise
    publish(key, ("ok", value))
    return value


def check_same_weights(model: torch.nn.Module) -> int:
    """How many of ``model``'s parameters and buffers differ (bit for bit) from rank 0's, summed over the
    ranks (0 in one process), with a warning when any does. Every rank decides from the same all-reduced sums,
    so a difference means a non-deterministic kernel: the output, written by rank 0 alone, is still rank 0's
    model, but its statistics mixed slightly different weights."""
    rank, size = world()
    if size == 1:
        return 0
    import hashlib

    def digest(t: torch.Tensor) -> str:
        flat = t.detach().cpu().contiguous().reshape(-1)
        return hashlib.sha1(flat.view(torch.uint8).numpy().data if flat.numel() else b"").hexdigest()

    mine = [digest(t) for _, t in sorted([*model.named_parameters(), *model.named_buffers()],
                                          key=lambda item: item[0])]
    reference = from_rank0(lambda: mine)
    differ = all_reduce_counts([sum(a != b for a, b in zip(mine, reference)) + abs(len(mine) - len(reference))])[0]
    if differ:
        import warnings

        warnings.warn(f"{differ} weight tensors differ between the {size} ranks (non-deterministic kernels?); the "
                      "output is rank 0's model", stacklevel=2)
    return differ
