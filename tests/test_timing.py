"""Process memory helpers (permcompile/timing.py)."""
from __future__ import annotations

import ctypes
import subprocess
import sys

import pytest

from permcompile.timing import map_large_allocations

# in a child, the setting being process-wide: a 16 MiB block freed (glibc then serves blocks up to 16 MiB from
# its heap), 64 blocks of 4 MiB, every other one freed: how many MiB went back to the system
_CHILD = """
import sys, torch
from permcompile.timing import map_large_allocations, rss_bytes
print(map_large_allocations() if sys.argv[1] == "set" else None)
big = torch.ones(4 << 20); del big
keep = [torch.ones(1 << 20) for _ in range(64)]
before = rss_bytes()
del keep[::2]
print((before - rss_bytes()) >> 20)
"""


def _glibc() -> bool:
    try:
        return sys.platform.startswith("linux") and hasattr(ctypes.CDLL("libc.so.6"), "mallopt")
    except OSError:
        return False


def _returned(mode: str) -> tuple[str, int]:
    out = subprocess.run([sys.executable, "-c", _CHILD, mode], capture_output=True, text=True, check=True)
    flag, mib = out.stdout.split()
    return flag, int(mib)


@pytest.mark.skipif(not _glibc(), reason="glibc only")
def test_freed_large_blocks_go_back_to_the_system_unless_the_user_chose_a_threshold(monkeypatch):
    assert _returned("default")[1] < 32  # glibc's own choice: the freed blocks stay resident (holes in its heap)
    flag, mib = _returned("set")
    assert flag == "True" and mib >= 120  # 32 x 4 MiB returned
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "131072")
    assert map_large_allocations() is False
