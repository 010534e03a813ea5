"""``torchrun --nproc-per-node 2 -m permcompile optimize`` (permcompile/launch.py) on CPU ranks with gloo.

Rank 0 alone writes OUT; the result equals a one-process run; a failure on either rank stops every rank with
a non-zero status instead of leaving one waiting.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import pytest
import torch

from _helpers import SAFETY_S

ARGS = ["--calib-samples", "16", "--calib-seq-len", "32", "--device", "cpu", "--quiet"]
LIMIT_S = SAFETY_S  # a hung rank fails the test instead of the whole suite


@pytest.fixture(autouse=True)
def _gloo():
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE", HF_HUB_OFFLINE="1", **extra)
    return env


def _optimize(*args, env=None):
    return subprocess.run([sys.executable, "-m", "permcompile", "optimize", *map(str, args)], env=env or _env(),
                          capture_output=True, text=True, timeout=LIMIT_S)


def _torchrun(*args):
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                           "--master-addr", "127.0.0.1", "--master-port", str(_free_port()), "-m", "permcompile",
                           "optimize", *map(str, args)], env=_env(), capture_output=True, text=True,
                          timeout=LIMIT_S)


def _ranks(args_by_rank: list[list], **extra_env) -> list[tuple[int, str]]:
    """Start one process per rank with torchrun's variables set by hand (no agent to stop the others: this is
    what permcompile itself must do); returns each rank's (exit status, stderr)."""
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, "-m", "permcompile", "optimize", *map(str, args)],
                              env=_env(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(len(args_by_rank)),
                                       MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), **extra_env),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for r, args in enumerate(args_by_rank)]
    out = []
    for p in procs:
        try:
            _, err = p.communicate(timeout=LIMIT_S)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail("a rank was still running after the time limit")
        out.append((p.returncode, err))
    return out


def _weights(folder):
    from safetensors.torch import load_file

    out = {}
    for f in sorted((folder / "hf").glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


@pytest.mark.slow  # three full runs (one process, two torchrun ranks, verify): ~110 s on 2 cores
def test_torchrun_two_ranks_write_one_output_equal_to_one_process(tiny_dir, tmp_path):
    model = tiny_dir("llama")
    one = _optimize(model, "--out", tmp_path / "one", *ARGS)
    assert one.returncode == 0, one.stderr
    two = _torchrun(model, "--out", tmp_path / "two", *ARGS[:-1])
    assert two.returncode == 0, two.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one", "two"]  # no lock, temporary or second folder
    assert two.stdout.count("checks: ") == 1  # the summary comes from rank 0 only
    assert two.stderr.count("[permcompile] fold ...") == 1  # and so does the progress
    check = subprocess.run([sys.executable, "-m", "permcompile", "verify", str(tmp_path / "two")], env=_env(),
                           capture_output=True, text=True, timeout=LIMIT_S)
    assert check.returncode == 0, check.stdout + check.stderr
    a, b = _weights(tmp_path / "one"), _weights(tmp_path / "two")
    assert a.keys() == b.keys() and a
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-6, atol=1e-6, msg=name)


@pytest.mark.slow  # ~25 s; test_a_rank_that_never_starts_times_out covers a missing peer by default
def test_torchrun_failure_on_rank0_fails_the_launch(tiny_dir, tmp_path):
    (tmp_path / "taken").mkdir()  # OUT exists, no --force: rank 0 refuses, rank 1 must not go on alone
    run = _torchrun(tiny_dir("llama"), "--out", tmp_path / "taken", *ARGS)
    assert run.returncode != 0
    assert "already exists" in run.stderr
    assert list((tmp_path / "taken").iterdir()) == []


@pytest.mark.slow  # ~25 s
def test_rank0_failure_before_the_compression_stops_rank1(tiny_dir, tmp_path):
    (tmp_path / "taken").mkdir()
    args = [tiny_dir("llama"), "--out", tmp_path / "taken", *ARGS]
    (r0, e0), (r1, e1) = _ranks([args, args])
    assert r0 == 2 and "already exists" in e0
    assert r1 == 2 and "stopped: rank 0" in e1 and "already exists" in e1, e1


@pytest.mark.slow  # two ranks through a whole compression and export: ~60 s
def test_rank0_failure_after_the_compression_stops_rank1(tiny_dir, tmp_path):
    # --out X.plan without TensorRT: rank 0 fails at the engine build, while rank 1 waits for its status
    pytest.importorskip("onnxruntime")
    try:
        import tensorrt  # noqa: F401
        pytest.skip("TensorRT is installed: the engine build would not fail")
    except ImportError:
        pass
    args = [tiny_dir("llama"), "--out", tmp_path / "eng.plan", *ARGS]
    (r0, e0), (r1, e1) = _ranks([args, args])
    assert r0 == 2 and "TensorRT" in e0
    assert r1 == 2 and "stopped: rank 0" in e1, e1


@pytest.mark.slow  # ~35 s
def test_rank1_failure_stops_rank0(tiny_dir, tmp_path):
    # rank 1 alone fails in the calibration (1 sample cannot be shared by 2 processes); rank 0 would wait at
    # its first all-reduce: it must stop with rank 1's status, and write nothing
    model = tiny_dir("llama")
    good = [model, "--out", tmp_path / "out", *ARGS]
    bad = [model, "--out", tmp_path / "out", "--calib-samples", "1", *ARGS[2:]]
    (r0, e0), (r1, e1) = _ranks([good, bad])
    assert r1 == 2 and "cannot be shared" in e1
    assert r0 == 2 and "stopped: rank 1" in e0, e0
    assert list(tmp_path.iterdir()) == []


def test_a_rank_that_never_starts_times_out(tiny_dir, tmp_path):
    port = _free_port()
    started = time.monotonic()
    run = _optimize(tiny_dir("llama"), "--out", tmp_path / "out", *ARGS,
                    env=_env(RANK="0", LOCAL_RANK="0", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                             MASTER_PORT=str(port), PERMCOMPILE_DIST_TIMEOUT="3"))
    assert run.returncode == 1 and "did not all join" in run.stderr, run.stderr
    assert time.monotonic() - started < 60
    assert list(tmp_path.iterdir()) == []


def test_local_device(monkeypatch):
    from permcompile.errors import UsageError
    from permcompile.launch import launched, local_device

    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert not launched() and local_device("cuda") == "cuda"
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert launched() and local_device("cuda") == "cuda:1" and local_device("cpu") == "cpu"
    with pytest.raises(UsageError, match="--device cuda"):
        local_device("cuda:0")
