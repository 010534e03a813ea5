"""Hostile folders and files: an ``optimize`` output given to ``verify``, a model folder from a hub.

Both are untrusted input (permcompile/safepath.py): a path they name must not lead outside them, a symlink must
not carry a file from elsewhere in (or out), a named pipe must not hang the run, a config must not make us
allocate a model its weights do not hold, and JSON must not exhaust the parser. The error contract of
``test_bad_inputs.py`` holds: one ``error:`` line, a non-zero exit, no traceback, nothing half-written, the
inputs untouched.

One real run (the ``made`` fixture, shared with test_bad_inputs.py) makes the output the ``verify`` cases copy
and tamper with.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
from pathlib import Path

import pytest
import torch

from _helpers import child_at_marker, finish
from test_bad_inputs import FAST, assert_no_output, assert_one_error, describe, invoke, message_lines, snapshot

from permcompile.errors import UsageError, VerificationError


@pytest.fixture
def llama(tiny_dir, tmp_path) -> Path:
    """A private copy of the tiny llama folder (the tests change it)."""
    return Path(shutil.copytree(tiny_dir("llama"), tmp_path / "model"))


@pytest.fixture
def out(tmp_path) -> Path:
    return tmp_path / "out"


def _edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text(encoding="utf-8"))
    data.update(changes)
    path.write_text(json.dumps(data), encoding="utf-8")


def _rerecord_digests(folder: Path) -> None:
    """What someone 'fixing' report.json after editing files would do: the digests then match."""
    from permcompile.export.digests import file_digests

    _edit_json(folder / "report.json", files=file_digests(folder))


def _secret(tmp_path: Path) -> Path:
    secret = tmp_path / "id_rsa"
    secret.write_text("-----BEGIN PRIVATE KEY-----\nnot for anyone's output\n", encoding="utf-8")
    return secret


# ------------------------------------------------------------------------------------------------ verify
@pytest.fixture
def made(forced_llama_output) -> Path:
    """A complete output of the tiny llama: the session's shared run (conftest.py). Read only."""
    target, _, forced = forced_llama_output
    assert forced.exit_code == 0, describe(forced)
    return target


@pytest.fixture
def copy(made, tmp_path) -> Path:
    return Path(shutil.copytree(made, tmp_path / "copy"))


def _verify_json(folder: Path) -> dict:
    result = invoke(["verify", folder, "--json"])
    assert_one_error(result, 1, "checks failed")
    return {c["name"]: c for c in json.loads(result.stdout)}


@pytest.mark.parametrize("where", ["parent", "absolute"])
def test_verify_never_reads_recorded_paths_outside_the_output(where, copy, tmp_path):
    """report.json's file list names a file outside OUT, with its true digest: integrity fails, naming it."""
    secret = _secret(tmp_path)
    name = "../id_rsa" if where == "parent" else str(secret)
    report = json.loads((copy / "report.json").read_text())
    report["files"][name] = hashlib.sha256(secret.read_bytes()).hexdigest()
    (copy / "report.json").write_text(json.dumps(report), encoding="utf-8")
    checks = _verify_json(copy)
    assert not checks["integrity"]["passed"] and "outside" in checks["integrity"]["detail"], checks["integrity"]


def test_verify_refuses_weights_linked_from_elsewhere(copy, tmp_path):
    """hf/model.safetensors as a symlink to the same bytes elsewhere (digests match): refused, nothing loaded."""
    elsewhere = tmp_path / "elsewhere.safetensors"
    shutil.move(copy / "hf" / "model.safetensors", elsewhere)
    (copy / "hf" / "model.safetensors").symlink_to(elsewhere)
    assert_one_error(invoke(["verify", copy]), 1, "hf/model.safetensors", "symbolic link", "outside")


def test_verify_refuses_triton_graph_with_external_data_outside(copy, tmp_path):
    """The Triton copy of the graph stores its weights in a file outside OUT (what ONNX Runtime refuses to
    load); digests re-recorded: the graph check fails, naming the Triton copy."""
    import onnx

    graph = onnx.load(str(copy / "model.onnx"))
    outside = tmp_path / "stolen"
    outside.mkdir()
    onnx.save(graph, str(outside / "model.onnx"), save_as_external_data=True, location="weights.bin",
              size_threshold=0)
    graph = onnx.load(str(outside / "model.onnx"), load_external_data=False)
    for tensor in graph.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = "../../../../stolen/weights.bin"  # from copy/triton/model/1/ to tmp_path/stolen/
    triton_graph = copy / "triton" / "model" / "1" / "model.onnx"
    triton_graph.unlink()
    onnx.save(graph, str(triton_graph))
    _rerecord_digests(copy)
    checks = _verify_json(copy)
    assert not checks["onnx_load"]["passed"] and "triton/model/1" in checks["onnx_load"]["detail"], checks


def test_verify_refuses_a_named_pipe_without_opening_it(copy, call_on_fifo):
    from permcompile.export.verify import verify_artifacts

    (copy / "model.onnx").unlink()
    exc = call_on_fifo("copy/model.onnx", lambda path: verify_artifacts(path.parent))
    assert isinstance(exc, VerificationError) and "named pipe" in str(exc), exc


class _Built(BaseException):
    """Not an Exception: no ``except Exception`` on the way may turn it into a diagnosis after the fact."""


@pytest.fixture
def no_model_build(monkeypatch):
    """The model must be refused before transformers builds it (a tampered config would allocate gigabytes):
    building it fails the test."""
    import transformers

    def boom(*args, **kwargs):
        raise _Built("the model was built before its config was checked against the weights")

    for name in ("AutoModelForCausalLM", "AutoModel"):
        monkeypatch.setattr(getattr(transformers, name), "from_pretrained", boom)


BOMBS = {"dims": {"hidden_size": 16384, "intermediate_size": 65536},
         "layers": {"num_hidden_layers": 1_000_000}}


@pytest.mark.parametrize("case", sorted(BOMBS))
def test_verify_tampered_config_is_compared_with_the_weights_first(case, copy, no_model_build):
    _edit_json(copy / "hf" / "config.json", **BOMBS[case])
    _rerecord_digests(copy)
    checks = _verify_json(copy)
    assert not checks["hf_load"]["passed"] and "do not match config.json" in checks["hf_load"]["detail"], checks


def _deep(levels: int) -> str:
    return "[" * levels + "]" * levels


def test_verify_deeply_nested_report(copy):
    report = (copy / "report.json").read_text()
    (copy / "report.json").write_text(report[:-1] + f', "deep": {_deep(100_000)}}}', encoding="utf-8")
    assert_one_error(invoke(["verify", copy]), 2, "report.json", "nested")


def test_verify_deeply_nested_hf_config(copy):
    cfg = (copy / "hf" / "config.json").read_text()
    (copy / "hf" / "config.json").write_text(cfg.rstrip()[:-1] + f', "deep": {_deep(100_000)}}}', encoding="utf-8")
    _rerecord_digests(copy)
    checks = _verify_json(copy)
    assert not checks["hf_load"]["passed"] and "nested" in checks["hf_load"]["detail"], checks["hf_load"]


def test_verify_deeply_nested_quantization_plan(tmp_path):
    from permcompile.export.verify_quant import PLAN_FILE, load_plan

    (tmp_path / PLAN_FILE).write_text('{"mode": "int8", "layers": ' + _deep(100_000) + "}", encoding="utf-8")
    plan, checks = load_plan(tmp_path, {"quantization": {"mode": "int8"}})
    assert plan is None and not checks[0].passed and "nested" in checks[0].detail, checks


def test_eval_refuses_an_output_with_a_link_out_of_it(copy, tmp_path):
    from permcompile.evaluate import evaluate

    elsewhere = tmp_path / "elsewhere.safetensors"
    shutil.move(copy / "hf" / "model.safetensors", elsewhere)
    (copy / "hf" / "model.safetensors").symlink_to(elsewhere)
    text = tmp_path / "text.txt"
    text.write_text("Some words to evaluate on. " * 50, encoding="utf-8")
    with pytest.raises(UsageError, match="symbolic link"):
        evaluate(str(copy), str(text))


# ------------------------------------------------------------------------------------------------ model folders
def _refused(model: Path, out: Path, *fragments: str) -> None:
    before = snapshot(model)
    assert_one_error(invoke(["optimize", model, "--out", out, *FAST]), 2, *fragments)
    assert_no_output(out)
    assert snapshot(model) == before, "the input model was changed"


def test_linked_license_is_never_copied_into_the_output(llama, tmp_path, out):
    """A LICENSE that links to a private key: the folder is refused, and the copy of a folder's extra files
    (``copy_extra_files``) never follows a link out of it."""
    from permcompile.models import copy_extra_files

    (llama / "LICENSE").symlink_to(_secret(tmp_path))
    _refused(llama, out, "LICENSE", "symbolic link", "outside")
    dest = tmp_path / "dest"
    dest.mkdir()
    copied = copy_extra_files(llama, dest)
    assert "LICENSE" not in copied and not (dest / "LICENSE").exists(), copied


def test_hub_snapshot_links_to_its_blobs_are_followed(tiny_dir, tmp_path):
    """The Hub cache's own layout (snapshots/<rev>/* -> ../../blobs/<sha>) is a model folder like any other."""
    from permcompile.models import copy_extra_files

    repo = tmp_path / "models--org--tiny"
    snap = repo / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    (repo / "blobs").mkdir()
    (repo / "blobs" / "f00d").write_text("Apache-2.0\n", encoding="utf-8")
    (snap / "LICENSE").symlink_to(Path("../../blobs/f00d"))
    dest = tmp_path / "dest"
    dest.mkdir()
    assert copy_extra_files(snap, dest) == ["LICENSE"]
    assert (dest / "LICENSE").read_text(encoding="utf-8") == "Apache-2.0\n" and not (dest / "LICENSE").is_symlink()


def test_weights_linked_from_outside_the_folder(llama, tmp_path, out):
    outside = tmp_path / "elsewhere.safetensors"
    shutil.move(llama / "model.safetensors", outside)
    (llama / "model.safetensors").symlink_to(outside)
    _refused(llama, out, "model.safetensors", "outside")


@pytest.mark.parametrize("where", ["parent", "absolute"])
def test_weight_index_naming_shards_outside_the_folder(where, llama, tmp_path, out):
    from safetensors import safe_open

    outside = tmp_path / "shard.safetensors"
    shutil.move(llama / "model.safetensors", outside)
    with safe_open(str(outside), framework="pt") as fh:
        keys = list(fh.keys())
    name = "../shard.safetensors" if where == "parent" else str(outside)
    index = {"metadata": {}, "weight_map": {k: name for k in keys}}
    (llama / "model.safetensors.index.json").write_text(json.dumps(index), encoding="utf-8")
    _refused(llama, out, "weight shard", "shard.safetensors")


def test_named_pipe_in_a_model_folder(llama, call_on_fifo):
    """transformers opens generation_config.json of a causal LM: as a named pipe it would block forever."""
    from permcompile.models import load_model

    (llama / "generation_config.json").unlink()
    exc = call_on_fifo(f"{llama.name}/generation_config.json", lambda path: load_model(str(path.parent)))
    assert isinstance(exc, UsageError) and "named pipe" in str(exc), exc


@pytest.mark.parametrize("case", sorted(BOMBS))
def test_config_larger_than_its_weights(case, llama, out, no_model_build):
    _edit_json(llama / "config.json", **BOMBS[case])
    _refused(llama, out, "do not match config.json")


@pytest.mark.parametrize("name", ["config.json", "generation_config.json"])
def test_deeply_nested_json_in_a_model_folder(name, llama, out):
    """config.json is ours to read, generation_config.json transformers': neither may reach the parser unbounded."""
    path = llama / name
    path.write_text(path.read_text().rstrip()[:-1] + f', "deep": {_deep(100_000)}}}', encoding="utf-8")
    _refused(llama, out, name, "nested")


# ------------------------------------------------------------------------------------------------ degenerate layers
def _zero_layer_model():
    """The tiny llama with one all-zero linear (up_proj of block 0): its scores are all zero, and so are the
    inputs of the down_proj after it (an all-zero activation)."""
    from permcompile.models import wrap_module
    from permcompile.testing.zoo import build_tiny

    net = build_tiny("llama")
    with torch.no_grad():
        net.model.layers[0].mlp.up_proj.weight.zero_()
    return wrap_module(net, name="zero")


def _quick(strategy: str, **kwargs):
    """An OptimizeConfig for ``strategy`` with the searches cut short (their result does not matter here)."""
    from permcompile.config import LearnedConfig, OptimizeConfig, SearchConfig

    return OptimizeConfig(permutation=strategy, calib_samples=2, calib_seq_len=16,
                          search=SearchConfig(swap_trials=20, residual_trials=0),
                          learned=LearnedConfig(steps=2, block_size=16), **kwargs)


@pytest.mark.parametrize("strategy", ["none", "random", "greedy", "hungarian", "search", "learned"])
def test_all_zero_layer_is_kept_not_a_crash(strategy):
    """Every strategy (none too) and the reconstruction take a layer whose weights and inputs are all zero."""
    from permcompile.pipeline import compress_

    loaded = _zero_layer_model()
    c = compress_(loaded, _quick(strategy), quiet=True)
    assert all(0.0 <= r.kept_identity <= 1.0 and 0.0 <= r.kept_chosen <= 1.0 for r in c.group_results)
    assert torch.count_nonzero(loaded.model.model.layers[0].mlp.up_proj.weight) == 0
    assert all(torch.isfinite(p).all() for p in loaded.model.parameters())


# ------------------------------------------------------------------------------------------------ calibration text
@pytest.mark.parametrize("limit", [3 << 20, 3 << 20 | 1], ids=["inside-a-character", "at-a-boundary"])
def test_calibration_text_cut_at_the_read_limit(limit, tmp_path):
    """A file past the read limit (64 MiB by default; smaller here, same code) is cut at a character boundary
    whatever chunk the limit falls in, not rejected as 'not UTF-8'."""
    from permcompile.calib.text import read_text_file

    path = tmp_path / "big.txt"
    path.write_bytes(b"a" + "\u00e9".encode("utf-8") * (limit // 2 + 8))  # two-byte characters after one byte
    text = read_text_file(path, max_bytes=limit)
    assert text[0] == "a" and set(text[1:]) == {"\u00e9"}
    assert len(text.encode("utf-8")) == limit - (limit + 1) % 2  # a cut character is dropped, nothing else
    path.write_bytes(b"caf\xc3")  # a character cut by the end of the file itself is still an error
    with pytest.raises(UsageError, match="not UTF-8"):
        read_text_file(path)


@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
def test_deeply_nested_calibration_table(suffix, tiny_dir, tmp_path):
    from permcompile.calib.data import load_calibration
    from permcompile.models import load_model

    path = tmp_path / f"data{suffix}"
    path.write_text(_deep(100_000) + "\n", encoding="utf-8")
    with pytest.raises(UsageError, match="nested too deeply"):
        load_calibration(str(path), load_model(str(tiny_dir("llama"))), 2, 16, 0)


# ------------------------------------------------------------------------------------------------ signals and names
def test_sighup_is_handled_like_sigterm(llama, tmp_path):
    """An ssh session that drops sends SIGHUP: one line, exit 129, no OUT, no lock, no temporaries.

    The child says when it holds OUT's lock (the model is loaded next) and waits there for the signal: the test
    signals on that line, never after a delay (test_bad_inputs.py's SIGTERM test signals later, in the export)."""
    target = tmp_path / "out"
    patch = ("import signal, sys\n"
             "import permcompile.models as models\n"
             "real = models.load_model\n"
             "def load_model(*args, **kwargs):\n"  # called once OUT is reserved and locked
             "    print('TEST: locked', file=sys.stderr, flush=True)\n"
             "    signal.pause()\n"
             "    return real(*args, **kwargs)\n"
             "models.load_model = load_model\n")
    proc, _ = child_at_marker(patch, ["optimize", llama, "--out", target, *FAST], "TEST: locked")
    assert (tmp_path / ".out.lock").is_file()  # the run holds OUT
    proc.send_signal(signal.SIGHUP)
    err = finish(proc)
    assert proc.returncode == 129, err[-2000:]
    assert "Traceback" not in err
    lines = message_lines(err)
    assert len(lines) == 1 and lines[0].startswith("error: ") and "SIGHUP" in lines[0], err[-2000:]
    assert_no_output(target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


@pytest.fixture
def no_model_load(monkeypatch):
    import permcompile.models as models

    def boom(*args, **kwargs):
        raise AssertionError("the model was loaded before the output name was checked")

    monkeypatch.setattr(models, "load_model", boom)


@pytest.mark.parametrize("name,fragment", [(b"out\xff", "not valid UTF-8"), (b"o" * 240, "shorter name")],
                         ids=["not-utf8", "no-room-for-temporaries"])
def test_output_name_the_toolchain_cannot_take(name, fragment, llama, tmp_path, no_model_load):
    """Names the file system takes for OUT but the run cannot use: not UTF-8 (ONNX Runtime fails on it after the
    export), or too long for the temporary folder written next to OUT. Refused before any work."""
    target = Path(os.fsdecode(os.fsencode(str(tmp_path)) + b"/" + name))
    assert_one_error(invoke(["optimize", llama, "--out", target, *FAST]), 2, fragment)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


# ------------------------------------------------------------------------------------------------ --resume
@pytest.mark.parametrize("strategy", ["search", "learned"])
def test_resume_without_a_checkpoint_starts_over(strategy, tmp_path):
    """One rule for every resumable pass: no checkpoint yet (the run stopped before the pass saved anything) is
    no error, the pass starts from its beginning."""
    from permcompile.models import wrap_module
    from permcompile.pipeline import compress_
    from permcompile.testing.zoo import build_tiny

    c = compress_(wrap_module(build_tiny("llama")), _quick(strategy), quiet=True, resume=True,
                  checkpoint_dir=str(tmp_path))
    assert c.group_results and c.mask_result.layers
