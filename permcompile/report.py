"""``report.json``: what ``optimize`` decided, measured and checked, with the sha256 of every other file.

Built once the model is compressed (:func:`build_report`), written with the artifacts and again after
verification (:func:`write_report`); ``permcompile verify`` recomputes the digests.
"""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from .config import OptimizeConfig
from .dtypes import dtype_name, model_dtype
from .export.digests import file_digests
from .passes.glue import glue_cost, glue_records


def build_report(loaded, config: OptimizeConfig, compressed, net, timer) -> dict:
    """The report of ``compressed`` (``pipeline.Compressed``) for ``loaded`` (its model ``net``, compressed in
    place), with the timings so far of ``timer`` (:class:`permcompile.timing.StepTimer`)."""
    c = compressed
    report = {
        "model": loaded.name, "source": loaded.source, "family": loaded.family,
        "auto_class": loaded.auto_class, "sparsity": str(config.sparsity),
        "permutation": config.permutation, "criterion": config.criterion, "precision": config.precision,
        "checkpoint_dtype": dtype_name(model_dtype(net)),
        "pruned": config.prune, "config": config_dict(config),
        "groups": [r.to_dict() for r in c.group_results],
        "glue_ops": c.fold_report.glue_ops,
        "glue": glue_records(net, c.groups, c.perms),
        "glue_cost": glue_cost(net, c.groups, c.perms, c.linears),
        "fold": {"groups_permuted": c.fold_report.groups_permuted, "tensors_changed": c.fold_report.tensors_changed,
                 "max_rel_err": c.fold_err},
        "pruned_layers": c.mask_result.layers if c.mask_result else [],
        "dense_layers": (c.mask_result.dense if c.mask_result else
                         [{"module": i.module, "param": i.param, "reason": "--prune none"} for i in c.linears]),
        "input_names": list(loaded.example_inputs().keys()),
        "timings": timer.timings,
        "peak_memory_gib": timer.memory_gib,
    }
    if c.calibration is not None:
        report["calibration"] = c.calibration
    if c.quant_plan is not None:
        report["quantization"] = c.quant_plan.summary()
    kept = [r for r in c.group_results if r.strategy != "none" or r.kept_identity]
    if kept:
        report["kept_importance"] = {
            "identity": sum(r.kept_identity for r in kept) / len(kept),
            "chosen": sum(r.kept_chosen for r in kept) / len(kept),
        }
    return report


def config_dict(config: OptimizeConfig) -> dict:
    d = asdict(config)
    d["sparsity"] = str(config.sparsity)
    return d


def jsonable(obj):
    """``obj`` with dataclasses as dicts, tuples as lists and paths as strings."""
    if hasattr(obj, "__dataclass_fields__"):
        return {k: jsonable(v) for k, v in asdict(obj).items()}
    if isinstance(obj, dict):
        return {k: jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj


def write_report(folder: Path, report: dict, digests: dict | None = None) -> None:
    """Write ``report.json`` with the sha256 of every other file (``digests`` when already computed)."""
    report = dict(report)
    report.pop("files", None)
    report["files"] = digests if digests is not None else file_digests(folder)
    (folder / "report.json").write_text(json.dumps(jsonable(report), indent=1, sort_keys=True))


__all__ = ["build_report", "config_dict", "jsonable", "write_report"]
