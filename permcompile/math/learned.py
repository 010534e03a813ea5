"""End-to-end learned permutations: the pure tensor pieces (``passes/e2e.py`` runs the training loop).

The method (PermLLM, arXiv 2601.22980): every coupling group gets a block-diagonal permutation whose blocks are
learnable ``B×B`` logit matrices. Annealed log-domain Sinkhorn (``math/sinkhorn.py``) turns each into a soft
(doubly-stochastic) matrix; the Hungarian solution of it is the hard permutation used in the forward pass, with
the soft matrix's gradient (straight-through). The N:M mask is chosen *in permuted order* from criterion scores
that move with their columns, hard top-N forward and a softmax-over-M surrogate backward, and mapped back to the
stored order: the weights never move while learning, only the masks change, so the loss is the model's own loss
for the mask the compiler will apply once the permutation is folded.

Conventions (``math/sinkhorn.py``): ``perm[p]`` = element placed at position ``p``; a (soft) permutation matrix is
``[B(position), B(element)]`` with ``P[p, perm[p]] = 1``. A *layout* is a ``[nb, B]`` long tensor of group positions,
one row per block; a block permutation ``q`` ``[nb, B]`` moves, within block ``b``, the element at position
``idx[b, q[b, p]]`` to position ``idx[b, p]``.

Pure functions: no graph, no I/O, nothing from ``permcompile.passes``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .nm import nm_mask
from .sinkhorn import harden, log_sinkhorn, perm_to_matrix

__all__ = [
    "block_layout",
    "init_logits",
    "soft_permutation",
    "harden_st",
    "compose_blocks",
    "permute_columns",
    "unpermute_columns",
    "soft_topn_mask",
    "st_nm_mask",
    "anneal",
    "kl_to_dense",
    "cosine_distance",
    "next_token_ce",
    "layerwise_distill",
]


def block_layout(labels: Tensor, fixed: Tensor | None, block: int) -> list[Tensor]:
    """Blocks of at most ``block`` movable positions that share a label, as ``[nb, B]`` layouts, one per size.

    Per label, the movable (not ``fixed``) positions in ascending order are cut into consecutive chunks of
    ``block``; a trailing chunk shorter than ``block`` becomes a smaller block (dropped below 2 positions).
    Any permutation within these blocks keeps every element in its label and every fixed element in place, so
    composing it with a valid permutation gives a valid one.
    """
    if block < 2:
        raise ValueError(f"block must be >= 2, got {block}")
    labels = torch.as_tensor(labels, dtype=torch.long)
    free = torch.ones_like(labels, dtype=torch.bool) if fixed is None else ~torch.as_tensor(fixed, dtype=torch.bool)
    by_size: dict[int, list[Tensor]] = {}
    for lab in torch.unique(labels).tolist():
        pos = torch.nonzero((labels == lab) & free).flatten()
        for start in range(0, pos.numel(), block):
            chunk = pos[start:start + block]
            if chunk.numel() >= 2:
                by_size.setdefault(chunk.numel(), []).append(chunk)
    return [torch.stack(by_size[s]) for s in sorted(by_size, reverse=True)]


def init_logits(nb: int, b: int, scale: float = 2.0, noise: float = 0.01,
                generator: torch.Generator | None = None) -> Tensor:
    """Logits whose Sinkhorn hardens to the identity: ``scale`` on the diagonal plus uniform ``noise``
    (the search starts at its warm start and the noise breaks ties between equal off-diagonal entries)."""
    eye = torch.eye(b).expand(nb, b, b)
    return scale * eye + noise * torch.rand(nb, b, b, generator=generator)


def soft_permutation(logits: Tensor, tau: float, iters: int) -> Tensor:
    """Doubly-stochastic ``exp(log_sinkhorn(logits, iters, tau))`` ``[..., B, B]`` (rows = positions)."""
    return log_sinkhorn(logits, iters, tau).exp()


def harden_st(soft: Tensor) -> tuple[Tensor, Tensor]:
    """``(perm, matrix)``: the Hungarian permutation of ``soft`` ``[..., B]`` and its one-hot matrix carrying
    ``soft``'s gradient (straight-through: ``hard + soft - soft.detach()``)."""
    perm = harden(soft)
    hard = perm_to_matrix(perm, soft.dtype).to(soft.device)
    return perm, hard + soft - soft.detach()


def compose_blocks(base: Tensor, layout: Tensor, q: Tensor) -> Tensor:
    """``base`` followed by the block permutation ``q`` on ``layout``: ``new[idx[b, p]] = base[idx[b, q[b, p]]]``.

    Folding ``base`` and then the block permutation (in the folded model's coordinates) is folding the result.
    """
    base = torch.as_tensor(base, dtype=torch.long)
    out = base.clone()
    layout, q = layout.to(base.device), q.to(base.device)
    out[layout.flatten()] = base[torch.gather(layout, 1, q).flatten()]
    return out


def permute_columns(x: Tensor, colidx: Tensor, q: Tensor) -> Tensor:
    """Move ``x``'s columns ``[..., K]`` within blocks.

    ``out[..., colidx[b, p]] = Σ_j q[b, p, j] x[..., colidx[b, j]]``; ``q`` ``[nb, B, B]`` is a (soft or
    straight-through) permutation matrix per block; columns outside ``colidx`` are copied. Differentiable in ``x``
    and ``q``.
    """
    flat = colidx.flatten()
    xb = x[..., colidx]  # [..., nb, B]
    moved = torch.einsum("...nj,npj->...np", xb, q.to(x.dtype))
    return x.index_copy(-1, flat, moved.reshape(*x.shape[:-1], -1))


def unpermute_columns(x: Tensor, colidx: Tensor, q: Tensor) -> Tensor:
    """The inverse move of :func:`permute_columns` (``q`` transposed): back to the order before it."""
    flat = colidx.flatten()
    xb = x[..., colidx]
    moved = torch.einsum("...np,npj->...nj", xb, q.to(x.dtype))
    return x.index_copy(-1, flat, moved.reshape(*x.shape[:-1], -1))


def soft_topn_mask(scores: Tensor, n: int, m: int, tau: float) -> Tensor:
    """Softmax-over-M surrogate of the N:M mask: ``n · softmax(s / (tau · mean(s)))`` per stripe of ``m``.

    Scores are divided by their stripe's mean, so ``tau`` is dimensionless (0.1: nearly hard, 1: smooth). Sums
    to ``n`` per stripe like the hard mask. Used only for its gradient (:func:`st_nm_mask`).
    """
    if tau <= 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    k = scores.shape[-1]
    if k % m:
        raise ValueError(f"the N:M axis has {k} entries, which is not a multiple of m={m}")
    s = scores.reshape(*scores.shape[:-1], k // m, m)
    s = s / s.detach().mean(dim=-1, keepdim=True).clamp_min(1e-30)
    return (n * torch.softmax(s / tau, dim=-1)).reshape(scores.shape)


def st_nm_mask(scores: Tensor, n: int, m: int, tau: float) -> Tensor:
    """The hard N:M mask of ``scores`` (``nm.nm_mask``: exactly what the compiler applies) in value, the
    gradient of :func:`soft_topn_mask` (straight-through)."""
    hard = nm_mask(scores.detach(), n, m).to(scores.dtype)
    soft = soft_topn_mask(scores, n, m, tau)
    return hard + soft - soft.detach()


def anneal(step: int, steps: int, start: float, end: float) -> float:
    """Geometric schedule from ``start`` (step 0) to ``end`` (last step)."""
    frac = step / max(1, steps - 1)
    return float(start * (end / start) ** frac)


def _token_mean(per_token: Tensor, mask: Tensor | None) -> Tensor:
    if mask is None:
        return per_token.mean()
    w = mask.to(per_token.dtype)
    return (per_token * w).sum() / w.sum().clamp_min(1.0)


def kl_to_dense(logits: Tensor, ref_logits: Tensor, mask: Tensor | None = None, temperature: float = 1.0) -> Tensor:
    """``KL(dense ‖ sparse)`` of the next-token (or per-token) distributions, averaged over the tokens of ``mask``
    (``[batch, seq]``, 1 = real token; None = all). Zero iff the two distributions agree."""
    logp = F.log_softmax(logits.float() / temperature, dim=-1)
    ref = F.log_softmax(ref_logits.float() / temperature, dim=-1)
    per_token = (ref.exp() * (ref - logp)).sum(-1)
    return _token_mean(per_token, mask)


def cosine_distance(h: Tensor, ref: Tensor, mask: Tensor | None = None) -> Tensor:
    """``1 − cos(h, ref)`` along the last dim, averaged over the tokens of ``mask`` (PermLLM's loss)."""
    per_token = 1.0 - F.cosine_similarity(h.float(), ref.float(), dim=-1, eps=1e-8)
    return _token_mean(per_token, mask)


def next_token_ce(logits: Tensor, input_ids: Tensor, mask: Tensor | None = None) -> Tensor:
    """Causal-LM cross-entropy of token ``t+1`` given the logits at ``t`` (padding excluded via ``mask``)."""
    lp = F.log_softmax(logits[:, :-1].float(), dim=-1)
    nll = -lp.gather(-1, input_ids[:, 1:, None].long()).squeeze(-1)
    return _token_mean(nll, None if mask is None else mask[:, 1:] * mask[:, :-1])


def layerwise_distill(hidden: list[Tensor] | tuple, ref_hidden: list[Tensor] | tuple,
                      mask: Tensor | None = None) -> Tensor:
    """Mean over layers of the smooth-L1 distance between hidden states, each scaled by the dense state's RMS
    (AMD's auxiliary term; the scale keeps deep layers with large activations from owning it)."""
    if len(hidden) != len(ref_hidden) or not hidden:
        raise ValueError("layerwise_distill needs the same, non-zero number of hidden states")
    total = 0.0
    for h, r in zip(hidden, ref_hidden):
        r = r.float()
        scale = r.pow(2).mean().sqrt().clamp_min(1e-12)
        per_token = F.smooth_l1_loss(h.float() / scale, r / scale, reduction="none").mean(-1)
        total = total + _token_mean(per_token, mask)
    return total / len(hidden)
