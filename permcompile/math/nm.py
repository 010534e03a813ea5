"""N:M structured sparsity: masks, checks, kept importance and pruning criteria.

Conventions (see ``docs/DESIGN.md``): every matrix is ``[out, K]`` with K the input-channel axis, the
N:M axis. A *stripe* is the group of ``m`` consecutive, aligned positions ``[j*m, (j+1)*m)`` along K;
an N:M mask keeps the ``n`` highest-scoring entries of every stripe in every row.

Everything here is pure tensor math: no graph, no I/O, no global state.
"""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "nm_mask",
    "is_nm",
    "nm_violations",
    "kept_importance",
    "magnitude_scores",
    "wanda_scores",
    "ria_scores",
    "criterion_scores",
    "CRITERIA",
    "unstructured_mask",
]


def _check_nm(n: int, m: int) -> None:
    if m < 1 or n < 0 or n > m:
        raise ValueError(f"invalid N:M sparsity {n}:{m}: need 0 <= n <= m and m >= 1")


def _stripes(x: Tensor, m: int) -> Tensor:
    """View ``[..., K]`` as ``[..., K//m, m]``; raises ValueError when K is not a multiple of m."""
    k = x.shape[-1]
    if k % m:
        raise ValueError(f"the N:M axis has {k} entries, which is not a multiple of m={m}")
    return x.reshape(*x.shape[:-1], k // m, m)


def nm_mask(scores: Tensor, n: int, m: int) -> Tensor:
    """Boolean mask keeping the ``n`` largest scores of every stripe of ``m`` along the last axis.

    ``scores`` is ``[out, K]`` (any leading dims work). Exactly ``n`` entries per stripe are True.
    Ties are broken deterministically: among equal scores the lower index is kept.
    Raises ValueError when K is not a multiple of ``m`` or ``n:m`` is invalid.
    """
    _check_nm(n, m)
    s = _stripes(scores, m)
    # A stable descending sort keeps equal scores in index order, so the lower index wins a tie
    # (torch.topk gives no such guarantee).
    order = torch.sort(s, dim=-1, descending=True, stable=True).indices
    mask = torch.zeros(s.shape, dtype=torch.bool, device=scores.device)
    mask.scatter_(-1, order[..., :n], True)
    return mask.reshape(scores.shape)


def _nonzeros_per_stripe(weight: Tensor, m: int) -> Tensor:
    return (_stripes(weight, m) != 0).sum(dim=-1)


def is_nm(weight: Tensor, n: int, m: int) -> bool:
    """True when every stripe of ``m`` along the last axis holds at most ``n`` nonzeros."""
    _check_nm(n, m)
    return bool((_nonzeros_per_stripe(weight, m) <= n).all())


def nm_violations(weight: Tensor, n: int, m: int) -> int:
    """Number of stripes (over all rows) holding more than ``n`` nonzeros."""
    _check_nm(n, m)
    return int((_nonzeros_per_stripe(weight, m) > n).sum())


def kept_importance(scores: Tensor, n: int, m: int, perm: Tensor | None = None) -> float:
    """Sum over rows and stripes of the top-``n`` scores of ``scores[:, perm]`` in each stripe of ``m``.

    This is the objective every permutation strategy maximises. ``perm`` (``perm[p]`` = column placed
    at position p) defaults to the identity. Accumulated in float64 so that comparisons between
    permutations are not swamped by rounding.
    """
    _check_nm(n, m)
    if perm is not None:
        scores = scores[:, torch.as_tensor(perm, dtype=torch.long, device=scores.device)]
    if n == 0:
        return 0.0
    s = _stripes(scores, m)
    top = s.topk(n, dim=-1).values if n < m else s
    return float(top.sum(dtype=torch.float64))


# ---- pruning criteria -----------------------------------------------------------------------------

def magnitude_scores(w: Tensor) -> Tensor:
    """``|W|``: the classic magnitude criterion."""
    return w.abs()


def _check_act_norm(w: Tensor, act_norm: Tensor | None, name: str) -> Tensor:
    if act_norm is None:
        raise ValueError(f"criterion {name!r} needs per-input-channel activation norms (act_norm)")
    act_norm = torch.as_tensor(act_norm, dtype=w.dtype, device=w.device)
    if act_norm.shape != (w.shape[-1],):
        raise ValueError(f"act_norm has shape {tuple(act_norm.shape)}, expected ({w.shape[-1]},)")
    return act_norm


def wanda_scores(w: Tensor, act_norm: Tensor) -> Tensor:
    """Wanda (Sun et al. 2023): ``|W_ij| * ||X_j||_2`` with ``act_norm[j] = ||X_j||_2``."""
    act_norm = _check_act_norm(w, act_norm, "wanda")
    return w.abs() * act_norm


def ria_scores(w: Tensor, act_norm: Tensor, a: float = 0.5) -> Tensor:
    """RIA (Zhang et al. ICLR 2024): ``(|W|/row_sum + |W|/col_sum) * ||X_j||_2 ** a``.

    ``row_sum[i] = sum_j |W_ij|`` (over the input channels of output row i) and
    ``col_sum[j] = sum_i |W_ij|`` (over the outputs reading input channel j). An all-zero row or column
    contributes 0 instead of NaN.
    """
    act_norm = _check_act_norm(w, act_norm, "ria")
    aw = w.abs()
    row = aw.sum(dim=-1, keepdim=True)
    col = aw.sum(dim=-2, keepdim=True)
    # |W| is 0 wherever its row/column sum is 0, so 0/1 = 0 is the right value there.
    rel = aw / torch.where(row > 0, row, torch.ones_like(row)) + aw / torch.where(col > 0, col, torch.ones_like(col))
    return rel * act_norm.clamp_min(0).pow(a)


CRITERIA = ("magnitude", "wanda", "ria")


def criterion_scores(name: str, w: Tensor, act_norm: Tensor | None = None) -> Tensor:
    """Dispatch to a criterion by name (``magnitude`` ignores ``act_norm``, which may be None)."""
    if name == "magnitude":
        return magnitude_scores(w)
    if name == "wanda":
        return wanda_scores(w, act_norm)
    if name == "ria":
        return ria_scores(w, act_norm)
    raise ValueError(f"unknown pruning criterion {name!r}; expected one of {', '.join(CRITERIA)}")


def unstructured_mask(scores: Tensor, sparsity: float = 0.5, per_row: bool = True) -> Tensor:
    """Mask keeping the highest scores, pruning ``floor(sparsity * count)`` entries.

    ``per_row=True`` prunes the same fraction of every output row (Wanda's comparison group);
    ``per_row=False`` ranks the whole matrix at once. Ties: the lower (flattened) index is kept.
    This is the "unstructured 50%" upper bound an N:M mask is compared against.
    """
    if not 0.0 <= sparsity <= 1.0:
        raise ValueError(f"sparsity must be in [0, 1], got {sparsity}")
    flat = scores if per_row else scores.reshape(1, -1)
    count = flat.shape[-1]
    keep = count - int(sparsity * count)
    order = torch.sort(flat, dim=-1, descending=True, stable=True).indices
    mask = torch.zeros(flat.shape, dtype=torch.bool, device=scores.device)
    mask.scatter_(-1, order[..., :keep], True)
    return mask.reshape(scores.shape)
