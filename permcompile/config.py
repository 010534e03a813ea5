"""User-facing configuration: frozen dataclasses, parsed and validated once."""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from .errors import UsageError
from .quantization import QuantizeConfig, check_deployable
from .registry import Registry

CRITERIA = ("magnitude", "wanda", "ria")
PRECISIONS = ("auto", "fp32", "fp16")  # ONNX precision; "auto" is resolved by OptimizeConfig.resolve_precision
RESIDUAL_MODES = ("global", "per-layer")


@dataclass(frozen=True)
class Sparsity:
    """N:M sparsity: keep ``n`` of every ``m`` consecutive weights along a layer's input (K) axis."""

    n: int = 2
    m: int = 4

    @classmethod
    def parse(cls, text: str) -> "Sparsity":
        match = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", str(text))
        if not match:
            raise UsageError(f"--sparsity must look like N:M (for example 2:4), got {text!r}")
        n, m = int(match.group(1)), int(match.group(2))
        if m < 2 or n < 1 or n >= m:
            raise UsageError(f"--sparsity {text!r} is invalid: need 1 <= N < M (for example 2:4 or 4:8)")
        return cls(n, m)

    def __post_init__(self) -> None:
        if not (isinstance(self.n, int) and isinstance(self.m, int)) or self.m < 2 or self.n < 1 or self.n >= self.m:
            raise UsageError(f"sparsity {self.n}:{self.m} is invalid: need integers 1 <= N < M (for example 2:4)")

    def __str__(self) -> str:
        return f"{self.n}:{self.m}"


OBJECTIVES = ("auto", "output", "diagonal", "relative")  # SearchConfig.objective
WARM_STARTS = ("hungarian", "greedy")  # SearchConfig.warm_start
AMP_MODES = ("auto", "off", "bf16", "fp16")  # SearchConfig.amp
_SEARCH_CHOICES = {"objective": OBJECTIVES, "warm_start": WARM_STARTS, "amp": AMP_MODES}


@dataclass(frozen=True)
class SearchConfig:
    """Hyper-parameters of the ``search`` strategy, the exchange search on a per-layer proxy (block-wise Sinkhorn
    matching, then exchanges; ``--search KEY=VALUE``).

    The defaults are the best measured setting (benchmarks/RESULTS.md): the Sinkhorn phase (``steps``) landed
    within noise of its Hungarian warm start on every model, while exchange trials on the layer-output
    error raised MiniLM's gap recovered from 0.148 to 0.274 (global residual) and DINOv2-S's; so by default
    the search is the warm start refined by ``swap_trials`` checked exchanges (``steps=0``). ``--search steps=N``
    turns the Sinkhorn phase on before the exchanges.
    """

    block_size: int = 64
    steps: int = 0
    rounds: int = 1
    lr: float = 0.1
    sinkhorn_iters: int = 8
    tau_start: float = 1.0
    tau_end: float = 0.05
    # exchange trials per group after the Sinkhorn phase (math.search.swap_refine). With the full-Gram
    # objective they helped every encoder (quality_minilm_2of4_wanda_perlayer.md, quality_dinov2-s_*) but made
    # SmolLM2's held-out perplexity worse on every seed (133.3 -> 140.9, quality_smollm2_2of4_wanda_residual_modes.md);
    # with objective="diagonal" SmolLM2 lands within seed noise of hungarian (quality_smollm2_2of4_wanda_diagonal*.md)
    swap_trials: int = 1000
    # what the search minimises: "output" = the layer-output error on calibration inputs (full input Gram
    # matrix, sees channel correlations); "diagonal" = the same error with channels treated as uncorrelated
    # (only diag(XᵀX): the squared Wanda scores of the dropped weights); "relative" = the output error of
    # each token relative to its input's norm (full Gram of unit-norm tokens), so a few tokens with massive
    # activations (a decoder's attention-sink token) do not own the objective. "auto" (default) = the best
    # measured per model family: "diagonal" for causal LMs, "output" otherwise (see resolve_objective).
    objective: str = "auto"
    # calibrate each block on the outputs of the blocks before it *pruned* (their N:M masks applied, as
    # SparseGPT does) instead of the dense model's: the Grams describe the inputs the deployed layer will see
    sequential: bool = False
    # weight each output channel of the layer-error objective by its Fisher information of the task loss
    # (next-token cross-entropy for causal LMs; output distillation otherwise): calib/sensitivity.py
    task_loss: bool = False
    # the heuristic every learned group starts from (the global residual group's too): "greedy" beat
    # "hungarian" on SmolLM2 2:4 Wanda (quality_smollm2_2of4_wanda_greedy.md) at 5-20x the time
    warm_start: str = "hungarian"
    # exchange trials on the global residual-stream group after the blocks (passes/search.py _refine_residual),
    # scored on the diagonal objective over every reader; 0 keeps the warm start's residual permutation. On
    # SmolLM2 2:4 Wanda, 2000 took held-out ppl 132.1 / 131.5 / 133.4 -> 126.2 / 125.3 / 134.7 (calibration
    # seeds 0/1/2; quality_smollm2_2of4_wanda_learned_default.md vs _residual_exchanges.md), hungarian 133.9 /
    # 129.0 / 136.8. Encoders whose residual stream is pinned by the output are unaffected.
    residual_trials: int = 2000
    # mixed precision of the Sinkhorn phase's loss (torch.autocast; the Sinkhorn iterations, the hard masks and
    # the final never-worse check stay fp32): "auto" = bf16 on CUDA, off (fp32) on the CPU; "fp16" scales the
    # loss by 2**10 before backward (Adam's step is scale-invariant). The exchange search is unaffected.
    amp: str = "auto"

    def resolve_amp(self, device: str) -> str:
        """The autocast mode for ``device``: "off", "bf16" or "fp16"."""
        if self.amp != "auto":
            return self.amp
        return "bf16" if str(device).startswith("cuda") else "off"

    def resolve_objective(self, family: str) -> str:
        """The objective the search uses for a model of ``family`` ("causal-lm", "encoder", "vision", ...)."""
        if self.objective != "auto":
            return self.objective
        return "diagonal" if family == "causal-lm" else "output"

    def warm_start_kernel(self):
        """The ``math/strategies`` function of the ``warm_start`` heuristic (:func:`heuristic_kernel`)."""
        return heuristic_kernel(self.warm_start)

    def __post_init__(self) -> None:
        if self.block_size < 2 or self.steps < 0 or self.rounds < 1:
            raise UsageError("--search needs block_size >= 2, steps >= 0 and rounds >= 1")
        if self.swap_trials < 0 or self.residual_trials < 0:
            raise UsageError(f"--search swap_trials and residual_trials must be >= 0, got {self.swap_trials} and "
                             f"{self.residual_trials}")
        for key, choices in _SEARCH_CHOICES.items():
            if getattr(self, key) not in choices:
                raise UsageError(f"unknown --search {key} {getattr(self, key)!r}; choose one of {', '.join(choices)}")


_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def parse_search(pairs, base: SearchConfig | None = None) -> SearchConfig:
    """``base`` (default ``SearchConfig()``) with ``KEY=VALUE`` strings applied in order, later ones winning.

    The one parser of ``--search KEY=VALUE``, shared by the CLI and the benchmark scripts. KEY is a field of
    ``SearchConfig`` (``-`` may stand for ``_``); VALUE is parsed to the field's type (``int``, ``float``,
    ``bool`` as true/false/1/0/yes/no/on/off, ``str``). Anything else raises one ``UsageError`` line.

    >>> parse_search(["swap_trials=50", "objective=diagonal"]).swap_trials
    50
    """
    import dataclasses

    types = {f.name: f.type if isinstance(f.type, str) else f.type.__name__ for f in dataclasses.fields(SearchConfig)}
    keys = ", ".join(types)
    changes: dict = {}
    for pair in pairs or ():
        key, sep, text = str(pair).partition("=")
        key, text = key.strip().replace("-", "_"), text.strip()
        if not sep or key not in types:
            raise UsageError(f"--search expects KEY=VALUE with KEY one of {keys}; got {pair!r}")
        kind = types[key]
        try:
            if kind == "bool":
                if text.lower() not in _TRUE + _FALSE:
                    raise ValueError
                value = text.lower() in _TRUE
            else:
                value = {"int": int, "float": float}.get(kind, str)(text)
        except ValueError:
            raise UsageError(f"--search {key} needs a value of type {kind}, got {text!r}") from None
        if key in _SEARCH_CHOICES and value not in _SEARCH_CHOICES[key]:
            raise UsageError(f"--search {key} must be one of {', '.join(_SEARCH_CHOICES[key])}, got {text!r}")
        changes[key] = value
    return dataclasses.replace(base if base is not None else SearchConfig(), **changes)


LEARNED_LOSSES = ("auto", "kl", "ce", "cosine", "mse")  # LearnedConfig.loss


@dataclass(frozen=True)
class LearnedConfig:
    """Research knobs of the ``learned`` strategy (``passes/learned.py``): permutations learned against the model's
    own output, PermLLM-style (the CLI exposes only ``--permutation learned``; set these from Python through
    ``OptimizeConfig.learned``).

    One block-diagonal soft permutation per coupling group (``block_size`` positions per block, head and pinned
    elements respected), log-domain Sinkhorn (``sinkhorn_iters``) at a temperature annealed ``tau_start`` →
    ``tau_end``, Hungarian hardening with a straight-through gradient, started at the ``hungarian`` permutation
    (``init_scale``: the identity's logit margin). Masks: hard N:M of the criterion in permuted order, softmax-over-M
    surrogate gradient at temperature ``mask_tau`` (relative to each stripe's mean score). AdamW (``lr``) for
    ``steps`` steps, one calibration batch per step; ``gumbel`` scales Gumbel noise added to the logits (faded with
    the temperature). ``loss``: "kl" to the dense model's logits, "ce" next-token cross-entropy (causal LMs),
    "cosine" 1 − cosine of the main output (last hidden state, PermLLM's), "mse" relative squared error; "auto" =
    "kl" for causal LMs, "cosine" otherwise. ``distill`` > 0 adds that weight times a layer-wise smooth-L1
    distillation of every hidden state (AMD's auxiliary term). The result is the better, over all calibration
    batches, of the final logits' permutations and the step that beat the warm start by the widest margin on its
    batch; with ``keep_best`` it replaces the warm start only if its loss is lower.
    """

    block_size: int = 64
    steps: int = 100
    lr: float = 0.05
    sinkhorn_iters: int = 5
    tau_start: float = 1.0
    tau_end: float = 0.1
    init_scale: float = 2.0
    mask_tau: float = 0.5
    # Gumbel noise on the logits (times tau / tau_start): exploration. The planted 32-channel problem of
    # tests/test_learned.py needs it (gumbel=1, lr=0.1), but on MiniLM 2:4 Wanda (calibration seeds 0/1, 100 steps)
    # held-out cosine was 0.8081 / 0.8061 without it (lr 0.05) vs 0.8011 / 0.8007 with it (lr 0.1)
    gumbel: float = 0.0
    loss: str = "auto"
    distill: float = 0.0
    keep_best: bool = True
    # sequences per training step: each calibration batch is split into chunks of this many (0: as given). More,
    # cheaper steps for the same tokens (SmolLM2 on 2 CPU cores: a step of 4 × 512 tokens takes about a minute)
    micro_batch: int = 0
    # "auto": the training steps' forward and backward under bf16 autocast on CUDA, fp32 elsewhere (a no-op on
    # CPU); "off": fp32 everywhere. The losses that pick the result are always computed in fp32
    autocast: str = "auto"
    # the loop's state (logits, AdamW, step, RNG, best so far) is saved after every ``checkpoint_steps`` steps or
    # ``checkpoint_seconds`` since the last save, whichever comes first (only where the pipeline asks for one)
    checkpoint_steps: int = 10
    checkpoint_seconds: float = 120.0

    def resolve_autocast(self, device) -> bool:
        """Whether the training steps run under bf16 autocast on ``device``."""
        return self.autocast == "auto" and str(device).split(":")[0] == "cuda"

    def resolve_loss(self, family: str) -> str:
        if self.loss != "auto":
            return self.loss
        return "kl" if family == "causal-lm" else "cosine"

    def __post_init__(self) -> None:
        if self.block_size < 2 or self.steps < 0 or self.sinkhorn_iters < 1:
            raise UsageError("learned needs block_size >= 2, steps >= 0 and sinkhorn_iters >= 1")
        if not (self.lr > 0 and 0 < self.tau_end <= self.tau_start and self.mask_tau > 0 and self.distill >= 0
                and self.gumbel >= 0):
            raise UsageError("learned needs lr > 0, 0 < tau_end <= tau_start, mask_tau > 0, distill >= 0, gumbel >= 0")
        if self.loss not in LEARNED_LOSSES:
            raise UsageError(f"learned loss must be one of {', '.join(LEARNED_LOSSES)}, got {self.loss!r}")
        if self.micro_batch < 0 or self.checkpoint_steps < 1 or not self.checkpoint_seconds > 0:
            raise UsageError("learned needs micro_batch >= 0, checkpoint_steps >= 1 and checkpoint_seconds > 0")
        if self.autocast not in ("auto", "off"):
            raise UsageError(f"learned autocast must be auto or off, got {self.autocast!r}")


# ------------------------------------------------------------------------------------------------ strategies
class HeuristicStrategy:
    """Handler of a strategy that scores each group on its own with a pure function of ``math/strategies``
    (``kernel``); the search and learned strategies start from one of these (their warm start)."""

    def __init__(self, function: str):
        self.function = function

    @property
    def kernel(self):
        from .math import strategies

        return getattr(strategies, self.function)

    def __call__(self, req):
        from .passes.sparsify import choose_permutations, group_progress

        cfg = req.config
        with group_progress(len(req.groups), cfg.permutation, req.quiet) as progress:
            return choose_permutations(req.groups, req.loaded.model, req.stats, cfg.criterion, cfg.permutation,
                                       cfg.sparsity.n, cfg.sparsity.m, req.pruned, seed=cfg.seed, progress=progress,
                                       kernel=self.kernel)


def _search(req):
    from .passes.search import search_permutations

    return search_permutations(req.loaded, req.groups, req.stats, req.batches, req.config, pruned=req.pruned,
                               quiet=req.quiet, checkpoints=req.checkpoints)


def _learned(req):
    from .passes.learned import learned_permutations

    return learned_permutations(req.loaded, req.groups, req.stats, req.batches, req.config, linears=req.linears,
                                quiet=req.quiet, checkpoints=req.checkpoints)


# The permutation strategies of ``--permutation``: name → handler, knobs, help (torchao registers a handler beside
# its config type). Each handler takes a ``passes.permute.PermuteRequest`` and returns ``(perms by group name,
# GroupResult per group)``; ``passes.permute.permute`` dispatches and checks the result. The table lives here, below
# the passes (as quantization.QUANT_MODES does), because ``OptimizeConfig`` validates against it and the CLI reads it
# before torch is imported; a handler imports its pass when called, and no pass imports this module (the passes get
# what they need from the table through the config object or the request: ``SearchConfig.warm_start_kernel``).
STRATEGIES = Registry("permutation strategy", "--permutation")
STRATEGIES.add("none", HeuristicStrategy("identity"), help="keep the original channel order")
STRATEGIES.add("random", HeuristicStrategy("random_perm"), help="a seeded random valid permutation (a baseline)")
STRATEGIES.add("greedy", HeuristicStrategy("greedy"), help="Apex-ASP-style best-swap search on the criterion scores")
STRATEGIES.add("hungarian", HeuristicStrategy("hungarian"),
               help="stripe slots reassigned by linear assignment on the criterion scores (the default: with "
                    "the weight update as good as search and learned, several times faster)")
STRATEGIES.add("search", _search, config_type=SearchConfig,
               help="exchange search on a per-layer output proxy, from a hungarian warm start (--search KEY=VALUE)")
STRATEGIES.add("learned", _learned, config_type=LearnedConfig,
               help="learned end to end against the model's own output (slowest; pays with --update none)")


def heuristic_kernel(name: str):
    """The ``math/strategies`` function behind heuristic strategy ``name`` (none, random, greedy, hungarian)."""
    handler = STRATEGIES.get(name).handler
    if not isinstance(handler, HeuristicStrategy):
        heuristics = [n for n in STRATEGIES if isinstance(STRATEGIES.get(n).handler, HeuristicStrategy)]
        raise UsageError(f"{name} is not a per-group heuristic (choose one of {', '.join(heuristics)})")
    return handler.kernel


UPDATES = ("none", "obs")
MASK_SCORES = ("obs", "criterion")
HELDOUT_MODES = ("auto", "none")
SEARCH_OBJECTIVES = ("criterion", "obs")


@dataclass(frozen=True)
class ReconstructConfig:
    """Research knobs of the reconstruction step (the CLI only exposes ``--update``).

    ``mask``: "obs" picks each stripe's kept weights by OBS saliency of the weights as updated so far
    (SparseGPT); "criterion" by the run's criterion (Wanda/RIA/magnitude) on the block's own inputs.
    ``damp``: fraction of the mean Hessian diagonal added to the diagonal. ``block``: columns updated
    together. ``refit_iters``: conjugate-gradient steps towards the exact fixed-mask least-squares weights
    after the OBS pass (0 = plain SparseGPT; default 30). ``search``: what the permutation search scores each weight by
    when reconstruction is on: "criterion" (the run's criterion on activation norms, as without
    reconstruction) or "obs" (the OBS cost ``w²/[H⁻¹]ⱼⱼ`` of pruning it with the rest of the row compensating,
    from the dense model's Hessians; costs one more calibration pass).
    """

    mask: str = "obs"
    damp: float = 0.01
    block: int = 32
    # 30 conjugate-gradient steps: on top of hungarian + the OBS pass they took SmolLM2 2:4 held-out ppl 75.7 -> 66.2
    # (seed 0) and MiniLM's embedding cosine 0.875 -> 0.897 (2 seeds): docs/FINDINGS.md, "reconstruction"
    refit_iters: int = 30
    search: str = "criterion"
    # Hessian shrinkage ρ, (1 − ρ)·H + ρ·diag(H) (math.obs.shrink_): how much the update may lean on the channel
    # correlations of the calibration text. With a held-out part (``heldout``) it is where the search starts
    shrink: float = 0.0
    # "auto": each block holds out part of the calibration data (one kind of text in turn when the batches come
    # from several, else a quarter of the batches), fits the update without it and keeps the least shrinkage in
    # ``shrink``, then ``shrink + step``, ... that beats the mask alone there, else the mask alone; "none": ``shrink``
    heldout: str = "auto"
    shrink_step: float = 0.25
    # a calibration that is one text (calib.data.narrow_calibration): the share of the fit's samples drawn from the
    # embedded mixed set, so the update also fits kinds of text the user's sample lacks; 0: the set is only checked
    # on (with ``heldout="auto"``). Measured in benchmarks/results/domains_smollm2_2of4_narrow*.md
    reference_share: float = 0.33

    def reference_samples(self, samples: int) -> int:
        """How many samples of the embedded mixed set go with ``samples`` of a single-text calibration."""
        if self.reference_share == 0:
            return max(3, samples // 4)  # a check set only
        return max(1, round(samples * self.reference_share / (1 - self.reference_share)))

    def shrink_steps(self) -> tuple[float, ...]:
        """The shrinkages the held-out search tries, in order (all below 1: ρ = 1 is the mask alone)."""
        steps, rho = [], self.shrink
        while rho < 1 - 1e-9:
            steps.append(round(rho, 6))
            rho += self.shrink_step
        return tuple(steps)

    def __post_init__(self) -> None:
        if not 0 <= self.shrink < 1 or not 0 < self.shrink_step <= 1:
            raise UsageError(f"reconstruction needs 0 <= shrink < 1 and 0 < shrink_step <= 1, got {self.shrink!r} "
                             f"and {self.shrink_step!r}")
        if not 0 <= self.reference_share < 1:
            raise UsageError(f"reconstruction needs 0 <= reference_share < 1, got {self.reference_share!r}")
        if self.heldout not in HELDOUT_MODES:
            raise UsageError(f"reconstruction heldout must be one of {', '.join(HELDOUT_MODES)}, "
                             f"got {self.heldout!r}")
        if self.search not in SEARCH_OBJECTIVES:
            raise UsageError(f"reconstruction search must be one of {', '.join(SEARCH_OBJECTIVES)}, "
                             f"got {self.search!r}")
        if self.mask not in MASK_SCORES:
            raise UsageError(f"reconstruction mask must be one of {', '.join(MASK_SCORES)}, got {self.mask!r}")
        if not 0 <= self.damp < 10 or self.block < 1 or self.refit_iters < 0:
            raise UsageError("reconstruction needs 0 <= damp < 10, block >= 1 and refit_iters >= 0")


@dataclass(frozen=True)
class OptimizeConfig:
    """Everything ``optimize()`` needs besides the model."""

    sparsity: Sparsity = Sparsity()
    # hungarian: with reconstruction on, the exchange search ("search") was no better on
    # MiniLM (R 0.919 vs 0.933, 3 seeds) at ~7x the search time (docs/FINDINGS.md, "reconstruction")
    permutation: str = "hungarian"
    criterion: str = "wanda"
    # ONNX (and Triton/TensorRT) precision. "auto" = fp16 for a bf16/fp16 checkpoint (its own size; the only
    # one of the two where TensorRT runs 2:4 sparse tactics), fp32 otherwise (bit-faithful to an fp32 model);
    # see resolve_precision. ``hf/`` always keeps the checkpoint's dtype.
    precision: str = "auto"
    prune: bool = True
    calib: str | None = None  # path; None -> embedded default
    calib_samples: int = 32
    calib_seq_len: int = 128
    seed: int = 0
    device: str = "cpu"
    prune_embeddings: bool = False  # embeddings and LM head stay dense by default
    # "global": one model-wide residual permutation folded into the weights (zero glue). "per-layer": each
    # reading site (q/k/v, gate/up of each block) gets its own permutation and one run-time gather (glue).
    residual: str = "global"
    search: SearchConfig = field(default_factory=SearchConfig)  # the "search" strategy's knobs (--search KEY=VALUE)
    # "obs": after the permutations are folded, choose each N:M mask and update the kept weights block by block
    # (SparseGPT-style optimal brain surgeon on the layer-input Hessian, in stored order); "none": mask only
    update: str = "obs"
    reconstruct: ReconstructConfig = field(default_factory=ReconstructConfig)
    learned: LearnedConfig = field(default_factory=LearnedConfig)  # the "learned" strategy's knobs
    # "fp8" / "int8": the pruned linears' weights and inputs on an 8-bit grid (quantization.py); a mode name is
    # accepted for QuantizeConfig(mode=...)
    quantize: QuantizeConfig = field(default_factory=QuantizeConfig)

    @property
    def trains_with_gradients(self) -> bool:
        """Whether the permutation strategy runs backward passes (the learned loop, the search's Sinkhorn phase
        or its task-loss sensitivities)."""
        if self.permutation == "learned":
            return self.learned.steps > 0
        return self.permutation == "search" and (self.search.steps > 0 or self.search.task_loss)

    def resolve_precision(self, checkpoint_dtype) -> str:
        """The ONNX precision for a model stored in ``checkpoint_dtype`` (a torch dtype or its name):
        ``precision`` itself unless it is "auto", then "fp16" for bf16/fp16 checkpoints and "fp32" otherwise."""
        if self.precision != "auto":
            return self.precision
        return "fp16" if str(checkpoint_dtype).replace("torch.", "") in ("bfloat16", "float16") else "fp32"

    def __post_init__(self) -> None:
        if isinstance(self.sparsity, str):
            object.__setattr__(self, "sparsity", Sparsity.parse(self.sparsity))
        if not isinstance(self.sparsity, Sparsity):
            raise UsageError(f"sparsity must be a Sparsity or an 'N:M' string, got {self.sparsity!r}")
        if not isinstance(self.search, SearchConfig):
            raise UsageError("search must be a SearchConfig")
        dev = str(self.device)
        if not (dev == "cpu" or dev.startswith("cuda") or dev == "mps"):
            raise UsageError(f"unknown device {dev!r}; use cpu or cuda (cuda:N)")
        if dev.startswith("cuda"):
            import torch

            if not torch.cuda.is_available():
                raise UsageError(f"--device {dev}: no CUDA device is available on this machine")
        STRATEGIES.get(self.permutation)  # an unknown name: one UsageError line listing the strategies
        if self.criterion not in CRITERIA:
            raise UsageError(f"unknown criterion {self.criterion!r}; choose one of {', '.join(CRITERIA)}")
        if self.precision not in PRECISIONS:
            raise UsageError(f"unknown precision {self.precision!r}; choose one of {', '.join(PRECISIONS)}")
        if self.update not in UPDATES:
            raise UsageError(f"--update must be one of {', '.join(UPDATES)}, got {self.update!r}")
        if not isinstance(self.reconstruct, ReconstructConfig):
            raise UsageError("reconstruct must be a ReconstructConfig")
        if not isinstance(self.learned, LearnedConfig):
            raise UsageError("learned must be a LearnedConfig")
        if self.residual not in RESIDUAL_MODES:
            raise UsageError(f"--residual must be one of {', '.join(RESIDUAL_MODES)}, got {self.residual!r}")
        if self.calib_samples < 1 or self.calib_seq_len < 2:
            raise UsageError("calibration needs at least 1 sample of at least 2 tokens")
        if isinstance(self.quantize, str):
            object.__setattr__(self, "quantize", QuantizeConfig(mode=self.quantize))
        if not isinstance(self.quantize, QuantizeConfig):
            raise UsageError("quantize must be a QuantizeConfig or a mode name")
        check_deployable(self)
