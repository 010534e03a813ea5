"""Differentiable permutations for the learned strategy: Sinkhorn, hardening, soft N:M masks, losses.

Convention, shared with ``docs/DESIGN.md``: a permutation ``perm`` has ``perm[p]`` = element placed at
position ``p`` and is applied to the K axis as ``W[:, perm]``. Its matrix ``P`` is ``[B(position),
B(element)]`` with ``P[p, perm[p]] = 1``, so that ``W @ P.T == W[:, perm]``. Soft (doubly-stochastic)
matrices use the same layout: rows are positions, columns are elements.

Pure functions; everything is batched over leading dimensions where it makes sense.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import Tensor

__all__ = [
    "log_sinkhorn",
    "harden",
    "perm_to_matrix",
    "straight_through",
    "soft_nm_mask",
    "mse_loss",
    "cosine_loss",
    "block_diag_apply",
]


def log_sinkhorn(log_alpha: Tensor, iters: int, tau: float = 1.0) -> Tensor:
    """Log of the Sinkhorn normalisation of ``exp(log_alpha / tau)``, over the last two dims.

    Alternately normalises rows then columns in the log domain (``logsumexp``), so no ``exp`` can
    overflow. After the final (column) step every column sums to exactly 1 and rows to 1 up to the
    convergence of ``iters`` iterations. ``tau`` -> 0 drives the result towards a permutation matrix.
    """
    if tau <= 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    x = log_alpha / tau
    for _ in range(iters):
        x = x - torch.logsumexp(x, dim=-1, keepdim=True)
        x = x - torch.logsumexp(x, dim=-2, keepdim=True)
    return x


def harden(soft: Tensor) -> Tensor:
    """Nearest permutations of ``soft`` ``[..., B, B]`` (rows = positions, columns = elements).

    Solves, per batch item, the assignment maximising ``sum_p soft[p, perm[p]]`` (scipy's Hungarian
    solver) and returns ``perm`` ``[..., B]`` (long, on ``soft``'s device) with ``perm[p]`` = element
    placed at position ``p``. Works on probabilities or log-probabilities (the latter gives the most
    likely permutation); ``-inf`` entries are treated as forbidden unless nothing else is possible.
    """
    if soft.dim() < 2 or soft.shape[-1] != soft.shape[-2]:
        raise ValueError(f"harden expects [..., B, B], got shape {tuple(soft.shape)}")
    b = soft.shape[-1]
    mats = soft.detach().reshape(-1, b, b).to("cpu", torch.float64).numpy()
    out = np.empty((mats.shape[0], b), dtype=np.int64)
    for i, mat in enumerate(mats):
        finite = np.isfinite(mat)
        if not finite.all():
            # scipy rejects infinite costs; a very low finite score keeps -inf entries last in line
            low = mat[finite].min() if finite.any() else 0.0
            span = (mat[finite].max() - low) if finite.any() else 1.0
            mat = np.where(finite, mat, low - (b + 1) * (span + 1.0))
        rows, cols = linear_sum_assignment(mat, maximize=True)
        out[i, rows] = cols
    return torch.from_numpy(out).reshape(soft.shape[:-1]).to(soft.device)


def perm_to_matrix(perm: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """One-hot ``[..., B, B]`` matrix with ``P[p, perm[p]] = 1`` (so ``W @ P.T == W[:, perm]``)."""
    perm = torch.as_tensor(perm, dtype=torch.long)
    return F.one_hot(perm, perm.shape[-1]).to(dtype)


def straight_through(hard: Tensor, soft: Tensor) -> Tensor:
    """Value of ``hard``, gradient of ``soft``: ``hard + soft - soft.detach()``."""
    return hard + soft - soft.detach()


def soft_nm_mask(scores: Tensor, n: int, m: int, tau: float) -> Tensor:
    """Differentiable N:M mask: ``sigmoid((scores - threshold) / tau)`` per stripe of ``m`` (last axis).

    The threshold of a stripe is the midpoint between its n-th and (n+1)-th largest scores, so exactly
    the hard ``nm_mask`` entries sit above it. Values lie in ``[0, 1]`` and tend to the hard mask as
    ``tau`` -> 0 (for stripes without a tie at the threshold); ``tau`` is in score units. Gradients flow
    to ``scores`` both directly and through the threshold. ``n == m`` gives all ones, ``n == 0`` zeros.
    """
    if tau <= 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    if m < 1 or not 0 <= n <= m:
        raise ValueError(f"invalid N:M sparsity {n}:{m}")
    k = scores.shape[-1]
    if k % m:
        raise ValueError(f"the N:M axis has {k} entries, which is not a multiple of m={m}")
    if n == m:
        return torch.ones_like(scores)
    if n == 0:
        return torch.zeros_like(scores)
    s = scores.reshape(*scores.shape[:-1], k // m, m)
    top = s.topk(n + 1, dim=-1).values
    threshold = 0.5 * (top[..., n - 1] + top[..., n])
    return torch.sigmoid((s - threshold.unsqueeze(-1)) / tau).reshape(scores.shape)


def mse_loss(y: Tensor, y_ref: Tensor, eps: float = 1e-12) -> Tensor:
    """Squared error normalised by the reference energy: ``||y - y_ref||^2 / ||y_ref||^2``."""
    return (y - y_ref).pow(2).sum() / y_ref.pow(2).sum().clamp_min(eps)


def cosine_loss(y: Tensor, y_ref: Tensor, eps: float = 1e-8) -> Tensor:
    """``1 - mean`` cosine similarity between ``y`` and ``y_ref`` along the last dim."""
    return 1.0 - F.cosine_similarity(y, y_ref, dim=-1, eps=eps).mean()


def block_diag_apply(w: Tensor, p_blocks: Tensor) -> Tensor:
    """Permute the K axis of ``w`` ``[..., K]`` with block-diagonal matrices ``p_blocks`` ``[K//B, B, B]``.

    Block ``b`` covers positions ``[b*B, (b+1)*B)``; with ``p_blocks[b] = perm_to_matrix(perm_b)`` the
    result is ``w[..., perm]`` for ``perm[b*B + p] = b*B + perm_b[p]``. Soft matrices give the matching
    soft mixture ``out[..., b*B + p] = sum_e w[..., b*B + e] * p_blocks[b, p, e]``.
    """
    nb, b, b2 = p_blocks.shape
    k = w.shape[-1]
    if b != b2 or nb * b != k:
        raise ValueError(f"p_blocks {tuple(p_blocks.shape)} does not tile a K axis of {k}")
    wb = w.reshape(*w.shape[:-1], nb, b)
    return torch.einsum("...ne,npe->...np", wb, p_blocks.to(w.dtype)).reshape(w.shape)
