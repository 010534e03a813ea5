"""``optimize()``: the whole compiler, one step after another.

capture → groups → calibrate → permute → fold → mask/reconstruct (→ quantize) → export → verify

Read this file top to bottom to see what ``permcompile optimize`` does. Each step lives in its own
module; this one only orders them. Around them: ``timing.py`` times each step, ``outdir.py`` writes the
output folder as a transaction (a temporary folder renamed into place only after every check passed; a
failed check leaves ``OUT.failed/``), ``report.py`` builds ``report.json``.

The steps' modules are imported inside the functions that run them, for start-up time: importing this module
(the CLI, ``permcompile.optimize``, torchrun's other ranks) loads no pass, and a run only the passes it uses.
"""
from __future__ import annotations

import copy
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .config import OptimizeConfig
from .dtypes import fp32_compute, model_dtype
from .errors import (MissingDependencyError, OutputWriteError, PermcompileError, UsageError, VerificationError,
                     write_failure)
from .launch import clean_up_on_success, is_writer
from .outdir import OutputLock, StagedOutput, reserve_output, resolve_outputs
from .report import build_report, jsonable, write_report
from .timing import StepTimer


PREFETCH_MIN_PARAMS = 20_000_000  # below this, tracing takes seconds: a second process does not pay


@dataclass
class OptimizeResult:
    out_dir: Path
    report: dict
    engine_path: Path | None = None


@dataclass
class Compressed:
    """Everything ``compress_`` decided and measured (the model itself was changed in place)."""

    groups: list
    linears: list
    perms: dict
    group_results: list
    fold_report: object
    fold_err: float
    mask_result: object
    stats: dict
    batches: list
    verify_inputs: list
    timings: dict
    checkpoints: object = None  # passes.checkpoint.Checkpoints: the resumable passes' folders
    quant_plan: object = None  # passes.quantize.QuantPlan with --quantize, else None
    calibration: dict | None = None  # batches by kind of text: all of them, and what reconstruction fitted/checked


def capture_and_analyze(loaded, m: int = 4, prune_embeddings: bool = False, timer: StepTimer | None = None):
    """capture → groups, shared by ``optimize`` and ``permcompile inspect``: ``(captured graph, coupling groups,
    every linear layer with whether it can be pruned N:m)``."""
    from .capture import capture
    from .passes.coupling import analyze
    from .passes.sparsify import select_linears

    t = timer or StepTimer(quiet=True)
    net = loaded.model
    with t.step("capture"):
        captured = capture(net, loaded.example_inputs(), loaded.forward_kwargs())
    with t.step("analyze"):
        groups = analyze(captured)
        linears = select_linears(net, captured, groups, m, prune_embeddings)
    return captured, groups, linears


def compress_(loaded, config: OptimizeConfig, *, timer: StepTimer | None = None, quiet: bool = True,
              resume: bool = False, checkpoint_dir: str | None = None, stats: dict | None = None,
              batches: list | None = None) -> Compressed:
    """capture → groups → calibrate → permute → fold (→ smooth) → mask/reconstruct (→ quantize), in memory, on
    ``loaded.model`` (in place).

    ``stats``/``batches`` may be passed in to reuse one calibration across several runs (benchmarks).
    ``checkpoint_dir``: where the resumable passes (search, learned, reconstruction) save their state (default: the
    cache, and only once a pass has run ``CHECKPOINT_AFTER_S``); ``resume``: they continue from it
    (``passes/checkpoint.py``).
    Post-conditions: folding preserved the function (checked on real and random inputs) and every pruned
    weight is N:M along its input axis.
    """
    from .calib.distributed import check_same_weights
    from .passes.checkpoint import Checkpoints

    if torch.is_inference_mode_enabled() and config.trains_with_gradients:
        raise UsageError(f"permutation {config.permutation!r} as configured trains with gradients, which "
                         "torch.inference_mode() forbids: call it under torch.no_grad() or outside both")
    torch.manual_seed(config.seed)
    t = timer or StepTimer(quiet=quiet)
    checkpoints = Checkpoints(loaded.name, checkpoint_dir, resume=resume, quiet=quiet)
    captured, groups, linears = capture_and_analyze(loaded, config.sparsity.m, config.prune_embeddings, t)
    if not any(i.prune for i in linears):
        raise UsageError(f"no linear layer of this model can take {config.sparsity} sparsity "
                         f"(input sizes: {sorted({i.k for i in linears})})")
    if config.residual == "per-layer":
        groups = _split_residual(loaded.model, groups, linears)
    with t.step("calibrate"):
        batches, local, stats = _calibrate(loaded, config, captured, linears, batches, stats, quiet)
    perms, group_results = _permute(loaded, config, groups, linears, batches, local, stats, t, quiet, checkpoints)
    verify_inputs, fold_report, fold_err, fold_check = _fold(loaded, groups, perms, stats, batches, t)
    smoothing = None
    if config.quantize.enabled and config.quantize.smoothing() is not None:
        from .passes.smooth import smooth_

        with t.step("smooth"):  # SmoothQuant diagonals, folded and checked like the permutations
            smoothing = smooth_(loaded.model, groups, [i for i in linears if i.prune], local,
                                config.quantize.smoothing(), fold_check, loaded.forward_kwargs(), stats)
    mask_result, fit_all = _mask(loaded, config, linears, batches, local, stats, t, quiet, checkpoints)
    quant_plan = None
    if config.quantize.enabled:
        from .passes.quantize import QuantRequest
        from .quantization import QUANT_MODES

        with t.step("quantize"):
            net = loaded.model
            quant_plan = QUANT_MODES.get(config.quantize.mode).handler(QuantRequest(
                net, linears, local, config.quantize, precision=config.resolve_precision(model_dtype(net)),
                stats=stats, forward_kwargs=loaded.forward_kwargs(),
                weight_scales=getattr(mask_result, "weight_scales", None)))
            quant_plan.smoothing = smoothing or {}
    check_same_weights(loaded.model)  # several processes: every rank must end with rank 0's weights (else a warning)
    return Compressed(groups, linears, perms, group_results, fold_report, fold_err, mask_result, stats, batches,
                      verify_inputs, t.timings, checkpoints, quant_plan, _calibration_summary(batches, fit_all))


def _split_residual(net, groups: list, linears: list) -> list:
    """``--residual per-layer``: the residual-stream group split at each reading site (passes/glue.py)."""
    from .passes.glue import split_residual

    groups = split_residual(groups, net, {i.param for i in linears if i.prune})
    if not any(g.kind == "residual-site" for g in groups):
        import warnings

        warnings.warn("--residual per-layer: this model has no permutable residual-stream group (see "
                      "`permcompile inspect`), so there is no reading site to split; the result is the "
                      "same as --residual global", stacklevel=3)
    return groups


def _calibrate(loaded, config: OptimizeConfig, captured, linears: list, batches: list | None, stats: dict | None,
               quiet: bool) -> tuple[list, list, dict]:
    """The calibration batches, this process's share of them, and every linear's input statistics."""
    from .calib.data import load_calibration, narrow_calibration
    from .calib.distributed import shard
    from .calib.stats import collect_input_stats

    net = loaded.model
    if batches is None:
        batches = load_calibration(config.calib, loaded, config.calib_samples, config.calib_seq_len, config.seed)
    narrow = (narrow_calibration(batches, config.reconstruct.reference_share)
              if config.prune and config.update == "obs" else None)
    if narrow:
        import warnings

        warnings.warn(narrow, stacklevel=3)
    # with several processes (calib/distributed.py) each runs its share and the sums are all-reduced
    local = shard(batches)
    if stats is None and str(config.device) != "cpu":  # only one block at a time on the accelerator
        from .calib.blocks import stream_channel_stats

        heads = set(_trailing_heads(captured, linears))
        stats = stream_channel_stats(net, local, [i.module for i in linears if i.module not in heads],
                                     forward_kwargs=loaded.forward_kwargs(), device=config.device, quiet=quiet)
    elif stats is None:
        stats = collect_input_stats(net, local, progress=not quiet, forward_kwargs=loaded.forward_kwargs(),
                                    stop_at=_trailing_heads(captured, linears))
    else:
        stats = copy.deepcopy(stats)
    return batches, local, stats


def _permute(loaded, config: OptimizeConfig, groups, linears, batches, local, stats, t: StepTimer, quiet: bool,
             checkpoints) -> tuple[dict, list]:
    """One permutation per coupling group (``passes/permute.py``), scored by the statistics the run asks for."""
    from .calib.distributed import from_rank0
    from .passes.permute import PermuteRequest, permute

    search_stats, search_config = stats, config
    if config.prune and config.update == "obs" and config.reconstruct.search == "obs" and config.permutation != "none":
        from dataclasses import replace

        from .calib.blocks import obs_stats

        with t.step("OBS statistics"):  # score weights by what reconstruction cannot recover (see obs_stats)
            search_stats = obs_stats(loaded.model, local, sorted({i.module for i in linears if i.prune}),
                                     damp=config.reconstruct.damp, forward_kwargs=loaded.forward_kwargs(),
                                     device=config.device, quiet=quiet)
            search_config = replace(config, criterion="wanda")
    pruned = {i.param for i in linears if i.prune}
    with t.step("permute"):
        # several processes: rank 0 searches, the others take its permutations (calib/distributed.py)
        return from_rank0(lambda: permute(PermuteRequest(
            loaded, groups, search_stats, batches, search_config, linears, pruned, quiet, checkpoints)))


def _fold(loaded, groups, perms, stats, batches, t: StepTimer):
    """Fold the permutations into the weights and check the function is unchanged: ``(verification inputs,
    fold report, relative error, a function re-measuring that error)`` (the smoothing step checks with it too)."""
    from .passes.fold import fold_
    from .passes.sparsify import permute_stats_

    net = loaded.model
    verify_inputs = _verification_inputs(loaded, batches)
    with torch.no_grad(), fp32_compute(net):  # a bf16/fp16 model is checked in fp32: rounding is not a bug
        dense_ref = [_main_output(net, b, loaded) for b in verify_inputs]

    def error() -> float:
        return _max_rel_err(net, verify_inputs, dense_ref, loaded)

    with t.step("fold"):
        fold_report = fold_(net, groups, perms)
        permute_stats_(stats, groups, perms)
        fold_err = error()
    if fold_err > 1e-4:
        raise VerificationError(f"folding changed the model's output (relative error {fold_err:.2e}); "
                                "this is a bug in the coupling analysis, please report it")
    return verify_inputs, fold_report, fold_err, error


def _mask(loaded, config: OptimizeConfig, linears, batches, local, stats, t: StepTimer, quiet: bool, checkpoints):
    """N:M masks, with the OBS update of the kept weights (``--update obs``): ``(mask result, the batches the
    update was fitted on, all processes' together)``; ``(None, None)`` with ``--prune none``."""
    n, m = config.sparsity.n, config.sparsity.m
    if not config.prune:
        return None, None
    if config.update != "obs":
        from .passes.sparsify import apply_masks_

        with t.step("mask"):
            return apply_masks_(loaded.model, linears, stats, config.criterion, n, m), None
    from .calib.data import load_calibration, narrow_calibration, with_reference
    from .calib.distributed import shard
    from .passes.reconstruct import reconstruct_

    fit_on, whole, rc = local, batches, config.reconstruct
    if narrow_calibration(batches) and (rc.reference_share > 0 or rc.heldout != "none"):
        # one text cannot show how an update fitted on it does on other kinds of text: the embedded mixed set
        # joins the fit (reference_share > 0) or is only checked on
        reference = load_calibration(None, loaded, rc.reference_samples(config.calib_samples),
                                     config.calib_seq_len, config.seed)
        fit_on = with_reference(local, shard(reference), fit=rc.reference_share > 0)
        whole = with_reference(batches, reference, fit=rc.reference_share > 0)  # what report.json counts
    with t.step("mask + reconstruct"):
        return reconstruct_(loaded.model, linears, fit_on, config.criterion, n, m,
                            forward_kwargs=loaded.forward_kwargs(), config=rc, device=config.device, quiet=quiet,
                            checkpoints=checkpoints, quantize=_joint_quant(loaded.model, config)), whole


def _calibration_summary(batches: list, fit_all: list | None) -> dict:
    """report.json's ``calibration``: batches by kind of text, and which the reconstruction fitted or only checked."""
    summary = {"batches": _by_kind(batches)}
    if fit_all is not None:
        checked = set(getattr(fit_all, "reference", None) or ())
        summary["reconstruction_fit"] = _by_kind(fit_all, skip=checked)
        embedded = set(getattr(fit_all, "embedded", None) or ()) - checked
        if embedded:
            summary["reconstruction_fit_embedded"] = _by_kind(fit_all, only=embedded)
        if checked:
            summary["reconstruction_checked_only"] = _by_kind(fit_all, only=checked)
    return summary


def _by_kind(batches: list, skip: set = frozenset(), only: set | None = None) -> dict[str, int]:
    """How many of ``batches`` come from each kind of text or file."""
    sources = list(getattr(batches, "sources", None) or [])
    if len(sources) != len(batches):
        sources = ["calibration"] * len(batches)
    counts: dict[str, int] = {}
    for i, s in enumerate(sources):
        if i not in skip and (only is None or i in only):
            counts[s] = counts.get(s, 0) + 1
    return counts


def optimize(model, out: str | os.PathLike, config: OptimizeConfig = OptimizeConfig(), *, force: bool = False,
             batch_range: tuple[int, int, int] = (1, 1, 8), seq_range: tuple[int, int, int] = (1, 128, 512),
             quiet: bool = False, resume: bool = False, checkpoint_dir: str | None = None,
             trust_pickle: bool = False, prefetch_export: bool | None = None) -> OptimizeResult:
    """Compile ``model`` (a short name, an HF folder, or an ``nn.Module``) into ``out``.

    Example::

        from permcompile import optimize, OptimizeConfig
        optimize("minilm", "out/minilm", OptimizeConfig(permutation="hungarian", criterion="wanda"))

    ``prefetch_export``: trace the ONNX graph in a forked process while the weights are being compressed
    (see :class:`permcompile.export.onnx.GraphPrefetch`); ``False`` traces after compression, in-process;
    ``None`` (default) prefetches models of at least ``PREFETCH_MIN_PARAMS`` parameters, where the trace
    is long enough to be worth a second process.
    """
    from .models import load_model

    if not isinstance(config, OptimizeConfig):
        raise UsageError(f"config must be an OptimizeConfig, got {type(config).__name__}")
    from .precheck import check_calibration_source, check_model_spec, check_range, check_seed

    batch_range = check_range(batch_range, "batch range")
    seq_range = check_range(seq_range, "sequence range")

    check_seed(config.seed)  # before any file is read or the model loaded (minutes on a large model)
    check_model_spec(model)
    check_calibration_source(config.calib)
    if not is_writer():  # torchrun's ranks > 0: the same compression, OUT untouched (launch.py)
        return _follow(model, out, config, resume=resume, checkpoint_dir=checkpoint_dir, trust_pickle=trust_pickle)
    out_dir, plan_path, lock = reserve_output(out, force, model)  # checked and locked before any work
    try:
        t = StepTimer(quiet=quiet)
        with t.step("load"):
            loaded = load_model(model, trust_pickle=trust_pickle)
    except BaseException:
        lock.release()
        raise
    if config.precision == "auto":  # fp16 for a half-precision checkpoint, fp32 otherwise
        import dataclasses

        config = dataclasses.replace(config, precision=config.resolve_precision(model_dtype(loaded.model)))
    prefetch = None
    if prefetch_export is None:
        prefetch_export = sum(p.numel() for p in loaded.model.parameters()) >= PREFETCH_MIN_PARAMS
    if config.residual == "per-layer":
        prefetch_export = False  # the gathers change the graph: it cannot be traced before they exist
    trace_dir = None
    try:
        if prefetch_export:
            from .export.onnx import GraphPrefetch

            trace_dir = Path(tempfile.mkdtemp(prefix="permcompile-trace-"))
            prefetch = GraphPrefetch(loaded.model, loaded.example_inputs(), config.precision, loaded.forward_kwargs(),
                                     workdir=trace_dir)
        # a model this call loaded is its own: once exported, its weights are cast in place and released
        # (verification reloads the written files); a module or LoadedModel passed in stays usable
        owned = not isinstance(model, (torch.nn.Module, type(loaded)))
        return _optimize_loaded(loaded, out_dir, plan_path, config, t, prefetch, batch_range, seq_range, quiet,
                                resume, checkpoint_dir, lock=lock, release_model=owned)
    finally:
        lock.release()
        if prefetch is not None:
            prefetch.cancel()
        if trace_dir is not None:
            shutil.rmtree(trace_dir, ignore_errors=True)
        from .export.ort_session import clear_session_cache

        clear_session_cache()


def _optimize_loaded(loaded, out_dir, plan_path, config, t, prefetch, batch_range, seq_range, quiet, resume,
                     checkpoint_dir, lock: OutputLock | None = None, release_model: bool = False) -> OptimizeResult:
    """compress → export → verify. ``release_model``: nothing after the export needs ``loaded.model``'s
    weights (verification reloads the written files and compares with outputs recorded before), so the
    export casts them in place and they are freed before verification: one copy of the weights at a time."""
    c = compress_(loaded, config, timer=t, quiet=quiet, resume=resume, checkpoint_dir=checkpoint_dir)
    net = loaded.model

    with StagedOutput(out_dir, lock) as staged:  # OUT's folder exists from here on; OUT itself only at commit
        tmp = staged.path
        report = build_report(loaded, config, c, net, t)

        from .export.verify import compare_ort_refs, format_checks, torch_outputs, verify_artifacts

        # the model in memory on a calibration batch, recorded now: ONNX Runtime is compared with it after export
        calib_inputs = c.verify_inputs[:1]
        from .passes.quantize import fake_quant_model

        with fake_quant_model(net, c.quant_plan):  # with --quantize: what the Q/DQ graph computes
            calib_refs = torch_outputs(net, calib_inputs, loaded.forward_kwargs())
        with t.step("export"):
            try:
                _write_artifacts(tmp, loaded, c.groups, c.perms, config, report, c.mask_result, prefetch,
                                 consume=release_model, quant_plan=c.quant_plan)
            except Exception as exc:  # noqa: BLE001 - a full disk must read as such, whoever raised it
                reason = write_failure(exc)
                if reason is None:
                    raise
                raise OutputWriteError(f"cannot write the output to {out_dir.resolve().parent}: {reason}") from exc
        # a quantized graph small enough to hold beside the model is checked teacher-forced (export/qdq_compare.py)
        keep = c.quant_plan is not None and _graph_small(tmp / "model.onnx")
        with t.step("verify"):
            # the in-memory model on calibration inputs, besides verify's random inputs on the reloaded hf/; the
            # teacher-forced references come first, so the model is released before verify_artifacts loads hf/
            # (both at once set SmolLM2 FP8's peak)
            calib_tol, note = _quant_tol(c.quant_plan, config.precision), ""
            if keep:
                from .export.qdq_compare import reference_outputs

                calib_refs, calib_tol, note = reference_outputs(tmp / "model.onnx", net, c.quant_plan, report,
                                                                calib_inputs, loaded.forward_kwargs(),
                                                                config.precision, None)
            if release_model:
                _release_weights_(net)
                net = None
            calib_cmp = compare_ort_refs(tmp / "model.onnx", calib_inputs, calib_refs, precision=config.precision,
                                         tol=calib_tol)
            calib_cmp.detail = note or calib_cmp.detail
            checks = verify_artifacts(tmp)
            checks.append(calib_cmp.as_check("onnxruntime_vs_torch_calibration"))
        report["checks"] = [asdict(c) for c in checks]
        report["timings"] = t.timings
        report["peak_memory_gib"] = t.memory_gib
        # verification only reads: the digests written before it still hold (and it just re-checked them)
        write_report(tmp, report, json.loads((tmp / "report.json").read_text())["files"])
        failed = [c for c in checks if not c.passed]
        if failed:
            dest = staged.fail()
            raise VerificationError(f"verification failed, artifacts kept in {dest}:\n{format_checks(failed)}")
        staged.commit()
        c.checkpoints.remove_cached()  # the output is in place: the passes' checkpoints have served their purpose

    engine = None
    if plan_path is not None:
        engine = _build_engine(out_dir, plan_path, config, loaded, batch_range, seq_range, report, t)
    if not quiet:
        print(f"[permcompile] wrote {out_dir}" + (f" and {engine}" if engine else ""), file=sys.stderr)
    return OptimizeResult(out_dir, report, engine)


def _follow(model, out, config, *, resume: bool, checkpoint_dir, trust_pickle: bool) -> OptimizeResult:
    """What ``optimize`` does on ranks > 0 (launch.py): load the model and run the same compression (its share of
    the calibration batches, every collective) without writing anything; rank 0 writes OUT."""
    import dataclasses

    from .calib.distributed import world
    from .models import load_model

    loaded = load_model(model, trust_pickle=trust_pickle)
    if config.precision == "auto":
        config = dataclasses.replace(config, precision=config.resolve_precision(model_dtype(loaded.model)))
    if checkpoint_dir is not None:  # each rank's reconstruction state is its own (its share of the batches)
        checkpoint_dir = str(Path(checkpoint_dir) / f"rank{world()[0]}")
    compressed = compress_(loaded, config, quiet=True, resume=resume, checkpoint_dir=checkpoint_dir)
    clean_up_on_success(compressed.checkpoints.cached())
    return OptimizeResult(Path(out), {}, None)


# --- helpers ------------------------------------------------------------------------------------

def _trailing_heads(captured, linears) -> list[str]:
    """Dense output heads that run after every pruned layer: calibration can stop there (LM heads)."""
    from .capture import linear_nodes

    order = {module: i for i, (_, module, _) in enumerate(linear_nodes(captured))}
    last_pruned = max((order.get(i.module, -1) for i in linears if i.prune), default=-1)
    return [i.module for i in linears if not i.prune and i.reason.startswith("output head")
            and order.get(i.module, -1) > last_pruned]


def _verification_inputs(loaded, batches: list[dict]) -> list[dict]:
    """Two small batches: real calibration samples and random inputs of another shape."""
    first = {k: v[:2] for k, v in batches[0].items()}
    if "input_ids" in first and first["input_ids"].shape[-1] > 64:
        first = {k: (v[:, :64] if v.dim() >= 2 and k != "pixel_values" else v) for k, v in first.items()}
    from .modelio import random_inputs

    gen = torch.Generator().manual_seed(1234)
    names = list(loaded.example_inputs(batch=2, seq=16))
    image_hw = loaded.image_size if "pixel_values" in names else None
    return [first, random_inputs(names, loaded.config, 2, 16, gen, image_hw=image_hw, vocab_size=loaded.vocab_size)]


def _main_output(net, batch: dict, loaded) -> torch.Tensor:
    """``net``'s main tensor on ``batch`` (:func:`permcompile.modelio.main_output`)."""
    from .modelio import main_output

    return main_output(net(**batch, **loaded.forward_kwargs()))


@torch.no_grad()
def _max_rel_err(net, inputs, refs, loaded) -> float:
    worst = 0.0
    for b, ref in zip(inputs, refs):
        with fp32_compute(net):
            y = _main_output(net, b, loaded)
        worst = max(worst, float((y - ref).abs().max() / ref.abs().max().clamp_min(1e-12)))
    return worst


def permutations_payload(groups, perms, config: OptimizeConfig, model_name: str) -> dict:
    entries = []
    for g in groups:
        perm = perms.get(g.name)
        is_id = perm is None or torch.equal(torch.as_tensor(perm), torch.arange(g.size))
        d = g.to_dict()
        d["perm"] = None if is_id else [int(x) for x in perm]
        entries.append(d)
    return {"format": "permcompile.permutations/1", "model": model_name, "sparsity": str(config.sparsity),
            "strategy": config.permutation, "criterion": config.criterion, "seed": config.seed, "groups": entries}


def _release_weights_(net: torch.nn.Module) -> None:
    """Free ``net``'s parameters and buffers (moved to the meta device: shapes kept, storage released)."""
    import gc

    net.to_empty(device="meta")
    gc.collect()


def _joint_quant(net, config):
    """``--quantize`` with ``QuantizeConfig.joint``: the OBS pass rounds as it prunes (passes.quantize.JointQuant)."""
    if not (config.quantize.enabled and config.quantize.joint):
        return None
    from .passes.quantize import JointQuant

    return JointQuant.from_config(config.quantize, config.resolve_precision(model_dtype(net)))


def _graph_small(onnx_path: Path) -> bool:
    from .export.qdq_compare import small_enough

    return onnx_path.is_file() and small_enough(onnx_path)


def _quant_tol(plan, precision: str) -> float | None:
    if plan is None:
        return None
    from .export.checks import DEFAULT_TOLERANCE
    from .passes.quantize import quant_tolerance

    return quant_tolerance(plan, precision, DEFAULT_TOLERANCE[precision])


def _write_artifacts(tmp: Path, loaded, groups, perms, config, report, mask_result, prefetch=None,
                     consume: bool = False, quant_plan=None) -> None:
    from .export.onnx import export_onnx
    from .export.triton import write_triton_repo
    from .export.onnx_graph import onnx_initializer_for_param

    net = loaded.model
    (tmp / "permutations.json").write_text(
        json.dumps(permutations_payload(groups, perms, config, loaded.name), indent=1, sort_keys=True))
    stages = {}
    clock = time.perf_counter()
    if hasattr(net, "save_pretrained"):
        from .passes.glue import standard_form

        with standard_form(net, report.get("glue", [])):  # a plain checkpoint: same function, no gather
            if quant_plan is None:
                net.save_pretrained(tmp / "hf", safe_serialization=True)
            else:  # the 8-bit codes and scales as a compressed-tensors checkpoint (export/hf_compressed.py)
                from .export.hf_compressed import save_compressed

                report["quantization"]["hf"] = save_compressed(net, tmp / "hf", quant_plan, str(config.sparsity))
        for extra in (loaded.tokenizer, loaded.image_processor):
            if extra is not None:
                try:
                    extra.save_pretrained(tmp / "hf")
                except Exception:  # a tokenizer that cannot save is not worth failing the run
                    pass
        if loaded.folder is not None:  # e.g. sentence-transformers' modules.json and 1_Pooling/
            from .models import copy_extra_files

            report["hf_extra_files"] = copy_extra_files(Path(loaded.folder), tmp / "hf")
    stages["save_hf"] = round(time.perf_counter() - clock, 3)
    # a quantized graph gets Q/DQ and 8-bit weight codes as it is written (export/onnx_qdq.py)
    info = export_onnx(net, loaded.example_inputs(), tmp / "model.onnx", config.precision,
                       forward_kwargs=loaded.forward_kwargs(), prefetched=prefetch, consume=consume,
                       quant_plan=quant_plan)
    report["onnx"] = jsonable(info)
    quantized = report["onnx"].pop("quantized")
    clock = time.perf_counter()
    proto = None
    for layer in report["pruned_layers"]:
        name = info.initializer_map.get(layer["param"])
        if name is None:  # not matched while exporting: search the graph (slower, best effort)
            try:
                if proto is None:
                    import onnx

                    proto = onnx.load(str(tmp / "model.onnx"), load_external_data=False)
                name = onnx_initializer_for_param(proto, layer["param"])
            except Exception as exc:  # mapping is best effort; verify falls back to structure checks
                report["onnx_mapping_error"] = str(exc)
        layer["onnx_initializer"] = name
    if quant_plan is not None:
        report["quantization"]["onnx"] = quantized
        quant_plan.write(tmp)
    triton = write_triton_repo(tmp / "triton", "model", onnx_path=tmp / "model.onnx", sparse=config.prune,
                               precision=config.precision, inputs=info.inputs, outputs=info.outputs,
                               quantize=quant_plan.mode if quant_plan is not None else None)
    report["triton"] = {"precision": config.precision, "sparsity": 'key: "trt_sparsity_enable"' in triton.config,
                        "notes": triton.notes}
    stages["triton"] = round(time.perf_counter() - clock, 3)
    report["onnx"]["stages"] = {**stages, **info.stages}
    write_report(tmp, report)


def _build_engine(out_dir, plan_path, config, loaded, batch_range, seq_range, report, t) -> Path:
    from .export.tensorrt import build_engine

    ex = loaded.example_inputs()
    profiles = {}
    for k, v in ex.items():
        if loaded.family == "vision":
            rest = tuple(v.shape[1:])
            profiles[k] = tuple((b,) + rest for b in batch_range)
        else:
            profiles[k] = tuple((b, s) for b, s in zip(batch_range, seq_range))
    with t.step("tensorrt"):
        try:
            # a quantized graph: its Q/DQ types set the layers' precision (export/tensorrt.py)
            extra = {"quantize": config.quantize.mode} if config.quantize.enabled else {}
            info = build_engine(out_dir / "model.onnx", plan_path, config.precision, profiles, sparse=config.prune,
                                **extra)
        except MissingDependencyError as exc:
            raise MissingDependencyError(f"{exc} (the ONNX artifacts are in {out_dir})") from exc
    report["tensorrt"] = jsonable(info)
    from .export.triton import write_triton_repo

    write_triton_repo(out_dir / "triton", "model_trt", plan_path=plan_path, io_from_onnx=out_dir / "model.onnx",
                      precision=config.precision, profiles=profiles, sparse=config.prune)
    report["timings"] = t.timings
    write_report(out_dir, report)
    return Path(plan_path)


__all__ = ["optimize", "OptimizeResult", "resolve_outputs", "PermcompileError"]
