"""``torchrun --nproc-per-node N -m permcompile optimize MODEL --out OUT``: one command, several processes.

Why: calibration, the OBS statistics and the reconstruction run every calibration batch through the model,
block by block; with N processes each runs 1/N of the batches and the statistics are summed
(calib/distributed.py). Every rank loads the model and makes the same decisions from the same sums; rank 0
alone searches the permutations (the others take its result), writes OUT, exports and verifies. The others
never touch OUT (no lock, no temporary folder), wait for rank 0 and exit with its status.

Failures: every collective has a timeout (``PERMCOMPILE_DIST_TIMEOUT`` seconds, default 1800); a rank that
fails publishes its exit status in the rendezvous store and leaves the group, so the others stop at their
next collective (gloo sees the closed connection at once; torchrun's agent also stops the other workers when
one exits non-zero) instead of waiting forever.
"""
from __future__ import annotations

import os

TIMEOUT_ENV = "PERMCOMPILE_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 1800.0

_CLEANUP: list = []  # folders a rank > 0 removes once rank 0 succeeded (its reconstruction checkpoint)


def launched() -> bool:
    """True when torchrun (or another launcher setting its variables) started this process with others."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ
    except ValueError:
        return False


def is_writer() -> bool:
    """Whether this process writes the output: rank 0, or the only process."""
    from .calib.distributed import world

    return world()[0] == 0


def local_device(device: str) -> str:
    """``--device`` for this rank: ``cuda`` becomes ``cuda:LOCAL_RANK`` under torchrun (one GPU per process)."""
    from .errors import UsageError

    if not launched() or not str(device).startswith("cuda"):
        return device
    if str(device) != "cuda":
        raise UsageError(f"--device {device} with {os.environ['WORLD_SIZE']} processes: give --device cuda "
                         "(each process uses cuda:LOCAL_RANK)")
    return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"


def _timeout_s() -> float:
    from .errors import UsageError

    text = os.environ.get(TIMEOUT_ENV, "")
    try:
        value = float(text) if text else DEFAULT_TIMEOUT_S
    except ValueError:
        value = -1.0
    if not value > 0:
        raise UsageError(f"{TIMEOUT_ENV} must be a positive number of seconds, got {text!r}")
    return value


def _exit_status(exc: BaseException) -> int:
    from .errors import PermcompileError

    if isinstance(exc, SystemExit):
        return exc.code if isinstance(exc.code, int) else 1
    if isinstance(exc, KeyboardInterrupt):
        return getattr(exc, "exit_status", 130)
    return int(getattr(exc, "exit_code", 1)) if isinstance(exc, PermcompileError) else 1


def _start(device: str):
    """Join the group torchrun's variables describe; returns the store rank 0 publishes in."""
    import datetime

    import torch
    import torch.distributed as dist

    from .calib.distributed import use_store

    timeout = datetime.timedelta(seconds=_timeout_s())
    backend = "gloo"
    if str(device).startswith("cuda"):
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        backend = "nccl"
    try:
        store, rank, size = next(dist.rendezvous("env://", timeout=timeout))
        dist.init_process_group(backend, store=store, rank=rank, world_size=size, timeout=timeout)
    except Exception as exc:  # noqa: BLE001 - a rank that never came (it failed its argument checks, say)
        from .calib.distributed import RankFailed

        first = (str(exc).strip().splitlines() or [""])[0][:300]
        raise RankFailed(f"rank {os.environ.get('RANK')}: the {os.environ.get('WORLD_SIZE')} processes did not all "
                         f"join within {timeout.total_seconds():.0f} s ({TIMEOUT_ENV}): {first}") from exc
    store = dist.PrefixStore("permcompile", store)
    use_store(store)
    if rank > 0:  # rank 0 prints the same warnings; progress output is already off (see pipeline.optimize)
        import warnings

        warnings.filterwarnings("ignore")
    return store


def _stop() -> None:
    import torch.distributed as dist

    from .calib.distributed import use_store

    use_store(None)
    if dist.is_initialized():
        dist.destroy_process_group()


def run_ranked(fn, device: str = "cpu"):
    """Run one command ``fn`` in this process; under torchrun, as one rank of the group (``fn`` is
    :func:`permcompile.pipeline.optimize` behind the CLI: rank 0 does everything, the others only the shared
    compression, then wait for rank 0). Every rank ends with rank 0's exit status."""
    if not launched():
        return fn()
    import pickle
    import shutil

    import torch.distributed as dist

    from .calib.distributed import RankFailed, wait_for, world

    store = _start(device)
    rank, size = world()
    try:
        result = fn()
        if rank > 0:
            code, message = wait_for("status")  # rank 0 exports, verifies (builds an engine) meanwhile
            if code:
                raise RankFailed(f"stopped: {message}", code)
    except BaseException as exc:
        raise _failed(store, rank, size, exc) from None
    if rank == 0:
        store.set("status", pickle.dumps((0, "")))
    try:
        dist.barrier()  # every rank has read the status before rank 0 (maybe the store's host) exits
    except Exception:  # noqa: BLE001 - rank 0's output is written: a rank gone at the very end changes nothing
        pass
    for folder in _CLEANUP:
        shutil.rmtree(folder, ignore_errors=True)
    _CLEANUP.clear()
    _stop()
    return result


def _failed(store, rank: int, size: int, exc: BaseException) -> BaseException:
    """Publish this rank's failure, leave the group; returns what to raise (another rank's failure when that
    is what broke this one's collective)."""
    import pickle

    from .calib.distributed import RankFailed

    code = _exit_status(exc)
    mine = f"rank {rank}: {type(exc).__name__}: {exc}".splitlines()[0][:500]
    if not isinstance(exc, RankFailed):
        other = _failure_elsewhere(store, rank, size)
        if other is not None and not _is_own_error(exc):  # the other rank's failure cut this one's wire
            code, mine = other
            exc = RankFailed(f"stopped: {mine}", code)
    try:
        store.set(f"failed/{rank}", pickle.dumps((code, mine)))
        if rank == 0:
            store.set("status", pickle.dumps((code, mine)))
    except Exception:  # noqa: BLE001 - the store went with rank 0 (not under torchrun)
        pass
    _CLEANUP.clear()
    _stop()  # leaving the group: the others' next collective fails at once instead of timing out
    if rank == 0:  # rank 0 may host the store: give the others a moment to read why before it goes
        _wait_for_others(store, size)
    return exc


def _wait_for_others(store, size: int, grace_s: float = 10.0) -> None:
    """Until every other rank has published its failure (it read rank 0's status), at most ``grace_s``."""
    import time

    deadline = time.monotonic() + grace_s
    try:
        while time.monotonic() < deadline and not store.check([f"failed/{r}" for r in range(1, size)]):
            time.sleep(0.1)
    except Exception:  # noqa: BLE001 - nothing to wait for without a store
        pass


def _failure_elsewhere(store, rank: int, size: int):
    """``(exit status, message)`` another rank published, or None."""
    import pickle

    try:
        for other in [0, *range(1, size)]:
            if other != rank and store.check([f"failed/{other}"]):
                return pickle.loads(store.get(f"failed/{other}"))
    except Exception:  # noqa: BLE001 - no store left: nothing to learn
        return None
    return None


def _is_own_error(exc: BaseException) -> bool:
    """A failure of this rank's own (bad input, a failed check), not a broken connection to a failed peer."""
    from .errors import PermcompileError

    return isinstance(exc, (PermcompileError, KeyboardInterrupt, SystemExit))


def clean_up_on_success(folders) -> None:
    """Remove ``folders`` (this rank's checkpoints) once rank 0 has written OUT, in :func:`run_ranked`."""
    _CLEANUP.extend(folders)


__all__ = ["launched", "run_ranked", "clean_up_on_success", "local_device", "is_writer"]
