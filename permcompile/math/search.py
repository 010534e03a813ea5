"""The search strategy's math: block-wise differentiable bipartite matching, then checked exchanges (pure tensor
math).

Objective. For a consumer ``y = x W^T`` pruned to ``W ⊙ M``, the output error on calibration inputs
``X`` is ``||X (W ⊙ (1-M))^T||² = Σ_rows r G rᵀ`` with ``G = XᵀX`` and ``r = W ⊙ (1-M)``: the exact
layer-output distillation loss, computed from the Gram matrix instead of the tokens. Unlike the
Wanda/RIA proxy (which only sees ``diag(G)``) it sees how channels correlate, so it can prefer
permutations whose dropped weights cancel out. The mask ``M`` is the criterion's N:M choice *in
permuted order* (what the pipeline will really apply), relaxed to a soft top-N for the gradient.
``objective_gram(G, "diagonal")`` swaps ``G`` for ``diag(G)``: the same search on an error that treats
channels as uncorrelated (the squared Wanda scores of the dropped weights).

Parametrisation. The permutation is ``warm`` (the Hungarian solution) refined by a block-diagonal
permutation: positions are grouped into blocks of ``B`` and each block has a learnable ``B×B`` cost
matrix (parameters grow as C·B, not C²). Log-domain Sinkhorn with an annealed temperature gives the soft
permutation; the Hungarian solution of it is the hard one, used forward with a straight-through
gradient, so every forward evaluates a real permutation and the best one seen is returned: the result is
never worse than the warm start on the objective. Each round regroups whole N:M stripes into new blocks
at random (reordering stripes leaves the loss unchanged), so channels can travel beyond one block.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .gather import gather_index, replica_columns
from .nm import nm_mask
from .sinkhorn import harden, log_sinkhorn, soft_nm_mask


@dataclass
class Consumer:
    """One consumer in the group's element coordinates (replicas already expanded).

    ``w``: ``[out, L]`` weights; ``scores``: ``[out, L]`` criterion scores (move with their column);
    ``gram``: ``[L, L]`` input Gram matrix; ``cols``: ``[L]`` the group element each column carries.
    """

    w: torch.Tensor
    scores: torch.Tensor
    gram: torch.Tensor
    cols: torch.Tensor


@dataclass
class LearnResult:
    perm: torch.Tensor
    loss_warm: float
    loss_best: float
    steps: int
    history: list
    swaps: int = 0  # exchanges kept by the refinement phase


def _positions(consumer: Consumer, perm: torch.Tensor) -> torch.Tensor:
    """Source column for each of the consumer's columns under group permutation ``perm``."""
    return gather_index(consumer.cols, perm)


def _diagonal_of(gram: torch.Tensor) -> torch.Tensor | None:
    """``diag(gram)`` (float64) when ``gram`` is diagonal (the ``diagonal`` objective), else None."""
    d = torch.diagonal(gram)
    return d.double() if torch.count_nonzero(gram) == torch.count_nonzero(d) else None


def output_error(consumers: list[Consumer], perm: torch.Tensor, n_keep: int, m: int) -> float:
    """Relative layer-output error of the hard N:M mask in permuted order (the learned objective)."""
    num, den = 0.0, 0.0
    for c in consumers:
        src = _positions(c, perm)
        w = c.w[:, src]
        mask = nm_mask(c.scores[:, src], n_keep, m)
        r = (w * (~mask)).double()
        diag = _diagonal_of(c.gram)
        if diag is not None:  # Σ r² d: no K×K product
            d = diag[src]
            num += float((r * r * d).sum())
            den += float((w.double().square() * d).sum())
            continue
        g = c.gram[src][:, src].double()
        num += float((r @ g * r).sum())
        den += float((w.double() @ g * w.double()).sum())
    return num / max(den, 1e-30)


def gram_rows(x: torch.Tensor, objective: str = "output") -> torch.Tensor:
    """The token rows ``x`` ([tokens, K]) whose Gram the objective sums: as they are, or for ``"relative"``
    each scaled to unit norm, so that every token's output error counts relative to its input's size (in a
    decoder a handful of attention-sink tokens carry activations 10²–10⁵× the others' squared norm and
    would otherwise own the Gram of some layers)."""
    if objective == "relative":
        return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    if objective in ("output", "diagonal"):
        return x
    raise ValueError(f"unknown objective {objective!r}")


def objective_gram(gram: torch.Tensor, objective: str = "output") -> torch.Tensor:
    """The Gram matrix the search scores with: the full ``XᵀX`` (``"output"``, the exact layer-output error;
    ``"relative"``: the same on the unit-norm rows of :func:`gram_rows`) or only its diagonal
    (``"diagonal"``: channels treated as uncorrelated, so the error of a mask is the sum of the squared
    Wanda scores ``W² · E[x²]`` of the weights it drops)."""
    if objective in ("output", "relative"):
        return gram
    if objective == "diagonal":
        return torch.diag(torch.diagonal(gram))
    raise ValueError(f"unknown objective {objective!r}")


def _stripe_blocks(perm_positions: torch.Tensor, labels: torch.Tensor, movable: torch.Tensor, m: int,
                   block: int, gen: torch.Generator, shuffle: bool) -> list[torch.Tensor]:
    """Partition movable positions into blocks of whole stripes, never mixing block labels."""
    blocks = []
    n = labels.numel()
    stripes = torch.arange(n).reshape(-1, m)
    for lab in torch.unique(labels):
        ok = ((labels[stripes] == lab) & movable[stripes]).all(dim=1)
        ids = torch.nonzero(ok).flatten()
        if ids.numel() < 2:
            continue
        if shuffle:
            ids = ids[torch.randperm(ids.numel(), generator=gen)]
        per = max(2, block // m)
        for start in range(0, ids.numel(), per):
            chunk = ids[start:start + per]
            if chunk.numel() >= 2:
                blocks.append(stripes[chunk].flatten())
    return blocks


def gram_factor(gram: torch.Tensor, energy: float = 0.999, max_rank: int | None = None) -> torch.Tensor:
    """``L`` with ``L Lᵀ ≈ gram``: the leading eigenvectors keeping ``energy`` of the trace (at most ``max_rank``).

    Calibration activations are strongly low-rank, so this cuts the cost of every learning step several
    times; the final choice is still checked against the exact Gram matrix.
    """
    evals, evecs = torch.linalg.eigh(gram.float())
    evals = evals.clamp_min(0).flip(0)
    evecs = evecs.flip(1)
    total = float(evals.sum())
    if total <= 0:
        return torch.zeros(gram.shape[0], 1)
    cum = torch.cumsum(evals, 0) / total
    rank = int(torch.searchsorted(cum, torch.tensor(energy, dtype=cum.dtype)).item()) + 1
    rank = max(1, min(rank, max_rank or gram.shape[0], gram.shape[0]))
    return (evecs[:, :rank] * evals[:rank].sqrt()).float()


def learn_permutation(consumers: list[Consumer], n: int, n_keep: int, m: int, warm: torch.Tensor,
                      labels: torch.Tensor, fixed: torch.Tensor, *, block: int = 64, steps: int = 60,
                      rounds: int = 2, lr: float = 0.05, sinkhorn_iters: int = 8, tau_start: float = 1.0,
                      tau_end: float = 0.05, generator: torch.Generator | None = None, device: str = "cpu",
                      on_step=None, swap_trials: int = 0, amp: str = "off") -> LearnResult:
    """Refine ``warm`` to lower the layer-output error of the N:M-masked consumers.

    Two phases: ``rounds`` × ``steps`` of block-wise Sinkhorn matching (above), then ``swap_trials``
    exchange trials (:func:`swap_refine`) on the exact objective. Returns the best hard permutation
    evaluated (never worse than ``warm`` on the exact objective). ``amp`` ("off", "bf16", "fp16") runs the
    Sinkhorn phase's loss under ``torch.autocast`` on ``device``.
    """
    if amp not in ("off", "bf16", "fp16"):
        raise ValueError(f"amp must be off, bf16 or fp16, got {amp!r}")
    gen = generator or torch.Generator().manual_seed(0)
    dev = torch.device(device)
    warm = torch.as_tensor(warm, dtype=torch.long)
    cur = warm.clone()
    # the Sinkhorn phase scores with a low-rank factor of each Gram (several times cheaper per step); the
    # exchange search does not need one (its trial cost does not depend on the rank), so it uses the exact Gram
    factors = [gram_factor(c.gram) for c in consumers] if steps > 0 else None
    warm_exact = output_error(consumers, warm, n_keep, m)
    best_loss = _lowrank_error(consumers, factors, cur, n_keep, m) if factors else warm_exact
    history = [best_loss]
    movable = ~fixed[cur] if fixed is not None else torch.ones(n, dtype=torch.bool)
    pos_labels = labels[cur]
    done = 0
    for rnd in range(rounds if factors else 0):
        layout = _stripe_blocks(cur, pos_labels, movable, m, block, gen, shuffle=rnd > 0)
        if not layout:
            break
        sizes = sorted({b.numel() for b in layout})
        for size in sizes:  # batch blocks of equal size together
            group = [b for b in layout if b.numel() == size]
            idx = torch.stack(group).to(dev)  # [nb, B] positions
            best_loss, cur, k = _optimise_blocks(consumers, factors, cur, idx, n_keep, m, steps, lr,
                                                 sinkhorn_iters, tau_start, tau_end, gen, dev, best_loss, history,
                                                 on_step, amp)
            done += k
    swaps = 0
    if swap_trials > 0:
        cur, swap_loss, swaps = swap_refine(consumers, [c.gram for c in consumers], cur, n_keep, m, labels, fixed,
                                            trials=swap_trials, generator=gen)
        history.append(swap_loss)
    # the Sinkhorn phase used a low-rank Gram: confirm on the exact objective, never return something worse
    cur_exact = warm_exact if torch.equal(cur, warm) else output_error(consumers, cur, n_keep, m)
    if cur_exact > warm_exact:
        cur, cur_exact = warm.clone(), warm_exact
    return LearnResult(cur, warm_exact, cur_exact, done, history, swaps)


def _lowrank_error(consumers, factors, perm, n_keep, m) -> float:
    num, den = 0.0, 0.0
    for c, f in zip(consumers, factors):
        src = _positions(c, perm)
        w = c.w[:, src]
        r = w * (~nm_mask(c.scores[:, src], n_keep, m))
        num += float((r @ f[src]).square().sum())
        den += float((w @ f[src]).square().sum())
    return num / max(den, 1e-30)


def _apply_q(x: torch.Tensor, reps, q: torch.Tensor, back: bool = False) -> torch.Tensor:
    """Permute ``x``'s columns block-wise by ``q`` (or by its transpose when ``back``), every replica alike."""
    out = x.clone()
    for sel, colidx in reps:
        xb = x[:, colidx]  # [out, nbs, B]
        eq = "onp,npj->onj" if back else "onj,npj->onp"
        # (under autocast the einsum runs in the reduced dtype; ``out`` keeps x's)
        out[:, colidx.flatten()] = torch.einsum(eq, xb, q[sel]).reshape(x.shape[0], -1).to(out.dtype)
    return out


# Sinkhorn phase constants: the identity's logit margin at the start (so the warm start is where the search
# begins) and the soft N:M mask's temperature relative to the mean score
_INIT_SCALE, _MASK_TAU = 2.0, 0.05


@torch.enable_grad()  # an optimisation loop: it must run when the caller disabled gradients
def _optimise_blocks(consumers, factors, cur, idx, n_keep, m, steps, lr, iters, tau0, tau1, gen, dev, best_loss,
                     history, on_step, amp="off"):
    nb, bsz = idx.shape
    n = cur.numel()
    eye = torch.eye(bsz, device=dev)
    noise = torch.rand(nb, bsz, bsz, generator=gen).to(dev) * 0.01
    logits = (_INIT_SCALE * eye.expand(nb, bsz, bsz) + noise).clone().requires_grad_(True)
    opt = torch.optim.Adam([logits], lr=lr)
    prepared = []
    idx_cpu = idx.cpu()
    for c, f in zip(consumers, factors):
        src = _positions(c, cur)  # consumer columns in the current order
        w = c.w[:, src].to(dev).float()
        s = c.scores[:, src].to(dev).float()
        g = f[src].to(dev).float()  # low-rank factor: loss = ||r g||²
        # after reordering, column j sits at group position cols[j]
        reps = [(sel.to(dev), ci.to(dev)) for sel, ci in replica_columns(c.cols, n, idx_cpu)]
        prepared.append((w, s, g, reps))
    total_energy = sum(float((w @ g).square().sum()) for w, _, g, _ in prepared)
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
    loss_scale = 2.0 ** 10 if amp == "fp16" else 1.0  # keeps fp16 gradients above underflow; Adam ignores the scale
    best_q = None
    for step in range(steps):
        frac = step / max(1, steps - 1)
        tau = tau0 * (tau1 / tau0) ** frac
        soft = torch.exp(log_sinkhorn(logits, iters, tau))  # [nb, B(position), B(element)]
        hard_perm = harden(soft.detach().cpu()).to(dev)  # [nb, B]
        hard = torch.zeros_like(soft).scatter_(2, hard_perm.unsqueeze(-1), 1.0)
        q = hard + soft - soft.detach()  # straight-through: hard forward, soft gradient
        loss = 0.0
        for w, s, g, reps in prepared:
            s_new = _apply_q(s, reps, q)  # fp32: the hard mask is the one the criterion will choose
            hard_mask = nm_mask(s_new.detach(), n_keep, m).float()
            soft_mask = soft_nm_mask(s_new, n_keep, m, _MASK_TAU * float(s_new.detach().mean().clamp_min(1e-12)))
            mask = hard_mask + soft_mask - soft_mask.detach()  # straight-through: hard forward, soft gradient
            with torch.autocast(device_type=dev.type, dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None):
                w_new = _apply_q(w, reps, q)
                r = _apply_q(w_new * (1 - mask), reps, q, back=True)  # dropped weights, back in current order
                loss = loss + (r @ g).float().square().sum()
        loss = loss / max(total_energy, 1e-30)
        value = float(loss.detach())
        if value < best_loss - 1e-12:
            best_loss = value
            best_q = hard_perm.detach().cpu().clone()
        history.append(value)
        if on_step:
            on_step(step, value, best_loss)
        opt.zero_grad()
        (loss * loss_scale).backward()
        opt.step()
    if best_q is not None:
        new = cur.clone()
        for b in range(nb):
            new[idx_cpu[b]] = cur[idx_cpu[b][best_q[b]]]
        cur = new
    return best_loss, cur, steps


def _exchange_pairs(perm: torch.Tensor, labels: torch.Tensor, fixed: torch.Tensor | None, m: int, trials: int,
                    gen: torch.Generator, accepted=None):
    """The position pairs an exchange search tries: per trial ``i`` among the movable positions and ``j`` among
    the movable positions of the same block label; trials whose two positions share a stripe are skipped.
    Exchanges keep labels and movability in place, so the pools drawn from ``perm`` stay valid throughout.

    When the group has no more distinct candidate pairs than ``trials`` (small groups: tiny models, never a
    real model's), random draws would mostly repeat pairs: instead every pair is tried once per pass, in a
    random order, and the search stops after a pass in which nothing was kept (``accepted()``, the caller's
    count of kept exchanges, did not change): a pairwise-exchange local optimum. At most ``trials`` pairs in all.
    """
    movable_pos = torch.ones(perm.numel(), dtype=torch.bool) if fixed is None else ~fixed[perm]
    pos_labels = labels[perm]
    candidates = torch.nonzero(movable_pos).flatten()
    if candidates.numel() < 2:
        return
    by_label = {int(lab): torch.nonzero(movable_pos & (pos_labels == lab)).flatten()
                for lab in torch.unique(pos_labels[candidates])}
    pairs = []
    for pool in by_label.values():
        counts = torch.bincount(pool // m)
        pairs.append((pool.numel() ** 2 - int(counts.square().sum())) // 2)
    if accepted is not None and sum(pairs) <= trials:
        every = []
        for pool in by_label.values():
            a, b = torch.triu_indices(pool.numel(), pool.numel(), offset=1)
            i, j = pool[a], pool[b]
            cross = i // m != j // m
            every.append(torch.stack([i[cross], j[cross]], dim=1))
        every = torch.cat(every)
        left = trials
        while left > 0 and every.shape[0]:
            before = accepted()
            for i, j in every[torch.randperm(every.shape[0], generator=gen)][:left].tolist():
                yield i, j
            left -= every.shape[0]
            if accepted() == before:
                return
        return
    for _ in range(trials):
        i = int(candidates[torch.randint(candidates.numel(), (1,), generator=gen)])
        pool = by_label[int(pos_labels[i])]
        j = int(pool[torch.randint(pool.numel(), (1,), generator=gen)])
        if i // m != j // m:
            yield i, j


class _single_thread:
    """Run a loop of small tensor ops on one thread: intra-op threads only add fork/join overhead there (on this
    project's 2-core machine with a busy neighbour, 1000 exchange trials took 9× longer with 2 threads, and one
    residual-stripe scoring 12× longer)."""

    def __enter__(self):
        self.prev = torch.get_num_threads()
        torch.set_num_threads(1)

    def __exit__(self, *exc):
        torch.set_num_threads(self.prev)


def _dropped_entries(scores: torch.Tensor, n_keep: int, m: int) -> torch.Tensor:
    """``~nm_mask`` for element-major scores ``[S, rows]`` (``S`` a multiple of ``m``; stripes of ``m``
    consecutive elements): an entry is dropped when at least ``n_keep`` others of its stripe beat it (a higher
    score, or an equal one at an earlier position): the same rule as ``nm_mask``'s stable sort, without sorting
    (and reading whole rows: contiguous)."""
    s = scores.reshape(-1, m, scores.shape[-1])
    rank = (s[:, :1] > s).to(torch.uint8)
    for k in range(1, m):
        rank += s[:, k:k + 1] > s
    for k in range(m - 1):
        rank[:, k + 1:] += s[:, k:k + 1] == s[:, k + 1:]
    return (rank >= n_keep).reshape(scores.shape)


def swap_refine(consumers: list[Consumer], grams: list[torch.Tensor], perm: torch.Tensor, n_keep: int, m: int,
                labels: torch.Tensor, fixed: torch.Tensor | None, *, trials: int = 1000,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, float, int]:
    """Pairwise exchanges that lower the output error, each checked exactly before it is kept.

    The loss is ``Σ_c ⟨R_c, R_c G_c⟩ / Σ_c ⟨W_c, W_c G_c⟩`` with ``R_c`` the pruned-away weights ``W ⊙ (1-M)``
    in the consumer's own column order and ``G_c`` the Gram matrix it is scored with (``grams``: usually the
    consumer's exact ``c.gram``). Exchanging the elements at positions ``i``
    and ``j`` only changes the mask of the stripes holding them (times replicas), i.e. a few columns ``S``
    of ``R``: with ``D`` the change of those columns, the loss moves by ``2⟨(RG)[:, S], D⟩ + ⟨D G[S, S], D⟩``.
    Keeping ``RG`` up to date (a rank-|S| update per kept exchange) makes a trial cost ``O(out · |S|²)``,
    independent of the Gram's rank. Each trial draws ``i`` among the movable positions and ``j`` among the
    movable positions of the same block label in another stripe and keeps the exchange if the loss drops.
    Everything is held element-major (``Rᵀ``, ``(RG)ᵀ``: a trial reads whole rows, not strided columns), a
    diagonal Gram (``objective="diagonal"``) is used as a vector, and the trials run on one thread.
    Returns ``(perm, loss, kept)``.
    """
    gen = generator or torch.Generator().manual_seed(0)
    n = perm.numel()
    cur = perm.clone()
    num, den = 0.0, 0.0
    state = []  # per consumer: [src, Rᵀ (pruned weights by source column), G, (RG)ᵀ, Wᵀ, scoresᵀ, diag(G) or None]
    for c, gram in zip(consumers, grams):
        src = _positions(c, cur)
        g = gram.double()
        diag = _diagonal_of(g)
        wt = c.w.T.double().contiguous()
        st = c.scores.T.contiguous()
        rt = torch.zeros_like(wt)
        rt[src] = wt[src] * _dropped_entries(st[src], n_keep, m)
        rgt = rt * diag[:, None] if diag is not None else g @ rt  # (R G)ᵀ = G Rᵀ (G is symmetric)
        num += float((rt * rgt).sum())
        den += float((wt * (wt * diag[:, None] if diag is not None else g @ wt)).sum())
        state.append([src, rt, g, rgt, wt, st, diag])
    den = max(den, 1e-30)
    loss = num / den
    identity_cols = [c.cols.numel() == n and torch.equal(c.cols, torch.arange(n)) for c in consumers]
    arange_m = torch.arange(m)
    kept = 0
    with _single_thread():
        for i, j in _exchange_pairs(cur, labels, fixed, m, trials, gen, accepted=lambda: kept):
            cand = cur.clone()
            cand[i], cand[j] = cur[j], cur[i]
            delta_total = 0.0
            updates = []
            for (src, rt, g, rgt, wt, st, diag), c, plain in zip(state, consumers, identity_cols):
                if plain:  # one column per element: only columns i and j change (O(1) instead of O(L))
                    new_src = src.clone()
                    new_src[i], new_src[j] = src[j], src[i]
                    stripes = torch.tensor([i // m, j // m])
                else:
                    new_src = _positions(c, cand)
                    changed = torch.nonzero(new_src != src).flatten()
                    if changed.numel() == 0:
                        updates.append(None)
                        continue
                    stripes = torch.unique(changed // m)
                sn = new_src[(stripes[:, None] * m + arange_m).flatten()]  # the same source columns, rearranged
                new = wt[sn] * _dropped_entries(st[sn], n_keep, m)
                d = new - rt[sn]
                quad = (diag[sn, None] * d * d).sum() if diag is not None else ((g[sn][:, sn] @ d) * d).sum()
                delta_total += float(2 * (rgt[sn] * d).sum() + quad)
                updates.append((new_src, sn, new, d))
            if delta_total < -1e-9 * den:
                cur = cand
                for st_, u in zip(state, updates):
                    if u is not None:
                        new_src, sn, new, d = u
                        st_[0] = new_src
                        st_[1][sn] = new
                        if st_[6] is not None:
                            st_[3][sn] += st_[6][sn, None] * d
                        else:
                            st_[3] += st_[2][:, sn] @ d
                loss += delta_total / den
                kept += 1
    return cur, loss, kept


def diagonal_exchanges(energy: torch.Tensor, scores: torch.Tensor, perm: torch.Tensor, n_keep: int, m: int,
                       labels: torch.Tensor, fixed: torch.Tensor | None, *, trials: int = 1000,
                       generator: torch.Generator | None = None) -> tuple[torch.Tensor, float, float, int]:
    """Pairwise exchanges on the diagonal objective for a group read by many consumers at once.

    ``energy`` and ``scores`` are ``[n, rows]`` (element-major: row ``e`` holds element ``e``'s entry of every
    consumer row, stacked over consumers): ``energy = W² E[x²]`` (each consumer's rows scaled as the caller
    wants them weighted) and the criterion's scores that choose the mask. The loss is the dropped energy
    ``Σ energy ⊙ (1 - M)`` with ``M`` the N:M mask of ``scores`` in permuted order, i.e. a sum over stripes;
    each stripe's share is cached, so a trial recomputes only the two stripes it changes (``O(rows · m)``,
    contiguous reads). Returns ``(perm, loss_start, loss_end, kept)`` with losses relative to the total energy.
    """
    gen = generator or torch.Generator().manual_seed(0)
    n = perm.numel()
    cur = perm.clone()
    total = max(float(energy.sum()), 1e-30)

    def dropped(elements: torch.Tensor) -> float:  # elements of one stripe, in position order
        return float((energy[elements] * _dropped_entries(scores[elements], n_keep, m)).sum())

    stripe_loss = [dropped(cur[k * m:(k + 1) * m]) for k in range(n // m)]
    start = sum(stripe_loss) / total
    kept = 0
    with _single_thread():
        for i, j in _exchange_pairs(cur, labels, fixed, m, trials, gen, accepted=lambda: kept):
            a, b = i // m, j // m
            cand = cur.clone()
            cand[i], cand[j] = cur[j], cur[i]
            new_a, new_b = dropped(cand[a * m:(a + 1) * m]), dropped(cand[b * m:(b + 1) * m])
            if new_a + new_b < stripe_loss[a] + stripe_loss[b] - 1e-9 * total:
                cur, stripe_loss[a], stripe_loss[b] = cand, new_a, new_b
                kept += 1
    return cur, start, sum(stripe_loss) / total, kept
