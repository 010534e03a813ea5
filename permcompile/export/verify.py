"""Checks on exported artifacts: N:M in the ONNX graph, ONNX Runtime vs torch, and whole OUT folders.

* :func:`onnx_nm_report` lists every constant MatMul / Gemm weight with its K axis (looking through
  Transpose / Cast) and says whether it is N:M along K.
* :func:`compare_ort_torch` runs ONNX Runtime (CPU) and the torch model on the same inputs.
* :func:`verify_artifacts` re-checks an ``optimize`` output folder: file digests (tamper detection),
  N:M of every pruned layer in ``model.onnx`` and in ``hf/`` safetensors, and ONNX Runtime vs the
  reloaded ``hf/`` model, one function per check. :func:`raise_if_failed` turns failed checks into a
  :class:`VerificationError`.

Sessions live in :mod:`.ort_session`, digests in :mod:`.digests`, the check type in :mod:`.checks`, reference
outputs and their comparison in :mod:`.compare`.
"""
from __future__ import annotations

import gc
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from ..config import Sparsity
from ..errors import UsageError, VerificationError
from ..hfenv import set_hf_env
from ..modelio import random_inputs, text_config
from ..safepath import UnsafePathError, read_json, resolve_inside, unsafe_entries
from .checks import DEFAULT_TOLERANCE, Check, aggregate, format_checks, raise_if_failed
from .compare import (SLICE_ABOVE_BYTES, SLICE_BYTES, CompareResult, compare_outputs, feeds, torch_outputs,
                      weight_bytes)
from .digests import REPORT, sha256_file
from .onnx import iter_weight_uses
from .onnx_graph import load_onnx, onnx_initializer_for_param
from .onnx_write import load_weightless, tensor_array
from .ort_chunks import NotSliceable, run_sliced
from .ort_session import clear_session_cache, ort_session
from .qdq_compare import reference_outputs
from .verify_quant import hf_check, load_plan, qdq_check

__all__ = [
    "LinearCheck",
    "Check",
    "CompareResult",
    "DEFAULT_TOLERANCE",
    "onnx_nm_report",
    "compare_ort_torch",
    "compare_ort_refs",
    "torch_outputs",
    "check_external_data",
    "format_checks",
    "raise_if_failed",
    "verify_artifacts",
    "random_inputs",
]

ONNX_FILE = "model.onnx"
HF_DIR = "hf"
MAX_REPORT_BYTES = 256 << 20  # report.json lists every pruned layer, and per-layer glue indices


# --------------------------------------------------------------------------------------------------
# N:M in ONNX graphs
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LinearCheck:
    """One MatMul/Gemm weight of an ONNX graph and its N:M status along K."""

    name: str  # initializer name
    node: str  # the MatMul / Gemm node
    op: str
    shape: tuple[int, ...]
    k_axis: int  # axis of the stored initializer that is K
    k: int
    n: int
    m: int
    is_nm: bool  # every group of m consecutive entries along K has at most n nonzeros (False if K % m)
    violations: int  # groups with more than n nonzeros (-1 when K is not a multiple of m)
    groups: int
    density: float  # fraction of nonzero entries
    dtype: str
    param: str | None  # torch parameter guessed from the exporter's metadata

    @property
    def divisible(self) -> bool:
        return self.k % self.m == 0


def _nm_stats(arr: np.ndarray, k_axis: int, n: int, m: int) -> tuple[bool, int, int]:
    k = arr.shape[k_axis]
    if k % m:
        return False, -1, 0
    moved = np.moveaxis(arr, k_axis, -1)
    counts = (moved.reshape(*moved.shape[:-1], k // m, m) != 0).sum(axis=-1)
    bad = int((counts > n).sum())
    return bad == 0, bad, int(counts.size)


def _constant_arrays(model, base_dir: str | os.PathLike = "", graph_file=None) -> dict[str, Any]:
    """Lazily converted arrays for initializers and Constant-node values (external data read from
    ``base_dir`` one tensor at a time, ``onnx_write.tensor_array``; nothing is cached, so a large model is never
    held whole)."""
    import onnx

    tensors: dict[str, Any] = {i.name: i for i in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value" and a.type == onnx.AttributeProto.TENSOR:
                    tensors[node.output[0]] = a.t

    class _Lazy(dict):
        def __missing__(self, key):
            return tensor_array(tensors[key], base_dir, graph_file)

    return _Lazy()


def check_external_data(path, proto=None) -> list[str]:
    """Problems ``onnx.load`` would have with the external data of ONNX file ``path`` (empty: none).

    Every external tensor's location is resolved and read the way ``onnx.load`` does (a file next to the
    graph, no symlink, no path outside the folder, a single hard link, in bounds), one tensor at a time.
    ``proto``: the file's graph already loaded without external data (saves parsing it again).
    """
    import onnx
    from onnx.external_data_helper import load_external_data_for_tensor, uses_external_data

    path = Path(path)
    if proto is None:
        proto = onnx.load(str(path), load_external_data=False)
    problems = []
    for tensor in proto.graph.initializer:
        if not uses_external_data(tensor) or _in_graph_file(tensor, path):
            continue
        probe = onnx.TensorProto()
        probe.CopyFrom(tensor)  # a header only: the payload is read into the probe, then dropped
        try:
            load_external_data_for_tensor(probe, str(path.parent))
        except Exception as exc:  # noqa: BLE001
            problems.append(f"{path.name}: {str(exc).splitlines()[0][:200]}")
            break  # one reason is enough: the same file usually fails every tensor
    return problems


def _in_graph_file(tensor, path: Path) -> bool:
    """A reference into the graph file itself (``onnx_write.load_weightless``): read, within the file's bounds,
    by ``onnx_write.tensor_array``."""
    return any(e.key == "location" and e.value == path.name for e in tensor.external_data)


def onnx_nm_report(path, n: int = 2, m: int = 4, min_k: int = 0,
                   base_dir: str | os.PathLike | None = None, names=None, graph_file=None) -> list[LinearCheck]:
    """Every constant MatMul/Gemm weight (K >= ``min_k``) with its N:M status along K.

    A weight shared by several nodes with the same K axis is reported once. fp16 / fp32 / fp64 (and any
    numeric) initializers are handled; external data is read from next to the file (or from ``base_dir``
    for a model proto loaded without it), one weight at a time. ``names``: only these initializers (the
    LM head of a large vocabulary is the largest array of all and is never pruned). ``graph_file``: the file a
    weightless ``path`` proto came from (``onnx_write.load_weightless``).
    """
    if base_dir is None and not hasattr(path, "graph"):
        base_dir = Path(path).parent
    model = load_onnx(path, external_data=False)
    arrays = _constant_arrays(model, base_dir or "", graph_file)
    seen: set[tuple[str, int]] = set()
    out: list[LinearCheck] = []
    for use in iter_weight_uses(model):
        if (use.init, use.k_axis) in seen or (names is not None and use.init not in names):
            continue
        seen.add((use.init, use.k_axis))
        k = use.shape[use.k_axis]
        if k < min_k:
            continue
        arr = arrays[use.init]
        ok, bad, groups = _nm_stats(arr, use.k_axis, n, m)
        density = float(np.count_nonzero(arr)) / max(arr.size, 1)
        out.append(LinearCheck(use.init, use.node, use.op, tuple(arr.shape), use.k_axis, k, n, m, ok, bad, groups,
                               density, str(arr.dtype), use.param))
    return out


# --------------------------------------------------------------------------------------------------
# ONNX Runtime vs torch
# --------------------------------------------------------------------------------------------------
def compare_ort_torch(model: nn.Module, onnx_path, input_batches: Sequence[Mapping[str, Tensor]],
                      forward_kwargs: Mapping[str, Any] | None = None, precision: str = "fp32",
                      tol: float | None = None, providers: Sequence[str] | None = None) -> CompareResult:
    """Run ``model`` (see :func:`torch_outputs`) and ONNX Runtime on each batch and compare.

    The torch side goes through the same wrapper as the export (same output selection, ``use_cache=False``).
    Errors are relative to the output scale ``max |torch|``; ``tol`` defaults to 1e-4 (fp32) / 2e-2 (fp16).
    """
    if precision not in DEFAULT_TOLERANCE:
        raise UsageError(f"unknown precision {precision!r}; choose fp32 or fp16")
    if not input_batches:
        raise UsageError("compare_ort_torch needs at least one input batch")
    start = time.perf_counter()
    refs = torch_outputs(model, input_batches, forward_kwargs)
    result = compare_ort_refs(onnx_path, input_batches, refs, precision, tol, providers)
    result.seconds = time.perf_counter() - start
    return result


def compare_ort_refs(onnx_path, input_batches: Sequence[Mapping[str, Tensor]], refs: Sequence[np.ndarray],
                     precision: str = "fp32", tol: float | None = None,
                     providers: Sequence[str] | None = None) -> CompareResult:
    """ONNX Runtime on each batch against recorded reference outputs (:func:`torch_outputs`): no torch model
    needs to be in memory next to the session."""
    if precision not in DEFAULT_TOLERANCE:
        raise UsageError(f"unknown precision {precision!r}; choose fp32 or fp16")
    start = time.perf_counter()
    outs = None
    if not providers and weight_bytes(onnx_path) > SLICE_ABOVE_BYTES:
        clear_session_cache()  # no whole-graph session beside the slices
        try:
            arrays = [{k: v.detach().cpu().numpy() for k, v in batch.items()} for batch in input_batches]
            outs = [o[0] for o in run_sliced(onnx_path, arrays, budget=SLICE_BYTES)]
        except NotSliceable:
            outs = None
        except Exception as exc:  # noqa: BLE001
            raise VerificationError(f"ONNX Runtime cannot run {onnx_path}: {' '.join(str(exc).split())[:300]}") \
                from exc
    if outs is None:
        session = ort_session(onnx_path, providers)
        outs = [session.run(None, feeds(session, batch))[0] for batch in input_batches]
    result = compare_outputs(refs, outs, precision, tol)
    result.seconds = time.perf_counter() - start
    return result


# --------------------------------------------------------------------------------------------------
# OUT folder verification
# --------------------------------------------------------------------------------------------------
def _integrity_check(out_dir: Path, report: Mapping[str, Any]) -> Check:
    recorded = report.get("files")
    if not isinstance(recorded, Mapping) or not recorded:
        return Check("integrity", False, "report.json records no file digests ('files'): cannot detect tampering")
    problems = []
    seen: dict[tuple, str] = {}
    for rel, digest in recorded.items():
        try:  # names from report.json: never opened outside OUT
            p = resolve_inside(out_dir, rel, "recorded file")
        except UnsafePathError:
            problems.append(f"{rel!r} lies outside the folder")
            continue
        if not p.is_file():
            problems.append(f"{rel} missing")
            continue
        st = p.stat()
        key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        if key not in seen:
            seen[key] = sha256_file(p)
        if seen[key] != digest:
            problems.append(f"{rel} changed")
    # unrecorded files that change what gets loaded: anything in hf/ or next to model.onnx
    present = [p.relative_to(out_dir).as_posix() for p in sorted(out_dir.rglob("*")) if p.is_file()]
    for rel in present:
        if rel not in recorded and (rel.startswith(HF_DIR + "/") or rel.startswith(ONNX_FILE)):
            problems.append(f"{rel} not recorded")
    for key in (ONNX_FILE,):
        if key not in recorded:
            problems.append(f"{key} has no recorded digest")
    if problems:
        shown = ", ".join(problems[:5]) + (f" (+{len(problems) - 5} more)" if len(problems) > 5 else "")
        return Check("integrity", False, shown, float(len(problems)))
    return Check("integrity", True, f"{len(recorded)} files match their sha256", 0.0)


def _read_report(out_dir: Path) -> dict[str, Any]:
    if not out_dir.is_dir():
        raise UsageError(f"{out_dir} is not a folder")
    # an output holds regular files only (triton/ shares model.onnx by a hard link): a symlink out of OUT or a
    # named pipe is refused before anything in the folder is opened
    unsafe = unsafe_entries(out_dir)
    if unsafe:
        more = f" (+{len(unsafe) - 3} more)" if len(unsafe) > 3 else ""
        raise VerificationError(f"{out_dir} is not safe to read: {'; '.join(unsafe[:3])}{more}")
    path = out_dir / REPORT
    if not path.is_file():
        raise UsageError(f"{out_dir} is not a permcompile output folder: {REPORT} is missing")
    report = read_json(path, max_bytes=MAX_REPORT_BYTES)
    if not isinstance(report, dict):
        raise UsageError(f"{path} does not hold a JSON object")
    return report


def _parse_sparsity(text: Any) -> tuple[int, int]:
    s = Sparsity.parse(str(text))
    return s.n, s.m


def _safetensors_reader(hf_dir: Path):
    """name -> numpy array over every ``*.safetensors`` file in ``hf_dir``."""
    from safetensors import safe_open

    where: dict[str, Path] = {}
    for f in sorted(hf_dir.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as fh:
            for key in fh.keys():
                where[key] = f

    def read(name: str) -> Tensor | None:
        f = where.get(name)
        if f is None:
            return None
        with safe_open(str(f), framework="pt") as fh:
            return fh.get_tensor(name)

    return where, read


def _static_image_hw(onnx_model) -> tuple[int, int] | None:
    """(height, width) of the graph's ``pixel_values`` input when both are fixed numbers, else None."""
    for vi in onnx_model.graph.input:
        if vi.name != "pixel_values":
            continue
        dims = list(vi.type.tensor_type.shape.dim)
        if len(dims) == 4 and dims[2].dim_value > 0 and dims[3].dim_value > 0:
            return int(dims[2].dim_value), int(dims[3].dim_value)
    return None


def _k_axis_for(model: nn.Module | None, param: str, entry: Mapping[str, Any]) -> int:
    if "k_axis" in entry:
        return int(entry["k_axis"])
    if model is not None:
        module_name = entry.get("module") or param.rsplit(".", 1)[0]
        try:
            module = model.get_submodule(module_name)
        except AttributeError:
            module = None
        if module is not None and type(module).__name__ == "Conv1D":  # transformers' GPT-2 Conv1D: [K, out]
            return 0
    return 1  # nn.Linear: [out, K]


def verify_artifacts(out_dir, tol: float | None = None, seed: int = 0,
                     shapes: Sequence[tuple[int, int]] = ((1, 7), (2, 16))) -> list[Check]:
    """Re-check an ``optimize`` output folder; returns the checks (see :func:`raise_if_failed`).

    ``shapes`` are the (batch, seq) pairs of the random ONNX Runtime vs torch batches (two different
    shapes exercise the dynamic axes; vision models use the batch sizes only).
    """
    out_dir = Path(out_dir)
    report = _read_report(out_dir)
    checks: list[Check] = [_integrity_check(out_dir, report)]
    check, parsed = _report_check(report)
    checks.append(check)
    if parsed is None:
        return checks
    n, m, precision, layers = parsed
    plan, plan_checks = load_plan(out_dir, report)  # --quantize: quantization.json (None otherwise)
    checks += plan_checks
    # N:M in model.onnx, first: the graph (which holds the weights of a single-file model) is released before
    # the hf/ model is loaded; its checks are listed after hf_load
    onnx_path = out_dir / ONNX_FILE
    onnx_checks, onnx_ok, image_hw = _onnx_checks(out_dir, onnx_path, report, layers, n, m, plan)
    # hf/ is reloaded for Conv1D orientation and the numerical comparison
    model, check = _load_hf(out_dir / HF_DIR, report)
    checks.append(check)
    checks += onnx_checks
    checks.append(_hf_nm_check(out_dir / HF_DIR, model, report, layers, n, m))
    if plan is not None:  # the compressed-tensors checkpoint: codes of the plan's type, the plan's scales
        checks.append(hf_check(out_dir / HF_DIR, plan, report, _safetensors_reader))
    if model is not None and onnx_ok:
        held, model = [model], None  # released inside, before ONNX Runtime loads the graph
        checks.append(_ort_vs_torch_check(held, onnx_path, report, plan, precision, tol, seed, shapes, image_hw))
    return checks


def _report_check(report: Mapping[str, Any]) -> tuple[Check, tuple[int, int, str, list] | None]:
    """``report``: report.json holds what the other checks read; with ``(n, m, precision, pruned layers)``
    when it does, None otherwise."""
    missing = [k for k in ("sparsity", "precision", "pruned_layers", "input_names", "auto_class") if k not in report]
    if missing:
        return Check("report", False, f"report.json lacks {', '.join(missing)}"), None
    try:
        n, m = _parse_sparsity(report["sparsity"])
    except UsageError as exc:
        return Check("report", False, str(exc)), None
    precision = str(report["precision"])
    if precision not in DEFAULT_TOLERANCE:
        return Check("report", False, f"unknown precision {precision!r} in report.json"), None
    layers = [e for e in report["pruned_layers"] if isinstance(e, Mapping) and e.get("param")]
    return Check("report", True, f"{report.get('family', '?')} / {report['auto_class']}, "
                                 f"{len(layers)} pruned layers, {n}:{m}, {precision}"), (n, m, precision, layers)


def _onnx_checks(out_dir: Path, onnx_path: Path, report: Mapping[str, Any], layers: list, n: int, m: int,
                 plan) -> tuple[list[Check], bool, tuple[int, int] | None]:
    """``onnx_load``, then ``onnx_nm`` (every pruned layer's initializer is N:M along K) and, quantized,
    ``onnx_qdq``; with whether the graph loaded and its static image size. The graph is released on return."""
    checks: list[Check] = []
    try:  # the graph without its weights (inline ones referenced in the file): read one at a time below
        onnx_model = load_weightless(onnx_path)
        # what onnx.load would refuse (hard links, symlinks, paths outside the folder), here and in triton/
        # (a graph without external data has nothing to resolve, and its Triton copy is the same bytes)
        problems = check_external_data(onnx_path, onnx_model)
        for copy in sorted(out_dir.glob("triton/*/*/model.onnx")):
            if not copy.samefile(onnx_path):  # a hard link is the graph just checked; anything else is read too
                where = copy.parent.relative_to(out_dir).as_posix()
                problems += [f"{where}/{p}" for p in check_external_data(copy)]
        if problems:
            raise VerificationError("; ".join(problems))
    except Exception as exc:  # noqa: BLE001
        checks.append(Check("onnx_load", False, str(exc).splitlines()[0][:200]))
        return checks, False, None
    wanted = {e["param"]: e.get("onnx_initializer") or onnx_initializer_for_param(onnx_model, e["param"])
              for e in layers}
    report_rows = {(r.name): r for r in onnx_nm_report(onnx_model, n, m, base_dir=onnx_path.parent,
                                                        names={v for v in wanted.values() if v},
                                                        graph_file=onnx_path)}
    bad = []
    for entry in layers:
        name = wanted[entry["param"]]
        row = report_rows.get(name) if name else None
        if row is None:
            bad.append(f"{entry['param']}: no ONNX MatMul/Gemm weight" + (f" named {name}" if name else ""))
        elif not row.is_nm:
            why = (f"K={row.k} not a multiple of {m}" if row.violations < 0
                   else f"{row.violations} of {row.groups} groups break {n}:{m}")
            bad.append(f"{entry['param']} ({name}): {why}")
    checks.append(aggregate("onnx_nm", len(layers), bad, f"{len(layers)} pruned weights are {n}:{m} along K"))
    if plan is not None:
        checks.append(qdq_check(onnx_model, onnx_path.parent, plan, report, graph_file=onnx_path))
    return checks, True, _static_image_hw(onnx_model)


def _load_hf(hf_dir: Path, report: Mapping[str, Any]) -> tuple[nn.Module | None, Check]:
    """``hf_load``: the ``hf/`` model in the dtype it was saved in, never running code from the folder."""
    try:
        import transformers

        cls = getattr(transformers, str(report["auto_class"]), None)
        if cls is None or not str(report["auto_class"]).startswith("Auto"):
            raise ValueError(f"unknown auto class {report['auto_class']!r}")
        set_hf_env(quiet=False)
        hf_config = read_json(hf_dir / "config.json", f"{HF_DIR}/config.json")
        if isinstance(hf_config, Mapping) and hf_config.get("auto_map"):  # never run code from an output
            raise ValueError("config.json asks to run custom code (auto_map); permcompile never runs it")
        from ..models import check_config_against_weights

        # a config.json claiming a larger model than the weights hold would be allocated in full before
        # transformers compares shapes: the safetensors headers are compared first
        check_config_against_weights(hf_dir, cls)
        # in the dtype it was saved in (the checkpoint's): a half model's reference still runs in fp32
        from .hf_compressed import is_compressed, load_decompressed

        if is_compressed(hf_config):  # --quantize: codes x weight_scale, without compressed-tensors
            model = load_decompressed(hf_dir, cls, *_safetensors_reader(hf_dir), dtype="auto",
                                      local_files_only=True, trust_remote_code=False).eval()
        else:
            model = cls.from_pretrained(str(hf_dir), dtype="auto", local_files_only=True,
                                        trust_remote_code=False).eval()
        return model, Check("hf_load", True, f"{type(model).__name__} from {HF_DIR}/")
    except Exception as exc:  # noqa: BLE001
        return None, Check("hf_load", False, f"cannot load {HF_DIR}/: {str(exc).splitlines()[0][:200]}")


def _hf_nm_check(hf_dir: Path, model: nn.Module | None, report: Mapping[str, Any], layers: list, n: int,
                 m: int) -> Check:
    """``hf_nm``: every pruned parameter in ``hf/`` safetensors is N:M along K (in glue order where glued)."""
    try:
        _, read = _safetensors_reader(hf_dir)
    except Exception as exc:  # noqa: BLE001
        return Check("hf_nm", False, f"cannot read {HF_DIR}/ safetensors: {str(exc).splitlines()[0][:200]}")
    bad = []
    state = dict(model.named_parameters(remove_duplicate=False)) if model is not None else {}
    # per-layer residual readers are saved in the model's own order: N:M holds in the glued (deployed) order
    glue = {r["param"]: r for r in report.get("glue", []) or [] if isinstance(r, Mapping) and "param" in r}
    for entry in layers:
        param = entry["param"]
        weight = read(param)
        source = "safetensors"
        if weight is None and param in state:  # tied weights are saved once, under another name
            weight, source = state[param].detach(), "reloaded model"
        if weight is None:
            bad.append(f"{param}: not in {HF_DIR}/")
            continue
        axis = _k_axis_for(model, param, entry)
        if weight.dim() != 2:
            bad.append(f"{param}: not a matrix ({tuple(weight.shape)})")
            continue
        if param in glue:
            index = torch.as_tensor(glue[param]["index"], dtype=torch.long)
            if index.numel() != weight.shape[axis] or not torch.equal(index.sort().values,
                                                                     torch.arange(index.numel())):
                bad.append(f"{param}: its glue index in report.json is not a permutation of its "
                           f"{weight.shape[axis]} inputs")
                continue
            weight = weight.index_select(axis, index)
            source += " in glue order"
        ok, violations, groups = _nm_stats(weight.float().numpy(), axis, n, m)
        if not ok:
            bad.append(f"{param} ({source}): " + (f"K={weight.shape[axis]} not a multiple of {m}" if violations < 0
                                                  else f"{violations} of {groups} groups break {n}:{m}"))
    return aggregate("hf_nm", len(layers), bad, f"{len(layers)} pruned parameters are {n}:{m} along K")


def _ort_vs_torch_check(held: list, onnx_path: Path, report: Mapping[str, Any], plan, precision: str,
                        tol: float | None, seed: int, shapes: Sequence[tuple[int, int]],
                        image_hw: tuple[int, int] | None) -> Check:
    """``onnxruntime_vs_torch`` on random batches: the reloaded model (``held``, a one-element list, emptied
    here) runs first and is released before ONNX Runtime loads the graph, so at most one copy of the
    weights is held at a time."""
    model = held.pop()
    try:
        gen = torch.Generator().manual_seed(seed)
        max_pos = getattr(text_config(model.config), "max_position_embeddings", None) or 10**9
        batches = [random_inputs(report["input_names"], model.config, b, min(s, int(max_pos)), gen, image_hw)
                   for b, s in shapes]
        start = time.perf_counter()
        # quantized: the function the Q/DQ graph computes, teacher-forced at its quantizers (qdq_compare.py)
        refs, tol, note = reference_outputs(onnx_path, model, plan, report, batches,
                                            report.get("forward_kwargs") or None, precision, tol)
        model = None
        gc.collect()
        result = compare_ort_refs(onnx_path, batches, refs, precision, tol)
        result.detail = note
        result.seconds = time.perf_counter() - start
        return result.as_check()
    except Exception as exc:  # noqa: BLE001
        return Check("onnxruntime_vs_torch", False, " ".join(str(exc).split())[:300])
