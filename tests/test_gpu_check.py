"""benchmarks/gpu_check.sh without a GPU: one line, exit 0, nothing written (the CI machines have no CUDA)."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from _helpers import SAFETY_S

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_gpu_check_without_cuda_says_so_and_exits_0(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: the script would measure")
    env = dict(os.environ, OUT=str(tmp_path))
    env.pop("GPU_CHECK_DRY_RUN", None)
    run = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh")], capture_output=True, text=True,
                         env=env, timeout=SAFETY_S)
    assert run.returncode == 0, run.stderr
    assert len(run.stdout.strip().splitlines()) == 1 and "no CUDA device" in run.stdout
    assert not any(tmp_path.iterdir())
