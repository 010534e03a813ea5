"""``optimize()``: the whole compiler, one step after another.

capture → groups → calibrate → permute → fold → mask → export → verify

Read this file top to bottom to see what ``permcompile optimize`` does. Each step lives in its own
module; this one only orders them, times them, and writes the output folder atomically (a temporary
folder renamed into place only after every check passed; a failed check leaves ``OUT.failed/``).
"""
from __future__ import annotations

import copy
import json
import os
import re
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .config import OptimizeConfig
from .dtypes import dtype_name, fp32_compute, model_dtype
from .errors import (MissingDependencyError, OutputWriteError, PermcompileError, UsageError, VerificationError,
                     write_failure)


PREFETCH_MIN_PARAMS = 20_000_000  # below this, tracing takes seconds: a second process does not pay


@dataclass
class OptimizeResult:
    out_dir: Path
    report: dict
    engine_path: Path | None = None


def _rss_bytes() -> int:
    """This process's resident memory now (Linux ``/proc``; 0 where it cannot be read)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


class _PeakRSS:
    """Highest resident memory of this process while a step runs, sampled every ``interval`` s by a daemon
    thread (a step's peak is what tells a user which step to blame when a large model runs out of memory)."""

    def __init__(self, interval: float = 0.05):
        import threading

        self.peak = _rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(interval,), daemon=True)
        self._thread.start()

    def _run(self, interval: float) -> None:
        while not self._stop.wait(interval):
            self.peak = max(self.peak, _rss_bytes())

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return max(self.peak, _rss_bytes())


@dataclass
class _Timer:
    """Wall time (``timings``, s) and peak resident memory (``memory_gib``) of each step of the pipeline."""
    timings: dict = field(default_factory=dict)
    quiet: bool = False
    memory_gib: dict = field(default_factory=dict)

    def step(self, name: str):
        timer = self

        class _Ctx:
            def __enter__(self):
                self.start = time.perf_counter()
                self.watch = _PeakRSS()
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


def resolve_outputs(out: str | os.PathLike, force: bool, model=None) -> tuple[Path, Path | None]:
    """``OUT`` → (artifact folder, engine path or None). ``X.plan`` puts artifacts in ``X/``.

    Checks everything that can be checked before any work: an existing output is replaced only with
    ``force`` and only if it is a permcompile output that does not hold the input model; the nearest
    existing parent folder must accept a file (a real write probe, not just permission bits).
    """
    from .safepath import check_output_name

    check_output_name(out)
    out = Path(out)
    plan = None
    if out.suffix == ".plan":
        plan = out
        out = out.with_suffix("")
    model_path = None
    if isinstance(model, (str, os.PathLike)) and Path(model).expanduser().exists():
        model_path = Path(model).expanduser().resolve()
    resolved_out = out.resolve()
    if model_path is not None and (resolved_out == model_path or resolved_out in model_path.parents):
        raise UsageError(f"refusing to write {out}: it holds the input model {model}")
    for target in [out] + ([plan] if plan else []):
        if not (target.exists() or target.is_symlink()):
            continue
        if not force:
            raise UsageError(f"output {target} already exists (use --force to replace it)")
        _check_replaceable(target, model_path, engine=target is plan, folder=out)
    parent = out.resolve().parent
    probe_dir = parent
    while not probe_dir.exists():
        probe_dir = probe_dir.parent
    if not probe_dir.is_dir():
        raise UsageError(f"cannot create {out}: {probe_dir} is a file, not a folder")
    try:
        with tempfile.TemporaryFile(dir=probe_dir):
            pass
    except OSError as exc:
        raise UsageError(f"cannot write to {probe_dir}: {exc.strerror or exc}") from None
    return out, plan


def _check_replaceable(target: Path, model_path: Path | None, *, engine: bool, folder: Path) -> None:
    """``--force`` replaces only a permcompile output: a folder with its report.json (or the engine file
    ``X.plan`` of an output folder ``X/``), never another file or folder, and never anything that is, holds
    or lies inside the input model (symlinks resolved)."""
    resolved = target.resolve()
    if model_path is not None:
        if resolved == model_path or resolved in model_path.parents:
            raise UsageError(f"refusing to replace {target}: it holds the input model")
        if model_path in resolved.parents:
            raise UsageError(f"refusing to replace {target}: it lies inside the input model {model_path}")
    if engine:
        if not resolved.is_file() or not (folder / "report.json").is_file():
            raise UsageError(f"refusing to replace {target}: it is not the engine of a permcompile output "
                             f"(no {folder / 'report.json'})")
        return
    if not resolved.is_dir():
        raise UsageError(f"refusing to replace {target}: it is a file, not a permcompile output folder")
    if not (resolved / "report.json").is_file():
        raise UsageError(f"refusing to replace {target}: it is not a permcompile output (no report.json)")


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


def compress_(loaded, config: OptimizeConfig, *, timer: "_Timer | None" = None, quiet: bool = True,
              resume: bool = False, checkpoint_dir: str | None = None, stats: dict | None = None,
              batches: list | None = None) -> Compressed:
    """capture → groups → calibrate → permute → fold → mask, in memory, on ``loaded.model`` (in place).

    ``stats``/``batches`` may be passed in to reuse one calibration across several runs (benchmarks).
    ``checkpoint_dir``: where the resumable passes (search, learned, reconstruction) save their state (default: the
    cache, and only once a pass has run ``CHECKPOINT_AFTER_S``); ``resume``: they continue from it
    (``passes/checkpoint.py``).
    Post-conditions: folding preserved the function (checked on real and random inputs) and every pruned
    weight is N:M along its input axis.
    """
    from .calib.data import load_calibration
    from .calib.distributed import check_same_weights, from_rank0, shard
    from .calib.stats import collect_input_stats
    from .capture import capture
    from .passes.checkpoint import Checkpoints
    from .passes.coupling import analyze
    from .passes.fold import fold_
    from .passes.sparsify import apply_masks_, permute_stats_, select_linears

    torch.manual_seed(config.seed)
    t = timer or _Timer(quiet=quiet)
    n, m = config.sparsity.n, config.sparsity.m
    net = loaded.model
    checkpoints = Checkpoints(loaded.name, checkpoint_dir, resume=resume, quiet=quiet)
    with t.step("capture"):
        captured = capture(net, loaded.example_inputs(), loaded.forward_kwargs())
    with t.step("analyze"):
        groups = analyze(captured)
        linears = select_linears(net, captured, groups, m, config.prune_embeddings)
        if not any(i.prune for i in linears):
            raise UsageError(f"no linear layer of this model can take {config.sparsity} sparsity "
                             f"(input sizes: {sorted({i.k for i in linears})})")
        pruned = {i.param for i in linears if i.prune}
        if config.residual == "per-layer":
            from .passes.glue import split_residual

            groups = split_residual(groups, net, pruned)
            if not any(g.kind == "residual-site" for g in groups):
                import warnings

                warnings.warn("--residual per-layer: this model has no permutable residual-stream group (see "
                              "`permcompile inspect`), so there is no reading site to split; the result is the "
                              "same as --residual global", stacklevel=2)

    with t.step("calibrate"):
        if batches is None:
            batches = load_calibration(config.calib, loaded, config.calib_samples, config.calib_seq_len,
                                       config.seed)
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

    search_stats, search_config = stats, config
    if config.prune and config.update == "obs" and config.reconstruct.search == "obs" and config.permutation != "none":
        from dataclasses import replace

        from .calib.blocks import obs_stats

        with t.step("OBS statistics"):  # score weights by what reconstruction cannot recover (see obs_stats)
            search_stats = obs_stats(net, local, sorted({i.module for i in linears if i.prune}),
                                     damp=config.reconstruct.damp, forward_kwargs=loaded.forward_kwargs(),
                                     device=config.device, quiet=quiet)
            search_config = replace(config, criterion="wanda")
    with t.step("permute"):
        from .passes.permute import PermuteRequest, permute

        # several processes: rank 0 searches, the others take its permutations (calib/distributed.py)
        perms, group_results = from_rank0(lambda: permute(PermuteRequest(
            loaded, groups, search_stats, batches, search_config, linears, pruned, quiet, checkpoints)))

    verify_inputs = _verification_inputs(loaded, batches)
    with torch.no_grad(), fp32_compute(net):  # a bf16/fp16 model is checked in fp32: rounding is not a bug
        dense_ref = [_main_output(net, b, loaded) for b in verify_inputs]
    with t.step("fold"):
        fold_report = fold_(net, groups, perms)
        permute_stats_(stats, groups, perms)
        fold_err = _max_rel_err(net, verify_inputs, dense_ref, loaded)
    if fold_err > 1e-4:
        raise VerificationError(f"folding changed the model's output (relative error {fold_err:.2e}); "
                                "this is a bug in the coupling analysis, please report it")
    smoothing = None
    if config.quantize.enabled and config.quantize.smooth_alpha is not None:
        from .passes.smooth import smooth_

        with t.step("smooth"):  # SmoothQuant diagonals, folded and checked like the permutations
            smoothing = smooth_(net, groups, [i for i in linears if i.prune], local, config.quantize.smooth_alpha,
                                lambda: _max_rel_err(net, verify_inputs, dense_ref, loaded),
                                loaded.forward_kwargs(), stats)
    mask_result = None
    if config.prune and config.update == "obs":
        from .passes.reconstruct import reconstruct_

        with t.step("mask + reconstruct"):
            mask_result = reconstruct_(net, linears, local, config.criterion, n, m,
                                       forward_kwargs=loaded.forward_kwargs(), config=config.reconstruct,
                                       device=config.device, quiet=quiet, checkpoints=checkpoints,
                                       quantize=_joint_quant(net, config))
    elif config.prune:
        with t.step("mask"):
            mask_result = apply_masks_(net, linears, stats, config.criterion, n, m)
    quant_plan = None
    if config.quantize.enabled:
        from .passes.quantize import QuantRequest
        from .quantization import QUANT_MODES

        with t.step("quantize"):
            quant_plan = QUANT_MODES.get(config.quantize.mode).handler(QuantRequest(
                net, linears, local, config.quantize, precision=config.resolve_precision(model_dtype(net)),
                stats=stats, forward_kwargs=loaded.forward_kwargs(),
                weight_scales=getattr(mask_result, "weight_scales", None)))
            quant_plan.smoothing = smoothing or {}
    check_same_weights(net)  # several processes: every rank must end with rank 0's weights (a warning if not)
    return Compressed(groups, linears, perms, group_results, fold_report, fold_err, mask_result, stats, batches,
                      verify_inputs, t.timings, checkpoints, quant_plan)


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
    from .launch import follow, is_writer

    if not is_writer():  # torchrun's ranks > 0: the same compression, OUT untouched (launch.py)
        return follow(model, out, config, resume=resume, checkpoint_dir=checkpoint_dir, trust_pickle=trust_pickle)
    out_dir, plan_path = resolve_outputs(out, force, model)
    lock = _OutputLock(out_dir)
    lock.acquire()  # now if OUT's folder exists, else once it is created (before anything is written there)
    try:
        if lock.held and _clean_stale(out_dir):  # an old output came back to OUT: check OUT again
            resolve_outputs(out, force, model)
            lock.identity = _identity(out_dir)
        t = _Timer(quiet=quiet)
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
                     checkpoint_dir, lock: "_OutputLock | None" = None, release_model: bool = False) -> OptimizeResult:
    """compress → export → verify. ``release_model``: nothing after the export needs ``loaded.model``'s
    weights (verification reloads the written files and compares with outputs recorded before), so the
    export casts them in place and they are freed before verification: one copy of the weights at a time."""
    from .passes.glue import glue_cost, glue_records

    c = compress_(loaded, config, timer=t, quiet=quiet, resume=resume, checkpoint_dir=checkpoint_dir)
    net = loaded.model
    groups, perms, group_results = c.groups, c.perms, c.group_results
    fold_report, fold_err, mask_result, linears = c.fold_report, c.fold_err, c.mask_result, c.linears
    verify_inputs = c.verify_inputs

    out_dir.resolve().parent.mkdir(parents=True, exist_ok=True)  # only now: a failed run leaves nothing
    lock = lock or _OutputLock(out_dir)
    if not lock.held:
        lock.acquire()
        _clean_stale(out_dir)
    # the PID in the name tells a later run whether this folder's owner is still alive (_clean_stale)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-{os.getpid()}-", dir=out_dir.resolve().parent))
    try:
        report = {
            "model": loaded.name, "source": loaded.source, "family": loaded.family,
            "auto_class": loaded.auto_class, "sparsity": str(config.sparsity),
            "permutation": config.permutation, "criterion": config.criterion, "precision": config.precision,
            "checkpoint_dtype": dtype_name(model_dtype(net)),
            "pruned": config.prune, "config": _config_dict(config),
            "groups": [r.to_dict() for r in group_results],
            "glue_ops": fold_report.glue_ops,
            "glue": glue_records(net, groups, perms),
            "glue_cost": glue_cost(net, groups, perms, linears),
            "fold": {"groups_permuted": fold_report.groups_permuted, "tensors_changed": fold_report.tensors_changed,
                     "max_rel_err": fold_err},
            "pruned_layers": mask_result.layers if mask_result else [],
            "dense_layers": (mask_result.dense if mask_result else
                             [{"module": i.module, "param": i.param, "reason": "--prune none"} for i in linears]),
            "input_names": list(loaded.example_inputs().keys()),
            "timings": t.timings,
            "peak_memory_gib": t.memory_gib,
        }
        if c.quant_plan is not None:
            report["quantization"] = c.quant_plan.summary()
        kept = [r for r in group_results if r.strategy != "none" or r.kept_identity]
        if kept:
            report["kept_importance"] = {
                "identity": sum(r.kept_identity for r in kept) / len(kept),
                "chosen": sum(r.kept_chosen for r in kept) / len(kept),
            }
        from .export.verify import compare_ort_refs, format_checks, torch_outputs, verify_artifacts

        # the model in memory on a calibration batch, recorded now: ONNX Runtime is compared with it after export
        calib_inputs = verify_inputs[:1]
        from .passes.quantize import fake_quant_model

        with fake_quant_model(net, c.quant_plan):  # with --quantize: what the Q/DQ graph computes
            calib_refs = torch_outputs(net, calib_inputs, loaded.forward_kwargs())
        with t.step("export"):
            try:
                _write_artifacts(tmp, loaded, groups, perms, config, report, mask_result, prefetch,
                                 consume=release_model, quant_plan=c.quant_plan)
            except Exception as exc:  # noqa: BLE001 - a full disk must read as such, whoever raised it
                reason = write_failure(exc)
                if reason is None:
                    raise
                raise OutputWriteError(f"cannot write the output to {out_dir.resolve().parent}: {reason}") from exc
        # a quantized graph small enough to hold beside the model is checked teacher-forced (export/qdq_compare.py)
        keep = c.quant_plan is not None and _graph_small(tmp / "model.onnx")
        if release_model and not keep:
            _release_weights_(net)
            net = None
        with t.step("verify"):
            checks = verify_artifacts(tmp)
            # the in-memory model on calibration inputs, besides verify's random inputs on the reloaded hf/
            calib_tol, note = _quant_tol(c.quant_plan, config.precision), ""
            if keep:
                from .export.qdq_compare import reference_outputs

                calib_refs, calib_tol, note = reference_outputs(tmp / "model.onnx", net, c.quant_plan, report,
                                                                calib_inputs, loaded.forward_kwargs(),
                                                                config.precision, None)
            calib_cmp = compare_ort_refs(tmp / "model.onnx", calib_inputs, calib_refs, precision=config.precision,
                                         tol=calib_tol)
            calib_cmp.detail = note or calib_cmp.detail
            checks.append(calib_cmp.as_check("onnxruntime_vs_torch_calibration"))
        report["checks"] = [asdict(c) for c in checks]
        report["timings"] = t.timings
        report["peak_memory_gib"] = t.memory_gib
        # verification only reads: the digests written before it still hold (and it just re-checked them)
        _write_report(tmp, report, json.loads((tmp / "report.json").read_text())["files"])
        failed = [c for c in checks if not c.passed]
        if failed:
            dest = out_dir.with_name(out_dir.name + ".failed")
            _replace(tmp, dest)
            raise VerificationError(f"verification failed, artifacts kept in {dest}:\n{format_checks(failed)}")
        lock.check_unchanged()
        _normalise_modes(tmp)
        _replace(tmp, out_dir)
        c.checkpoints.remove_cached()  # the output is in place: the passes' checkpoints have served their purpose
    except BaseException:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        raise

    engine = None
    if plan_path is not None:
        engine = _build_engine(out_dir, plan_path, config, loaded, batch_range, seq_range, report, t)
    if not quiet:
        print(f"[permcompile] wrote {out_dir}" + (f" and {engine}" if engine else ""), file=sys.stderr)
    return OptimizeResult(out_dir, report, engine)


# --- helpers ------------------------------------------------------------------------------------

def _config_dict(config: OptimizeConfig) -> dict:
    d = asdict(config)
    d["sparsity"] = str(config.sparsity)
    return d


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
            net.save_pretrained(tmp / "hf", safe_serialization=True)
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
    info = export_onnx(net, loaded.example_inputs(), tmp / "model.onnx", config.precision,
                       forward_kwargs=loaded.forward_kwargs(), prefetched=prefetch, consume=consume)
    report["onnx"] = _jsonable(info)
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
    if quant_plan is not None:  # Q/DQ around every quantized MatMul, weights as 8-bit codes (export/onnx_qdq.py)
        from .export.onnx_qdq import rewrite_qdq_file

        names = {e["param"]: e["onnx_initializer"] for e in report["pruned_layers"] if e.get("onnx_initializer")}
        report["quantization"]["onnx"] = rewrite_qdq_file(tmp / "model.onnx", quant_plan, names)
        quant_plan.write(tmp)
    triton = write_triton_repo(tmp / "triton", "model", onnx_path=tmp / "model.onnx", sparse=config.prune,
                               precision=config.precision, inputs=info.inputs, outputs=info.outputs,
                               quantize=quant_plan.mode if quant_plan is not None else None)
    report["triton"] = {"precision": config.precision, "sparsity": 'key: "trt_sparsity_enable"' in triton.config,
                        "notes": triton.notes}
    stages["triton"] = round(time.perf_counter() - clock, 3)
    report["onnx"]["stages"] = {**stages, **info.stages}
    _write_report(tmp, report)


def _jsonable(obj):
    if hasattr(obj, "__dataclass_fields__"):
        return {k: _jsonable(v) for k, v in asdict(obj).items()}
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj


def _write_report(folder: Path, report: dict, digests: dict | None = None) -> None:
    """Write ``report.json`` with the sha256 of every other file (``digests`` when already computed)."""
    from .export.digests import file_digests

    report = dict(report)
    report.pop("files", None)
    report["files"] = digests if digests is not None else file_digests(folder)
    (folder / "report.json").write_text(json.dumps(_jsonable(report), indent=1, sort_keys=True))


def _replace(src: Path, dest: Path) -> None:
    """Move ``src`` to ``dest`` so that a crash at any point loses neither: an existing ``dest`` is renamed
    aside (``.DEST.old-PID-*``), ``src`` moved in, and only then the old one deleted. A run that dies between
    the two renames leaves the old output aside; the next run to the same OUT puts it back (``_clean_stale``).
    """
    import secrets

    aside = None
    if dest.exists() or dest.is_symlink():
        aside = dest.with_name(f".{dest.name}.old-{os.getpid()}-{secrets.token_hex(4)}")
        os.replace(dest, aside)  # a rename: atomic
    try:
        os.replace(src, dest)
    except BaseException:
        if aside is not None and not (dest.exists() or dest.is_symlink()):
            os.replace(aside, dest)
        raise
    if aside is not None:
        _remove(aside)


def _normalise_modes(folder: Path) -> None:
    """Every file ``0o666``, every folder ``0o777``, less the umask (0644 / 0755 usually), like a file made
    with ``open()``: some writers (safetensors through transformers) create theirs 0600."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(folder, 0o777 & ~umask)
    for root, dirs, files in os.walk(folder):
        for d in dirs:
            os.chmod(os.path.join(root, d), 0o777 & ~umask)
        for f in files:
            path = os.path.join(root, f)
            if not os.path.islink(path):
                os.chmod(path, 0o666 & ~umask)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return pid > 0
    return True


LEGACY_TMP_STALE_S = 86_400  # a temporary folder without a PID in its name is presumed dead after a day


def _clean_stale(out_dir: Path) -> bool:
    """Remove what runs to ``out_dir`` that died (SIGKILL, power loss) left next to it: their temporary
    folders ``.OUT.tmp-PID-*``; an old output renamed aside (``.OUT.old-PID-*``) goes back to OUT if OUT is
    missing (the run died between the two renames of ``_replace``), else is deleted. Only names of that form
    whose process is gone are touched, and temporaries of versions that named them without a PID
    (``.OUT.tmp-XXXXXXXX``) once a day old. Returns True when an old output was put back."""
    restored = False
    parent = out_dir.parent
    legacy = re.compile(rf"\.{re.escape(out_dir.name)}\.tmp-[a-z0-9_]{{8}}")
    for name in (out_dir.name, out_dir.name + ".failed"):
        pattern = re.compile(rf"\.{re.escape(name)}\.(tmp|old)-(\d+)-[A-Za-z0-9_]+")
        try:
            entries = sorted(parent.iterdir())
        except OSError:
            return restored
        for entry in entries:
            if name == out_dir.name and legacy.fullmatch(entry.name) and entry.is_dir() and not entry.is_symlink():
                try:
                    if time.time() - entry.stat().st_mtime > LEGACY_TMP_STALE_S:
                        shutil.rmtree(entry, ignore_errors=True)
                except OSError:
                    pass
                continue
            match = pattern.fullmatch(entry.name)
            if match is None or _pid_alive(int(match.group(2))) or not entry.is_dir() or entry.is_symlink():
                continue
            dest = parent / name
            try:
                if match.group(1) == "old" and not (dest.exists() or dest.is_symlink()):
                    os.replace(entry, dest)
                    restored = True
                else:
                    shutil.rmtree(entry, ignore_errors=True)
            except OSError:
                pass
    return restored


def _identity(path: Path):
    """What tells one output at ``path`` from another written there later (None: nothing there)."""
    try:
        st = path.lstat()
    except OSError:
        return None
    try:
        report = (path / "report.json").stat().st_mtime_ns
    except OSError:
        report = None
    return st.st_dev, st.st_ino, report


class _OutputLock:
    """``.OUT.lock`` next to OUT, created exclusively and holding the owner's PID, for the whole run: a
    second run to the same OUT is refused at once instead of silently replacing the first one's result. A
    lock whose process is gone (SIGKILL) is taken over. The state of OUT when the run started is recorded:
    at the end, an OUT that changed meanwhile (a run that did not see the lock) is not replaced."""

    def __init__(self, out_dir: Path):
        self.out_dir = out_dir
        self.path = out_dir.parent / f".{out_dir.name}.lock"
        self.held = False
        self.identity = _identity(out_dir)

    def acquire(self) -> None:
        if self.held or not self.path.parent.is_dir():
            return
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                try:
                    pid = int(self.path.read_text(encoding="utf-8").split()[0])
                except (OSError, ValueError, IndexError):
                    pid = None
                if pid is not None and _pid_alive(pid):
                    raise UsageError(f"another permcompile run (pid {pid}) is writing {self.out_dir}; wait for it "
                                     f"to finish (or delete {self.path} if no run is)") from None
                if pid is None and time.time() - self._mtime() < 5:  # being written by its owner right now
                    time.sleep(0.2)
                    continue
                self.path.unlink(missing_ok=True)  # stale: its process is gone
                continue
            except OSError as exc:
                raise UsageError(f"cannot write to {self.path.parent}: {exc.strerror or exc}") from None
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                fh.write(f"{os.getpid()}\n")
            self.held = True
            return
        raise UsageError(f"cannot lock {self.out_dir}: {self.path} is in the way")

    def _mtime(self) -> float:
        try:
            return self.path.stat().st_mtime
        except OSError:
            return 0.0

    def check_unchanged(self) -> None:
        if _identity(self.out_dir) != self.identity:
            raise OutputWriteError(f"{self.out_dir} was written by another run while this one worked; "
                                   "it was left as it is and this run's result discarded")

    def release(self) -> None:
        if self.held:
            self.held = False
            try:
                self.path.unlink(missing_ok=True)
            except OSError:
                pass


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
    report["tensorrt"] = _jsonable(info)
    from .export.triton import write_triton_repo

    write_triton_repo(out_dir / "triton", "model_trt", plan_path=plan_path, io_from_onnx=out_dir / "model.onnx",
                      precision=config.precision, profiles=profiles, sparse=config.prune)
    report["timings"] = t.timings
    _write_report(out_dir, report)
    return Path(plan_path)


__all__ = ["optimize", "OptimizeResult", "resolve_outputs", "PermcompileError"]
