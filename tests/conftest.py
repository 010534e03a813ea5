"""Shared fixtures. Everything runs offline: no hub access, quiet transformers logging."""
from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_VERBOSITY"] = "error"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Each xdist worker's torch would start one OpenMP thread per core and spin between ops: two workers on two cores
# fight with four spinning threads. One thread per worker, waiting passively (set before torch is imported; the
# CLI subprocesses the tests start inherit it). A serial run (`-n 0`) keeps torch's defaults.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from pathlib import Path  # noqa: E402
from typing import Callable  # noqa: E402

import pytest  # noqa: E402

# ------------------------------------------------------------------------------------------ parallel test runs
# The default run uses two pytest-xdist workers (the `dev` extra installs it): `python -m pytest -q` as in the README
# and .ci/run. Set here rather than as `-n 2` in pyproject's addopts so that `-p no:xdist`, or an environment
# without xdist, still runs the suite serially instead of refusing `-n`. `-n 0` runs serially, `-n N` picks N.
DEFAULT_WORKERS = 2


@pytest.hookimpl(tryfirst=True)
def pytest_cmdline_main(config):
    """Without ``-n`` (or ``--dist``/``--tx``), run on ``DEFAULT_WORKERS`` (at most one per core) with
    ``--dist loadgroup`` (see :func:`pytest_collection_modifyitems`). Not in a worker, nor with ``--pdb`` or
    ``--collect-only``."""
    option = config.option
    if (not config.pluginmanager.hasplugin("xdist") or hasattr(config, "workerinput")
            or getattr(option, "numprocesses", None) is not None or getattr(option, "dist", "no") != "no"
            or getattr(option, "tx", None) or option.usepdb or option.collectonly):
        return
    workers = min(DEFAULT_WORKERS, os.cpu_count() or 1)
    if workers > 1:
        option.numprocesses, option.dist = workers, "loadgroup"


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node):
    """xdist, controller side: a worker parses the command line again, where a ``--dist`` set above is absent;
    tell it in its ``workerinput`` (read by :func:`pytest_collection_modifyitems`)."""
    node.workerinput["permcompile_dist"] = node.config.getvalue("dist")


def _shared_fixtures(item) -> list[str]:
    """The fixtures of ``item`` defined in tests/ (conftest.py or a test module) with a scope wider than one
    test: ``test_x.name`` for a module's own, ``name`` for conftest's (session)."""
    info = getattr(item, "_fixtureinfo", None)
    out = []
    for name, defs in (info.name2fixturedefs.items() if info is not None else ()):
        fixturedef = defs[-1]
        if fixturedef.scope == "function" or not fixturedef.baseid or name in CHEAP_SHARED:
            continue
        out.append(name if fixturedef.scope == "session" else f"{Path(item.nodeid.split('::')[0]).stem}.{name}")
    return out


# session fixtures cheap enough to build once per worker: they group nothing
CHEAP_SHARED = {"tiny_dir"}


@pytest.hookimpl(tryfirst=True)  # before xdist's own, which reads the groups
def pytest_collection_modifyitems(config, items):
    """Under ``--dist loadgroup``, session and module fixtures (each a full run or an export) would be built once
    per worker that runs one of their tests: every test that shares such a fixture with another, directly or
    through a chain of them, gets the same ``xdist_group``, so each is built once. Other tests are spread one by
    one."""
    workerinput = getattr(config, "workerinput", None)  # None: not an xdist worker
    if workerinput is None or workerinput.get("permcompile_dist") != "loadgroup":
        return
    config.option.loadgroup = True  # xdist's own hook (after this one) then adds each group to its tests' ids
    parent: dict[str, str] = {}

    def find(x: str) -> str:
        while parent.setdefault(x, x) != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    shared = {}
    for item in items:
        names = _shared_fixtures(item)
        shared[item] = names
        for name in names[1:]:
            parent[find(name)] = find(names[0])
    for item, names in shared.items():
        if names:
            item.add_marker(pytest.mark.xdist_group(find(names[0])))


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Callable[..., Path]:
    """Factory: ``tiny_dir("llama")`` saves the zoo model once per session and returns its folder.

    The folder is shared between tests: copy it (``shutil.copytree``) before modifying it.
    """
    from permcompile.testing import save_tiny

    cache: dict[tuple[str, int], Path] = {}

    def make(name: str, seed: int = 0) -> Path:
        key = (name, seed)
        if key not in cache:
            folder = tmp_path_factory.mktemp(f"tiny_{name}_{seed}")
            cache[key] = save_tiny(name, folder, seed=seed)
        return cache[key]

    return make


@pytest.fixture
def call_on_fifo(tmp_path) -> Callable:
    """``call_on_fifo(name, fn)``: make a named pipe ``tmp_path/name``, run ``fn(path)`` in a thread and return
    the exception it raised (None if none). Fails the test if ``fn`` opens the pipe for reading (which would
    block it until a writer comes): the event is seen as it happens, a writer opened without blocking then
    succeeds, and closing it gives the reader EOF so the thread ends. No time limit decides it (a loaded machine
    only makes ``fn`` slower); ``SAFETY_S`` bounds a ``fn`` hung elsewhere."""
    import threading
    import time

    from _helpers import SAFETY_S

    if not hasattr(os, "mkfifo"):
        pytest.skip("needs named pipes")

    def run(name: str, fn) -> BaseException | None:
        fifo = tmp_path / name
        os.mkfifo(fifo)
        box: dict = {}

        def target():
            try:
                fn(fifo)
            except BaseException as exc:  # noqa: BLE001
                box["exc"] = exc

        thread = threading.Thread(target=target, daemon=True)
        thread.start()
        blocked, deadline = False, time.monotonic() + SAFETY_S
        while thread.is_alive() and time.monotonic() < deadline:
            try:  # succeeds only while a reader has the pipe open, blocked or not
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
            except OSError:  # ENXIO: no reader (yet)
                thread.join(0.05)
            else:
                blocked = True
                break
        thread.join(SAFETY_S)
        assert not thread.is_alive(), f"{getattr(fn, '__name__', fn)} still runs after {SAFETY_S} s"
        assert not blocked, f"{getattr(fn, '__name__', fn)} opened a named pipe for reading"
        return box.get("exc")

    return run


@pytest.fixture(scope="session")
def forced_llama_output(tmp_path_factory, tiny_dir):
    """The tiny llama optimized (test_bad_inputs.FAST) over an old output at OUT: ``(OUT, refused, forced)``, the
    results of a run without ``--force`` (refused) and one with it (replaces the old output). One full run shared
    by test_bad_inputs.py (the --force tests, the verify tampering cases) and test_untrusted_inputs.py (hostile
    outputs given to verify). Read only: copy OUT before changing it."""
    import json

    from test_bad_inputs import optimize_cli

    target = tmp_path_factory.mktemp("forced") / "out"
    target.mkdir()
    (target / "report.json").write_text(json.dumps({"model": "old"}), encoding="utf-8")
    (target / "stale.txt").write_text("from an older run", encoding="utf-8")
    model = tiny_dir("llama")
    refused = optimize_cli(model, target)
    forced = optimize_cli(model, target, "--force")
    return target, refused, forced


@pytest.fixture(scope="session")
def hungarian_llama(tmp_path_factory, tiny_dir):
    """The tiny llama optimized with hungarian permutations, 4 x 32 calibration tokens, the graph traced ahead in a
    forked process (``prefetch_export=True``), its weights treated as past the 2 GB external-data limit (lowered
    to 1 KiB for the run: ``model.onnx`` + ``model.onnx.data``): an ``OptimizeResult``. One full run shared by
    test_export_prefetch.py (the prefetched pipeline passes its checks), test_large_export.py (a large model's
    output) and test_glue.py (the global-residual output that per-layer glue is compared with). Read only: copy
    ``out_dir`` before changing it."""
    from permcompile import OptimizeConfig, optimize
    from permcompile.export import onnx as onnx_export

    cfg = OptimizeConfig(permutation="hungarian", calib_samples=4, calib_seq_len=32)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(onnx_export, "EXTERNAL_DATA_THRESHOLD", 1024)
        return optimize(str(tiny_dir("llama")), tmp_path_factory.mktemp("hungarian_llama") / "out", cfg, quiet=True,
                        prefetch_export=True)


@pytest.fixture(scope="session")
def tiny_llama_onnx(tmp_path_factory):
    """``(model, {"fp16": path, "fp32": path})``: ``testing.zoo.tiny_llama()`` exported once per session, fp16 as a
    single file and fp32 with external data (input ``input_ids`` only). Shared by test_ort_slices.py (sliced runs)
    and test_evaluate.py (``OnnxModel`` on a causal LM). Read only: neither the model nor the files may change."""
    import torch

    from permcompile.export.onnx import export_onnx
    from permcompile.testing.zoo import tiny_llama

    model = tiny_llama().eval()
    example = {"input_ids": torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(0))}
    folder = tmp_path_factory.mktemp("tiny_llama_onnx")
    out = {}
    for precision, external in (("fp16", False), ("fp32", True)):
        path = folder / precision / "model.onnx"
        export_onnx(model, example, path, precision, external_data=external)
        out[precision] = path
    return model, out


@pytest.fixture(scope="session")
def bf16_llama_plan(tmp_path_factory):
    """The tiny llama saved in bf16 and optimized (hungarian, 2 x 16 calibration tokens, precision "auto")
    to ``engine.plan`` with a stand-in TensorRT builder (TensorRT cannot run here), sequence profile 1/16/32:
    ``(result, plan_path, builder_calls)``; the artifacts are in ``plan_path.with_suffix("")``. One full run shared
    by test_dtype.py (a bf16 checkpoint compiles in its dtype) and test_pipeline_trt.py (the engine step). Read
    only."""
    import torch

    from permcompile import OptimizeConfig, optimize
    from permcompile.export import tensorrt as trt_mod
    from permcompile.testing.zoo import tiny_llama

    folder = tmp_path_factory.mktemp("bf16_plan")
    tiny_llama().to(torch.bfloat16).save_pretrained(folder / "llama_bf16")
    calls: dict = {}

    def fake_build(onnx_path, plan_path, precision, profiles, sparse=True):
        calls.update(onnx=str(onnx_path), precision=precision, profiles=profiles, sparse=sparse)
        with open(plan_path, "wb") as fh:
            fh.write(b"not a real engine")
        return {"sparse_layers": ["stand-in"], "plan": str(plan_path)}

    plan = folder / "engine.plan"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(trt_mod, "build_engine", fake_build)
        result = optimize(str(folder / "llama_bf16"), plan,
                          OptimizeConfig(permutation="hungarian", calib_samples=2, calib_seq_len=16), quiet=True,
                          prefetch_export=False, seq_range=(1, 16, 32))
    return result, plan, calls
