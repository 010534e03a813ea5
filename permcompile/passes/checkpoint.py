"""What a resumable pass keys its checkpoints by: a digest of the weights, the calibration data and the settings.

Content only (no folder name or path): two models in folders of the same name get different checkpoints, and a
copy of the same model in another folder resumes from the same one. Atomic file writes for the checkpoints.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from torch import nn


def content_digest(model: nn.Module, batches: list[dict], settings: dict) -> str:
    """sha256 over ``settings`` (JSON), every batch tensor, and each parameter's name, shape, sums and a sample
    of its values (hashing every byte of a billion-parameter model would cost more than it protects)."""
    h = hashlib.sha256()
    h.update(json.dumps(settings, sort_keys=True, default=str).encode())
    for b in batches:
        for k in sorted(b):
            h.update(k.encode())
            h.update(b[k].detach().cpu().contiguous().numpy().tobytes())
    for name, p in sorted(model.named_parameters()):
        flat = p.detach().reshape(-1)
        total = square = 0.0
        for chunk in flat.split(1 << 20):  # float64 sums a million values at a time: no full-size copy
            c = chunk.double()
            total += float(c.sum())
            square += float(c.square().sum())
        h.update(f"{name}{tuple(p.shape)}{total}{square}".encode())
        h.update(flat[:: max(1, flat.numel() // 4096)].float().numpy().tobytes())  # a sample of the values
    return h.hexdigest()


def write_atomic(path: Path, write) -> None:
    """``write(tmp_path)`` then rename over ``path``: a reader never sees a half-written file."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
