"""Optimal-brain-surgeon reconstruction under an N:M mask (SparseGPT, Frantar & Alistarh 2023), pure math.

A linear layer ``y = W x`` with calibration inputs ``X`` ([tokens, K]) is pruned to N:M along K and its
kept weights are updated so that the layer output moves as little as possible:

    minimise  ||X Wᵀ - X W'ᵀ||²  =  tr((W - W') H (W - W')ᵀ),   H = XᵀX,   W' N:M along K.

:func:`sparsegpt_nm_` processes the columns left to right: for each stripe of M columns it picks the N to
keep (by OBS saliency ``w² / [H⁻¹]ⱼⱼ²`` of the *already updated* weights, or by caller-given scores), zeroes
the others and spreads each zeroed weight's error over the columns to its right with the Cholesky factor of
H⁻¹. Columns to the left are never revisited, so for a fixed mask the result is close to, not exactly, the
least-squares optimum; :func:`refit_masked_` then solves the fixed-mask least-squares problem exactly (by
batched conjugate gradients, warm-started) when asked.

Everything here works on one weight matrix in consumer orientation ``[out, K]``, in float32/float64, on any
device; nothing imports the model or the pipeline.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor


@dataclass
class Moment:
    """``XᵀX / tokens`` of a layer's inputs, as the K×K matrix (``gram``) or, with fewer tokens than channels, as
    rows ``R`` with ``RᵀR = XᵀX / tokens`` (``rows``, [tokens, K]: smaller than the matrix). What a held-out check
    scores updates on: an 8192-channel ``down_proj`` held out on 1365 tokens takes 45 MB as rows, 268 MB as a matrix."""

    gram: Tensor | None = None
    rows: Tensor | None = None

    def to(self, device) -> "Moment":
        return Moment(*(None if t is None else t.to(device) for t in (self.gram, self.rows)))

    def add_to_(self, h: Tensor, alpha: float) -> Tensor:
        """``h += alpha · XᵀX / tokens`` in place (no K×K temporary for rows)."""
        if self.gram is not None:
            return h.add_(self.gram, alpha=alpha)
        return h.addmm_(self.rows.T, self.rows, alpha=alpha)

    def error(self, d: Tensor) -> float:
        """``tr(D (XᵀX / tokens) Dᵀ)`` for a weight difference ``D`` [out, K]."""
        if self.gram is not None:
            d = d.to(self.gram.dtype)
            return float((d @ self.gram).mul_(d).sum())
        return float((d.to(self.rows.dtype) @ self.rows.T).square_().sum())


@dataclass
class HessianAccumulator:
    """Running ``XᵀX`` of one layer's input (float32 on the accumulator's device, as SparseGPT: a float64
    copy of an 8k×8k Hessian and its per-batch product would double the block's working set), and the token count.

    ``diagonal=True`` keeps only ``diag(XᵀX)`` (``Σ x²`` per channel, a ``[K]`` vector): the Wanda/RIA statistics.
    ``keep_rows=True`` keeps the inputs themselves while there are fewer tokens than channels (a held-out part:
    :class:`Moment`); the matrix is formed once more arrive or one is asked for."""

    k: int
    device: torch.device | str = "cpu"
    diagonal: bool = False
    # the ``XᵀX`` of the held-out part of the same inputs (also counted in this one), when a pass asked for one
    heldout: "HessianAccumulator | None" = None
    keep_rows: bool = False

    def __post_init__(self) -> None:
        shape = (self.k,) if self.diagonal else (self.k, self.k)
        self.keep_rows = self.keep_rows and not self.diagonal
        self._rows: list[Tensor] | None = [] if self.keep_rows else None
        # the per-channel vector is tiny: float64 there, as the whole-model statistics (calib/stats.py)
        self.xtx = None if self.keep_rows else torch.zeros(
            shape, dtype=torch.float64 if self.diagonal else torch.float32, device=self.device)
        self.count = 0

    def add(self, rows: Tensor) -> tuple[Tensor, int]:
        """Add a ``[tokens, K]`` block of inputs (any float dtype; the product runs in fp32).

        Returns the block's ``(XᵀX, tokens)`` so a layer reading the same inputs can reuse it."""
        product, count = self.product(rows)
        self.add_product(product, count, rows)
        return product, count

    def product(self, rows: Tensor) -> tuple[Tensor, int]:
        """The ``(XᵀX, tokens)`` of a ``[tokens, K]`` block of inputs, as :meth:`add` would add it (nothing added)."""
        rows = rows.reshape(-1, self.k).to(self.xtx.device if self.xtx is not None else self.device, torch.float32)
        return (rows.square().sum(0).double() if self.diagonal else rows.T @ rows), int(rows.shape[0])

    def add_product(self, product: Tensor, count: int, rows: Tensor | None = None) -> None:
        """Add an already computed ``XᵀX`` (or its diagonal) of ``count`` tokens; ``rows``: those inputs, which a
        ``keep_rows`` accumulator keeps instead while it holds fewer tokens than channels (shared, not copied,
        when already float32 on its device)."""
        if self._rows is not None and rows is not None and self.count + count < self.k:
            self._rows.append(rows.reshape(-1, self.k).to(self.device, torch.float32))
        else:
            self.to_matrix_()
            self.xtx += product
        self.count += count

    def to_matrix_(self) -> None:
        """From kept rows to the matrix (for good: once it exists, products are added to it)."""
        if self._rows is None:
            return
        self.xtx = torch.zeros(self.k, self.k, dtype=torch.float32, device=self.device)
        for r in self._rows:
            self.xtx.addmm_(r.T, r)
        self._rows = None

    def hessian(self, release: bool = False) -> Tensor:
        """``XᵀX / tokens`` as float32 (the scale cancels in the update; it keeps the numbers near 1).

        ``release``: scale the accumulator's own buffer and hand it over (no K×K copy; the accumulator is
        spent: no further ``add`` or ``hessian``)."""
        self.to_matrix_()
        if release and not self.diagonal:
            h, self.xtx = self.xtx.div_(max(self.count, 1)), None
            return h
        return (self.xtx / max(self.count, 1)).float()

    def moment(self, release: bool = False) -> Moment:
        """``XᵀX / tokens`` as a :class:`Moment`: the kept rows (scaled) where there are any, else the matrix."""
        if self._rows is not None:
            rows = torch.cat(self._rows) if self._rows else torch.zeros(0, self.k, device=self.device)
            if release:
                self._rows = None
            return Moment(rows=rows.mul_(1.0 / max(self.count, 1) ** 0.5) if release else
                          rows / max(self.count, 1) ** 0.5)
        return Moment(gram=self.hessian(release))


def all_finite(t: Tensor, rows: int = 256) -> bool:
    """No NaN or Inf in ``t``, by float64 sums of a few rows at a time (NaN and Inf propagate through a sum; a
    float64 sum of float32 values cannot overflow): ``isfinite(t).all()`` makes K×K temporaries, 450 MB for an
    8k-wide Hessian."""
    flat = t.reshape(-1, t.shape[-1]) if t.dim() > 1 else t.reshape(1, -1)
    return all(bool(torch.isfinite(flat[i:i + rows].sum(dtype=torch.float64))) for i in range(0, flat.shape[0], rows))


def dampen(h: Tensor, damp: float) -> Tensor:
    """``H + λ I`` with ``λ = damp · mean(diag H)``; channels that never fired (diag 0) get a unit diagonal.

    Returns a new float32 matrix and leaves ``h`` untouched.
    """
    h = h.float().clone()
    diag = torch.diagonal(h)
    dead = diag <= 0
    if bool(dead.any()):
        h[dead, :] = 0
        h[:, dead] = 0
        diag[dead] = 1.0
    mean = float(diag.mean())
    diag += damp * (mean if mean > 0 else 1.0)
    return h


def inverse_cholesky_upper(h: Tensor) -> Tensor:
    """Upper Cholesky factor ``U`` of ``H⁻¹`` (``H⁻¹ = UᵀU``): row j of U holds the OBS update of column j
    given that columns < j are fixed. Float32 (as SparseGPT; a dampened H is well conditioned), float64 when
    that fails. Raises ``torch.linalg.LinAlgError`` if H is not positive definite even then. (``U`` may be a
    transposed view: see :func:`_upper_inverse_factor_`.)"""
    for dtype in (torch.float32, torch.float64):
        work = h.to(dtype, copy=True)
        if _upper_inverse_factor_(work):
            return work.mT.to(h.dtype)
        del work
    lower = torch.linalg.cholesky(h.double())  # raises with torch's own message
    return torch.linalg.cholesky(torch.cholesky_inverse(lower), upper=True).to(h.dtype)


def _upper_inverse_factor_(a: Tensor) -> bool:
    """Overwrite the symmetric positive definite ``a`` so that ``a.mT`` is the upper Cholesky factor of its
    inverse, in its own storage: Cholesky, inverse from the factor, Cholesky again, each on ``a.mT`` (the same
    symmetric matrix, column-major as LAPACK wants it, so torch makes no working copy: an 8k-wide layer's is
    256 MB). False (``a`` then holds garbage) when a factorisation fails or the result is not finite."""
    info = torch.empty((), dtype=torch.int32)
    col = a.mT
    torch.linalg.cholesky_ex(col, out=(col, info))
    if int(info):
        return False
    torch.cholesky_inverse(col, out=col)
    torch.linalg.cholesky_ex(col, upper=True, out=(col, info))
    col.triu_()  # cholesky_ex leaves the other triangle as it was: the factor is triangular by definition
    return int(info) == 0 and all_finite(a)


def shrink_(h: Tensor, rho: float) -> Tensor:
    """``(1 − ρ)·H + ρ·diag(H)``, in place: the channel correlations pulled towards zero, each channel's energy kept.

    Why: the OBS update compensates a pruned weight through the channels its input correlates with *on the
    calibration data*; text of another kind correlates differently, and there that compensation is error.
    ``ρ = 0`` is the plain update; as ``ρ → 1`` nothing is left to compensate with (a diagonal Hessian: no update,
    the mask by ``w²·Hⱼⱼ``, Wanda's ranking). Returns ``h``."""
    return _off_diagonal_(h, lambda x: x.mul_(1.0 - rho)) if rho > 0 else h


def unshrink_(h: Tensor, rho: float) -> Tensor:
    """Undo :func:`shrink_` ``(h, rho)`` in place (``rho < 1``: the correlations were scaled, not erased)."""
    return _off_diagonal_(h, lambda x: x.div_(1.0 - rho)) if rho > 0 else h


def _off_diagonal_(h: Tensor, scale_) -> Tensor:
    """``scale_`` (an in-place op) applied to ``h`` with its diagonal kept."""
    diag = torch.diagonal(h).clone()
    scale_(h)
    torch.diagonal(h).copy_(diag)
    return h


def dampened_inverse_cholesky(h: Tensor, damp: float) -> Tensor:
    """:func:`inverse_cholesky_upper` of :func:`dampen` ``(h, damp)``, holding one K×K matrix besides ``h``
    (float32 in place; float64 only when that fails)."""
    work = dampen(h, damp)
    if _upper_inverse_factor_(work):
        return work.mT
    del work
    return inverse_cholesky_upper(dampen(h, damp).double()).float()


def damping_diagonal(h: Tensor, damp: float) -> Tensor | None:
    """The vector ``d`` with ``dampen(h, damp) == h + diag(d)``, or None when that does not hold (a channel
    with a non-positive diagonal but non-zero off-diagonal entries): lets callers use the dampened matrix
    without a K×K copy."""
    diag = torch.diagonal(h).float()
    dead = diag <= 0
    if bool(dead.any()) and bool(h[dead].any()):
        return None
    mean = float(torch.where(dead, torch.ones_like(diag), diag).mean())  # as dampen: dead channels count 1
    d = torch.full_like(diag, damp * (mean if mean > 0 else 1.0))
    d[dead] += 1.0 - diag[dead]
    return d


def inverse_diagonal(h: Tensor, damp: float = 0.01) -> Tensor:
    """``diag((H + λI)⁻¹)`` (float32): how expensive each input channel's weights are to prune once the rest
    of the row may compensate; ``w² / [H⁻¹]ⱼⱼ`` is the OBS cost of zeroing weight j alone."""
    factor = torch.linalg.cholesky(dampen(h, damp).double())
    return torch.diagonal(torch.cholesky_inverse(factor)).float()


def output_error(w_ref: Tensor, w: Tensor, h: "Tensor | Moment") -> float:
    """``tr((W_ref - W) H (W_ref - W)ᵀ)``: the squared layer-output error on the inputs H was built from."""
    if isinstance(h, Moment):
        return h.error(w_ref - w)
    d = (w_ref - w).to(h.dtype)
    return float((d @ h).mul_(d).sum())


def obs_saliency(w: Tensor, hinv_diag: Tensor) -> Tensor:
    """OBS cost of zeroing each weight alone: ``w² / [H⁻¹]ⱼⱼ`` (here with U's diagonal, ``[H⁻¹]ⱼⱼ = U_jj²``
    for the conditional inverse SparseGPT uses)."""
    return w.square() / hinv_diag.square().unsqueeze(0)


def _keep_mask(scores: Tensor, n: int, m: int) -> Tensor:
    """Keep the ``n`` largest of every stripe of ``m`` along the last axis (lower index wins a tie)."""
    from .nm import nm_mask

    return nm_mask(scores, n, m)


@torch.no_grad()
def sparsegpt_nm_(w: Tensor, h: Tensor, n: int, m: int, *, damp: float = 0.01, block: int = 32,
                  scores: Tensor | None = None, hinv_chol: Tensor | None = None,
                  quantize: Callable[[Tensor], Tensor] | None = None) -> Tensor:
    """Prune ``w`` ([out, K], float32, modified in place) to N:M along K with OBS updates; returns the keep mask.

    ``h`` is the (undampened) ``XᵀX``-like Hessian [K, K]. ``scores`` ([out, K]) fixes the mask by a
    criterion instead of the OBS saliency (the update still runs). ``block`` columns are updated together
    (a multiple of ``m``); the result does not depend on it beyond rounding. ``quantize`` maps a column ([out],
    its pruned entries already 0) onto the weight grid before its error is spread to the columns on its right
    (GPTQ inside the N:M mask: one update absorbs pruning and rounding error); it must keep zeros at zero.
    """
    out, k = w.shape
    if k % m:
        raise ValueError(f"K={k} is not a multiple of M={m}")
    if h.shape != (k, k):
        raise ValueError(f"Hessian shape {tuple(h.shape)} does not match K={k}")
    block = max(m, block - block % m)
    dead = torch.diagonal(h).to(w.device) <= 0
    if bool(dead.any()):
        w[:, dead] = 0  # a channel that never carries a signal: its weights change nothing on the data
    # (a K×K copy less when the caller shares the factor: an 8k-wide layer's Hessian is 256 MB)
    u = dampened_inverse_cholesky(h.to(w.device), damp) if hinv_chol is None else hinv_chol.to(w.device, w.dtype)
    keep = torch.zeros(out, k, dtype=torch.bool, device=w.device)
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        u1 = u[i1:i2, i1:i2]
        d1 = torch.diagonal(u1)
        for j in range(i2 - i1):
            if j % m == 0:  # choose this stripe's mask on the weights as updated so far
                s = (obs_saliency(w1[:, j:j + m], d1[j:j + m]) if scores is None
                     else scores[:, i1 + j:i1 + j + m].to(w1))
                keep[:, i1 + j:i1 + j + m] = _keep_mask(s, n, m)
            col = w1[:, j]
            q = torch.where(keep[:, i1 + j], col, torch.zeros_like(col))
            if quantize is not None:
                q = quantize(q)
            e = (col - q) / d1[j]
            w1[:, j:] -= e.unsqueeze(1) * u1[j, j:].unsqueeze(0)
            w1[:, j] = q
            err1[:, j] = e
        w[:, i1:i2] = w1
        if i2 < k:
            w[:, i2:] -= err1 @ u[i1:i2, i2:]
    w.mul_(keep.to(w.dtype))  # exact zeros (the update leaves pruned entries at 0 already, up to rounding)
    return keep


@torch.no_grad()
def refit_masked_(w: Tensor, w_ref: Tensor, keep: Tensor, h: Tensor, *, iters: int = 20,
                  damp: float = 0.01) -> Tensor:
    """Move the kept weights of ``w`` (in place) towards the fixed-mask least-squares optimum.

    Solves, for every row independently, ``min (w' - w_ref) Hd (w' - w_ref)ᵀ`` over ``w'`` zero outside
    ``keep``, with ``Hd`` the dampened Hessian, by ``iters`` steps of conjugate gradients started at ``w``
    (all rows at once: one ``[out, K] @ [K, K]`` product per step). Never increases the objective.
    """
    h = h.to(w.device, w.dtype)
    d = damping_diagonal(h, damp)
    if d is None:  # rare (see damping_diagonal): the dampened copy
        hd, d = dampen(h, damp), torch.zeros(h.shape[0], dtype=w.dtype, device=w.device)
    else:  # H + diag(d) applied as a product and a scaling: no K×K copy
        hd = h
    km = keep.to(w.dtype)
    # in-place updates throughout: every [out, K] temporary of an 8k-wide layer is 64 MB
    x = w.mul_(km)  # w itself holds the iterate
    diff = w_ref - x
    r = diff @ hd
    r.addcmul_(diff, d.unsqueeze(0)).mul_(km)  # minus half the gradient, restricted to the kept entries
    del diff
    p = r.clone()
    rs = (r * r).sum(1)
    tiny = torch.finfo(w.dtype).tiny
    for _ in range(iters):
        if float(rs.max()) <= tiny:
            break
        ap = p @ hd
        ap.addcmul_(p, d.unsqueeze(0)).mul_(km)
        alpha = (rs / (p * ap).sum(1).clamp_min(tiny)).unsqueeze(1)
        x.addcmul_(alpha, p)
        r.addcmul_(alpha, ap, value=-1.0)
        del ap
        rs_new = (r * r).sum(1)
        p.mul_((rs_new / rs.clamp_min(tiny)).unsqueeze(1)).add_(r)
        rs = rs_new
    w.mul_(km)
    return w


def masked_least_squares(w_ref: Tensor, keep: Tensor, h: Tensor) -> Tensor:
    """Reference solution (slow, exact): row by row, ``w'_S = H_SS⁻¹ (H w_refᵀ)_S`` on the kept set S.

    For tests and small problems only (one K×K solve per row).
    """
    out = torch.zeros_like(w_ref, dtype=torch.float64)
    hh = h.double()
    b = w_ref.double() @ hh
    for i in range(w_ref.shape[0]):
        s = keep[i].nonzero().flatten()
        if s.numel():
            out[i, s] = torch.linalg.solve(hh[s][:, s], b[i, s])
    return out.to(w_ref.dtype)


@torch.no_grad()
def choose_update(w_ref: Tensor, h_fit: Tensor, h_val: "Tensor | Moment", crit: Tensor, n: int, m: int, shrinks, *,
                  damp: float = 0.01, refit_iters: int = 30, rows: int = 64) -> tuple[float | None, dict]:
    """Which update of ``w_ref`` ([out, K]) carries over to inputs it was not fitted on.

    Each candidate is fitted on ``h_fit`` and scored by its output error on ``h_val`` (a held-out part of the
    calibration data), on at most ``rows`` evenly spaced output rows (rows are independent given H, so a sample
    of them ranks the candidates): ``None`` = the ``crit`` N:M mask with no update (the masks-only result), a float
    ρ = the least-squares update of the kept weights under that mask on ``shrink_(h_fit, ρ)`` (``refit_iters``
    conjugate-gradient steps: what the OBS pass and its refit move towards, without the OBS pass's column-by-column
    loop, which would cost each candidate as much as the layer). ``shrinks`` are tried in order and the search
    stops at the first that beats the mask alone (the fast path: the plain update generalises). Returns the choice
    and ``{"mask": error, "shrink=ρ": error, ...}``, each relative to the held-out output energy of ``w_ref``.
    ``h_fit`` is used as scratch and left as it was, up to rounding (``shrinks`` below 1)."""
    from .nm import nm_mask

    idx = torch.linspace(0, w_ref.shape[0] - 1, min(rows, w_ref.shape[0])).round().long().unique()
    ref = w_ref[idx]
    keep = nm_mask(crit[idx], n, m)
    masked = ref * keep
    total = output_error(ref, torch.zeros_like(ref), h_val) or 1.0
    errors = {"mask": output_error(ref, masked, h_val) / total}
    best, best_err = None, errors["mask"]
    for rho in shrinks:
        h = shrink_(h_fit, float(rho))  # in place and undone below: no K×K copy
        w = refit_masked_(masked.clone(), ref, keep, h, iters=max(1, refit_iters), damp=damp)
        unshrink_(h_fit, float(rho))
        err = output_error(ref, w, h_val) / total
        errors[f"shrink={float(rho):g}"] = err
        if err < best_err:
            best, best_err = float(rho), err
            break  # the first (least shrunk) update that beats the mask alone
    return best, errors
