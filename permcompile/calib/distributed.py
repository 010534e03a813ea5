"""Several processes (GPUs, or CPU ranks with gloo) sharing the calibration work: data parallel over batches.

Why data parallel: blocks are processed in order (block i's inputs come from the pruned blocks before it),
so splitting the *model* across ranks would leave all but one idle; splitting the *calibration batches*
keeps every rank busy on the same block. Each rank runs its share of the batches through the block (only
that block on its device: memory per rank is one block plus its share of activations, the model itself
stays in host memory), the per-layer statistics (``XᵀX``, ``Σx²``, token counts) are summed across ranks
with ``all_reduce``, and every rank then makes the same deterministic decision (permutation, mask, OBS
update) from the same sums, so all ranks end with the same weights and rank 0 writes the output.

Nothing here starts processes: launch with ``torchrun`` (or ``torch.multiprocessing``) and call
``torch.distributed.init_process_group`` first; without an initialised group everything is a no-op.
"""
from __future__ import annotations

import torch


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
    return batches[rank::size]


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
