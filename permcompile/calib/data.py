"""Calibration data: turn a user-given source (or the embedded default) into forward-kwargs batches.

``load_calibration(source, loaded, n_samples, seq_len, seed)`` returns a list of dicts of tensors, each one a
small batch to be passed as ``model(**batch, **loaded.forward_kwargs())``. In total the batches hold
``n_samples`` samples (fewer, with a warning, when the source is too small for that many):

* causal LMs: non-overlapping windows of exactly ``seq_len`` tokens cut from the concatenated text, chosen at
  random with ``seed`` (``{"input_ids": [b, seq_len]}``);
* encoders: sentences chosen at random with ``seed``, padded per batch and truncated at ``seq_len`` tokens
  (``input_ids``, ``attention_mask`` and, when the tokenizer makes them, ``token_type_ids``);
* vision models: images (``{"pixel_values": [b, C, H, W]}``), with seeded random crops/flips of the given
  images when there are fewer images than ``n_samples``.

Sources: ``None`` (embedded default: equal shares of literary prose, technical documentation and source code,
each batch from one kind, or four public-domain photos), a ``.txt``
file, a folder of ``.txt`` files, a ``datasets`` dataset saved with ``save_to_disk``, a ``.json`` / ``.jsonl``
/ ``.csv`` / ``.parquet`` file (text column: ``text`` or the first string column), or a folder of images
(png/jpg/jpeg/bmp). Models without a tokenizer (tiny test folders) get byte-level ids (``byte % vocab``).
"""
from __future__ import annotations

import csv
import json
import random
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

import torch

from ..errors import MissingDependencyError, UsageError
from .text import DEFAULT_DIR, default_domains, read_text_file, split_sentences

if TYPE_CHECKING:  # pragma: no cover
    from ..models import LoadedModel

DEFAULT_IMAGES = DEFAULT_DIR / "images"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff")  # calibration and eval alike
TABLE_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_BATCH_SIZE = 8
MAX_TEXT_CHARS = 4_000_000  # text beyond this (a seeded random slice is kept) is never tokenized
MAX_DATASET_ROWS = 20_000


# ------------------------------------------------------------------------------------------------ defaults
def default_image_paths() -> list[Path]:
    return sorted(p for p in DEFAULT_IMAGES.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


def _pick_column(rows: list, where: str) -> list[str]:
    """Texts from table rows: the ``text`` column, else the first column holding strings."""
    rows = [r for r in rows if r is not None]
    if not rows:
        raise UsageError(f"calibration data {where} has no rows")
    if all(isinstance(r, str) for r in rows):
        return [r for r in rows if r.strip()]
    dict_rows = [r for r in rows if isinstance(r, dict)]
    if not dict_rows:
        raise UsageError(f"calibration data {where} holds neither objects nor strings")
    columns: list[str] = []
    for row in dict_rows[:100]:
        columns.extend(k for k in row if k not in columns)
    column = "text" if "text" in columns else None
    if column is None:
        for name in columns:
            if any(isinstance(r.get(name), str) and r.get(name).strip() for r in dict_rows[:100]):
                column = name
                break
    if column is None:
        raise UsageError(f"calibration data {where} has no text column (columns: {', '.join(map(str, columns[:8]))})")
    return [r[column] for r in dict_rows if isinstance(r.get(column), str) and r[column].strip()]


def _read_jsonl(path: Path, text: str) -> list:
    rows = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise UsageError(f"calibration file {path} line {lineno} is not valid JSON ({exc.msg})") from None
        except RecursionError:
            raise UsageError(f"calibration file {path} line {lineno} is nested too deeply to read") from None
    return rows


def _read_table(path: Path) -> list[str]:
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise MissingDependencyError("reading .parquet calibration data needs pyarrow: pip install pyarrow") \
                from None
        try:
            rows = pq.read_table(str(path)).to_pylist()
        except Exception as exc:
            raise UsageError(f"cannot read parquet file {path}: {str(exc).splitlines()[0][:160]}") from None
        return _pick_column(rows, str(path))
    text = read_text_file(path)
    if not text.strip():
        raise UsageError(f"calibration file {path} is empty")
    if suffix == ".jsonl":
        return _pick_column(_read_jsonl(path, text), str(path))
    if suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            if exc.msg.startswith("Extra data"):  # JSON lines saved as .json
                return _pick_column(_read_jsonl(path, text), str(path))
            raise UsageError(f"calibration file {path} is not valid JSON (line {exc.lineno}: {exc.msg})") from None
        except RecursionError:
            raise UsageError(f"calibration file {path} is nested too deeply to read") from None
        if isinstance(data, dict):
            lists = {k: v for k, v in data.items() if isinstance(v, list)}
            if lists and all(len(v) == len(next(iter(lists.values()))) for v in lists.values()) and any(
                    v and not isinstance(v[0], dict) for v in lists.values()):
                keys = list(lists)
                data = [dict(zip(keys, vals)) for vals in zip(*lists.values())]  # columnar {"text": [...]}
            elif lists:
                data = next(iter(lists.values()))  # {"data": [...]}
            else:
                data = [data]
        if not isinstance(data, list):
            raise UsageError(f"calibration file {path} must hold a list of records")
        return _pick_column(data, str(path))
    # .csv
    try:
        csv.field_size_limit(1 << 30)
        rows = list(csv.DictReader(text.splitlines()))
    except csv.Error as exc:
        raise UsageError(f"cannot parse CSV file {path}: {exc}") from None
    return _pick_column(rows, str(path))


def _is_saved_dataset(folder: Path) -> bool:
    return (folder / "dataset_dict.json").is_file() or (
        (folder / "dataset_info.json").is_file() and (folder / "state.json").is_file())


def _read_saved_dataset(folder: Path, seed: int) -> list[str]:
    try:
        import datasets
    except ImportError:
        raise MissingDependencyError("reading a saved dataset needs the datasets package: pip install datasets") \
            from None
    try:
        ds = datasets.load_from_disk(str(folder))
    except Exception as exc:
        raise UsageError(f"cannot load the dataset saved in {folder}: {str(exc).splitlines()[0][:160]}") from None
    if isinstance(ds, datasets.DatasetDict):
        if not ds:
            raise UsageError(f"dataset in {folder} has no splits")
        ds = ds["train"] if "train" in ds else ds[next(iter(ds))]
    if len(ds) == 0:
        raise UsageError(f"dataset in {folder} is empty")
    columns = list(ds.column_names)
    column = "text" if "text" in columns else None
    if column is None:
        for name, feat in ds.features.items():
            if isinstance(feat, datasets.Value) and feat.dtype in ("string", "large_string"):
                column = name
                break
    if column is None:
        raise UsageError(f"dataset in {folder} has no text column (columns: {', '.join(columns[:8])})")
    if len(ds) > MAX_DATASET_ROWS:
        idx = sorted(random.Random(seed).sample(range(len(ds)), MAX_DATASET_ROWS))
        ds = ds.select(idx)
    return [t for t in ds[column] if isinstance(t, str) and t.strip()]


def _files_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and not any(
        part.startswith(".") for part in p.relative_to(folder).parts))


def _read_texts(path: Path, seed: int) -> list[str]:
    """Documents from a text-like source (file, folder of .txt, tables, saved dataset)."""
    if path.is_dir():
        if _is_saved_dataset(path):
            return _read_saved_dataset(path, seed)
        files = _files_in(path)
        if not files:
            raise UsageError(f"calibration folder {path} is empty")
        txts = [p for p in files if p.suffix.lower() == ".txt"]
        tables = [p for p in files if p.suffix.lower() in TABLE_SUFFIXES]
        if txts:
            docs = [t for t in (read_text_file(p) for p in txts) if t.strip()]
            if not docs:
                raise UsageError(f"calibration folder {path} holds only empty .txt files")
            return docs
        if tables:
            return [t for p in tables for t in _read_table(p)]
        if any(p.suffix.lower() in IMAGE_SUFFIXES for p in files):
            raise UsageError(f"calibration folder {path} holds images, but this model takes text")
        raise UsageError(f"calibration folder {path} holds no .txt, .json/.jsonl/.csv/.parquet or image files")
    suffix = path.suffix.lower()
    if suffix in TABLE_SUFFIXES:
        docs = _read_table(path)
    elif suffix in IMAGE_SUFFIXES:
        raise UsageError(f"calibration file {path} is an image, but this model takes text")
    else:
        text = read_text_file(path)
        docs = [text] if text.strip() else []
    if not docs:
        raise UsageError(f"calibration file {path} is empty")
    return docs


# ------------------------------------------------------------------------------------------------ text → tensors
def _max_positions(loaded: "LoadedModel") -> int | None:
    cfg = loaded.config
    for attr in ("max_position_embeddings", "n_positions"):
        value = getattr(cfg, attr, None) if cfg is not None else None
        if isinstance(value, int) and value > 0:
            return value
    return None


def _clamp_seq_len(loaded: "LoadedModel", seq_len: int) -> int:
    limit = _max_positions(loaded)
    if limit is not None and seq_len > limit:
        warnings.warn(f"calibration sequence length {seq_len} exceeds the model's {limit} positions; using {limit}",
                      stacklevel=3)
        return limit
    return seq_len


def _encode(loaded: "LoadedModel", text: str) -> list[int]:
    if loaded.tokenizer is not None:
        return list(loaded.tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])
    vocab = loaded.vocab_size
    return [b % vocab for b in text.encode("utf-8")]


def _causal_windows(docs: list[str], loaded: "LoadedModel", n_samples: int, seq_len: int, seed: int,
                    where: str) -> list[torch.Tensor]:
    text = "\n\n".join(d.strip() for d in docs)
    if len(text) > MAX_TEXT_CHARS:
        start = random.Random(seed).randrange(0, len(text) - MAX_TEXT_CHARS)
        text = text[start:start + MAX_TEXT_CHARS]
    ids = _encode(loaded, text)
    n_windows = len(ids) // seq_len
    if n_windows == 0:
        raise UsageError(f"calibration text {where} is too short: {len(ids)} tokens, need at least {seq_len} "
                         "for one sample (lower the sequence length or give more text)")
    if n_windows < n_samples:
        warnings.warn(f"calibration text {where} has only {n_windows} windows of {seq_len} tokens; "
                      f"using {n_windows} samples instead of {n_samples}", stacklevel=3)
    gen = torch.Generator().manual_seed(seed)
    spare = len(ids) - n_windows * seq_len
    offset = int(torch.randint(0, spare + 1, (1,), generator=gen))
    chosen = torch.randperm(n_windows, generator=gen)[:n_samples].sort().values.tolist()
    data = torch.tensor(ids[offset:offset + n_windows * seq_len], dtype=torch.long).view(n_windows, seq_len)
    return [data[i] for i in chosen]


def _encoder_batches(docs: list[str], loaded: "LoadedModel", n_samples: int, seq_len: int, seed: int,
                     batch_size: int, where: str) -> list[dict[str, torch.Tensor]]:
    sentences = [s for d in docs for s in split_sentences(d, min_words=2)]
    if not sentences:
        sentences = [" ".join(d.split()) for d in docs if d.strip()]
    if not sentences:
        raise UsageError(f"calibration text {where} holds no sentences")
    if len(sentences) < n_samples:
        warnings.warn(f"calibration text {where} has only {len(sentences)} sentences; using them all instead of "
                      f"{n_samples} samples", stacklevel=3)
    gen = torch.Generator().manual_seed(seed)
    chosen = [sentences[i] for i in torch.randperm(len(sentences), generator=gen)[:n_samples].tolist()]
    batches = []
    for start in range(0, len(chosen), batch_size):
        group = chosen[start:start + batch_size]
        if loaded.tokenizer is not None:
            enc = loaded.tokenizer(group, padding=True, truncation=True, max_length=seq_len, return_tensors="pt")
            batch = {k: enc[k].long() for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc}
        else:
            rows = [_encode(loaded, s)[:seq_len] or [0] for s in group]
            width = max(len(r) for r in rows)
            pad = loaded.pad_token_id
            ids = torch.full((len(rows), width), pad, dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for i, r in enumerate(rows):
                ids[i, :len(r)] = torch.tensor(r, dtype=torch.long)
                mask[i, :len(r)] = 1
            batch = {"input_ids": ids, "attention_mask": mask}
        batches.append(batch)
    return batches


# ------------------------------------------------------------------------------------------------ images
def _pil():
    try:
        from PIL import Image
    except ImportError:
        raise MissingDependencyError("reading images needs Pillow: pip install pillow") from None
    return Image


def _image_paths(path: Path | None) -> list[Path]:
    if path is None:
        return default_image_paths()
    if path.is_dir():
        files = _files_in(path)
        if not files:
            raise UsageError(f"calibration folder {path} is empty")
        images = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
        if not images:
            raise UsageError(f"calibration folder {path} holds no images ({', '.join(IMAGE_SUFFIXES)}); "
                             "this is a vision model")
        return images
    if path.suffix.lower() in IMAGE_SUFFIXES:
        return [path]
    raise UsageError(f"calibration source {path} is not an image or a folder of images; this is a vision model")


def open_image(path: Path, mode: str):
    """One image file, fully decoded and converted to PIL ``mode``; :class:`UsageError` if it cannot be read."""
    Image = _pil()
    try:
        with Image.open(path) as im:
            im.load()
            return im.convert(mode)
    except Exception as exc:
        first = str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__
        raise UsageError(f"cannot read image {path}: corrupt or unsupported ({first})") from None


def _augment(image, rng: random.Random):
    """A seeded random resized crop (35-100% of the area) with an optional horizontal flip."""
    Image = _pil()
    w, h = image.size
    for _ in range(10):
        area = w * h * rng.uniform(0.35, 1.0)
        ratio = rng.uniform(3 / 4, 4 / 3)
        cw, ch = int(round((area * ratio) ** 0.5)), int(round((area / ratio) ** 0.5))
        if 0 < cw <= w and 0 < ch <= h:
            x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
            image = image.crop((x, y, x + cw, y + ch))
            break
    if rng.random() < 0.5:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return image


def images_to_pixels(images: list, image_processor=None, size: tuple[int, int] = (224, 224),
                     channels: int = 3) -> torch.Tensor:
    """PIL images → ``[n, C, H, W]`` float pixels: the image processor when there is one, else a bicubic
    resize to ``size`` (height, width) and ImageNet normalisation (0.5/0.5 for non-RGB inputs)."""
    if image_processor is not None:
        return image_processor(images=images, return_tensors="pt")["pixel_values"].float()
    import numpy as np

    Image = _pil()
    h, w = size
    mean = np.array(IMAGENET_MEAN if channels == 3 else (0.5,) * channels, dtype=np.float32)
    std = np.array(IMAGENET_STD if channels == 3 else (0.5,) * channels, dtype=np.float32)
    out = []
    for im in images:
        arr = np.asarray(im.resize((w, h), Image.Resampling.BICUBIC), dtype=np.float32) / 255.0
        if arr.ndim == 2:
            arr = arr[:, :, None]
        arr = (arr[:, :, :channels] - mean) / std
        out.append(torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1))))
    return torch.stack(out)


def _to_pixels(images: list, loaded: "LoadedModel") -> torch.Tensor:
    return images_to_pixels(images, loaded.image_processor, loaded.image_size, loaded.num_channels)


def _vision_batches(path: Path | None, loaded: "LoadedModel", n_samples: int, seed: int,
                    batch_size: int) -> list[dict[str, torch.Tensor]]:
    paths = _image_paths(path)
    mode = "L" if loaded.num_channels == 1 else "RGB"
    rng = random.Random(seed)
    if len(paths) > n_samples:
        paths = sorted(rng.sample(paths, n_samples))
    images = [open_image(p, mode) for p in paths]
    extra = [_augment(images[k % len(images)], rng) for k in range(n_samples - len(images))]
    images = images + extra
    return [{"pixel_values": _to_pixels(images[i:i + batch_size], loaded)}
            for i in range(0, len(images), batch_size)]


# ------------------------------------------------------------------------------------------------ public API
def load_calibration(source: "str | Path | None", loaded: "LoadedModel", n_samples: int, seq_len: int,
                     seed: int, *, batch_size: int = DEFAULT_BATCH_SIZE) -> list[dict[str, torch.Tensor]]:
    """Calibration batches for ``loaded`` (see the module docstring for sources and shapes)."""
    if n_samples < 1:
        raise UsageError("calibration needs at least 1 sample")
    if seq_len < 2 and loaded.family != "vision":
        raise UsageError("calibration sequence length must be at least 2 tokens")
    batch_size = max(1, int(batch_size))
    path = None
    if source is not None and str(source) != "":
        from ..precheck import check_calibration_source

        check_calibration_source(source)  # the checks optimize() made before loading, for direct callers
        path = Path(source).expanduser()

    if loaded.family == "vision":
        return _vision_batches(path, loaded, n_samples, seed, batch_size)

    if path is None:
        return embedded_calibration(loaded, n_samples, seq_len, seed, batch_size=batch_size)
    seq_len = _clamp_seq_len(loaded, seq_len)
    docs, where = _read_texts(path, seed), str(path)
    if not docs:
        raise UsageError(f"calibration source {where} holds no text")
    out = CalibrationBatches(_text_batches(docs, loaded, n_samples, seq_len, seed, batch_size, where))
    out.sources = [path.name] * len(out)
    out.documents = len(docs)
    return out


def embedded_calibration(loaded: "LoadedModel", n_samples: int, seq_len: int, seed: int, *,
                         batch_size: int = DEFAULT_BATCH_SIZE, kinds: list[str] | None = None) -> "CalibrationBatches":
    """Batches of the embedded mixed set (text models): every kind of text (or each of ``kinds``) gets an equal
    share of the samples, in batches of its own labelled with the kind."""
    domains = default_domains()
    if kinds is not None:
        unknown = sorted(set(kinds) - set(domains))
        if unknown:
            raise UsageError(f"the embedded calibration set has no kind {', '.join(unknown)} "
                             f"(kinds: {', '.join(domains)})")
        domains = {k: v for k, v in domains.items() if k in kinds}
    seq_len = _clamp_seq_len(loaded, seq_len)
    shares = [n_samples // len(domains) + (i < n_samples % len(domains)) for i in range(len(domains))]
    out = CalibrationBatches()
    for (name, text), share in zip(domains.items(), shares):
        if share:
            part = _text_batches([text], loaded, share, seq_len, seed, batch_size, f"(embedded {name})")
            out.extend(part)
            out.sources.extend([name] * len(part))
    return out


def with_reference(batches: list, reference: list, *, fit: bool) -> "CalibrationBatches":
    """``batches`` followed by ``reference`` (batches of the embedded mixed set, labelled by kind), for a pass
    whose user data is one text and so cannot show how an update fitted on it does on other kinds of text.

    ``fit``: the reference batches join the data the update is fitted on, as kinds of text of their own (the
    held-out check then holds out one kind at a time, the user's text among them); otherwise they are marked
    ``reference``: checked on, never fitted on."""
    out = CalibrationBatches(list(batches) + list(reference))
    sources = list(getattr(batches, "sources", None) or [])
    out.sources = ((sources if len(sources) == len(batches) else ["calibration"] * len(batches))
                   + list(getattr(reference, "sources", None) or ["reference"] * len(reference)))
    out.embedded = list(range(len(batches), len(out)))
    if not fit:
        out.documents = getattr(batches, "documents", None)
        out.reference = list(out.embedded)
    return out


def narrow_calibration(batches: list, reference_share: float = 0.0) -> str | None:
    """Why ``batches`` are too narrow to fit a weight update that serves other text, or None.

    One document (a single text file) is one kind of text: reconstruction fitted on one novel alone scored twice
    the masks-only perplexity on Python code (docs/FINDINGS.md). ``reference_share``: the share of the fit the
    pass then takes from the embedded mixed set (``ReconstructConfig.reference_share``), which the message
    states. Images and the embedded mixed set are never narrow."""
    documents = getattr(batches, "documents", None)
    if documents != 1:
        return None
    if reference_share > 0:
        return (f"calibration data {batches.sources[0]} is a single text: {reference_share:.0%} of the weight "
                "update's fit comes from the embedded mixed set (prose, documentation, code) so it also holds on "
                "other kinds of text; for the best quality on what the model serves, give a folder with samples "
                "of each kind")
    return (f"calibration data {batches.sources[0]} is a single text: the weight update fits its kind of text "
            "and can lose quality on other kinds; give a folder with samples of each kind of text the model "
            "will serve, or leave out --calib for the embedded mixed set")


class CalibrationBatches(list):
    """The calibration batches, with ``sources``: the kind of text (or the file) each batch was cut from, so a
    pass can hold out one kind and measure how an update fitted on the others carries over to it."""

    def __init__(self, batches=()):
        super().__init__(batches)
        self.sources: list[str] = []
        self.documents: int | None = None  # texts the batches were cut from (None: the embedded set or images)
        self.positions: list[int] | None = None  # each batch's index in the whole set (a process's share: shard)
        self.total: int | None = None  # batches in the whole set
        self.reference: list[int] = []  # batches to check on, never to fit on (with_reference)
        # batches with_reference added from the embedded set (their kind names may equal a user file's)
        self.embedded: list[int] = []

    def share(self, start: int, step: int) -> "CalibrationBatches":
        """Every ``step``-th batch from ``start``, keeping each one's label and position in the whole set."""
        out = CalibrationBatches(self[start::step])
        out.sources = self.sources[start::step] if len(self.sources) == len(self) else []
        out.documents = self.documents
        out.positions = list(range(len(self)))[start::step]
        out.total = len(self)
        return out


def _text_batches(docs: list[str], loaded: "LoadedModel", n_samples: int, seq_len: int, seed: int,
                  batch_size: int, where: str) -> list[dict[str, torch.Tensor]]:
    if loaded.family == "causal-lm":
        windows = _causal_windows(docs, loaded, n_samples, seq_len, seed, where)
        return [{"input_ids": torch.stack(windows[i:i + batch_size])} for i in range(0, len(windows), batch_size)]
    return _encoder_batches(docs, loaded, n_samples, seq_len, seed, batch_size, where)


def count_samples(batches: Iterable[dict[str, Any]]) -> int:
    """Number of samples (rows) across calibration batches."""
    total = 0
    for batch in batches:
        first = next(iter(batch.values()))
        total += int(first.shape[0])
    return total
