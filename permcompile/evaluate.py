"""Quality metrics for dense and pruned models: perplexity, embedding / feature similarity, top-1.

Everything here is pure evaluation (no side effects at import, nothing is written):

* :func:`perplexity` / :func:`perplexity_ids` - causal-LM perplexity over sliding windows (HF guide style);
* :func:`embedding_similarity` - sentence embeddings (masked mean of ``last_hidden_state``) of a model vs a
  reference model: mean cosine and Spearman correlation of the pairwise similarities;
* :func:`feature_similarity` - vision backbones: CLS / patch feature cosine vs a reference;
* :func:`top1` - classifier accuracy;
* :class:`OnnxModel` - an ONNX Runtime session that can be called like the HF model for all of the above;
* :func:`evaluate` - the ``permcompile eval`` driver for an ``optimize`` output folder, an HF folder or a short
  model name.

Models are called as ``model(**inputs)`` (plus ``use_cache=False`` for causal LMs); anything with ``.logits``
or ``.last_hidden_state`` in its output works, so an :class:`OnnxModel` can stand in for a torch model.
"""
from __future__ import annotations

import math
import os
import random
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F

from .calib.data import IMAGE_SUFFIXES, open_image
from .calib.text import read_text_file, split_sentences
from .modelio import named_output
from .errors import MissingDependencyError, UsageError

MAX_PAIRS = 20_000
DEFAULT_MAX_SENTENCES = 1_000
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "tokenizer.model",
                    "spiece.model", "sentencepiece.bpe.model")
_IMAGE_PROCESSOR_FILES = ("preprocessor_config.json", "image_processor_config.json")
# ================================================================================================ helpers
PROGRESS_LINE_EVERY_S = 10.0  # off a terminal, a count line at most this often (and one at the end)


def _say(enabled: bool, text: str) -> None:
    """A step line on stderr, like ``optimize``'s."""
    if enabled:
        print(f"[permcompile] {text}", file=sys.stderr, flush=True)


class _Counter:
    """Progress of a long loop in the user's units (windows, sentences, images), on stderr.

    A tqdm bar with the whole description on a terminal; elsewhere (a log file, a pipe, CI) a count line
    every :data:`PROGRESS_LINE_EVERY_S` seconds and one at the end, so that a log shows progress too.
    """

    def __init__(self, enabled: bool, total: int, desc: str, unit: str):
        self.enabled, self.total, self.desc, self.unit = enabled and total > 0, total, desc, unit
        self.done, self.bar = 0, None
        self.start = self.last = time.perf_counter()
        if self.enabled and sys.stderr.isatty():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, leave=False)

    def update(self, n: int = 1) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
            return
        now = time.perf_counter()
        if self.enabled and (self.done >= self.total or now - self.last >= PROGRESS_LINE_EVERY_S):
            self.last = now
            _say(True, f"{self.desc}: {self.done}/{self.total} {self.unit}s ({now - self.start:.0f} s)")

    def close(self) -> None:
        """Clear the bar; a finished loop leaves its count line (an interrupted one leaves none)."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None
            if self.done >= self.total:
                _say(True, f"{self.desc}: {self.done}/{self.total} {self.unit}s "
                           f"({time.perf_counter() - self.start:.0f} s)")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


def _config(model) -> Any:
    return getattr(model, "config", None)


def _max_positions(model) -> int | None:
    cfg = _config(model)
    if cfg is None:
        return None
    cfg = getattr(cfg, "text_config", None) or cfg
    for attr in ("max_position_embeddings", "n_positions", "max_seq_len"):
        value = getattr(cfg, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _vocab_size(model, tokenizer=None) -> int:
    cfg = _config(model)
    size = getattr(cfg, "vocab_size", None) if cfg is not None else None
    if not size and tokenizer is not None:
        size = len(tokenizer)
    return int(size or 256)


def _unwrap(model):
    """Accept a :class:`~permcompile.models.LoadedModel` wherever a model is expected."""
    if hasattr(model, "family") and hasattr(model, "auto_class") and hasattr(model, "model"):
        return model.model, model
    return model, None


def _is_torch_module(model) -> bool:
    return isinstance(model, torch.nn.Module)


def _forward(model, inputs: Mapping[str, torch.Tensor], causal: bool = False):
    kwargs = dict(inputs)
    if causal and _is_torch_module(model):
        kwargs["use_cache"] = False
    if _is_torch_module(model):
        kwargs.setdefault("return_dict", True)
    try:
        return model(**kwargs)
    except TypeError:
        if "return_dict" in kwargs and _is_torch_module(model):
            kwargs.pop("return_dict")
            return model(**kwargs)
        raise


def _encode_ids(tokenizer, text: str, vocab_size: int) -> list[int]:
    """Token ids without special tokens; tokenizer-less models get byte-level ids (``byte % vocab``)."""
    if tokenizer is not None:
        return list(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])
    return [b % vocab_size for b in text.encode("utf-8")]


def _was_eval(model):
    """Switch a torch module to eval mode; returns a callable restoring its mode."""
    if _is_torch_module(model):
        was = model.training
        model.eval()
        return lambda: model.train(was)
    return lambda: None


# ================================================================================================ text
def _read_text_file(path: Path) -> str:
    return read_text_file(path, "data", max_bytes=None)


def read_text(path: str | os.PathLike) -> str:
    """The text of a ``.txt`` file (any name) or of all ``.txt`` files in a folder (sorted, joined by blank lines).

    Raises :class:`UsageError` when the path is missing, holds no text, or holds binary data.
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise UsageError(f"data path {path} does not exist")
    if p.is_dir():
        files = sorted(f for f in p.rglob("*.txt") if f.is_file() and not any(
            part.startswith(".") for part in f.relative_to(p).parts))
        if not files:
            raise UsageError(f"data folder {path} holds no .txt files")
        texts = [t.strip() for t in (_read_text_file(f) for f in files)]
        text = "\n\n".join(t for t in texts if t)
        if not text:
            raise UsageError(f"data folder {path} holds only empty .txt files")
        return text
    if p.suffix.lower() in IMAGE_SUFFIXES:
        raise UsageError(f"data file {path} is an image, but this model takes text")
    text = _read_text_file(p)
    if not text.strip():
        raise UsageError(f"data file {path} is empty")
    return text


# ================================================================================================ perplexity
def _windows(n_tokens: int, context: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, n_target) per window, as in the HF perplexity guide: the last ``n_target`` tokens of
    each window are scored (the window's first token never is: it has no context inside the window)."""
    out = []
    prev_end = 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + context, n_tokens)
        out.append((begin, end, end - prev_end))
        prev_end = end
        if end == n_tokens:
            break
    return out


@torch.no_grad()
def perplexity_ids(model, ids: torch.Tensor, context: int = 512, stride: int | None = None,
                   max_tokens: int | None = None, batch_size: int = 4, progress: bool = False,
                   reference=None) -> dict:
    """Perplexity of causal LM ``model`` on token ids ``ids`` (1-D, or ``[1, T]``).

    Windows of ``context`` tokens start every ``stride`` tokens (default ``stride = context``: non-overlapping
    windows); in each window only the tokens not scored by an earlier window are scored (all but the first
    for non-overlapping windows, the last ``stride`` otherwise). ``max_tokens`` keeps the first tokens only.
    ``context`` is clamped to the model's position limit (with a warning). Windows of equal length are run
    ``batch_size`` at a time; batching does not change the result.

    Returns ``{"ppl", "nll" (mean per scored token), "tokens" (scored), "context", "stride", "windows"}``.
    With a ``reference`` model (the dense original, same tokenizer) the same windows also give
    ``reference_ppl``, ``kl`` (mean over scored tokens of KL(reference ‖ model) of the next-token
    distributions, in nats) and ``top1_agreement`` (share of scored tokens whose most likely next token is
    the reference's): how far the compressed model moved from the original, not just from the text.
    """
    model, _ = _unwrap(model)
    if reference is not None:
        reference, _ = _unwrap(reference)
    ids = torch.as_tensor(ids, dtype=torch.long)
    if ids.dim() == 2 and ids.shape[0] == 1:
        ids = ids[0]
    if ids.dim() != 1:
        raise UsageError(f"perplexity needs a 1-D sequence of token ids, got shape {tuple(ids.shape)}")
    if max_tokens is not None:
        if max_tokens < 2:
            raise UsageError(f"max_tokens must be at least 2, got {max_tokens}")
        ids = ids[:max_tokens]
    context = int(context)
    if context < 2:
        raise UsageError(f"context must be at least 2 tokens, got {context}")
    limit = _max_positions(model)
    if limit is not None and context > limit:
        warnings.warn(f"context {context} exceeds the model's {limit} positions; using {limit}", stacklevel=1)
        context = limit
    stride = context if stride is None else int(stride)
    if stride < 1 or stride > context:
        raise UsageError(f"stride must be between 1 and the context ({context}), got {stride}")
    if batch_size < 1:
        raise UsageError(f"batch size must be at least 1, got {batch_size}")
    if ids.numel() < 2:
        raise UsageError(f"the text is too short for perplexity: {ids.numel()} token(s), need at least 2")

    windows = _windows(ids.numel(), context, stride)
    # consecutive windows of the same length go together
    batches: list[list[tuple[int, int, int]]] = []
    for w in windows:
        if batches and len(batches[-1]) < batch_size and (batches[-1][0][1] - batches[-1][0][0]) == (w[1] - w[0]):
            batches[-1].append(w)
        else:
            batches.append([w])

    restore = _was_eval(model)
    restore_ref = _was_eval(reference) if reference is not None else (lambda: None)
    total_nll, total_tokens = 0.0, 0
    ref_nll, total_kl, agree = 0.0, 0.0, 0
    what = f"perplexity{' and reference' if reference is not None else ''} ({context}-token windows)"
    counter = _Counter(progress, len(windows), what, "window")
    try:
        for batch in batches:
            length = batch[0][1] - batch[0][0]
            if length < 2:
                counter.update(len(batch))
                continue
            x = torch.stack([ids[b:e] for b, e, _ in batch])
            logits = named_output(_forward(model, {"input_ids": x}, causal=True), "logits")
            targets = x[:, 1:].clone()
            positions = torch.arange(1, length)
            for row, (_, _, n_target) in enumerate(batch):
                targets[row, positions < length - n_target] = -100
            flat_t = targets.reshape(-1)
            nll = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), flat_t,
                                  ignore_index=-100, reduction="sum")
            total_nll += float(nll.double())
            total_tokens += int((targets != -100).sum())
            if reference is not None:
                ref_logits = named_output(_forward(reference, {"input_ids": x}, causal=True), "logits")
                if ref_logits.shape != logits.shape:
                    raise UsageError(f"the reference's logits {tuple(ref_logits.shape)} and the model's "
                                     f"{tuple(logits.shape)} differ in shape: is the reference the right model?")
                scored = flat_t != -100
                lp = F.log_softmax(logits[:, :-1].float().reshape(-1, logits.shape[-1])[scored], dim=-1)
                del logits
                lq = F.log_softmax(ref_logits[:, :-1].float().reshape(-1, ref_logits.shape[-1])[scored], dim=-1)
                del ref_logits
                ref_nll += float(-lq.gather(1, flat_t[scored, None]).double().sum())
                total_kl += float((lq.exp() * (lq - lp)).sum(dtype=torch.float64))
                agree += int((lq.argmax(-1) == lp.argmax(-1)).sum())
            counter.update(len(batch))
    finally:
        counter.close()
        restore()
        restore_ref()
    if total_tokens == 0:
        raise UsageError("no token could be scored (text too short for one window)")
    mean = total_nll / total_tokens
    out = {"ppl": math.exp(mean) if mean < 700 else math.inf, "nll": mean, "tokens": total_tokens,
           "context": context, "stride": stride, "windows": len(windows)}
    if reference is not None:
        ref_mean = ref_nll / total_tokens
        out.update({"reference_ppl": math.exp(ref_mean) if ref_mean < 700 else math.inf,
                    "kl": total_kl / total_tokens, "top1_agreement": agree / total_tokens})
    return out


def perplexity(model, tokenizer_or_none, text: str, context: int = 512, stride: int | None = None,
               max_tokens: int | None = None, batch_size: int = 4, progress: bool = False,
               reference=None) -> dict:
    """Perplexity of ``model`` on ``text`` (see :func:`perplexity_ids`; ``reference`` adds KL and agreement).

    The text is tokenized without special tokens; with no tokenizer, bytes become ids (``byte % vocab``).
    ``model`` may be a :class:`~permcompile.models.LoadedModel` (its tokenizer is used when none is given).
    """
    net, loaded = _unwrap(model)
    tokenizer = tokenizer_or_none
    if tokenizer is None and loaded is not None:
        tokenizer = loaded.tokenizer
    if not isinstance(text, str) or not text.strip():
        raise UsageError("the text to evaluate perplexity on is empty")
    _say(progress, f"tokenizing {len(text):,} characters" + ("" if tokenizer else " (bytes: no tokenizer)"))
    if max_tokens is not None and tokenizer is not None:
        # tokenizing a whole corpus to keep its start is wasteful: cut the text generously first
        budget = max(4096, int(max_tokens) * 16)
        ids = _encode_ids(tokenizer, text[:budget], 0)
        if len(ids) < max_tokens + 16 and len(text) > budget:
            ids = _encode_ids(tokenizer, text, 0)
    else:
        ids = _encode_ids(tokenizer, text, _vocab_size(net, tokenizer))
    _say(progress, f"{len(ids):,} tokens" + (f" (the first {max_tokens:,} are scored)"
                                             if max_tokens is not None and len(ids) > max_tokens else ""))
    return perplexity_ids(net, torch.tensor(ids, dtype=torch.long), context=context, stride=stride,
                          max_tokens=max_tokens, batch_size=batch_size, progress=progress, reference=reference)


# ================================================================================================ embeddings
def _tokenize_batch(tokenizer, sentences: Sequence[str], max_length: int, vocab_size: int,
                    pad_id: int = 0) -> dict[str, torch.Tensor]:
    if tokenizer is not None:
        enc = tokenizer(list(sentences), padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        return {k: enc[k].long() for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc}
    rows = [_encode_ids(None, s, vocab_size)[:max_length] or [0] for s in sentences]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, :len(r)] = 1
    return {"input_ids": ids, "attention_mask": mask}


def _mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1e-9)


@torch.no_grad()
def sentence_embeddings(model, tokenizer, sentences: Sequence[str], batch_size: int = 32,
                        max_length: int = 128, progress: bool = False, desc: str = "embeddings") -> torch.Tensor:
    """``[n, hidden]`` float64 embeddings: attention-masked mean of ``last_hidden_state``."""
    model, _ = _unwrap(model)
    limit = _max_positions(model)
    if limit is not None:
        max_length = min(max_length, limit)
    vocab = _vocab_size(model, tokenizer)
    pad = getattr(_config(model), "pad_token_id", None) or 0
    # similar lengths batched together: far less padding (the result does not depend on the batching)
    order = sorted(range(len(sentences)), key=lambda i: len(sentences[i]))
    restore = _was_eval(model)
    out = []
    try:
        with _Counter(progress, len(order), desc, "sentence") as counter:
            for start in range(0, len(order), batch_size):
                group = [sentences[i] for i in order[start:start + batch_size]]
                batch = _tokenize_batch(tokenizer, group, max_length, vocab, pad)
                hidden = named_output(_forward(model, batch), "last_hidden_state")
                out.append(_mean_pool(hidden.double(), batch["attention_mask"]))
                counter.update(len(group))
    finally:
        restore()
    emb = torch.cat(out)
    result = torch.empty_like(emb)
    result[torch.tensor(order, dtype=torch.long)] = emb
    return result


def _pair_indices(n: int, max_pairs: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    total = n * (n - 1) // 2
    if total <= max_pairs:
        iu = torch.triu_indices(n, n, offset=1)
        return iu[0], iu[1]
    gen = torch.Generator().manual_seed(seed)
    pairs: set[tuple[int, int]] = set()
    while len(pairs) < max_pairs:
        a = torch.randint(0, n, (max_pairs,), generator=gen)
        b = torch.randint(0, n, (max_pairs,), generator=gen)
        for i, j in zip(a.tolist(), b.tolist()):
            if i != j:
                pairs.add((min(i, j), max(i, j)))
                if len(pairs) >= max_pairs:
                    break
    ordered = sorted(pairs)
    return torch.tensor([p[0] for p in ordered]), torch.tensor([p[1] for p in ordered])


def _spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    from scipy.stats import spearmanr

    if a.numel() < 2:
        return float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # constant input: nan, no warning spam
        return float(spearmanr(a.numpy(), b.numpy())[0])


def embedding_similarity(model, ref_model, tokenizer, sentences: list[str], batch_size: int = 32,
                         max_length: int = 128, max_pairs: int = MAX_PAIRS, seed: int = 0,
                         progress: bool = False) -> dict:
    """Sentence-embedding agreement of ``model`` with ``ref_model`` (normally the dense source).

    ``mean_cosine``: mean over sentences of cos(model embedding, reference embedding) of the same sentence;
    ``spearman``: Spearman correlation between the pairwise cosine similarities of the model's embeddings
    and those of the reference's, over all sentence pairs (a seeded random subset of ``max_pairs`` pairs
    when there are more).
    """
    sentences = [s for s in sentences if isinstance(s, str) and s.strip()]
    if len(sentences) < 3:
        raise UsageError(f"embedding similarity needs at least 3 sentences, got {len(sentences)}")
    emb = sentence_embeddings(model, tokenizer, sentences, batch_size, max_length, progress, "embeddings (model)")
    ref = sentence_embeddings(ref_model, tokenizer, sentences, batch_size, max_length, progress,
                              "embeddings (reference)")
    if emb.shape != ref.shape:
        raise UsageError(f"the model's embeddings ({emb.shape[-1]}) and the reference's ({ref.shape[-1]}) "
                         "differ in size: is the reference the right model?")
    cos = F.cosine_similarity(emb, ref, dim=-1)
    en, rn = F.normalize(emb, dim=-1), F.normalize(ref, dim=-1)
    i, j = _pair_indices(len(sentences), max_pairs, seed)
    sim_model = (en[i] * en[j]).sum(-1)
    sim_ref = (rn[i] * rn[j]).sum(-1)
    return {"mean_cosine": float(cos.mean()), "min_cosine": float(cos.min()),
            "spearman": _spearman(sim_model, sim_ref), "sentences": len(sentences), "pairs": int(i.numel())}


# ================================================================================================ vision
@torch.no_grad()
def feature_similarity(model, ref_model, pixel_values_batches: Iterable, progress: bool = False) -> dict:
    """Vision backbone agreement with ``ref_model``: mean cosine of the CLS features
    (``last_hidden_state[:, 0]``, per image) and of the patch features (``[:, 1:]``, per token)."""
    model, _ = _unwrap(model)
    ref_model, _ = _unwrap(ref_model)
    restore_a, restore_b = _was_eval(model), _was_eval(ref_model)
    cls_sum, patch_sum, images, patches = 0.0, 0.0, 0, 0
    counter = _Counter(progress, _count_images(pixel_values_batches), "features (model and reference)", "image")
    try:
        for batch in pixel_values_batches:
            pixels = batch["pixel_values"] if isinstance(batch, Mapping) else batch
            a = named_output(_forward(model, {"pixel_values": pixels}), "last_hidden_state").double()
            b = named_output(_forward(ref_model, {"pixel_values": pixels}), "last_hidden_state").double()
            if a.shape != b.shape:
                raise UsageError(f"the model's features {tuple(a.shape)} and the reference's {tuple(b.shape)} "
                                 "differ in shape: is the reference the right model?")
            cls_sum += float(F.cosine_similarity(a[:, 0], b[:, 0], dim=-1).sum())
            images += a.shape[0]
            if a.shape[1] > 1:
                pc = F.cosine_similarity(a[:, 1:], b[:, 1:], dim=-1)
                patch_sum += float(pc.sum())
                patches += pc.numel()
            counter.update(a.shape[0])
    finally:
        counter.close()
        restore_a()
        restore_b()
    if images == 0:
        raise UsageError("no images to compare")
    return {"cls_cosine": cls_sum / images, "patch_cosine": patch_sum / patches if patches else float("nan"),
            "images": images}


def _count_images(batches) -> int:
    """Images in a list of batches (0, no count shown, for a one-pass iterable that cannot be counted ahead)."""
    if not isinstance(batches, (list, tuple)):
        return 0
    total = 0
    for batch in batches:
        if isinstance(batch, Mapping):
            pixels = batch.get("pixel_values", batch.get("labels"))
        else:
            pixels = batch[1] if isinstance(batch, tuple) else batch
        total += int(pixels.shape[0]) if isinstance(pixels, torch.Tensor) and pixels.dim() else 0
    return total


def _split_labelled(batch) -> tuple[dict, torch.Tensor]:
    if isinstance(batch, Mapping):
        if "labels" not in batch:
            raise UsageError("a labelled batch needs a 'labels' entry")
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        return inputs, torch.as_tensor(batch["labels"])
    inputs, labels = batch
    if isinstance(inputs, torch.Tensor):
        inputs = {"pixel_values": inputs}
    return dict(inputs), torch.as_tensor(labels)


@torch.no_grad()
def top1(model, batches_with_labels: Iterable, progress: bool = False, desc: str = "top-1") -> float:
    """Top-1 accuracy of a classifier: batches are ``{"pixel_values": ..., "labels": ...}`` dicts or
    ``(inputs, labels)`` pairs (inputs a tensor of pixels or a dict of model inputs)."""
    model, _ = _unwrap(model)
    restore = _was_eval(model)
    correct, total = 0, 0
    counter = _Counter(progress, _count_images(batches_with_labels), desc, "image")
    try:
        for batch in batches_with_labels:
            inputs, labels = _split_labelled(batch)
            logits = named_output(_forward(model, inputs), "logits")
            correct += int((logits.argmax(-1).cpu() == labels.view(-1).cpu()).sum())
            total += int(labels.numel())
            counter.update(int(labels.numel()))
    finally:
        counter.close()
        restore()
    if total == 0:
        raise UsageError("no labelled samples to score")
    return correct / total


@torch.no_grad()
def logits_agreement(model, ref_model, batches: Iterable, progress: bool = False) -> dict:
    """Classifier vs reference without labels: top-1 agreement and mean logits cosine."""
    model, _ = _unwrap(model)
    ref_model, _ = _unwrap(ref_model)
    agree, cos, total = 0, 0.0, 0
    with _Counter(progress, _count_images(batches), "logits (model and reference)", "image") as counter:
        for batch in batches:
            inputs = dict(batch) if isinstance(batch, Mapping) else {"pixel_values": batch}
            inputs.pop("labels", None)
            a = named_output(_forward(model, inputs), "logits").double()
            b = named_output(_forward(ref_model, inputs), "logits").double()
            agree += int((a.argmax(-1) == b.argmax(-1)).sum())
            cos += float(F.cosine_similarity(a, b, dim=-1).sum())
            total += a.shape[0]
            counter.update(a.shape[0])
    if total == 0:
        raise UsageError("no images to compare")
    return {"top1_agreement": agree / total, "logits_cosine": cos / total, "images": total}


# ------------------------------------------------------------------------------------------------ images
def image_paths(path: str | os.PathLike) -> list[Path]:
    """Images in a folder (recursively, sorted) or a single image file."""
    p = Path(path).expanduser()
    if not p.exists():
        raise UsageError(f"data path {path} does not exist")
    if p.is_file():
        if p.suffix.lower() in IMAGE_SUFFIXES:
            return [p]
        raise UsageError(f"data file {path} is not an image ({', '.join(IMAGE_SUFFIXES[:4])}); this is a vision model")
    files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES
                   and not any(part.startswith(".") for part in f.relative_to(p).parts))
    if not files:
        raise UsageError(f"data folder {path} holds no images ({', '.join(IMAGE_SUFFIXES[:4])}); "
                         "this is a vision model")
    return files


def _image_size(config) -> tuple[int, int]:
    size = getattr(config, "image_size", 224) if config is not None else 224
    if isinstance(size, (list, tuple)):
        return int(size[0]), int(size[-1])
    if isinstance(size, dict):
        return int(size.get("height", 224)), int(size.get("width", 224))
    return int(size), int(size)


def images_to_pixels(images: list, image_processor=None, config=None) -> torch.Tensor:
    """PIL images → ``[n, C, H, W]`` float pixels: the image processor when there is one, else a resize to
    ``config.image_size`` and ImageNet normalisation (see :func:`permcompile.calib.data.images_to_pixels`)."""
    from .calib.data import images_to_pixels as to_pixels

    channels = int(getattr(config, "num_channels", 3) or 3) if config is not None else 3
    return to_pixels(images, image_processor, _image_size(config), channels)


def pixel_batches(paths: Sequence[Path], image_processor=None, config=None, batch_size: int = 16,
                  labels: Sequence[int] | None = None, progress: bool = False) -> list[dict[str, torch.Tensor]]:
    channels = int(getattr(config, "num_channels", 3) or 3) if config is not None else 3
    mode = "L" if channels == 1 else "RGB"
    batches = []
    with _Counter(progress, len(paths), "reading images", "image") as counter:
        for start in range(0, len(paths), batch_size):
            images = [open_image(p, mode) for p in paths[start:start + batch_size]]
            batch = {"pixel_values": images_to_pixels(images, image_processor, config)}
            if labels is not None:
                batch["labels"] = torch.tensor(list(labels[start:start + batch_size]), dtype=torch.long)
            batches.append(batch)
            counter.update(len(images))
    return batches


def labelled_images(folder: str | os.PathLike, config=None) -> tuple[list[Path], list[int], dict[str, int]]:
    """A folder of class subfolders → (image paths, label ids, class name → id).

    Subfolder names are matched to ``config.label2id`` (case-insensitive) when they all appear there, else
    read as integers when they all are, else numbered in sorted order.
    """
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise UsageError(f"labels folder {folder} does not exist or is not a folder")
    classes = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise UsageError(f"labels folder {folder} has no class subfolders (expected FOLDER/<class>/<image>)")
    names = [d.name for d in classes]
    label2id = {str(k).lower(): int(v) for k, v in (getattr(config, "label2id", None) or {}).items()}
    if label2id and all(n.lower() in label2id for n in names):
        mapping = {n: label2id[n.lower()] for n in names}
    elif all(n.isdigit() for n in names):
        mapping = {n: int(n) for n in names}
    else:
        mapping = {n: i for i, n in enumerate(names)}
    num_labels = getattr(config, "num_labels", None)
    if num_labels and max(mapping.values()) >= num_labels:
        raise UsageError(f"labels folder {folder} has class ids up to {max(mapping.values())} but the model has "
                         f"{num_labels} labels")
    paths, labels = [], []
    for d in classes:
        for p in sorted(f for f in d.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES):
            paths.append(p)
            labels.append(mapping[d.name])
    if not paths:
        raise UsageError(f"labels folder {folder} holds no images in its class subfolders")
    return paths, labels, mapping


# ================================================================================================ ONNX
_ORT_NP = {
    "tensor(float)": "float32", "tensor(float16)": "float16", "tensor(double)": "float64",
    "tensor(int64)": "int64", "tensor(int32)": "int32", "tensor(bool)": "bool", "tensor(int8)": "int8",
    "tensor(uint8)": "uint8", "tensor(bfloat16)": None,
}


class OnnxOutput(dict):
    """The ONNX model's output, readable as ``out.logits`` / ``out.last_hidden_state`` / ``out[0]``."""

    def __getattr__(self, name):
        if name in self:
            return self[name]
        if name in ("logits", "last_hidden_state", "pooler_output", "hidden_states", "attentions"):
            return None
        raise AttributeError(name)

    def __getitem__(self, key):
        if isinstance(key, int):
            return list(self.values())[key]
        return super().__getitem__(key)


class OnnxModel:
    """An ONNX file behind ``onnxruntime.InferenceSession`` (CPU), callable like the HF model.

    ``model(input_ids=..., attention_mask=..., pixel_values=...)`` feeds only the inputs the graph declares
    (cast to their declared types; fp16 graphs get fp16 floats), fills a missing ``attention_mask`` with
    ones and ``token_type_ids`` with zeros, and returns an :class:`OnnxOutput` whose main tensor (fp32
    torch) is ``.logits`` or ``.last_hidden_state``: the graph output's own name when it is one of those,
    else by ``family`` (causal-lm → logits, otherwise last_hidden_state). ``config`` (the HF config of the
    model, optional) gives the metrics the position limit and vocabulary size.
    """

    def __init__(self, path: str | os.PathLike, family: str | None = None, config=None,
                 providers: Sequence[str] | None = None, threads: int | None = None):
        path = Path(path)
        if not path.is_file():
            raise UsageError(f"ONNX file {path} does not exist")
        try:
            import onnxruntime as ort
        except ImportError:
            raise MissingDependencyError("ONNX evaluation needs onnxruntime: pip install onnxruntime") from None
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        if threads:
            opts.intra_op_num_threads = int(threads)
        try:
            self.session = ort.InferenceSession(str(path), sess_options=opts,
                                                providers=list(providers or ["CPUExecutionProvider"]))
        except Exception as exc:  # noqa: BLE001
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
            raise UsageError(f"ONNX Runtime cannot load {path}: {first}") from None
        self.path = path
        self.config = config
        self.family = family
        self.inputs = {i.name: i.type for i in self.session.get_inputs()}
        outputs = self.session.get_outputs()
        self.output_names = [o.name for o in outputs]
        first = self.output_names[0]
        if first in ("logits", "last_hidden_state"):
            self.main_output = first
        else:
            self.main_output = "logits" if family == "causal-lm" else "last_hidden_state"
        self.training = False

    # torch.nn.Module look-alikes, so that metric code can treat both the same
    def eval(self):
        return self

    def train(self, mode: bool = True):
        return self

    def __repr__(self) -> str:
        return f"OnnxModel({str(self.path)!r}, inputs={list(self.inputs)}, output={self.main_output})"

    def _feeds(self, kwargs: Mapping[str, Any]) -> dict:
        import numpy as np

        given = {k: v for k, v in kwargs.items() if v is not None and k in self.inputs}
        feeds = {}
        for name, typ in self.inputs.items():
            value = given.get(name)
            if value is None:
                if name == "attention_mask" and kwargs.get("input_ids") is not None:
                    value = torch.ones_like(torch.as_tensor(kwargs["input_ids"]))
                elif name in ("token_type_ids", "position_ids") and kwargs.get("input_ids") is not None:
                    ids = torch.as_tensor(kwargs["input_ids"])
                    value = (torch.zeros_like(ids) if name == "token_type_ids"
                             else torch.arange(ids.shape[-1]).expand_as(ids).contiguous())
                else:
                    have = ", ".join(k for k, v in kwargs.items() if v is not None) or "nothing"
                    raise UsageError(f"the ONNX model {self.path.name} needs input {name!r}, got {have}")
            arr = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
            want = _ORT_NP.get(typ)
            if want is not None and arr.dtype != np.dtype(want):
                arr = arr.astype(want)
            feeds[name] = np.ascontiguousarray(arr)
        return feeds

    def __call__(self, input_ids=None, attention_mask=None, pixel_values=None, **kwargs) -> OnnxOutput:
        named = {"input_ids": input_ids, "attention_mask": attention_mask, "pixel_values": pixel_values}
        named.update({k: v for k, v in kwargs.items() if isinstance(v, torch.Tensor)})
        results = self.session.run(None, self._feeds(named))
        out = OnnxOutput()
        main = torch.from_numpy(results[0]).float()
        out[self.main_output] = main
        for name, value in zip(self.output_names[1:], results[1:]):
            out[name] = torch.from_numpy(value).float() if value.dtype.kind == "f" else torch.from_numpy(value)
        return out

    forward = __call__


# ================================================================================================ evaluate()
def _read_report(folder: Path) -> dict:
    """The output folder's report.json; the folder is someone else's files: a symlink out of it or a named pipe in
    it refuses it before anything is opened (``permcompile/safepath.py``)."""
    from .safepath import UnsafePathError, read_json, unsafe_entries

    unsafe = unsafe_entries(folder)
    if unsafe:
        raise UnsafePathError(f"{folder} is not safe to read: {'; '.join(unsafe[:3])}")
    path = folder / "report.json"
    data = read_json(path)
    if not isinstance(data, dict):
        raise UsageError(f"{path} is not a permcompile report (not a JSON object)")
    return data


def _output_folder(target: str) -> Path | None:
    p = Path(target).expanduser()
    if p.suffix == ".plan" and not (p / "report.json").is_file():
        p = p.with_suffix("")
    return p if p.is_dir() and (p / "report.json").is_file() else None


def _reference_from_report(report: dict, out: Path) -> str:
    from .models import SHORT_NAMES

    name = str(report.get("model") or "")
    if name in SHORT_NAMES:
        return name
    candidates = [report.get("source"), name]
    for cand in candidates:
        if not cand or not isinstance(cand, str):
            continue
        for p in (Path(cand).expanduser(), out.parent / cand):
            if p.is_dir() and (p / "config.json").is_file():
                return str(p)
    raise UsageError(f"cannot find the dense model {name or '?'} that {out} was made from; "
                     "pass the reference model explicitly (--reference)")


def _light_assets(folder: Path, family: str):
    """Tokenizer / image processor / config of an HF folder without loading its weights."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(str(folder), trust_remote_code=False)
    except Exception:  # noqa: BLE001 - the config only refines limits
        config = None
    tokenizer = processor = None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if family != "vision" and any((folder / f).is_file() for f in _TOKENIZER_FILES):
            try:
                from transformers import AutoTokenizer

                tokenizer = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False)
            except Exception:  # noqa: BLE001
                tokenizer = None
        if family == "vision" and any((folder / f).is_file() for f in _IMAGE_PROCESSOR_FILES):
            try:
                from transformers import AutoImageProcessor

                processor = AutoImageProcessor.from_pretrained(str(folder), trust_remote_code=False)
            except Exception:  # noqa: BLE001
                processor = None
    return config, tokenizer, processor


def evaluate(target: str, data: str, *, reference: str | None = None, family: str | None = None,
             context: int = 512, max_tokens: int | None = None, backend: str = "torch",
             labels: str | None = None, stride: int | None = None, batch_size: int | None = None,
             max_sentences: int | None = DEFAULT_MAX_SENTENCES, progress: bool = False) -> dict:
    """Evaluate ``target`` on ``data``; returns a flat dict of metrics (plus ``notes``: warnings met).

    ``target``: an ``optimize`` output folder (``hf/``, ``model.onnx``, ``report.json``), an HF folder or a
    short name. ``backend="onnx"`` runs the output folder's ``model.onnx`` in ONNX Runtime.

    * causal LM: perplexity on the text in ``data`` (a .txt file or folder) with windows of ``context``
      tokens (first ``max_tokens`` tokens only, when given); with ``reference``, the reference's too;
    * encoder: embedding similarity to ``reference`` (default: the dense model the output folder was made
      from) on the sentences of ``data`` (up to ``max_sentences``, a seeded random subset);
    * vision: CLS / patch feature similarity to the reference on the images in ``data``; classifiers get
      top-1 accuracy when ``labels`` (or ``data``) is a folder of class subfolders, else top-1 agreement
      with the reference.

    ``progress``: a line on stderr for every phase (loading, reading, tokenizing) and counts of the windows,
    sentences or images evaluated (a bar on a terminal, a line every few seconds elsewhere).
    """
    from .models import FAMILIES, load_model

    if backend not in ("torch", "onnx"):
        raise UsageError(f"unknown backend {backend!r}; choose torch or onnx")
    if family is not None and family not in FAMILIES:
        raise UsageError(f"unknown family {family!r}; choose one of {', '.join(FAMILIES)}")
    if context is not None and int(context) < 2:
        raise UsageError(f"context must be at least 2 tokens, got {context}")
    if max_tokens is not None and int(max_tokens) < 2:
        raise UsageError(f"max tokens must be at least 2, got {max_tokens}")
    data_path = Path(data).expanduser()
    if not data_path.exists():
        raise UsageError(f"data path {data} does not exist")
    if data_path.is_file() and data_path.stat().st_size == 0:
        raise UsageError(f"data file {data} is empty")
    if labels is not None and not Path(labels).expanduser().is_dir():
        raise UsageError(f"labels folder {labels} does not exist or is not a folder")

    start = time.perf_counter()
    notes: list[str] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = _evaluate(target, data_path, reference=reference, family=family, context=int(context),
                           max_tokens=max_tokens, backend=backend, labels=labels, stride=stride,
                           batch_size=batch_size, max_sentences=max_sentences, progress=progress,
                           load_model=load_model)
    for w in caught:
        if issubclass(w.category, UserWarning) and "permcompile" in str(w.filename):
            msg = str(w.message).strip().splitlines()[0] if str(w.message).strip() else ""
            if msg and msg not in notes:
                notes.append(msg)
    result["seconds"] = round(time.perf_counter() - start, 2)
    result["notes"] = notes
    return result


def _evaluate(target, data_path: Path, *, reference, family, context, max_tokens, backend, labels, stride,
              batch_size, max_sentences, progress, load_model) -> dict:
    out_dir = _output_folder(str(target))
    report: dict = {}
    if out_dir is not None:
        report = _read_report(out_dir)
        hf_dir = out_dir / "hf"
        fam = family or report.get("family")
        auto_class = report.get("auto_class")
        if backend == "onnx":
            onnx_path = out_dir / "model.onnx"
            if not onnx_path.is_file():
                raise UsageError(f"{out_dir} has no model.onnx")
            if fam is None:
                raise UsageError(f"{out_dir}/report.json does not say the model family; pass --family")
            config, tokenizer, processor = (_light_assets(hf_dir, fam) if hf_dir.is_dir() else (None, None, None))
            _say(progress, f"loading {onnx_path} in ONNX Runtime")
            model = OnnxModel(onnx_path, family=fam, config=config)
        else:
            if not hf_dir.is_dir():
                raise UsageError(f"{out_dir} has no hf/ folder to evaluate with torch (try --backend onnx)")
            _say(progress, f"loading {hf_dir}")
            loaded = load_model(hf_dir)
            model, tokenizer, processor, config = loaded.model, loaded.tokenizer, loaded.image_processor, loaded.config
            fam = family or report.get("family") or loaded.family
            auto_class = auto_class or loaded.auto_class
        label = str(out_dir)
    else:
        if backend == "onnx":
            raise UsageError(f"--backend onnx needs a permcompile output folder (with report.json and model.onnx); "
                             f"{target} is not one")
        _say(progress, f"loading {target}")
        loaded = load_model(target)
        model, tokenizer, processor, config = loaded.model, loaded.tokenizer, loaded.image_processor, loaded.config
        fam = family or loaded.family
        auto_class = loaded.auto_class
        label = str(target)

    result: dict[str, Any] = {"target": label, "backend": backend, "family": fam}
    if report.get("sparsity"):
        result["sparsity"] = report.get("sparsity")
        result["permutation"] = report.get("permutation")

    def ref_spec() -> str:
        ref = reference
        if ref is None:
            if out_dir is None:
                raise UsageError(f"{fam} models are compared with a reference (dense) model: pass --reference "
                                 f"(e.g. the model {target} was made from)")
            ref = _reference_from_report(report, out_dir)
        result["reference"] = str(ref)
        return str(ref)

    def ref_loaded(spec: str | None = None):
        spec = spec or ref_spec()
        _say(progress, f"loading the reference {spec}")
        return load_model(spec)

    if fam == "causal-lm":
        _say(progress, f"reading {data_path}")
        text = read_text(data_path)
        ref = ref_loaded() if reference is not None else None
        ppl = perplexity(model, tokenizer or (ref.tokenizer if ref else None), text, context=context, stride=stride,
                         max_tokens=max_tokens, batch_size=batch_size or 4, progress=progress,
                         reference=ref.model if ref else None)
        result.update({"metric": "perplexity", **ppl})
        return result

    if fam == "encoder":
        spec = ref_spec()  # a missing reference is the first thing to report
        _say(progress, f"reading {data_path}")
        text = read_text(data_path)
        sentences = split_sentences(text)
        if len(sentences) < 3:
            sentences = split_sentences(text, min_words=1)
        found = len(sentences)
        if max_sentences is not None and len(sentences) > max_sentences:
            keep = sorted(random.Random(0).sample(range(len(sentences)), max_sentences))
            sentences = [sentences[i] for i in keep]
        if len(sentences) < 3:
            raise UsageError(f"data {data_path} holds {len(sentences)} sentence(s); embedding similarity needs "
                             "at least 3")
        _say(progress, f"{len(sentences):,} sentences" + (f" (a seeded sample of the {found:,} found)"
                                                           if found > len(sentences) else ""))
        ref = ref_loaded(spec)
        sim = embedding_similarity(model, ref.model, tokenizer or ref.tokenizer, sentences,
                                   batch_size=batch_size or 32,
                                   max_length=min(128, context) if context else 128, progress=progress)
        result.update({"metric": "embedding_similarity", **sim})
        return result

    if fam == "vision":
        classifier = auto_class == "AutoModelForImageClassification"
        label_dir = labels
        if label_dir is None and classifier and data_path.is_dir() and any(
                d.is_dir() and not d.name.startswith(".") for d in data_path.iterdir()):
            label_dir = str(data_path)
        bs = batch_size or 16
        if classifier and label_dir is not None:
            paths, ids, mapping = labelled_images(label_dir, config)
            batches = pixel_batches(paths, processor, config, bs, labels=ids, progress=progress)
            result.update({"metric": "top1", "top1": top1(model, batches, progress, "top-1 (model)"),
                           "images": len(paths), "classes": len(mapping)})
            if reference is not None:
                ref = ref_loaded()
                ref_batches = (batches if processor is not None or ref.image_processor is None else
                               pixel_batches(paths, ref.image_processor, config, bs, labels=ids, progress=progress))
                result["reference_top1"] = top1(ref.model, ref_batches, progress, "top-1 (reference)")
            return result
        spec = ref_spec()
        paths = image_paths(data_path)
        ref = ref_loaded(spec)
        batches = pixel_batches(paths, processor or ref.image_processor, config or ref.config, bs, progress=progress)
        if classifier:
            result.update({"metric": "logits_agreement", **logits_agreement(model, ref.model, batches, progress)})
        else:
            result.update({"metric": "feature_similarity",
                           **feature_similarity(model, ref.model, batches, progress)})
        return result

    raise UsageError(f"cannot evaluate a model of family {fam!r}")


def format_result(result: Mapping[str, Any]) -> str:
    """A small two-column table of ``evaluate``'s result."""
    order = ["target", "backend", "family", "sparsity", "permutation", "reference", "metric",
             "ppl", "reference_ppl", "kl", "nll", "tokens", "context", "stride", "windows",
             "mean_cosine", "min_cosine", "spearman", "sentences", "pairs",
             "cls_cosine", "patch_cosine", "top1", "reference_top1", "top1_agreement", "logits_cosine",
             "images", "classes", "seconds"]
    keys = [k for k in order if k in result and result[k] is not None]
    keys += [k for k in result if k not in keys and k != "notes" and not isinstance(result[k], (dict, list))]
    width = max(len(k) for k in keys) if keys else 0
    lines = []
    for k in keys:
        v = result[k]
        if isinstance(v, float):
            text = f"{v:.4f}" if k not in ("seconds",) else f"{v:.1f}"
            if k in ("ppl", "reference_ppl") and math.isfinite(v):
                text = f"{v:.3f}"
        else:
            text = str(v)
        lines.append(f"{k:<{width}}  {text}")
    return "\n".join(lines)
