"""Wall time and peak resident memory of each step of the pipeline (``report.json``'s ``timings`` and
``peak_memory_gib``). A step's peak is what tells a user which step to blame when a large model runs out of
memory."""
from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field


def rss_bytes() -> int:
    """This process's resident memory now (Linux ``/proc``; 0 where it cannot be read)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def map_large_allocations(threshold: int = 1 << 20) -> bool:
    """glibc only: serve allocations of ``threshold`` bytes or more with their own memory mappings, so memory
    freed by one step is returned to the system instead of staying resident for the next; True if set. A
    ``MALLOC_MMAP_THRESHOLD_`` in the environment is the user's choice and is left alone.

    Why: glibc raises its mmap threshold (up to 32 MiB) each time a mapped block is freed; blocks below it then
    come from the heap, and the heap keeps freed memory resident (fragmented between live blocks). Measured on
    6 Llama-3.2-1B-shaped layers, ``--quantize fp8`` (benchmarks/results/memory_scaling_quant_fp8_6l*.md): peak
    3.19 GiB by default, 2.89 GiB with a fixed 1 MiB threshold, every step 0.2-0.6 GiB lower; reconstruction took
    6-10 % longer in a 1-layer probe (the kernel zeroes each fresh mapping)."""
    if "MALLOC_MMAP_THRESHOLD_" in os.environ or not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(-3, int(threshold)))  # M_MMAP_THRESHOLD; also ends the dynamic adjustment
    except (OSError, AttributeError):  # not glibc (musl, ...): nothing to set
        return False


class PeakRSS:
    """Highest resident memory of this process while a step runs, sampled every ``interval`` s by a daemon
    thread."""

    def __init__(self, interval: float = 0.05):
        import threading

        self.peak = rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(interval,), daemon=True)
        self._thread.start()

    def _run(self, interval: float) -> None:
        while not self._stop.wait(interval):
            self.peak = max(self.peak, rss_bytes())

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return max(self.peak, rss_bytes())


@dataclass
class StepTimer:
    """Wall time (``timings``, s) and peak resident memory (``memory_gib``) of each step of the pipeline."""
    timings: dict = field(default_factory=dict)
    quiet: bool = False
    memory_gib: dict = field(default_factory=dict)

    def step(self, name: str):
        timer = self

        class _Ctx:
            def __enter__(self):
                self.start = time.perf_counter()
                self.watch = PeakRSS()
                if not timer.quiet:
                    print(f"[permcompile] {name} ...", file=sys.stderr, flush=True)
                return self

            def __exit__(self, *exc):
                timer.timings[name] = round(time.perf_counter() - self.start, 3)
                peak = self.watch.stop()
                if peak:
                    timer.memory_gib[name] = round(peak / 2**30, 3)
                return False

        return _Ctx()


__all__ = ["map_large_allocations", "rss_bytes", "PeakRSS", "StepTimer"]
