"""Permutation strategies: choose the order of a group's input channels before N:M pruning.

Interface (``docs/DESIGN.md``)::

    strategy(scores: Tensor[R, n], n_keep: int, m: int, blocks: LongTensor[n], fixed: BoolTensor[n],
             generator: torch.Generator) -> LongTensor[n]

``scores`` stacks the group's importance rows (every consumer's ``[out, K]`` score matrix, in group
element columns). The returned ``perm`` has ``perm[p]`` = element placed at position ``p`` and always

- is a permutation of ``range(n)``;
- keeps every element inside its block: ``blocks[perm] == blocks`` (attention heads);
- leaves ``fixed`` elements in place: ``perm[e] == e``.

The objective is the kept importance (``nm.kept_importance``): the sum over rows and over the aligned
stripes ``[j*m, (j+1)*m)`` of the ``n_keep`` largest scores of ``scores[:, perm]``. Stripes are always
the global aligned positions, whatever the blocks look like: blocks need not be contiguous and a stripe
may mix blocks and fixed elements. When ``n`` is not a multiple of ``m`` (callers normally leave such
groups dense) the trailing partial stripe is treated as padded with zero-score fixed columns.
``greedy`` and ``hungarian`` never return a permutation worse than the identity.

Implementation note: the work runs in numpy on float32 (single-threaded; for these ``[stripes, R]``
arrays torch's intra-op thread pool costs more than it saves on a small shared CPU), sums that decide
between permutations in float64.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor

__all__ = ["Strategy", "identity", "random_perm", "greedy", "hungarian"]

Strategy = Callable[..., Tensor]

# Size (in float32 elements) of the scratch buffer of the pairwise kernel.
_KERNEL_BUFFER = 1 << 20


# ---- problem normalisation ------------------------------------------------------------------------

@dataclass
class _Problem:
    """A strategy's input, validated and padded to whole stripes.

    ``st`` is the transposed score matrix ``[n_pad, R]`` (one row per element) so that the columns of a
    set of elements are a contiguous row gather.
    """

    st: np.ndarray  # [n_pad, R] float32, C-contiguous
    n: int  # original group size
    n_keep: int
    m: int
    blocks: np.ndarray  # [n_pad] int64
    fixed: np.ndarray  # [n_pad] bool

    @property
    def n_pad(self) -> int:
        return self.st.shape[0]

    @property
    def stripes(self) -> int:
        return self.n_pad // self.m

    def trivial(self) -> bool:
        """True when no permutation can change the objective."""
        if self.n_keep <= 0 or self.n_keep >= self.m or self.st.shape[1] == 0:
            return True
        return int((~self.fixed).sum()) < 2

    def arrange(self, perm: np.ndarray) -> np.ndarray:
        """``scores[:, perm]`` slot-major: ``out[r, s]`` is the score row of the element at ``s*m + r``.

        Slot-major keeps every ``out[r]`` contiguous, which the elementwise kernels prefer.
        """
        return self.st[perm.reshape(self.stripes, self.m).T]

    def kept(self, perm: np.ndarray) -> float:
        """The objective for the padded permutation ``perm`` (float64 accumulation)."""
        return float(_top_sum(list(self.arrange(perm)), self.n_keep).sum())


def _labels_and_fixed(n: int, blocks, fixed) -> tuple[np.ndarray, np.ndarray]:
    blocks = np.zeros(n, np.int64) if blocks is None else torch.as_tensor(blocks).detach().cpu().long().numpy()
    fixed = np.zeros(n, bool) if fixed is None else torch.as_tensor(fixed).detach().cpu().bool().numpy()
    if blocks.shape != (n,) or fixed.shape != (n,):
        raise ValueError(f"blocks and fixed must have shape ({n},), got {blocks.shape} and {fixed.shape}")
    return blocks, fixed


def _prepare(scores: Tensor, n_keep: int, m: int, blocks, fixed) -> _Problem:
    scores = torch.as_tensor(scores)
    if scores.dim() != 2:
        raise ValueError(f"scores must be [rows, n], got shape {tuple(scores.shape)}")
    if m < 1:
        raise ValueError(f"m must be >= 1, got {m}")
    rows, n = scores.shape
    blocks, fixed = _labels_and_fixed(n, blocks, fixed)
    st = np.ascontiguousarray(scores.detach().cpu().float().numpy().T)
    if not np.isfinite(st).all():
        raise ValueError("scores contain NaN or infinite values")
    pad = (-n) % m
    if pad:
        # Zero-score columns, fixed and in a block of their own, complete the last stripe: they never
        # move, so the first n entries of the padded permutation are a permutation of range(n).
        st = np.concatenate([st, np.zeros((pad, rows), np.float32)])
        label = int(blocks.max()) + 1 if n else 0
        blocks = np.concatenate([blocks, np.full(pad, label, np.int64)])
        fixed = np.concatenate([fixed, np.ones(pad, bool)])
    return _Problem(st, n, int(n_keep), int(m), blocks, fixed)


def _result(perm: np.ndarray, n: int) -> Tensor:
    return torch.from_numpy(np.ascontiguousarray(perm[:n], dtype=np.int64))


# ---- shared kernels -------------------------------------------------------------------------------

def _largest(vals: list[np.ndarray], n: int) -> list[np.ndarray]:
    """The ``n`` largest of the same-shape arrays ``vals``, elementwise, as ``n`` arrays, descending.

    ``n`` bubble passes of elementwise max/min: for the tiny k of N:M this is several times faster than
    sorting along a strided axis.
    """
    out = []
    for t in range(n):
        last = t == n - 1  # the last pass needs no losers
        cur, rest = vals[0], []
        for v in vals[1:]:
            if not last:
                rest.append(np.minimum(cur, v))
            cur = np.maximum(cur, v)
        out.append(cur)
        vals = rest
    return out


def _top_sum(vals: list[np.ndarray], n: int) -> np.ndarray:
    """Per stripe, the sum over rows of the ``n`` largest of ``vals`` (``k`` arrays ``[S, R]``), float64 ``[S]``."""
    k = len(vals)
    total = lambda arrays: sum(v.sum(axis=1, dtype=np.float64) for v in arrays)  # noqa: E731
    if n <= 0:
        return np.zeros(vals[0].shape[0])
    if n >= k:
        return total(vals)
    if n <= k - n:
        return total(_largest(vals, n))
    # fewer passes through the complement: everything minus the k-n smallest
    return total(vals) + total(_largest([-v for v in vals], k - n))


def _nth_largest(vals: list[np.ndarray], n: int) -> np.ndarray:
    """The ``n``-th largest (``1 <= n <= len(vals)``) of the same-shape arrays ``vals``, elementwise.

    Adding a value ``v`` to a set whose n-th largest is ``t`` raises its top-n sum by ``relu(v - t)``:
    this threshold is all a strategy needs to price a candidate.
    """
    k = len(vals)
    if n <= k - n + 1:
        return _largest(vals, n)[-1]
    return -_largest([-v for v in vals], k - n + 1)[-1]


def _min_sum(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``out[w, i, j] = sum_r min(a[w, i, r], b[w, j, r])`` for ``[W, I, R]`` and ``[W, J, R]`` (float32).

    ``sum_r relu(a - b) = sum_r a - sum_r min(a, b)``: this is how every candidate is priced. One row of
    ``a`` at a time against a slice of ``b`` that fits a cache-sized buffer, reduced by ``einsum``.
    Deliberately single-threaded: on a small shared CPU the thread pools of ``torch.cdist`` (L1 kernel)
    and of BLAS cost more than they save, and made this 2-10x slower.
    """
    w, i, r = a.shape
    j = b.shape[1]
    if i > j:  # min is symmetric: loop over the shorter side
        return _min_sum(b, a).transpose(0, 2, 1)
    out = np.empty((w, i, j), np.float32)
    step = max(1, _KERNEL_BUFFER // max(1, j * r))
    buf = np.empty((min(step, w), j, r), np.float32)
    for s in range(0, w, step):
        bs = b[s:s + step]
        bb = buf[: bs.shape[0]]
        for k in range(i):
            np.minimum(a[s:s + step, k:k + 1, :], bs, out=bb)
            np.einsum("wjr->wj", bb, out=out[s:s + step, k, :])
    return out


def _relu_sum(cols: np.ndarray, thr: np.ndarray) -> np.ndarray:
    """``out[i, j] = sum_r relu(cols[i, r] - thr[j, r])`` (float64)."""
    return cols.sum(1, dtype=np.float64)[:, None] - _min_sum(cols[None], thr[None])[0].astype(np.float64)


# ---- trivial strategies ---------------------------------------------------------------------------

def identity(scores: Tensor, n_keep: int, m: int, blocks: Tensor, fixed: Tensor,
             generator: torch.Generator | None = None) -> Tensor:
    """The identity permutation (the "none" baseline)."""
    return torch.arange(scores.shape[1])


def random_perm(scores: Tensor, n_keep: int, m: int, blocks: Tensor, fixed: Tensor,
                generator: torch.Generator | None = None) -> Tensor:
    """A uniformly random valid permutation: each block's free elements shuffled among themselves."""
    n = scores.shape[1]
    labels, fix = _labels_and_fixed(n, blocks, fixed)
    perm = torch.arange(n)
    for label in np.unique(labels).tolist():
        pos = torch.from_numpy(np.flatnonzero((labels == label) & ~fix))
        perm[pos] = pos[torch.randperm(pos.numel(), generator=generator)]
    return perm


# ---- hungarian ------------------------------------------------------------------------------------

def _windows(labels: np.ndarray, window: int, generator: torch.Generator | None) -> tuple[np.ndarray, np.ndarray]:
    """Deal indices ``0..len(labels)-1`` into random windows of at most ``window`` same-label indices.

    Returns ``(idx, sizes)``: ``idx`` ``[W, size]`` holds each window's indices, padded by repeating
    its first index, and ``sizes`` ``[W]`` the real sizes. Windows of one label differ in size by at most
    one; windows of a single index (nothing to exchange) are dropped.
    """
    count = labels.size
    if count < 2:
        return np.zeros((0, 1), np.int64), np.zeros(0, np.int64)
    shuffle = torch.randperm(count, generator=generator).numpy()
    order = shuffle[np.argsort(labels[shuffle], kind="stable")]  # random order inside each label
    sorted_labels = labels[order]
    seg_first = np.flatnonzero(np.r_[True, sorted_labels[1:] != sorted_labels[:-1]])
    seg_len = np.diff(np.r_[seg_first, count])
    seg_windows = -(-seg_len // window)
    first_window = np.cumsum(seg_windows) - seg_windows
    seg = np.repeat(np.arange(seg_len.size), seg_len)
    rank = np.arange(count) - seg_first[seg]
    # Round-robin dealing: entry k of a segment goes to window k % nw, at offset k // nw.
    wid = first_window[seg] + rank % seg_windows[seg]
    off = rank // seg_windows[seg]
    sizes = np.bincount(wid, minlength=int(seg_windows.sum()))
    idx = np.full((sizes.size, int(sizes.max())), -1, np.int64)
    idx[wid, off] = order
    idx = np.where(idx < 0, idx[:, :1], idx)
    keep = sizes > 1
    return idx[keep], sizes[keep]


class _Arrangement:
    """A padded permutation together with the scores it arranges, ``x`` ``[m, stripes, R]``."""

    def __init__(self, p: _Problem, perm: np.ndarray):
        self.p = p
        self.perm = perm.copy()
        self.x = p.arrange(perm)

    def shuffle_slots(self, generator: torch.Generator | None) -> None:
        """Reorder the free elements inside each stripe at random (the objective does not change).

        A slot round only exchanges elements that sit in the same slot, so without this the search
        could never swap, say, slot 0 of one stripe with slot 2 of another. Elements move only between
        free positions of the same block and stripe.
        """
        p = self.p
        free = np.flatnonzero(~p.fixed)
        if free.size < 2:
            return
        key = torch.rand(free.size, generator=generator).numpy()
        stripe, label = free // p.m, p.blocks[free]
        by_pos = free[np.lexsort((free, label, stripe))]
        by_key = free[np.lexsort((key, label, stripe))]
        src = self.perm.copy()
        self.perm[by_pos] = src[by_key]
        self.x = p.arrange(self.perm)

    def slot_round(self, r: int, window: int, generator: torch.Generator | None) -> float:
        """Reassign the elements in slot ``r`` of every stripe, optimally given the other ``m-1`` slots.

        With the rest of stripe ``s`` fixed, putting element ``c`` there adds
        ``sum_rows relu(score_c - t_s)`` to the objective, ``t_s`` being the n-th largest of the other
        members. Since ``relu(v - t) = v - min(v, t)`` and a perfect matching uses every element once,
        maximising the total is minimising the matched ``sum_rows min(score_c, t_s)``: one pairwise kernel
        per batch of windows, then one linear assignment per window (one block, at most ``window``
        stripes, drawn from ``generator``). The current arrangement is a feasible matching, so the
        objective never decreases (up to rounding). Returns the gain (as accurate as float32 sums).
        """
        p, m = self.p, self.p.m
        pos = np.arange(p.stripes) * m + r
        movable = np.flatnonzero(~p.fixed[pos])  # stripes whose slot r is free
        idx, sizes = _windows(p.blocks[pos[movable]], window, generator)
        if idx.size == 0:
            return 0.0
        stripes = movable[idx]  # [W, size]: stripe of each freed position
        thr = _nth_largest([self.x[j] for j in range(m) if j != r], p.n_keep)  # [S, R]
        cost = _min_sum(self.x[r][stripes], thr[stripes])
        gain = 0.0
        target = idx.copy()  # target[w, i]: the window slot that receives the element now in slot i
        for w in range(idx.shape[0]):
            size = int(sizes[w])
            c = cost[w, :size, :size].astype(np.float64)
            rows, cols = linear_sum_assignment(c)
            gain += np.trace(c) - c[rows, cols].sum()
            target[w, rows] = idx[w, cols]
        valid = np.arange(idx.shape[1])[None, :] < sizes[:, None]
        src, dst = movable[idx[valid]], movable[target[valid]]
        moved_elems, moved_rows = self.perm[pos[src]], self.x[r][src]
        self.perm[pos[dst]] = moved_elems
        self.x[r][dst] = moved_rows
        return float(gain)


def _balanced_init(p: _Problem) -> np.ndarray:
    """Deal each block's free elements, heaviest first, across its stripes in snake order.

    Spreads high-importance channels (activation outliers) over different stripes so that few stripes
    hold more than ``n_keep`` of them: the channel-allocation step of RIA.
    """
    perm = np.arange(p.n_pad)
    weight = p.st.sum(axis=1, dtype=np.float64)
    stripe = np.arange(p.n_pad) // p.m
    for label in np.unique(p.blocks[~p.fixed]).tolist():
        pos = np.flatnonzero((p.blocks == label) & ~p.fixed)
        if pos.size < 2:
            continue
        s = stripe[pos]  # sorted, since pos is
        rank = np.arange(pos.size) - np.searchsorted(s, s)  # slot rank inside its stripe
        ordinal = np.unique(s, return_inverse=True)[1]
        ns = int(ordinal.max()) + 1
        # snake: rank 0 visits stripes left to right, rank 1 right to left, ...
        key = np.where(rank % 2 == 0, ordinal, ns - 1 - ordinal)
        slot_order = pos[np.argsort(rank * ns + key, kind="stable")]
        perm[slot_order] = pos[np.argsort(-weight[pos], kind="stable")]
    return perm


def _auto_sweeps(p: _Problem, window: int, budget: float) -> int:
    """Sweeps that fit a work budget, between 4 and 32.

    A sweep costs about ``n * R * (g + 8)`` elementary operations: the pairwise kernel over windows of
    ``g`` stripes (``window``, or fewer when every block is smaller) plus thresholds and gathers.
    """
    _, per_block = np.unique(p.blocks[~p.fixed], return_counts=True)
    g = max(2, min(window, int(per_block.max()) // p.m if per_block.size else 2))
    per_sweep = p.n_pad * max(1, p.st.shape[1]) * (g + 8)
    return int(np.clip(budget // per_sweep, 4, 32))


def hungarian(scores: Tensor, n_keep: int, m: int, blocks: Tensor, fixed: Tensor,
              generator: torch.Generator | None = None, *, window: int = 32, max_sweeps: int | None = None,
              budget: float = 3e8, tol: float = 1e-3, init: str = "identity", shuffle: bool = True) -> Tensor:
    """RIA-style channel allocation refined by linear assignment, one stripe slot at a time.

    Each sweep runs ``m`` slot rounds (``_Arrangement.slot_round``): slot ``r`` of every stripe is
    emptied and its elements are optimally reassigned to the freed slots given the other members of
    each stripe. Between sweeps the free elements of each stripe are reordered at random
    (``shuffle``), so that any two elements can meet in a round. Assignment windows hold at most
    ``window`` stripes of one block, redrawn at random from ``generator`` every round: a sweep costs
    ``O(R * n * window)``, and a block with at most ``window`` free stripes is solved exactly every
    round. Sweeps stop after ``max_sweeps`` (default: as many as fit ``budget`` elementary operations,
    between 4 and 32) or when a sweep gains less than ``tol`` times what the first one gained.

    ``init`` is ``"identity"``, ``"balanced"`` (heavy channels dealt across stripes first) or ``"best"``
    (refine both, keep the better). The result is compared exactly with the identity and is never
    worse; it is a deterministic function of the inputs and the generator's state.
    """
    if init not in ("identity", "balanced", "best"):
        raise ValueError(f"unknown init {init!r}; expected identity, balanced or best")
    if window < 2:
        raise ValueError(f"window must be >= 2, got {window}")
    p = _prepare(scores, n_keep, m, blocks, fixed)
    ident = np.arange(p.n_pad)
    if p.trivial():
        return _result(ident, p.n)
    sweeps = _auto_sweeps(p, window, budget) if max_sweeps is None else int(max_sweeps)
    starts = ([ident] if init != "balanced" else []) + ([_balanced_init(p)] if init != "identity" else [])
    best, best_val = ident, p.kept(ident)
    for start in starts:
        arr = _Arrangement(p, start)
        first = None
        for sweep in range(sweeps):
            if sweep and shuffle:
                arr.shuffle_slots(generator)
            gained = sum(arr.slot_round(r, window, generator) for r in range(p.m))
            first = gained if first is None else first
            if gained <= tol * first:
                break
        val = p.kept(arr.perm)
        if val > best_val:
            best, best_val = arr.perm, val
    return _result(best, p.n)


# ---- greedy ---------------------------------------------------------------------------------------

def greedy(scores: Tensor, n_keep: int, m: int, blocks: Tensor, fixed: Tensor,
           generator: torch.Generator | None = None, *, max_swaps: int | None = None,
           time_limit: float | None = None) -> Tensor:
    """Apex-ASP-style channel swaps: apply the best improving swap of two elements until none is left.

    A swap exchanges two free elements of one block sitting in different stripes. Swap gains live in a
    ``[n_b, n_b]`` table per block of ``n_b`` free elements, built once (``O(R * n_b^2)``) and updated
    for the ``2m`` positions of the two touched stripes after each swap (``O(R * m * n_b)``). Every swap
    is checked exactly before it is applied, so the objective strictly increases and the result is never
    worse than the identity. Stops when no swap gains, after ``max_swaps`` swaps in all (default ``n``),
    or after ``time_limit`` seconds of wall clock (a limit makes the result machine dependent, hence
    no limit by default). ``generator`` is unused: the search is deterministic.
    """
    p = _prepare(scores, n_keep, m, blocks, fixed)
    perm = np.arange(p.n_pad)
    if p.trivial():
        return _result(perm, p.n)
    budget = p.n if max_swaps is None else int(max_swaps)
    deadline = None if time_limit is None else time.perf_counter() + time_limit
    free = np.flatnonzero(~p.fixed)
    for label in np.unique(p.blocks[free]).tolist():
        pos = free[p.blocks[free] == label]
        if budget <= 0 or (deadline is not None and time.perf_counter() > deadline):
            break
        if np.unique(pos // p.m).size >= 2:
            budget -= _GreedyBlock(p, perm, pos).run(budget, deadline)
    return _result(perm, p.n)


class _GreedyBlock:
    """Best-swap search among the free positions ``pos`` of one block; updates ``perm`` in place.

    ``repl[i, e]`` is the change in the kept importance of stripe ``stripe[i]`` when the element at
    ``pos[i]`` is replaced by block element ``e``; swapping positions ``i`` and ``j`` gains
    ``repl[i, elem[j]] + repl[j, elem[i]]``. ``gain`` holds that for every pair (``-inf`` for pairs in
    one stripe), with row maxima cached so that picking the best swap costs ``O(n_b)``.
    """

    def __init__(self, p: _Problem, perm: np.ndarray, pos: np.ndarray):
        self.p, self.perm, self.pos = p, perm, pos
        self.stripe = pos // p.m
        self.same = self.stripe[:, None] == self.stripe[None, :]
        self.elem = np.arange(pos.size)  # elem[i]: row of self.cols holding the element now at pos[i]
        self.cols = p.st[perm[pos]]  # [n_b, R] scores of the block's elements, in their initial order
        self.repl = self._repl_rows(np.arange(pos.size))
        self.gain = self.repl[:, self.elem] + self.repl[:, self.elem].T
        self.gain[self.same] = -np.inf
        self.rowarg = self.gain.argmax(axis=1)
        self.rowmax = self.gain[np.arange(pos.size), self.rowarg]
        # gains below this are float32 noise of the table
        self.eps = 1e-6 * float(self.cols.sum(dtype=np.float64)) / pos.size

    def _repl_rows(self, rows: np.ndarray) -> np.ndarray:
        p, m = self.p, self.p.m
        q = self.pos[rows]
        members = (q // m)[:, None] * m + np.arange(m)  # [T, m]: the positions of each one's stripe
        others = members[members != q[:, None]].reshape(rows.size, m - 1)
        top = _largest([p.st[self.perm[others[:, j]]] for j in range(m - 1)], p.n_keep)
        full = _top_sum([p.st[self.perm[members[:, j]]] for j in range(m)], p.n_keep)
        base = sum(v.sum(axis=1, dtype=np.float64) for v in top) - full
        return base[:, None] + _relu_sum(self.cols, top[-1]).T

    def _stripes_kept(self, stripes: np.ndarray, perm: np.ndarray) -> float:
        m = self.p.m
        return float(_top_sum([self.p.st[perm[stripes * m + j]] for j in range(m)], self.p.n_keep).sum())

    def _refresh_rows(self, rows: np.ndarray) -> None:
        self.rowarg[rows] = self.gain[rows].argmax(axis=1)
        self.rowmax[rows] = self.gain[rows, self.rowarg[rows]]

    def run(self, budget: int, deadline: float | None) -> int:
        """Apply up to ``budget`` improving swaps; returns how many were applied."""
        swaps = 0
        while swaps < budget and (deadline is None or time.perf_counter() <= deadline):
            i = int(self.rowmax.argmax())
            j = int(self.rowarg[i])
            if not self.rowmax[i] > self.eps:
                break
            qi, qj = self.pos[i], self.pos[j]
            touched_stripes = np.unique(self.stripe[[i, j]])
            before = self._stripes_kept(touched_stripes, self.perm)
            trial = self.perm.copy()
            trial[qi], trial[qj] = self.perm[qj], self.perm[qi]
            if not self._stripes_kept(touched_stripes, trial) > before:
                # the table's float32 estimate was wrong: never propose this pair again
                self.gain[i, j] = self.gain[j, i] = -np.inf
                self._refresh_rows(np.array([i, j]))
                continue
            self.perm[qi], self.perm[qj] = trial[qi], trial[qj]
            self.elem[i], self.elem[j] = self.elem[j], self.elem[i]
            self._update(np.flatnonzero(np.isin(self.stripe, touched_stripes)))
            swaps += 1
        return swaps

    def _update(self, t: np.ndarray) -> None:
        """Recompute the table for positions ``t`` (those of the two stripes a swap touched)."""
        self.repl[t] = self._repl_rows(t)
        g = self.repl[t][:, self.elem] + self.repl[:, self.elem[t]].T  # new gain[t, :]
        g[self.same[t]] = -np.inf
        self.gain[t] = g
        self.gain[:, t] = g.T
        # rows outside t: their best may have been in a column of t (recompute) or may now be there
        stale = np.isin(self.rowarg, t)
        stale[t] = True
        self._refresh_rows(np.flatnonzero(stale))
        col = t[g.T.argmax(axis=1)]
        colmax = g.T.max(axis=1)
        better = (colmax > self.rowmax) & ~stale
        self.rowarg[better], self.rowmax[better] = col[better], colmax[better]
