"""Bad and hostile inputs to the ``permcompile`` command line and the Python API.

Every case must end with a non-zero exit code (2 for usage errors, 1 for failed checks), exactly one
``error: ...`` line on stderr (progress bars aside, see ``test_quiet_means_no_progress_bars``), no traceback,
and no output: neither OUT nor a ``.tmp-`` folder may be left behind.

Almost every case fails before the ONNX export, so they are cheap; one full run (``old_and_forced``) makes a
real output that the ``verify`` tampering tests copy.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from _helpers import SAFETY_S, child_at_marker, finish  # noqa: E402
from permcompile.cli import main  # noqa: E402
from permcompile.config import OptimizeConfig, SearchConfig, Sparsity  # noqa: E402
from permcompile.errors import UsageError  # noqa: E402

FAST = ["--quiet", "--calib-samples", "2", "--calib-seq-len", "16", "--permutation", "none"]
_PROGRESS = re.compile(r"\r|\d+%\|")  # tqdm bars written by transformers ("Loading weights ...")
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0
DEFAULT_IMAGES = Path(__file__).resolve().parents[1] / "permcompile" / "calib" / "default" / "images"



# ------------------------------------------------------------------------------------------------ helpers
def invoke(args: list, input: str | None = None) -> "object":
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=True, input=input)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


def describe(result) -> str:
    return f"exit {result.exit_code}\n--- stdout\n{result.stdout[-2000:]}\n--- stderr\n{result.stderr[-2000:]}"


def message_lines(stderr: str) -> list[str]:
    return [ln for ln in stderr.splitlines() if ln.strip() and not _PROGRESS.search(ln)]


def assert_one_error(result, code: int | None = 2, *fragments: str) -> str:
    """Exit ``code`` (any non-zero when None), one 'error:' line (progress bars aside), no traceback."""
    if code is None:
        assert result.exit_code != 0, describe(result)
    else:
        assert result.exit_code == code, describe(result)
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout, describe(result)
    lines = message_lines(result.stderr)
    assert len(lines) == 1 and lines[0].startswith("error: "), describe(result)
    for frag in fragments:
        assert frag.lower() in lines[0].lower(), (frag, lines[0])
    return lines[0]


def assert_no_output(out: Path) -> None:
    assert not out.exists(), f"{out} was created"
    assert not out.with_name(out.name + ".failed").exists()
    parent = out.parent
    if parent.is_dir():
        left = [p.name for p in parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name]
        assert left == [], f"temporary folders left behind: {left}"
        assert not (parent / f".{out.name}.lock").exists(), "the output lock was left behind"


def snapshot(folder: Path) -> dict:
    """Every file under ``folder`` and its bytes: inputs must come out of a failed run as they went in."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def copy_model(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest)
    return dest


@pytest.fixture
def llama(tiny_dir) -> Path:
    return tiny_dir("llama")


@pytest.fixture
def out(tmp_path) -> Path:
    return tmp_path / "out"


def optimize_cli(model, out: Path, *extra) -> "object":
    return invoke(["optimize", model, "--out", out, *FAST, *extra])


# ------------------------------------------------------------------------------------------------ model inputs
def _no_weights(folder: Path) -> None:
    (folder / "model.safetensors").unlink()


def _corrupt_config(folder: Path) -> None:
    (folder / "config.json").write_text('{"model_type": "llama", "hidden_size": ', encoding="utf-8")


def _config_list(folder: Path) -> None:
    (folder / "config.json").write_text("[1, 2, 3]", encoding="utf-8")


def _config_binary(folder: Path) -> None:
    (folder / "config.json").write_bytes(b"\xff\xfe\x00\x81" * 64)


def _unknown_model_type(folder: Path) -> None:
    cfg = json.loads((folder / "config.json").read_text())
    cfg["model_type"] = "no-such-architecture"
    (folder / "config.json").write_text(json.dumps(cfg), encoding="utf-8")


def _truncated(folder: Path) -> None:
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])


def _garbage_weights(folder: Path) -> None:
    (folder / "model.safetensors").write_bytes(os.urandom(4096))


def _empty_weights(folder: Path) -> None:
    (folder / "model.safetensors").write_bytes(b"")


def _edit_state(folder: Path, fn) -> None:
    from safetensors.torch import load_file, save_file

    state = load_file(str(folder / "model.safetensors"))
    fn(state)
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})


def _missing_tensor(folder: Path) -> None:
    _edit_state(folder, lambda s: s.pop("model.layers.0.mlp.down_proj.weight"))


def _wrong_shape(folder: Path) -> None:
    _edit_state(folder, lambda s: s.__setitem__("model.layers.0.mlp.down_proj.weight", torch.zeros(64, 64)))


def _non_finite(value: float):
    def breaker(folder: Path) -> None:
        def poison(state):
            state["model.layers.1.self_attn.q_proj.weight"][3, 5] = value
        _edit_state(folder, poison)
    return breaker


def _heads_not_dividing_hidden(folder: Path) -> None:
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(num_attention_heads=3, num_key_value_heads=3)
    cfg.pop("head_dim", None)
    (folder / "config.json").write_text(json.dumps(cfg), encoding="utf-8")


SENTINEL_CODE = "import pathlib\npathlib.Path(__file__).with_name('CODE_RAN').write_text('x')\n"


def _remote_code(folder: Path) -> None:
    """A config that names its own Python code (auto_map), which writes CODE_RAN when imported."""
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(model_type="evil_llama", auto_map={"AutoConfig": "configuration_evil.EvilConfig",
                                                  "AutoModelForCausalLM": "modeling_evil.EvilModel"})
    (folder / "config.json").write_text(json.dumps(cfg), encoding="utf-8")
    for name in ("configuration_evil.py", "modeling_evil.py"):
        (folder / name).write_text(SENTINEL_CODE, encoding="utf-8")


def _pickled(folder: Path) -> None:
    from safetensors.torch import load_file

    state = load_file(str(folder / "model.safetensors"))
    (folder / "model.safetensors").unlink()
    torch.save(state, folder / "pytorch_model.bin")


def _index_missing_shard(folder: Path) -> None:
    (folder / "model.safetensors").rename(folder / "model-00001-of-00002.safetensors")
    index = {"metadata": {}, "weight_map": {"model.norm.weight": "model-00002-of-00002.safetensors"}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index), encoding="utf-8")


BROKEN_FOLDERS = {
    "no_weights": (_no_weights, "no weights"),
    "corrupt_config": (_corrupt_config, "not valid JSON"),
    "config_is_a_list": (_config_list, "JSON object"),
    "config_not_utf8": (_config_binary, "config.json"),
    "unknown_model_type": (_unknown_model_type, "no-such-architecture"),
    "truncated_safetensors": (_truncated, "truncated or corrupt"),
    "garbage_safetensors": (_garbage_weights, "truncated or corrupt"),
    "empty_safetensors": (_empty_weights, "empty"),
    "missing_tensor": (_missing_tensor, "missing model.layers.0.mlp.down_proj.weight"),
    "wrong_shape_tensor": (_wrong_shape, ("model.layers.0.mlp.down_proj.weight", "[64, 64]", "[64, 128]")),
    "nan_weight": (_non_finite(float("nan")), ("model.layers.1.self_attn.q_proj.weight", "not finite", "NaN")),
    "inf_weight": (_non_finite(float("inf")), ("model.layers.1.self_attn.q_proj.weight", "not finite", "Inf")),
    "heads_not_dividing_hidden": (_heads_not_dividing_hidden, "not a multiple of the number of attention heads"),
    "remote_code": (_remote_code, ("custom code", "auto_map")),
    "pickled_bin": (_pickled, "pickled"),
    "index_missing_shard": (_index_missing_shard, "missing weight shard"),
}


@pytest.mark.parametrize("case", sorted(BROKEN_FOLDERS))
def test_broken_model_folder(case, llama, tmp_path, out):
    breaker, fragments = BROKEN_FOLDERS[case]
    folder = copy_model(llama, tmp_path / f"model_{case}")
    breaker(folder)
    before = snapshot(folder)
    result = invoke(["optimize", folder, "--out", out, *FAST], input="y\n")  # a prompt would read this 'y'
    assert_one_error(result, 2, *((fragments,) if isinstance(fragments, str) else fragments))
    assert "[y/N]" not in result.stdout + result.stderr, "transformers prompted for remote code"
    assert_no_output(out)
    assert snapshot(folder) == before, "the input model was changed"


def test_nonexistent_model_path(tmp_path, out):
    assert_one_error(optimize_cli(tmp_path / "no" / "such" / "model", out), 2, "does not exist")
    assert_no_output(out)


def test_empty_model_folder(tmp_path, out):
    (tmp_path / "empty").mkdir()
    assert_one_error(optimize_cli(tmp_path / "empty", out), 2, "config.json")
    assert_no_output(out)


def test_plain_file_as_model(tmp_path, out):
    path = tmp_path / "model.txt"
    path.write_text("not a model", encoding="utf-8")
    assert_one_error(optimize_cli(path, out), 2, "is a file")
    assert_no_output(out)


def test_unknown_short_name(tmp_path, out, monkeypatch):
    monkeypatch.chdir(tmp_path)
    line = assert_one_error(optimize_cli("gpt-17-ultra", out), 2, "gpt-17-ultra")
    assert "minilm" in line  # lists the short names it knows
    assert_no_output(out)


def test_trust_pickle_loads_pickled_weights(llama, tmp_path, out, monkeypatch):
    monkeypatch.delenv("PERMCOMPILE_TRUST_PICKLE", raising=False)  # restored after the test
    folder = copy_model(llama, tmp_path / "pickled")
    _pickled(folder)
    # 2:3 fits no layer: the run stops right after loading, with the 'no linear layer' message once loaded
    assert_one_error(optimize_cli(folder, out, "--trust-pickle", "--sparsity", "2:3"), 2, "no linear layer")
    assert_no_output(out)


# ------------------------------------------------------------------------------------------------ options
@pytest.mark.parametrize("text", ["3:2", "0:4", "abc", "2:4:8", "4:4", "-1:4", "2:0", "", "2/4", "1.5:4"])
def test_bad_sparsity(text, llama, out):
    assert_one_error(optimize_cli(llama, out, "--sparsity", text), 2, "sparsity")
    assert_no_output(out)


@pytest.mark.parametrize("text", ["2:3", "2:256"])
def test_sparsity_no_layer_can_take(text, llama, out):
    assert_one_error(optimize_cli(llama, out, "--sparsity", text), 2, "no linear layer")
    assert_no_output(out)


@pytest.mark.parametrize("option,value", [
    ("--permutation", "bogus"), ("--criterion", "bogus"), ("--precision", "int3"),
    ("--calib-samples", "0"), ("--calib-samples", "-3"), ("--calib-seq-len", "1"),
])
def test_bad_option_values(option, value, llama, out):
    line = assert_one_error(optimize_cli(llama, out, option, value), 2)
    if not value.lstrip("-").isdigit():
        assert value in line
    assert_no_output(out)


@pytest.mark.parametrize("value", ["batch=0,1,2", "seq=abc", "batch=1,8", "seq=4,2,1"])
def test_bad_tensorrt_ranges(value, llama, tmp_path):
    plan = tmp_path / "engine.plan"
    assert_one_error(optimize_cli(llama, plan, "--trt-profile", value), 2, "--trt-profile " + value.split("=")[0])
    assert_no_output(plan)
    assert_no_output(tmp_path / "engine")


@pytest.mark.parametrize("value", ["batch=0,1,2", "seq=abc"])
def test_bad_tensorrt_ranges_are_refused_early(value, llama, tmp_path):
    """Whatever the formatting, a malformed range is a usage error (2) caught before any work."""
    plan = tmp_path / "engine.plan"
    result = optimize_cli(llama, plan, "--trt-profile", value)
    assert result.exit_code == 2, describe(result)
    assert "Traceback" not in result.stderr and "--trt-profile" in result.stderr
    assert_no_output(plan)
    assert_no_output(tmp_path / "engine")


@pytest.mark.parametrize("args", [["--calib-samples", "abc"], ["--sparsty", "2:4"], []],
                         ids=["not-an-int", "unknown-option", "missing-out"])
def test_click_usage_errors_are_one_line(args, llama, out):
    argv = ["optimize", llama, *args] + (["--out", out] if args else [])
    assert_one_error(invoke(argv), 2)
    assert_no_output(out)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_device_cuda_without_cuda(llama, out):
    assert_one_error(optimize_cli(llama, out, "--permutation", "search", "--device", "cuda"), 2, "cuda")
    assert_no_output(out)


# ------------------------------------------------------------------------------------------------ calibration
def _calib_missing(tmp_path: Path) -> Path:
    return tmp_path / "no_such_calib.txt"


def _calib_empty_file(tmp_path: Path) -> Path:
    path = tmp_path / "empty.txt"
    path.write_text("", encoding="utf-8")
    return path


def _calib_whitespace(tmp_path: Path) -> Path:
    path = tmp_path / "blank.txt"
    path.write_text("   \n\n\t  \n", encoding="utf-8")
    return path


def _calib_empty_folder(tmp_path: Path) -> Path:
    path = tmp_path / "calib_dir"
    path.mkdir()
    return path


def _calib_binary(tmp_path: Path) -> Path:
    path = tmp_path / "data.bin"
    path.write_bytes(bytes(range(256)) * 16)
    return path


def _calib_not_utf8(tmp_path: Path) -> Path:
    path = tmp_path / "latin.txt"
    path.write_bytes(("caf\xe9 " * 500).encode("latin-1"))
    return path


def _calib_too_short(tmp_path: Path) -> Path:
    path = tmp_path / "short.txt"
    path.write_text("Hi there", encoding="utf-8")
    return path


def _calib_images_for_text(tmp_path: Path) -> Path:
    path = tmp_path / "images"
    path.mkdir()
    shutil.copy(DEFAULT_IMAGES / "chelsea.png", path / "cat.png")
    return path


def _calib_bad_json(tmp_path: Path) -> Path:
    path = tmp_path / "data.json"
    path.write_text('[{"text": "unterminated', encoding="utf-8")
    return path


CALIB_CASES = {
    "missing_path": (_calib_missing, "does not exist"),
    "empty_file": (_calib_empty_file, "empty"),
    "whitespace_file": (_calib_whitespace, "empty"),
    "empty_folder": (_calib_empty_folder, "empty"),
    "binary_file": (_calib_binary, "binary"),
    "not_utf8": (_calib_not_utf8, "utf-8"),
    "too_short": (_calib_too_short, "too short"),
    "images_for_text_model": (_calib_images_for_text, "images"),
    "bad_json": (_calib_bad_json, "not valid JSON"),
}


@pytest.mark.parametrize("case", sorted(CALIB_CASES))
def test_bad_calibration_text(case, llama, tmp_path, out):
    make, fragment = CALIB_CASES[case]
    assert_one_error(optimize_cli(llama, out, "--calib", make(tmp_path)), 2, fragment)
    assert_no_output(out)


@pytest.fixture
def no_model_load(monkeypatch):
    """Arguments that can be checked without the model must be refused before it is loaded (minutes on a
    large one): reaching the loader fails the test."""
    import permcompile.models as models

    def boom(*args, **kwargs):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(models, "load_model", boom)


@pytest.mark.parametrize("case", ["missing_path", "empty_file", "whitespace_file", "empty_folder", "binary_file",
                                  "not_utf8"])
def test_bad_calibration_is_refused_before_loading(case, llama, tmp_path, out, no_model_load):
    make, fragment = CALIB_CASES[case]
    assert_one_error(optimize_cli(llama, out, "--calib", make(tmp_path)), 2, fragment)
    assert_no_output(out)


@pytest.mark.parametrize("value", ["99999999999999999999", "-1"])
def test_seed_out_of_range(value, llama, out, no_model_load):
    assert_one_error(optimize_cli(llama, out, "--seed", value), 2, "--seed", value)
    assert_no_output(out)


@pytest.mark.parametrize("text,guess", [("MiniLM", "minilm"), ("smollm", "smollm2"), ("all-minilm", "minilm")])
def test_near_miss_short_name_is_suggested(text, guess, tmp_path, out, monkeypatch, no_model_load):
    monkeypatch.chdir(tmp_path)
    assert_one_error(optimize_cli(text, out), 2, text, f"did you mean {guess!r}")
    assert_no_output(out)


def test_arguments_are_checked_before_torch_is_imported(tmp_path):
    """A missing --calib file, an unknown model name, a bad seed or option value costs no torch import either."""
    code = ("import sys\nfrom permcompile.cli import main\ntry:\n    main(sys.argv[1:])\n"
            "except SystemExit as exc:\n    print('torch' in sys.modules, exc.code)\n")
    cases = [["tinyllama-nope", "--out", tmp_path / "o1"],
             [tmp_path, "--out", tmp_path / "o2", "--calib", tmp_path / "missing.txt"],
             [tmp_path, "--out", tmp_path / "o3", "--seed", "99999999999999999999"],
             [tmp_path, "--out", tmp_path / "o4", "--sparsity", "3:2"],
             [tmp_path, "--out", tmp_path / "o5", "--permutation", "bogus"]]
    for args in cases:
        proc = subprocess.run([sys.executable, "-c", code, "optimize", *map(str, args), "--quiet"],
                              capture_output=True, text=True, timeout=SAFETY_S, cwd=tmp_path)
        assert proc.stdout.split() == ["False", "2"], (args, proc.stdout, proc.stderr)
        assert len(message_lines(proc.stderr)) == 1 and proc.stderr.startswith("error: "), proc.stderr


def test_calibration_from_a_fifo_is_refused(llama, call_on_fifo):
    from permcompile.calib.data import load_calibration
    from permcompile.models import load_model

    loaded = load_model(str(llama))
    exc = call_on_fifo("calib.txt", lambda path: load_calibration(str(path), loaded, 2, 16, 0))
    assert isinstance(exc, UsageError), exc


def test_corrupt_image_for_vision_model(tiny_dir, tmp_path, out):
    images = tmp_path / "images"
    images.mkdir()
    shutil.copy(DEFAULT_IMAGES / "chelsea.png", images / "a_good.png")
    (images / "b_corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(300))
    assert_one_error(optimize_cli(tiny_dir("vit"), out, "--calib", images), 2, "b_corrupt.png")
    assert_no_output(out)


def test_text_file_for_vision_model(tiny_dir, tmp_path, out):
    text = tmp_path / "text.txt"
    text.write_text("Some words. " * 200, encoding="utf-8")
    assert_one_error(optimize_cli(tiny_dir("vit"), out, "--calib", text), 2, "vision model")
    assert_no_output(out)


# ------------------------------------------------------------------------------------------------ outputs
def test_missing_output_parents_are_created_only_when_needed(llama, tmp_path):
    """A bad option is refused before anything is created under OUT's missing parents."""
    target = tmp_path / "a" / "b" / "out"
    assert_one_error(optimize_cli(llama, target, "--sparsity", "abc"), 2, "sparsity")
    assert not (tmp_path / "a").exists()


def test_failed_run_leaves_no_output_parents(llama, tmp_path):
    target = tmp_path / "a" / "b" / "out"
    assert_one_error(optimize_cli(llama, target, "--calib", tmp_path / "missing.txt"), 2, "does not exist")
    assert not (tmp_path / "a").exists(), "empty output parents were left behind"


def test_output_in_read_only_folder(llama, tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        if os.access(folder, os.W_OK):
            pytest.skip("running as root: a 0o500 folder is still writable (see the file-as-parent test)")
        target = folder / "out"
        assert_one_error(optimize_cli(llama, target), 2, "cannot write")
        assert list(folder.iterdir()) == []
    finally:
        folder.chmod(0o700)


@pytest.mark.parametrize("below", ["out", "sub/out"])
def test_output_under_a_regular_file(below, llama, tmp_path):
    """The as-root stand-in for a read-only folder: OUT (or its parent) lies under a regular file."""
    blocker = tmp_path / "blocker"
    blocker.write_text("I am a file", encoding="utf-8")
    target = blocker / below
    assert_one_error(optimize_cli(llama, target), 2, "blocker")
    assert blocker.read_text(encoding="utf-8") == "I am a file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blocker"]


@pytest.mark.skipif(not Path("/proc/self").exists(), reason="needs /proc")
def test_output_under_proc(llama):
    target = Path("/proc") / f"permcompile-test-{os.getpid()}"
    assert_one_error(optimize_cli(llama, target), 2)
    assert not target.exists()


def test_empty_output_path(llama, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # '' resolves to the current folder: never let that be /work/main
    (tmp_path / "keep.txt").write_text("keep", encoding="utf-8")
    assert_one_error(invoke(["optimize", llama, "--out", "", *FAST]), 2)
    assert (tmp_path / "keep.txt").read_text(encoding="utf-8") == "keep"
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]


@pytest.fixture
def old_and_forced(forced_llama_output):
    """An old output at OUT; optimize without --force (refused), then with --force (replaces it). One session
    fixture (conftest.py): test_untrusted_inputs.py's verify cases copy the same output. Read only."""
    return forced_llama_output


def test_existing_output_without_force(old_and_forced):
    target, refused, _ = old_and_forced
    assert_one_error(refused, 2, "already exists", "--force")


def test_existing_output_with_force_is_replaced(old_and_forced):
    target, _, forced = old_and_forced
    assert forced.exit_code == 0, describe(forced)
    assert not (target / "stale.txt").exists()
    report = json.loads((target / "report.json").read_text())
    assert report["model"] != "old" and report["pruned_layers"]
    assert (target / "model.onnx").is_file() and (target / "hf").is_dir()
    assert [p.name for p in target.parent.iterdir() if ".tmp-" in p.name] == []


def test_force_never_deletes_the_input_model(llama, tmp_path):
    parent = tmp_path / "workspace"
    model = copy_model(llama, parent / "my_model")
    (parent / "notes.txt").write_text("precious", encoding="utf-8")
    result = optimize_cli(model, parent, "--force")
    assert (model / "config.json").is_file() and (model / "model.safetensors").is_file(), "the input model is gone"
    assert (parent / "notes.txt").read_text(encoding="utf-8") == "precious"
    assert_one_error(result, 2)


def test_output_files_are_world_readable(old_and_forced):
    """Every file of an output has the mode ``open()`` gives (0644 under umask 022): hf/model.safetensors too."""
    import stat

    target, _, forced = old_and_forced
    assert forced.exit_code == 0, describe(forced)
    umask = os.umask(0)
    os.umask(umask)
    modes = {str(p.relative_to(target)): oct(stat.S_IMODE(p.stat().st_mode)) for p in target.rglob("*") if p.is_file()}
    assert "hf/model.safetensors" in modes
    assert set(modes.values()) == {oct(0o666 & ~umask)}, modes
    assert [p.name for p in target.parent.iterdir() if p.name.startswith(".")] == [], "lock or aside folder left"


def _force_targets(model: Path, tmp_path: Path) -> dict:
    """OUT paths --force must never replace: a file inside the model, the model itself (directly and through a
    symlink), a symlink to a file inside it, a plain file and a folder that is not an output."""
    plain = tmp_path / "notes.txt"
    plain.write_text("precious", encoding="utf-8")
    other = tmp_path / "photos"
    other.mkdir()
    (other / "cat.txt").write_text("meow", encoding="utf-8")
    (tmp_path / "link_to_model").symlink_to(model, target_is_directory=True)
    (tmp_path / "link_to_weights").symlink_to(model / "model.safetensors")
    return {"file_inside_model": (model / "model.safetensors", "inside the input model"),
            "model_itself": (model, "input model"),
            "symlink_to_model": (tmp_path / "link_to_model", "input model"),
            "symlink_into_model": (tmp_path / "link_to_weights", "input model"),
            "plain_file": (plain, "is a file"),
            "not_an_output": (other, "not a permcompile output")}


@pytest.mark.parametrize("case", ["file_inside_model", "model_itself", "symlink_to_model", "symlink_into_model",
                                  "plain_file", "not_an_output"])
def test_force_replaces_only_a_permcompile_output(case, llama, tmp_path):
    model = copy_model(llama, tmp_path / "model")
    target, fragment = _force_targets(model, tmp_path)[case]
    before = {p: snapshot(p) for p in (model, tmp_path / "photos")}
    plain = (tmp_path / "notes.txt").read_text(encoding="utf-8")
    assert_one_error(optimize_cli(model, target, "--force"), 2, fragment)
    assert {p: snapshot(p) for p in before} == before, "an input was changed"
    assert (tmp_path / "notes.txt").read_text(encoding="utf-8") == plain
    assert [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name or ".lock" in p.name] == []


def test_force_replaces_atomically(tmp_path, monkeypatch):
    """The old output is renamed aside, the new one moved in, and only then the old one deleted: a failure
    in between (here the move-in) leaves the old output in place."""
    from permcompile import outdir

    old = tmp_path / "out"
    old.mkdir()
    (old / "report.json").write_text("old", encoding="utf-8")
    new = tmp_path / f".out.tmp-{os.getpid()}-abc"
    new.mkdir()
    (new / "report.json").write_text("new", encoding="utf-8")
    real = os.replace

    def fail_move_in(src, dst):
        if Path(src) == new:
            raise OSError(28, "No space left on device")
        return real(src, dst)

    monkeypatch.setattr(outdir.os, "replace", fail_move_in)
    with pytest.raises(OSError):
        outdir._replace(new, old)
    assert (old / "report.json").read_text(encoding="utf-8") == "old"
    monkeypatch.setattr(outdir.os, "replace", real)
    outdir._replace(new, old)
    assert (old / "report.json").read_text(encoding="utf-8") == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_concurrent_run_to_the_same_output_is_refused(llama, tmp_path, out):
    """A live run's lock (.OUT.lock with its PID) stops a second run at once; a dead run's lock is taken over."""
    lock = tmp_path / ".out.lock"
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        lock.write_text(f"{sleeper.pid}\n", encoding="utf-8")
        # 2:3 fits no layer: a run that got past the lock would end at 'no linear layer' after loading
        assert_one_error(optimize_cli(llama, out, "--sparsity", "2:3"), 2, "another permcompile run",
                         str(sleeper.pid))
        assert lock.read_text(encoding="utf-8") == f"{sleeper.pid}\n" and not out.exists()
    finally:
        sleeper.kill()
        sleeper.wait()
    lock.write_text(f"{_dead_pid()}\n", encoding="utf-8")
    assert_one_error(optimize_cli(llama, out, "--sparsity", "2:3"), 2, "no linear layer")
    assert_no_output(out)


def test_output_written_meanwhile_is_never_replaced(out):
    """The output transaction (outdir.StagedOutput) on its own: OUT did not exist when the run started, another
    run that did not see the lock wrote it meanwhile; the commit refuses, OUT is kept, the temporary folder goes.
    The same through a whole ``optimize`` run: the slow test below."""
    from permcompile.errors import OutputWriteError
    from permcompile.outdir import StagedOutput

    with pytest.raises(OutputWriteError, match="another run"):
        with StagedOutput(out) as staged:
            try:
                (staged.path / "report.json").write_text('{"model": "this run"}', encoding="utf-8")
                out.mkdir()
                (out / "report.json").write_text('{"model": "the other run"}', encoding="utf-8")
                staged.commit()
            finally:
                staged.lock.release()
    assert json.loads((out / "report.json").read_text()) == {"model": "the other run"}
    assert [p.name for p in out.parent.iterdir()] == ["out"]


@pytest.mark.slow  # a full optimize (~10 s); test_output_written_meanwhile_is_never_replaced covers the commit
def test_output_written_meanwhile_by_another_run_is_kept(llama, out, monkeypatch):
    """A run that did not see the lock (an older version, another host) wrote OUT while this one worked: this
    run must not replace it, even though OUT did not exist when it started."""
    import permcompile.pipeline as pipeline

    real = pipeline._write_artifacts

    def other_run_finishes_first(*args, **kwargs):
        out.mkdir()
        (out / "report.json").write_text('{"model": "the other run"}', encoding="utf-8")
        return real(*args, **kwargs)

    monkeypatch.setattr(pipeline, "_write_artifacts", other_run_finishes_first)
    assert_one_error(optimize_cli(llama, out), 1, "another run")
    assert json.loads((out / "report.json").read_text()) == {"model": "the other run"}
    assert [p.name for p in out.parent.iterdir() if p.name != "out"] == []


def test_stale_temporaries_of_dead_runs_are_cleaned_up(llama, tmp_path, out):
    """What a killed run left next to OUT goes; what a live run is writing stays. An old output a run had
    renamed aside when it died goes back to OUT (here: so OUT exists again and --force is needed)."""
    import time

    dead, alive = _dead_pid(), os.getpid()
    for name in (f".out.tmp-{dead}-abc123", f".out.tmp-{alive}-def456", f".out.old-{dead}-0a1b2c"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "report.json").write_text(json.dumps({"model": name}), encoding="utf-8")
    (tmp_path / ".other.tmp-1-abc").mkdir()  # not ours to judge: another OUT's name
    for name, age in ((".out.tmp-k3j_x9q2", 2 * 86_400), (".out.tmp-recent01", 60)):  # no PID: older versions
        (tmp_path / name).mkdir()
        os.utime(tmp_path / name, (time.time() - age, time.time() - age))
    assert_one_error(optimize_cli(llama, out, "--sparsity", "2:3"), 2, "already exists")
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == [".other.tmp-1-abc", f".out.tmp-{alive}-def456", ".out.tmp-recent01", "out"], left
    assert json.loads((out / "report.json").read_text()) == {"model": f".out.old-{dead}-0a1b2c"}


def test_sigterm_during_export_leaves_nothing(llama, tmp_path):
    """SIGTERM (docker stop, CI timeouts) is handled like Ctrl-C: one line, exit 143, no OUT, no temporaries.

    The child says when its export begins (the temporary output folder exists) and waits there for the signal:
    the test signals on that line, never after a delay."""
    import signal

    target = tmp_path / "out"
    before = snapshot(llama)
    patch = ("import signal, sys\n"
             "import permcompile.export.onnx as onnx_export\n"
             "real = onnx_export.export_onnx\n"
             "def export_onnx(*args, **kwargs):\n"
             "    print('TEST: export begins', file=sys.stderr, flush=True)\n"
             "    signal.pause()\n"
             "    return real(*args, **kwargs)\n"
             "onnx_export.export_onnx = export_onnx\n")
    proc, _ = child_at_marker(patch, ["optimize", llama, "--out", target, *FAST], "TEST: export begins")
    assert any(".out.tmp-" in p.name for p in tmp_path.iterdir())  # the temporary output exists
    proc.send_signal(signal.SIGTERM)
    err = finish(proc)
    assert proc.returncode == 143, err[-2000:]
    assert "Traceback" not in err
    lines = message_lines(err)
    assert len(lines) == 1 and lines[0].startswith("error: ") and "SIGTERM" in lines[0], err[-2000:]
    assert_no_output(target)
    assert list(tmp_path.iterdir()) == []
    assert snapshot(llama) == before


# ------------------------------------------------------------------------------------------------ verify
def test_verify_not_an_output(tmp_path, llama):
    empty = tmp_path / "empty"
    empty.mkdir()
    a_file = tmp_path / "file.txt"
    a_file.write_text("x", encoding="utf-8")
    for target in (empty, llama, a_file, tmp_path / "missing"):
        assert_one_error(invoke(["verify", target]), 2, "not a permcompile output")


@pytest.fixture
def good_copy(old_and_forced, tmp_path) -> Path:
    target, _, forced = old_and_forced
    assert forced.exit_code == 0, describe(forced)
    copy = tmp_path / "copy"
    shutil.copytree(target, copy)
    return copy


def _first_pruned(folder: Path) -> dict:
    return json.loads((folder / "report.json").read_text())["pruned_layers"][0]


def _rerecord_digests(folder: Path) -> None:
    """What someone 'fixing' report.json after editing files would do: integrity then passes."""
    from permcompile.export.digests import file_digests

    report = json.loads((folder / "report.json").read_text())
    report["files"] = file_digests(folder)
    (folder / "report.json").write_text(json.dumps(report), encoding="utf-8")


def _flip_onnx_weight(folder: Path) -> str:
    import onnx

    name = _first_pruned(folder)["onnx_initializer"]
    proto = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    init = next(i for i in proto.graph.initializer if i.name == name)
    raw = bytes(init.raw_data)
    assert len(raw) >= 256
    data = bytearray((folder / "model.onnx").read_bytes())
    at = data.find(raw)
    assert at >= 0 and data.find(raw, at + 1) < 0
    for i in range(at, at + 256):  # XOR: zeros become nonzero, so N:M breaks as well as the numbers
        data[i] ^= 0x5A
    (folder / "model.onnx").write_bytes(bytes(data))
    return name


def _densify_hf_weight(folder: Path) -> str:
    from safetensors.torch import load_file, save_file

    param = _first_pruned(folder)["param"]
    path = folder / "hf" / "model.safetensors"
    state = load_file(str(path))
    w = state[param]
    assert (w == 0).float().mean() > 0.4
    gen = torch.Generator().manual_seed(0)
    state[param] = torch.where(w == 0, 1e-3 * torch.randn(w.shape, generator=gen), w).contiguous()
    save_file(state, str(path), metadata={"format": "pt"})
    return param


def _verify_fails(folder: Path, *must_fail: str) -> None:
    result = invoke(["verify", folder, "--json"])
    assert_one_error(result, 1, "checks failed")
    checks = {c["name"]: c for c in json.loads(result.stdout)}
    for name in must_fail:
        assert name in checks and not checks[name]["passed"], (name, checks.get(name))


def test_verify_fresh_copy_passes(good_copy):
    result = invoke(["verify", good_copy])
    assert result.exit_code == 0, describe(result)


def test_verify_tampered_onnx(good_copy):
    _flip_onnx_weight(good_copy)
    _verify_fails(good_copy, "integrity", "onnx_nm")


def test_verify_tampered_onnx_with_rerecorded_digests(good_copy):
    _flip_onnx_weight(good_copy)
    _rerecord_digests(good_copy)
    _verify_fails(good_copy, "onnx_nm", "onnxruntime_vs_torch")


def test_verify_densified_hf_weight(good_copy):
    param = _densify_hf_weight(good_copy)
    result = invoke(["verify", good_copy])
    assert_one_error(result, 1, "checks failed")
    assert "FAIL" in result.stdout and param in result.stdout


def test_verify_densified_hf_weight_with_rerecorded_digests(good_copy):
    _densify_hf_weight(good_copy)
    _rerecord_digests(good_copy)
    _verify_fails(good_copy, "hf_nm")


def test_verify_missing_onnx(good_copy):
    (good_copy / "model.onnx").unlink()
    result = invoke(["verify", good_copy])
    assert_one_error(result, None)
    assert result.exit_code in (1, 2)


def test_verify_corrupt_report(good_copy):
    (good_copy / "report.json").write_text("{not json", encoding="utf-8")
    assert_one_error(invoke(["verify", good_copy]), 2, "report.json")


def test_verify_extra_file_in_hf(good_copy):
    (good_copy / "hf" / "model-extra.safetensors").write_bytes((good_copy / "hf" / "model.safetensors").read_bytes())
    _verify_fails(good_copy, "integrity")


def test_verify_never_runs_code_from_a_tampered_output(good_copy):
    """hf/config.json made to name code (auto_map), digests re-recorded: the code neither runs nor is asked
    about; the reload check fails saying why."""
    cfg_path = good_copy / "hf" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["auto_map"] = {"AutoConfig": "configuration_evil.EvilConfig",
                       "AutoModelForCausalLM": "modeling_evil.EvilModel"}
    cfg_path.write_text(json.dumps(cfg), encoding="utf-8")
    for name in ("configuration_evil.py", "modeling_evil.py"):
        (good_copy / "hf" / name).write_text(SENTINEL_CODE, encoding="utf-8")
    _rerecord_digests(good_copy)
    result = invoke(["verify", good_copy, "--json"], input="y\n")
    assert_one_error(result, 1, "checks failed")
    checks = {c["name"]: c for c in json.loads(result.stdout)}
    assert not checks["hf_load"]["passed"] and "custom code" in checks["hf_load"]["detail"], checks["hf_load"]
    assert not (good_copy / "hf" / "CODE_RAN").exists(), "code from the output folder ran"


# ------------------------------------------------------------------------------------------------ --debug
def test_debug_shows_the_traceback(tmp_path, out):
    result = invoke(["optimize", tmp_path / "missing_model", "--out", out, "--quiet", "--debug"])
    assert result.exit_code == 2
    assert "Traceback (most recent call last)" in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: ")
    assert_no_output(out)
    verify = invoke(["verify", tmp_path, "--debug"])
    assert verify.exit_code == 2 and "Traceback" in verify.stderr


# ------------------------------------------------------------------------------------------------ real process
def _subprocess(args: list) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONWARNINGS="default")
    return subprocess.run([sys.executable, "-m", "permcompile.cli", *map(str, args)], capture_output=True,
                          text=True, env=env, timeout=SAFETY_S)


def test_real_process_error_is_one_line(tmp_path, out):
    proc = _subprocess(["optimize", tmp_path / "missing_model", "--out", out, "--quiet"])
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.splitlines() == [proc.stderr.strip()] and proc.stderr.startswith("error: "), proc.stderr
    assert proc.stdout == ""
    assert_no_output(out)


def test_quiet_means_no_progress_bars(llama, tmp_path, out):
    result = optimize_cli(llama, out, "--calib", tmp_path / "missing.txt")  # fails right after loading
    assert result.exit_code == 2, describe(result)
    assert result.stderr.splitlines() == [result.stderr.strip()], describe(result)
    assert result.stderr.startswith("error: ")
    assert_no_output(out)


# ------------------------------------------------------------------------------------------------ Python API
@pytest.fixture
def no_export(monkeypatch):
    """Bad configs must be refused before the (slow) export: reaching it fails the test at once."""
    import permcompile.pipeline as pipeline

    def boom(*args, **kwargs):
        raise RuntimeError("the pipeline went on to write artifacts")

    monkeypatch.setattr(pipeline, "_write_artifacts", boom)

@pytest.mark.parametrize("text", ["3:2", "0:4", "abc", "2:4:8", "4:4", "-1:4", "2:0", "", ":", "2:", None, 2.4])
def test_sparsity_parse_rejects(text):
    with pytest.raises(UsageError):
        Sparsity.parse(text)


@pytest.mark.parametrize("text,expected", [("2:4", (2, 4)), (" 4 : 8 ", (4, 8)), ("1:2", (1, 2))])
def test_sparsity_parse_accepts(text, expected):
    s = Sparsity.parse(text)
    assert (s.n, s.m) == expected and str(s) == f"{expected[0]}:{expected[1]}"


@pytest.mark.parametrize("field,value", [("permutation", "bogus"), ("criterion", "l3"), ("precision", "int4"),
                                         ("calib_samples", 0), ("calib_seq_len", 1)])
def test_api_bad_config_raises_usage_error(field, value, llama, out, no_export):
    from permcompile.pipeline import optimize

    with pytest.raises(UsageError):
        optimize(str(llama), out, OptimizeConfig(**{field: value}), quiet=True)
    with pytest.raises(UsageError):
        dataclasses.replace(OptimizeConfig(), **{field: value})
    assert_no_output(out)


def test_api_bad_model_and_output(llama, tmp_path, out, no_export):
    from permcompile.pipeline import optimize

    cfg = OptimizeConfig(calib_samples=2, calib_seq_len=16, permutation="none")
    with pytest.raises(UsageError):
        optimize(42, out, cfg, quiet=True)
    with pytest.raises(UsageError):
        optimize(str(tmp_path / "missing"), out, cfg, quiet=True)
    with pytest.raises(UsageError, match="no linear layer"):
        optimize(str(llama), out, dataclasses.replace(cfg, sparsity=Sparsity.parse("2:3")), quiet=True)
    assert_no_output(out)
    existing = tmp_path / "existing"
    existing.mkdir()
    with pytest.raises(UsageError, match="already exists"):
        optimize(str(llama), existing, cfg, quiet=True)
    assert list(existing.iterdir()) == []


@pytest.mark.parametrize("config", ["2:4", None, {"sparsity": "2:4"}])
def test_api_config_of_wrong_type(config, llama, out, no_export):
    from permcompile.pipeline import optimize

    with pytest.raises(UsageError):
        optimize(str(llama), out, config, quiet=True)
    assert_no_output(out)


@pytest.mark.parametrize("make", [lambda: Sparsity(3, 2), lambda: Sparsity(0, 4), lambda: "3:2"],
                         ids=["Sparsity(3,2)", "Sparsity(0,4)", "string"])
def test_api_invalid_sparsity_object(make, llama, out, no_export):
    from permcompile.pipeline import optimize

    with pytest.raises(UsageError):
        optimize(str(llama), out, OptimizeConfig(sparsity=make(), calib_samples=2, calib_seq_len=16,
                                                 permutation="none"), quiet=True)
    assert_no_output(out)


@pytest.mark.parametrize("knobs", [{"steps": -1}, {"block_size": 0}, {"block_size": 1}],
                         ids=["steps", "block_size0", "block_size1"])
def test_api_bad_search_config(knobs, llama, out, no_export):
    from permcompile.pipeline import optimize

    with pytest.raises(UsageError):
        optimize(str(llama), out, OptimizeConfig(permutation="search", search=SearchConfig(**knobs)), quiet=True)
    assert_no_output(out)


@pytest.mark.parametrize("args,word", [(["--residual", "bogus"], "residual"), (["--search", "steps=-1"], "steps"),
                                       (["--search", "block_size=0"], "block_size"),
                                       (["--search", "objective=cosine"], "cosine")])
def test_bad_search_options(args, word, llama, out):
    assert_one_error(optimize_cli(llama, out, *args), 2, word)
    assert_no_output(out)


# 2:3 fits no layer of the tiny llama, so an unvalidated field ends in 'no linear layer' (fast) instead of a
# message naming the bad field.
@pytest.mark.parametrize("word,kwargs", [
    ("device", {"device": "bogus"}),
    ("batch", {"batch_range": (0, 1, 2)}),
    ("seq", {"seq_range": (8, 4, 2)}),
], ids=["device", "batch_range", "seq_range"])
def test_api_unvalidated_fields(word, kwargs, llama, tmp_path, no_export):
    from permcompile.pipeline import optimize

    kwargs = dict(kwargs)
    ranges = {k: kwargs.pop(k) for k in ("batch_range", "seq_range") if k in kwargs}
    target = tmp_path / "engine.plan"
    with pytest.raises(UsageError, match=f"(?i){word}"):  # wherever the check lives: config or optimize()
        cfg = OptimizeConfig(sparsity=Sparsity.parse("2:3"), calib_samples=2, calib_seq_len=16, **kwargs)
        optimize(str(llama), target, cfg, quiet=True, **ranges)
    assert_no_output(target)


# ----------------------------------------------------------------------------------------------- full / read-only disks
@pytest.fixture
def mount_tmpfs(tmp_path):
    """Factory: a real tmpfs of ``size`` bytes (read-only with ``ro=True``) mounted under tmp_path.

    Needs root and mount rights (containers usually grant them to root); skips otherwise. The rlimit test
    below covers the non-root case of a write that fails half-way.
    """
    mounted: list[Path] = []

    def make(name: str, size: str, ro: bool = False) -> Path:
        if not IS_ROOT or shutil.which("mount") is None:
            pytest.skip("mounting a tmpfs needs root")
        point = tmp_path / name
        point.mkdir()
        opts = f"size={size}" + (",ro" if ro else "")
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(point)], capture_output=True, text=True)
        if r.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
        mounted.append(point)
        return point

    yield make
    for point in mounted:
        subprocess.run(["umount", "-l", str(point)], capture_output=True)


def test_output_on_a_full_disk(llama, mount_tmpfs):
    """A 64 KiB file system: the first weights written fill it. One line naming the problem, nothing left."""
    disk = mount_tmpfs("small", "64k")
    target = disk / "out"
    line = assert_one_error(optimize_cli(llama, target), 1, "no space left")
    assert_no_output(target)
    assert list(disk.iterdir()) == [], "the temporary output was not removed from the full disk"
    assert str(disk) in line or "out" in line


def test_output_on_a_read_only_file_system(llama, mount_tmpfs):
    disk = mount_tmpfs("ro", "1m", ro=True)
    target = disk / "sub" / "out"
    assert_one_error(optimize_cli(llama, target), 2, "cannot write", "read-only")
    assert list(disk.iterdir()) == []


def test_write_that_fails_half_way_leaves_nothing(llama, tmp_path):
    """Non-root stand-in for a full disk: RLIMIT_FSIZE makes any write past 96 KiB fail (EFBIG), after the
    output's temporary folder was created and partly written. In this process (a child interpreter would spend
    most of the test importing torch): the soft limit is lowered for the run only, the hard one left alone, so
    it is restored after."""
    resource = pytest.importorskip("resource")
    import signal

    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    if hard != resource.RLIM_INFINITY and hard < 96 * 1024:
        pytest.skip("the hard file-size limit is already below 96 KiB")
    target = tmp_path / "out"
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # fail the write instead of killing the process
    try:
        resource.setrlimit(resource.RLIMIT_FSIZE, (96 * 1024, hard))
        result = optimize_cli(llama, target)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)
    assert_one_error(result, 1, "too large")
    assert_no_output(target)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_api_module_with_non_finite_weights(out):
    """An in-memory module is checked like a folder: the tensor is named before any work."""
    from permcompile.pipeline import optimize
    from permcompile.testing.zoo import build_tiny

    net = build_tiny("llama")
    with torch.no_grad():
        net.model.layers[0].mlp.up_proj.weight[0, 0] = float("inf")
    with pytest.raises(UsageError, match=r"not finite: model\.layers\.0\.mlp\.up_proj\.weight holds Inf"):
        optimize(net, out, OptimizeConfig(permutation="none", calib_samples=2, calib_seq_len=16), quiet=True)
    assert_no_output(out)


# ------------------------------------------------------------------------------------------------ checkpoints, cache
QUICK_SEARCH = dict(swap_trials=20, residual_trials=0)


def _searched(loaded, **kwargs):
    from permcompile.pipeline import compress_

    cfg = OptimizeConfig(permutation="search", calib_samples=2, calib_seq_len=16,
                         search=dataclasses.replace(SearchConfig(), **QUICK_SEARCH))
    return compress_(loaded, cfg, quiet=True, **kwargs)


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    """A fresh HOME with no cache variable set: where the default cache would go."""
    monkeypatch.delenv("PERMCOMPILE_CACHE_DIR", raising=False)
    monkeypatch.delenv("PERMCOMPILE_CACHE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    return tmp_path / "home"


@pytest.mark.parametrize("content", ['{"fingerprint": "abc", "done": {"model.layers.0": {"q": ', "", "\xff\xfe"],
                                     ids=["truncated", "empty", "not-utf8"])
def test_corrupt_resume_checkpoint(content, llama, tmp_path, out, monkeypatch):
    from permcompile.passes.checkpoint import Checkpoints

    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "search_state.json").write_bytes(content.encode("latin-1"))
    real_open = Checkpoints.open

    def open_here(self, name, digest, state_file):  # the search's checkpoint is the corrupt file
        opened = real_open(self, name, digest, state_file)
        if name == "search":
            opened.folder, opened.path = ckpt, ckpt / state_file
        return opened

    monkeypatch.setattr(Checkpoints, "open", open_here)
    line = assert_one_error(optimize_cli(llama, out, "--permutation", "search", "--resume"), 2,
                            "search_state.json", "rerun without --resume")
    assert str(ckpt) in line
    assert_no_output(out)


def test_search_run_writes_nothing_to_home_by_default(home):
    """A short search (under CHECKPOINT_AFTER_S) writes no checkpoint to the user's home."""
    from permcompile.models import load_model
    from permcompile.testing.zoo import build_tiny

    _searched(load_model(build_tiny("llama")))
    assert not home.exists(), sorted(str(p) for p in home.rglob("*"))


def test_read_only_home_does_not_stop_a_search_run(home, tmp_path, monkeypatch):
    """HOME under a regular file (what a read-only home is to root): the checkpoint cannot be written, the run
    says so in one warning and goes on."""
    import permcompile.passes.checkpoint as checkpoint_mod
    from permcompile.models import load_model
    from permcompile.testing.zoo import build_tiny

    (tmp_path / "blocker").write_text("a file", encoding="utf-8")
    monkeypatch.setenv("HOME", str(tmp_path / "blocker" / "home"))
    monkeypatch.setattr(checkpoint_mod, "CHECKPOINT_AFTER_S", 0.0)  # as if the search ran long
    with pytest.warns(UserWarning, match="checkpoint") as caught:
        c = _searched(load_model(build_tiny("llama")))
    assert len([w for w in caught if "checkpoint" in str(w.message)]) == 1
    assert any(r.strategy == "search" for r in c.group_results)


def test_checkpoints_are_keyed_by_content_under_one_variable(home, tmp_path, monkeypatch):
    """Two models with the same name get different checkpoints; the folder is $PERMCOMPILE_CACHE_DIR/search,
    and the retired PERMCOMPILE_CACHE is not read."""
    from permcompile.models import wrap_module
    from permcompile.passes.checkpoint import Checkpoints
    from permcompile.passes.search import STATE_FILE, _fingerprint
    from permcompile.testing.zoo import build_tiny

    def folder(seed, name):
        loaded = wrap_module(build_tiny("llama", seed=seed), name=name)
        return Checkpoints(loaded.name).open("search", _fingerprint(loaded, [], cfg, []), STATE_FILE).folder

    monkeypatch.setenv("PERMCOMPILE_CACHE", str(tmp_path / "retired"))
    cfg = OptimizeConfig(permutation="search")
    a, b = folder(0, "model"), folder(1, "model")
    assert a != b
    assert a.parent == b.parent == home / ".cache" / "permcompile" / "search"
    monkeypatch.setenv("PERMCOMPILE_CACHE_DIR", str(tmp_path / "cache"))
    again = folder(0, "renamed")
    assert again.parent == tmp_path / "cache" / "search" and again.name.split("-")[-1] == a.name.split("-")[-1]


# ------------------------------------------------------------------------------------------------ Ctrl-C
def test_ctrl_c_during_search_then_resume(llama, tmp_path, monkeypatch):
    """SIGINT in the middle of a search: exit 130, one line, no OUT; ``--resume`` then completes.

    The child waits for the signal right after its first checkpoint is on disk, and says so on stderr: the test
    sends SIGINT on that line, so the signal always lands mid-run (no timing)."""
    import signal

    env = {**os.environ, "PERMCOMPILE_CACHE_DIR": str(tmp_path / "cache")}
    target = tmp_path / "out"
    args = ["optimize", str(llama), "--out", str(target), "--calib-samples", "2", "--calib-seq-len", "16",
            "--permutation", "search", "--search", "swap_trials=20", "--search", "residual_trials=0",
            "--update", "none"]
    # checkpoints from the first block on (by default only once a pass has run CHECKPOINT_AFTER_S)
    patch = ("import signal, sys\n"
             "import permcompile.passes.checkpoint as c; c.CHECKPOINT_AFTER_S = 0\n"
             "real = c.PassCheckpoint.save\n"
             "def save(self, write, saved):\n"
             "    done = real(self, write, saved)\n"
             "    if done and not self.resume:\n"
             "        print('TEST: checkpoint written', file=sys.stderr, flush=True)\n"
             "        signal.pause()\n"
             "    return done\n"
             "c.PassCheckpoint.save = save\n")
    proc, before = child_at_marker(patch, [*args, "--quiet"], "TEST: checkpoint written", env=env)
    proc.send_signal(signal.SIGINT)
    err = before + finish(proc)
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err
    lines = message_lines(err)
    errors = [ln for ln in lines if ln.startswith("error: ")]
    assert errors == [lines[-1]] and "interrupted" in errors[0], err[-2000:]
    assert "searched blocks are checkpointed in" in errors[0] and "--resume" in errors[0], errors[0]
    assert_no_output(target)
    ckpt_root = tmp_path / "cache" / "search"
    assert any(ckpt_root.rglob("search_state.json"))
    monkeypatch.setenv("PERMCOMPILE_CACHE_DIR", env["PERMCOMPILE_CACHE_DIR"])  # the resumed run: in this process
    resumed = invoke([*args, "--resume", "--quiet"])
    assert resumed.exit_code == 0, describe(resumed)
    assert (target / "report.json").is_file()
    assert not any(ckpt_root.rglob("search_state.json")), "the checkpoint outlived the output it was for"
