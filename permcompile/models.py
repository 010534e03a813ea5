"""Loading models: short names of packaged real models, local Hugging Face folders, or in-memory modules.

``load_model(spec)`` always returns a :class:`LoadedModel` holding an fp32 model in eval mode (SDPA attention
where the architecture supports it), its family ("causal-lm", "encoder" or "vision"), the transformers Auto
class that reloads a saved copy, and the tokenizer / image processor found next to the weights (or None).

Every problem a user can cause (missing folder, broken config, missing or truncated weights, pickled weights,
unknown architecture, missing model package) becomes a one-line :class:`UsageError` or
:class:`MissingDependencyError`; no raw traceback reaches the user.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import os
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import MissingDependencyError, UsageError
from .hfenv import set_hf_env
from .safepath import JSONBoundsError, UnsafePathError, iter_files, read_json, resolve_inside, unsafe_entries

# Nothing here may reach the network: set before transformers / huggingface_hub are imported.
set_hf_env(quiet=False)

FAMILIES = ("causal-lm", "encoder", "vision")

from .shortnames import SHORT_NAMES  # noqa: E402 (torch-free, so the CLI can check names before torch)

_SAFETENSORS_NAMES = ("model.safetensors", "model.safetensors.index.json")
_PICKLE_NAMES = ("pytorch_model.bin", "pytorch_model.bin.index.json")
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "tokenizer.model",
                    "spiece.model", "sentencepiece.bpe.model")
_IMAGE_PROCESSOR_FILES = ("preprocessor_config.json", "image_processor_config.json")
# Heads that transformers may legitimately (re-)initialise when a checkpoint lacks them: warn, do not refuse.
_OPTIONAL_PREFIXES = ("pooler.", "classifier.", "score.", "qa_outputs.")


CACHE_ENV = "PERMCOMPILE_CACHE_DIR"  # the one variable that moves the cache (README, "Cache")


def cache_root() -> Path:
    """permcompile's cache: ``$PERMCOMPILE_CACHE_DIR`` or ``~/.cache/permcompile``.

    It holds models converted from GGUF (``<name>-fp32/``) and the resumable passes' checkpoints (``search/``,
    ``learned/``, ``reconstruct/``; ``passes/checkpoint.py``).
    """
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "permcompile"


@dataclass
class LoadedModel:
    """A model ready for the pipeline plus what is needed to feed and re-save it."""

    model: nn.Module
    family: str
    auto_class: str
    tokenizer: Any = None
    image_processor: Any = None
    source: str = "<in-memory>"
    name: str = "model"
    extras: dict = field(default_factory=dict)
    folder: Path | None = None  # the HF folder it was read from (None for an in-memory module)

    @property
    def config(self):
        """The model's transformers config (None for plain modules)."""
        return getattr(self.model, "config", None)

    @property
    def vocab_size(self) -> int:
        cfg = self.config
        size = getattr(cfg, "vocab_size", None) if cfg is not None else None
        if not size and self.tokenizer is not None:
            size = len(self.tokenizer)
        return int(size or 2)

    @property
    def image_size(self) -> tuple[int, int]:
        """(height, width) of the images the model is fed: what its image processor produces (its centre
        crop, or a fixed resize), else the config's ``image_size`` (224 when unknown).

        The processor wins because that is what calibration and deployment feed the model: DINOv2's config
        says 518 while its processor crops to 224, and a graph exported at 518 would refuse 224 images.
        """
        proc = self.image_processor
        if proc is not None:
            for attr, enabled in (("crop_size", getattr(proc, "do_center_crop", False)), ("size", True)):
                value = getattr(proc, attr, None) if enabled else None
                if isinstance(value, dict) and value.get("height") and value.get("width"):
                    return int(value["height"]), int(value["width"])
                if hasattr(value, "height") and getattr(value, "height", None) and getattr(value, "width", None):
                    return int(value.height), int(value.width)
        size = getattr(self.config, "image_size", 224) if self.config is not None else 224
        if isinstance(size, (list, tuple)):
            return int(size[0]), int(size[-1])
        if isinstance(size, dict):
            return int(size.get("height", 224)), int(size.get("width", 224))
        return int(size), int(size)

    @property
    def num_channels(self) -> int:
        return int(getattr(self.config, "num_channels", 3) or 3) if self.config is not None else 3

    @property
    def pad_token_id(self) -> int:
        pad = None
        if self.tokenizer is not None:
            pad = getattr(self.tokenizer, "pad_token_id", None)
        if pad is None and self.config is not None:
            pad = getattr(self.config, "pad_token_id", None)
        return int(pad) if pad is not None else 0

    def forward_kwargs(self) -> dict[str, Any]:
        """Extra (non-tensor) flags for every forward call / torch.export."""
        return {"use_cache": False} if self.family == "causal-lm" else {}

    def example_inputs(self, batch: int = 2, seq: int = 8) -> dict[str, torch.Tensor]:
        """Deterministic example kwargs for ``model(**inputs, **forward_kwargs())`` or ``torch.export``."""
        gen = torch.Generator().manual_seed(0)
        if self.family == "vision":
            h, w = self.image_size
            return {"pixel_values": torch.randn(batch, self.num_channels, h, w, generator=gen)}
        ids = None
        if self.tokenizer is not None:
            try:
                from .calib.text import default_text

                ids = self.tokenizer(default_text()[:2000], add_special_tokens=False, verbose=False)["input_ids"]
                ids = torch.tensor(ids[:seq], dtype=torch.long) if len(ids) >= seq else None
            except Exception:  # a tokenizer we cannot drive: fall back to random ids
                ids = None
        if ids is None:
            input_ids = torch.randint(0, self.vocab_size, (batch, seq), generator=gen)
        else:
            input_ids = ids.unsqueeze(0).repeat(batch, 1)
        inputs = {"input_ids": input_ids}
        if self.family == "encoder":
            inputs["attention_mask"] = torch.ones_like(input_ids)
        return inputs


# --------------------------------------------------------------------------------------------------- helpers
def _transformers():
    try:
        import transformers
    except ImportError as exc:  # pragma: no cover - transformers is a hard dependency
        raise MissingDependencyError("transformers is not installed: pip install transformers") from exc
    return transformers


def _short(exc: BaseException, limit: int = 200) -> str:
    """First line of an exception message, shortened: fit for a one-line error."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _cause(exc: BaseException, limit: int = 200) -> str:
    """The line of a (possibly multi-line) exception message that says what is wrong.

    Validation wrappers put a heading first ("Class validation error for validator ...:") and the cause
    after it ("ValueError: The hidden size (64) is not a multiple of the number of attention heads (3)").
    """
    lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
    for line in reversed(lines):
        head, sep, rest = line.partition(": ")
        if sep and head.endswith(("Error", "Exception")) and rest:
            return _short(rest, limit)
    return _short(exc, limit)


def _refuse_remote_code(folder: Path, cfg: dict) -> None:
    """A config naming code to import (``auto_map``) is refused: permcompile never runs code from a folder."""
    auto_map = cfg.get("auto_map")
    if auto_map:
        refs = auto_map.values() if isinstance(auto_map, dict) else [auto_map]
        first = next((str(r[0] if isinstance(r, (list, tuple)) else r) for r in refs if r), "?")
        raise UsageError(f"{folder}/config.json asks to run custom code from the folder (auto_map: {first}); "
                         "permcompile never runs code from a model folder: use an architecture transformers ships")


def _auto_class_for(arch: str | None, model_type: str | None = None) -> str:
    """Name of the transformers Auto class that reloads architecture ``arch``."""
    if not arch:
        return "AutoModel"
    from transformers.models.auto import modeling_auto as ma

    causal = set(ma.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
    image_cls = set(ma.MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES.values())
    if arch.endswith("ForCausalLM") or arch in causal:
        return "AutoModelForCausalLM"
    if arch.endswith("ForImageClassification") or arch in image_cls:
        return "AutoModelForImageClassification"
    return "AutoModel"


def _family_for(model: nn.Module, auto_class: str | None = None) -> str:
    if auto_class == "AutoModelForCausalLM":
        return "causal-lm"
    if getattr(model, "main_input_name", None) == "pixel_values" or auto_class == "AutoModelForImageClassification":
        return "vision"
    name = type(model).__name__
    if name.endswith("ForCausalLM") or name.endswith("LMHeadModel"):
        return "causal-lm"
    cfg = getattr(model, "config", None)
    if cfg is not None and getattr(cfg, "is_decoder", False) and not getattr(cfg, "is_encoder_decoder", False):
        return "causal-lm"
    if cfg is not None and hasattr(cfg, "image_size") and hasattr(cfg, "patch_size"):
        return "vision"
    if any(tag in name for tag in ("ViT", "Vit", "Dinov2", "Deit", "Swin", "ConvNext", "ResNet", "Image")):
        return "vision"
    return "encoder"


def _find_weights(folder: Path) -> tuple[list[Path], list[Path]]:
    files = [p for p in sorted(folder.iterdir()) if p.is_file()]
    safes = [p for p in files if p.name.endswith(".safetensors") or p.name in _SAFETENSORS_NAMES]
    pickles = [p for p in files if p.name.endswith(_PICKLE_SUFFIXES) or p.name in _PICKLE_NAMES]
    return safes, pickles


def _check_safetensors(files: list[Path]) -> None:
    """Open every safetensors file's header: catches truncated or garbage files with a one-line message."""
    from safetensors import safe_open

    for path in files:
        if path.name.endswith(".index.json"):
            index = read_json(path)
            try:
                shards = sorted(set(index["weight_map"].values()))
                for shard in shards:  # names from the folder: none may lead out of it
                    resolve_inside(path.parent, shard, "weight shard")
            except (KeyError, TypeError, AttributeError) as exc:
                raise UsageError(f"{path} is not a valid safetensors index ({_short(exc)})") from None
            missing = [s for s in shards if not (path.parent / s).is_file()]
            if missing:
                raise UsageError(f"{path.parent} is missing weight shard(s) {', '.join(missing[:3])} "
                                 f"listed in {path.name}")
            continue
        if path.stat().st_size == 0:
            raise UsageError(f"weights file {path} is empty")
        try:
            with safe_open(str(path), framework="pt") as handle:
                handle.keys()
        except Exception as exc:
            raise UsageError(f"weights file {path} is truncated or corrupt ({_short(exc)})") from None


def _read_config_dict(folder: Path) -> dict:
    cfg_path = folder / "config.json"
    data = read_json(cfg_path)
    if not isinstance(data, dict):
        raise UsageError(f"{cfg_path} must hold a JSON object, not {type(data).__name__}")
    return data


def _load_tokenizer(folder: Path, **kwargs):
    if not any((folder / f).is_file() for f in _TOKENIZER_FILES) and "gguf_file" not in kwargs:
        return None
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False, **kwargs)
    except Exception as exc:
        warnings.warn(f"ignoring the tokenizer in {folder}: {_short(exc)}", stacklevel=3)
        return None


def _load_image_processor(folder: Path):
    if not any((folder / f).is_file() for f in _IMAGE_PROCESSOR_FILES):
        return None
    try:
        from transformers import AutoImageProcessor

        return AutoImageProcessor.from_pretrained(str(folder), trust_remote_code=False)
    except Exception as exc:
        warnings.warn(f"ignoring the image processor in {folder}: {_short(exc)}", stacklevel=3)
        return None


def _from_pretrained(auto_cls, folder: Path, **kwargs):
    """``from_pretrained`` with SDPA, falling back to eager attention only when SDPA is refused."""
    kwargs["trust_remote_code"] = False  # never import code from the folder, never prompt for it
    try:
        return auto_cls.from_pretrained(str(folder), attn_implementation="sdpa", **kwargs)
    except (ValueError, NotImplementedError, TypeError) as exc:
        msg = str(exc).lower()
        if "sdpa" not in msg and "scaled_dot_product" not in msg and "attn_implementation" not in msg:
            raise
    return auto_cls.from_pretrained(str(folder), attn_implementation="eager", **kwargs)


def _refuse_mismatched_shapes(folder: Path, auto_cls, config, safes: list[Path]) -> None:
    """Name the first checkpoint tensor whose shape differs from what ``config`` builds, with both shapes.

    transformers prints that in a report we silence and raises "look at the above report"; the shapes are
    compared here on a model built on the meta device (no memory, no weights read: safetensors headers only).
    """
    try:
        from safetensors import safe_open

        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            expected = {k: tuple(v.shape) for k, v in auto_cls.from_config(config).state_dict().items()}
        prefix = getattr(auto_cls, "base_model_prefix", "") or ""
        for path in safes:
            if not path.name.endswith(".safetensors"):
                continue
            with safe_open(str(path), framework="pt") as handle:
                for key in handle.keys():
                    shape = tuple(handle.get_slice(key).get_shape())
                    want = next((expected[k] for k in (key, key.removeprefix(prefix + "."), f"{prefix}.{key}")
                                 if k in expected), None)
                    if want is not None and want != shape:
                        raise UsageError(f"weights in {folder} do not match config.json: {key} has shape "
                                         f"{list(shape)} in {path.name}, config.json gives {list(want)}")
    except UsageError:
        raise
    except Exception:  # the diagnosis is best effort: the caller's message stands
        return


# what a config may build beyond the checkpoint's own tensors (heads transformers initialises when a checkpoint
# lacks them: a pooler, a classifier): elements
_UNSTORED_SLACK = 1 << 24


def _weight_shapes(folder: Path) -> dict[str, tuple[int, ...]]:
    """name -> shape of every tensor in ``folder``'s safetensors files, from their headers alone."""
    from safetensors import safe_open

    found: dict[str, tuple[int, ...]] = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as handle:  # maps the file; reads the header only
            for key in handle.keys():
                found[key] = tuple(handle.get_slice(key).get_shape())
    return found


def check_config_against_weights(folder: Path, auto_cls, config=None) -> None:
    """Refuse a ``config.json`` that describes a larger model than ``folder``'s safetensors hold, before the model
    is built: transformers allocates the whole model first and compares shapes after (a config claiming
    hidden 16384 over tiny weights took 6 GB). The model is built on the meta device (no memory) and its shapes
    compared with the safetensors headers; :class:`UsageError` names the first mismatch."""
    import re

    from .modelio import text_config

    folder = Path(folder)
    try:
        headers = _weight_shapes(folder)
        if config is None:
            config = _transformers().AutoConfig.from_pretrained(str(folder), trust_remote_code=False)
    except Exception:  # unreadable headers or config: the loader's own checks say what is wrong
        return
    if not headers:
        return
    # layers: ModuleList entries are numbered in every transformers architecture; building a config's million
    # layers, even on the meta device, would take minutes
    numbered = [int(x) for key in headers for x in re.findall(r"\.(\d+)\.", key)]
    layers = getattr(text_config(config), "num_hidden_layers", None)
    if isinstance(layers, int) and numbered and layers > max(numbered) + 1:
        raise UsageError(f"weights in {folder} do not match config.json: it gives num_hidden_layers {layers}, the "
                         f"weights hold {max(numbered) + 1}")
    try:
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            meta = auto_cls.from_config(config)
    except Exception:  # a config transformers refuses: its own message says why, when it loads
        return
    prefix = getattr(auto_cls, "base_model_prefix", "") or getattr(meta, "base_model_prefix", "") or ""
    expected = {k: tuple(v.shape) for k, v in meta.state_dict().items()}
    for key, shape in headers.items():
        want = next((expected[k] for k in (key, key.removeprefix(prefix + "."), f"{prefix}.{key}") if k in expected),
                    None)
        if want is not None and want != shape:
            raise UsageError(f"weights in {folder} do not match config.json: {key} has shape {list(shape)} in the "
                             f"weights, config.json gives {list(want)}")
    stored = sum(math.prod(shape) for shape in headers.values())
    built = sum(p.numel() for p in meta.parameters())
    if built > 2 * stored + _UNSTORED_SLACK:
        raise UsageError(f"weights in {folder} do not match config.json: it describes {built:,} parameters, the "
                         f"weights hold {stored:,}")


def _refuse_non_finite(model: nn.Module, folder: "Path | str") -> None:
    """NaN or Inf in a weight would surface later as a failed score or mask: name the tensor now."""
    for name, tensor in model.named_parameters():  # buffers may hold -inf on purpose (attention masks)
        if not tensor.is_floating_point():
            continue
        # in slices: isfinite of a whole bf16 matrix makes fp32 and bool temporaries (1.3 GB for a 1B
        # model's 128k-token embedding, twice its bf16 size)
        flat = tensor.detach().reshape(-1)
        step = 1 << 22
        # float8 codes (a quantized checkpoint's weights) have no isfinite kernel: widen each slice
        widen = tensor.element_size() == 1
        bad = next((part for part in (flat[i:i + step] for i in range(0, flat.numel(), step))
                    if not bool(torch.isfinite(part.float() if widen else part).all())), None)
        if bad is not None:
            bad = "NaN" if bool(torch.isnan(bad.float()).any()) else "Inf"
            raise UsageError(f"weights in {folder} are not finite: {name} holds {bad} values")


def _finalize(model: nn.Module, keep_half: bool = False) -> nn.Module:
    """Eval mode, in fp32 unless ``keep_half`` and the model is stored in bf16/fp16.

    Half-precision checkpoints stay half (memory ≈ the checkpoint); every step that needs fp32 (statistics,
    scores, searches, checks) upcasts locally.
    """
    from .dtypes import HALF_DTYPES, model_dtype

    if keep_half and model_dtype(model) in HALF_DTYPES:
        return model.eval()
    if getattr(model, "is_quantized", False):  # e.g. the compressed-tensors hf/ of --quantize: runs as loaded
        return model.eval()
    return model.float().eval()


# ------------------------------------------------------------------------------------------------ local folder
def _load_folder(folder: Path, *, trust_pickle: bool = False, name: str | None = None,
                 source: str | None = None) -> LoadedModel:
    if not folder.exists():
        raise UsageError(f"model path {folder} does not exist")
    if not folder.is_dir():
        raise UsageError(f"model path {folder} is a file; give a Hugging Face model folder (with config.json)")
    unsafe = unsafe_entries(folder)  # before anything in it is opened (a Hub snapshot's blob links are fine)
    if unsafe:
        more = f" (+{len(unsafe) - 3} more)" if len(unsafe) > 3 else ""
        raise UnsafePathError(f"model folder {folder} is not safe to read: {'; '.join(unsafe[:3])}{more}")
    if not (folder / "config.json").is_file():
        raise UsageError(f"{folder} has no config.json: not a Hugging Face model folder")
    for extra in sorted(folder.glob("*.json")):  # what transformers will parse: over the bounds is refused first
        try:
            read_json(extra)
        except JSONBoundsError:
            raise
        except UsageError:  # malformed: transformers' own handling (a broken tokenizer file is skipped, warned)
            pass
    cfg_dict = _read_config_dict(folder)
    _refuse_remote_code(folder, cfg_dict)
    transformers = _transformers()
    try:
        config = transformers.AutoConfig.from_pretrained(str(folder), trust_remote_code=False)
    except Exception as exc:
        model_type = cfg_dict.get("model_type")
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

        if model_type and model_type not in CONFIG_MAPPING_NAMES:
            raise UsageError(f"{folder}/config.json: unknown or unsupported architecture "
                             f"(model_type {model_type!r}, transformers {transformers.__version__})") from None
        if model_type:  # a known architecture whose values transformers refuses: its own reason says why
            raise UsageError(f"{folder}/config.json is invalid: {_cause(exc)}") from None
        raise UsageError(f"{folder}/config.json cannot be parsed as a transformers config ({_short(exc)})") from None

    archs = getattr(config, "architectures", None) or []
    arch = archs[0] if archs else None
    auto_name = _auto_class_for(arch, getattr(config, "model_type", None))

    safes, pickles = _find_weights(folder)
    kwargs: dict[str, Any] = {"dtype": "auto", "output_loading_info": True}  # as stored (see _finalize)
    if safes:
        _check_safetensors(safes)
        kwargs["use_safetensors"] = True
    elif pickles:
        if not trust_pickle:
            raise UsageError(f"{folder} holds only pickled weights ({pickles[0].name}), which can run arbitrary code "
                             "when loaded; convert them to safetensors, or pass --trust-pickle (trust_pickle=True) "
                             "if you trust the file")
        kwargs["use_safetensors"] = False
    else:
        raise UsageError(f"{folder} has a config.json but no weights (model.safetensors) next to it")

    auto_cls = getattr(transformers, auto_name)
    if safes:
        check_config_against_weights(folder, auto_cls, config)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model, info = _from_pretrained(auto_cls, folder, **kwargs)
    except (UsageError, MissingDependencyError):
        raise
    except ValueError as exc:
        if "unrecognized configuration class" in str(exc).lower() or "does not recognize" in str(exc).lower():
            raise UsageError(f"{folder}: architecture {arch or config.model_type!r} cannot be loaded with "
                             f"{auto_name}") from None
        raise UsageError(f"cannot load the model in {folder}: {_short(exc)}") from None
    except Exception as exc:
        _refuse_mismatched_shapes(folder, auto_cls, config, safes)
        raise UsageError(f"cannot load the model in {folder}: {_short(exc)}") from None

    missing = sorted(info.get("missing_keys") or [])
    hard = [k for k in missing if not k.startswith(_OPTIONAL_PREFIXES) and ".pooler." not in k]
    if hard:
        more = f" and {len(hard) - 1} more" if len(hard) > 1 else ""
        raise UsageError(f"weights in {folder} are incomplete: missing {hard[0]}{more}")
    if missing:
        warnings.warn(f"{folder}: {', '.join(missing[:3])} not in the checkpoint (randomly initialised)", stacklevel=2)
    mismatched = info.get("mismatched_keys") or []
    if mismatched:
        _refuse_mismatched_shapes(folder, auto_cls, config, safes)
        raise UsageError(f"weights in {folder} do not match config.json: {sorted(mismatched)[0]}")
    _refuse_non_finite(model, folder)

    model = _finalize(model, keep_half=True)
    family = _family_for(model, auto_name)
    tokenizer = _load_tokenizer(folder) if family != "vision" else None
    image_processor = _load_image_processor(folder) if family == "vision" else None
    return LoadedModel(model=model, family=family, auto_class=auto_name, tokenizer=tokenizer,
                       image_processor=image_processor, source=source or str(folder),
                       name=name or folder.resolve().name, folder=folder)


# What ``save_pretrained`` does not write but a model folder may carry: sentence-transformers' modules.json,
# 1_Pooling/, config_sentence_transformers.json, ... Never weights (any format; an index would point at shards
# that are not there), code (never run from an output), model cards (they describe the dense model) or our cache
# marker.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".onnx", ".onnx_data",
                    ".gguf", ".npz", ".npy", ".pkl", ".pickle", ".tflite", ".ot", ".data", ".index.json")
_NOT_COPIED = ("readme.md", "permcompile_source.json")
MAX_EXTRA_FILE_BYTES = 64 * 1024 * 1024  # larger: weights in a format not listed above


def copy_extra_files(src: Path, dst: Path) -> list[str]:
    """Copy ``src``'s files that ``dst`` lacks, but for weights, code, model cards and hidden files. A symlink is
    followed only to a regular file inside ``src`` (or a Hub cache snapshot's blobs, which its files link to):
    ``LICENSE -> ~/.ssh/id_rsa`` is not copied. Returns the relative paths copied."""
    copied = []
    for path in iter_files(src):
        rel = path.relative_to(src)
        name = path.name.lower()
        if (any(part.startswith(".") for part in rel.parts) or name.endswith(_WEIGHT_SUFFIXES)
                or name.endswith(".py") or name in _NOT_COPIED or (dst / rel).exists()
                or path.stat().st_size > MAX_EXTRA_FILE_BYTES):
            continue
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path.resolve(), dst / rel)  # the target iter_files checked
        copied.append(rel.as_posix())
    return copied


# ------------------------------------------------------------------------------------------------ short names
def _package_dir(short: str) -> Path:
    info = SHORT_NAMES[short]
    try:
        spec = importlib.util.find_spec(info["module"])  # locate without executing the package
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise MissingDependencyError(f"model {short!r} needs the {info['package']} package: {info['install']}")
    return Path(locations[0])


def _load_minilm() -> LoadedModel:
    folder = _package_dir("minilm") / "model"
    if not (folder / "config.json").is_file():
        info = SHORT_NAMES["minilm"]
        raise MissingDependencyError(f"the {info['package']} package has no model files in {folder}: "
                                     f"reinstall it ({info['install']})")
    loaded = _load_folder(folder, name="minilm", source=f"{SHORT_NAMES['minilm']['package']} ({folder})")
    return loaded


def _gguf_signature(path: Path) -> dict:
    stat = path.stat()
    return {"gguf": path.name, "size": stat.st_size, "format": 1}


def convert_gguf(gguf_path: Path, target: Path, architecture: str | None = None) -> Path:
    """Dequantise a GGUF checkpoint to an fp32 safetensors HF folder at ``target`` (written atomically)."""
    for module, pip_name in (("gguf", "gguf"), ("accelerate", "accelerate")):
        if importlib.util.find_spec(module) is None:
            raise MissingDependencyError(f"loading GGUF weights needs {pip_name}: pip install gguf accelerate")
    transformers = _transformers()
    folder, fname = gguf_path.parent, gguf_path.name
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder), gguf_file=fname,
                                                                   trust_remote_code=False)
            gguf_model = transformers.AutoModelForCausalLM.from_pretrained(str(folder), gguf_file=fname,
                                                                           dtype=torch.float32,
                                                                           trust_remote_code=False)
    except Exception as exc:
        raise UsageError(f"cannot read GGUF file {gguf_path}: {_short(exc)}") from None
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    config.architectures = [architecture or type(gguf_model).__name__]
    config.dtype = torch.float32
    clean = type(gguf_model)(config)
    state = {k: v.float() for k, v in gguf_model.state_dict().items()}
    result = clean.load_state_dict(state, strict=False)
    bad = [k for k in result.missing_keys if k not in set(getattr(clean, "all_tied_weights_keys", {}) or {})
           and not k.endswith("lm_head.weight")]
    if bad or result.unexpected_keys:
        raise UsageError(f"GGUF conversion of {gguf_path} is incomplete: {(bad or result.unexpected_keys)[0]}")
    if getattr(config, "tie_word_embeddings", False) and hasattr(clean, "tie_weights"):
        clean.tie_weights()
    del gguf_model, state

    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=str(target.parent)))
    except OSError as exc:
        raise UsageError(f"cannot write the converted model to the cache {target.parent}: "
                         f"{exc.strerror or _short(exc)}; set {CACHE_ENV} to a writable folder") from None
    try:
        os.chmod(tmp, 0o755)
        clean.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        (tmp / "permcompile_source.json").write_text(json.dumps(_gguf_signature(gguf_path)), encoding="utf-8")
        if target.exists():  # stale or concurrently written: replace
            old = target.with_name(f".{target.name}.old-{os.getpid()}-{int(time.time())}")
            try:
                os.replace(target, old)
                shutil.rmtree(old, ignore_errors=True)
            except OSError:
                pass
        try:
            os.replace(tmp, target)
        except OSError:
            if not (target / "permcompile_source.json").is_file():  # lost a race with nobody: re-raise
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _cache_valid(target: Path, gguf_path: Path) -> bool:
    marker = target / "permcompile_source.json"
    try:
        return json.loads(marker.read_text(encoding="utf-8")) == _gguf_signature(gguf_path) and (
            target / "config.json").is_file()
    except (OSError, ValueError):
        return False


def _load_smollm2() -> LoadedModel:
    info = SHORT_NAMES["smollm2"]
    pkg = _package_dir("smollm2")
    gguf_path = pkg / info["gguf_file"]
    if not gguf_path.is_file():
        raise MissingDependencyError(f"the {info['package']} package has no {info['gguf_file']}: reinstall it "
                                     f"({info['install']})")
    for module in ("gguf", "accelerate"):
        if importlib.util.find_spec(module) is None:
            raise MissingDependencyError(f"model 'smollm2' needs {module}: {info['install']}")
    target = cache_root() / "smollm2-fp32"
    if not _cache_valid(target, gguf_path):
        convert_gguf(gguf_path, target, architecture="LlamaForCausalLM")
    try:
        return _load_folder(target, name="smollm2", source=f"{info['package']} ({gguf_path}), fp32 cache {target}")
    except UsageError:
        # a damaged cache: rebuild it once
        shutil.rmtree(target, ignore_errors=True)
        convert_gguf(gguf_path, target, architecture="LlamaForCausalLM")
        return _load_folder(target, name="smollm2", source=f"{info['package']} ({gguf_path}), fp32 cache {target}")


def _load_gguf_file(path: Path) -> LoadedModel:
    digest = hashlib.sha1(f"{path.resolve()}:{path.stat().st_size}".encode()).hexdigest()[:10]
    target = cache_root() / f"{path.stem}-{digest}-fp32"
    if not _cache_valid(target, path):
        convert_gguf(path, target)
    return _load_folder(target, name=path.stem, source=f"{path} (fp32 cache {target})")


# ------------------------------------------------------------------------------------------------ public API
def load_model(spec: "str | os.PathLike | nn.Module | LoadedModel", *, trust_pickle: bool = False) -> LoadedModel:
    """Load a model for the pipeline.

    ``spec`` is a short name from :data:`SHORT_NAMES` ("minilm", "smollm2"), a local Hugging Face folder
    (config.json + safetensors; pickled ``.bin`` weights only with ``trust_pickle=True``; bf16/fp16 weights
    stay in that dtype, anything else becomes fp32), a ``.gguf`` file,
    an ``nn.Module`` (used as is, switched to eval/fp32) or an existing :class:`LoadedModel` (returned as is).
    """
    if isinstance(spec, LoadedModel):
        return spec
    if isinstance(spec, nn.Module):
        return wrap_module(spec)
    if not isinstance(spec, (str, os.PathLike)):
        raise UsageError(f"cannot load a model from a {type(spec).__name__}; give a folder path or a short name")
    text = os.fspath(spec)
    if text in SHORT_NAMES and not Path(text).exists():
        return _load_minilm() if text == "minilm" else _load_smollm2()
    path = Path(text).expanduser()
    if not path.exists():
        from .precheck import check_model_spec

        check_model_spec(text)  # raises, suggesting the nearest short name ("MiniLM" -> "minilm")
    if path.is_file() and path.suffix.lower() == ".gguf":
        return _load_gguf_file(path)
    return _load_folder(path, trust_pickle=trust_pickle)


def wrap_module(model: nn.Module, *, tokenizer=None, image_processor=None, name: str | None = None) -> LoadedModel:
    """Wrap an in-memory module; the family and Auto class are guessed from its class name and config."""
    model = _finalize(model)
    _refuse_non_finite(model, f"the given {type(model).__name__}")
    cfg = getattr(model, "config", None)
    archs = getattr(cfg, "architectures", None) or [] if cfg is not None else []
    arch = type(model).__name__ if cfg is not None else None
    auto_name = _auto_class_for(arch or (archs[0] if archs else None))
    family = _family_for(model, auto_name)
    if family == "causal-lm" and auto_name == "AutoModel" and cfg is not None:
        auto_name = "AutoModelForCausalLM"
    return LoadedModel(model=model, family=family, auto_class=auto_name, tokenizer=tokenizer,
                       image_processor=image_processor, source="<in-memory>", name=name or type(model).__name__)
