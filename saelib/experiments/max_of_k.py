"""Gross et al.'s max-of-K toy transformer: data, model, training, and ground-truth labels of SAE
latents trained on its final-position residual stream.

The model and its training follow "Compact Proofs of Model Performance via Mechanistic
Interpretability" (Gross, Agrawal, Kwa et al. 2024, arXiv 2406.11779; code
``JasonGross/guarantees-based-mechanistic-interpretability``, ``gbmi/exp_max_of_n/train.py``,
``MAX_OF_4_CONFIG``): a 1-layer, 1-head, attention-only ``HookedTransformer`` with
``d_model = d_head = 32``, ``d_vocab = 64``, ``n_ctx = 4``, no normalisation and all biases zero
and frozen; uniformly random token sequences; cross-entropy of the true maximum at the last
position; AdamW (lr 1e-3, betas (0.9, 0.999), torch's default weight decay 0.01), batch 128,
3000 steps (one pass over 384k fresh sequences).

Jason Gross's prediction (LessWrong comment on Apollo Research 2024, REFERENCES.md): an SAE on this model's
activations with width ``d_vocab`` finds roughly one latent per sequence maximum; wider SAEs
split those latents by the query token, the largest non-max token and the number of copies of
the maximum. :func:`ground_truth` gives those four variables for every sequence and
:func:`label_latents` scores every latent against them.

Shapes: ``tokens [n, n_ctx]`` (long), ``resid [n, d_model]``, ``acts [n, d_sae]``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from matplotlib.figure import Figure
from torch import Tensor
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer, HookedTransformerConfig
from transformer_lens.utils import get_act_name

from ..core.metrics import active
from . import feature_trees as ft

__all__ = [
    "MaxOfKConfig",
    "SECONDARY_VARIABLES",
    "LatentLabels",
    "sample_sequences",
    "make_model",
    "train_max_of_k",
    "accuracy",
    "final_residual",
    "ground_truth",
    "activation_histogram",
    "label_latents",
    "max_range",
    "variance_explained",
    "summarize_labels",
    "plot_max_histograms",
    "NestingViolation",
    "SplitNesting",
    "split_nesting",
    "MaximaCoverage",
    "maxima_coverage",
]

Distribution = Literal["uniform", "uniform_max"]

#: The ground-truth variables that may explain how a latent splits beyond the maximum.
SECONDARY_VARIABLES: tuple[str, ...] = ("query", "nonmax", "copies")


@dataclass
class MaxOfKConfig:
    """The max-of-K model and its training run (defaults: Gross et al.'s ``MAX_OF_4_CONFIG``).

    Attributes:
        d_vocab: number of token values (the maximum is one of them).
        n_ctx: sequence length K.
        d_model: residual stream width.
        d_head: attention head width (one head).
        steps: optimiser steps.
        batch_size: sequences per step, drawn fresh and uniformly at random every step.
        lr: AdamW learning rate.
        betas: AdamW betas.
        weight_decay: AdamW weight decay (Gross's config passes none, so torch's default 0.01).
        seed: seeds the model initialisation and the training sequences.
        progress: show a tqdm progress bar.
    """

    d_vocab: int = 64
    n_ctx: int = 4
    d_model: int = 32
    d_head: int = 32
    steps: int = 3000
    batch_size: int = 128
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.01
    seed: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        for name in ("d_vocab", "n_ctx", "d_model", "d_head", "steps", "batch_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"MaxOfKConfig.{name} must be a positive int, got {v!r}")
        if self.d_vocab < 2 or self.n_ctx < 2:
            raise ValueError(f"max-of-K needs d_vocab >= 2 and n_ctx >= 2, got {self.d_vocab}, {self.n_ctx}")
        if not (self.lr > 0):
            raise ValueError(f"MaxOfKConfig.lr must be > 0, got {self.lr!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def hooked_config(self) -> HookedTransformerConfig:
        """The TransformerLens config: 1 layer, 1 head, attention-only, no norm."""
        return HookedTransformerConfig(
            n_layers=1,
            n_heads=1,
            d_model=self.d_model,
            d_head=self.d_head,
            d_vocab=self.d_vocab,
            n_ctx=self.n_ctx,
            attn_only=True,
            normalization_type=None,
            act_fn=None,
            seed=self.seed,
            device="cpu",
        )


def sample_sequences(
    n: int,
    d_vocab: int,
    n_ctx: int,
    generator: torch.Generator,
    distribution: Distribution = "uniform",
) -> Int[Tensor, "n n_ctx"]:
    """Draw ``n`` token sequences.

    ``"uniform"``: every token independently uniform on ``[0, d_vocab)`` (the training
    distribution; the maximum is then skewed high, ``P(max = m) ∝ (m+1)^K - m^K``).
    ``"uniform_max"``: the maximum ``m`` uniform on ``[0, d_vocab)``, then a sequence uniform among
    those whose maximum is ``m`` (``c`` copies of ``m`` with probability ∝ ``C(K, c) m^(K-c)``,
    at uniformly random positions, the other tokens uniform on ``[0, m)``).

    Raises ValueError for an unknown ``distribution`` or non-positive sizes.
    """
    if n < 1 or d_vocab < 1 or n_ctx < 1:
        raise ValueError(f"n, d_vocab, n_ctx must be positive, got {n}, {d_vocab}, {n_ctx}")
    if distribution == "uniform":
        return torch.randint(d_vocab, (n, n_ctx), generator=generator)
    if distribution != "uniform_max":
        raise ValueError(f"distribution must be 'uniform' or 'uniform_max', got {distribution!r}")
    mx = torch.randint(d_vocab, (n,), generator=generator)  # [n]
    c = torch.arange(1, n_ctx + 1, dtype=torch.float64)  # [K]
    binom = torch.tensor([math.comb(n_ctx, k) for k in range(1, n_ctx + 1)], dtype=torch.float64)
    weights = binom * mx[:, None].double().pow(n_ctx - c)  # [n, K]; 0^0 = 1 puts m = 0 on c = K
    copies = torch.multinomial(weights, 1, generator=generator)[:, 0] + 1  # [n]
    rank = torch.rand(n, n_ctx, generator=generator).argsort(dim=-1)  # random position order
    is_max = rank < copies[:, None]  # [n, K]
    others = (torch.rand(n, n_ctx, generator=generator) * mx[:, None]).floor().long()
    return torch.where(is_max, mx[:, None], others)


def make_model(cfg: MaxOfKConfig) -> HookedTransformer:
    """An untrained max-of-K transformer with every bias zero and frozen (``requires_grad=False``)."""
    model = HookedTransformer(cfg.hooked_config())
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.rsplit(".", 1)[-1].startswith("b_"):
                p.zero_()
                p.requires_grad_(False)
    return model


def _max_logits(model: HookedTransformer, tokens: Tensor) -> Float[Tensor, "n d_vocab"]:
    return model(tokens, return_type="logits")[:, -1, :]


def train_max_of_k(cfg: MaxOfKConfig) -> tuple[HookedTransformer, list[float]]:
    """Train a max-of-K model from scratch; deterministic for a given config on CPU.

    Returns ``(model, losses)``, ``losses`` the training cross-entropy (nats) of every step.
    The model is returned in eval mode.
    """
    model = make_model(cfg)
    g = torch.Generator().manual_seed(cfg.seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    losses: list[float] = []
    model.train()
    for _ in tqdm(range(cfg.steps), disable=not cfg.progress, desc="train max-of-K", mininterval=1.0):
        tokens = sample_sequences(cfg.batch_size, cfg.d_vocab, cfg.n_ctx, g)  # [batch, K]
        loss = F.cross_entropy(_max_logits(model, tokens), tokens.max(dim=-1).values)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    model.eval()
    return model, losses


@torch.no_grad()
def accuracy(model: HookedTransformer, tokens: Int[Tensor, "n n_ctx"], batch_size: int = 8192) -> float:
    """Fraction of sequences whose last-position argmax logit is the true maximum."""
    correct = 0
    for start in range(0, len(tokens), batch_size):
        chunk = tokens[start : start + batch_size]
        correct += (_max_logits(model, chunk).argmax(-1) == chunk.max(-1).values).sum().item()
    return correct / len(tokens)


@torch.no_grad()
def final_residual(
    model: HookedTransformer, tokens: Int[Tensor, "n n_ctx"], batch_size: int = 8192
) -> Float[Tensor, "n d_model"]:
    """The residual stream after the last block at the last position (what the unembedding reads:
    the model has no final norm), collected through the ``resid_post`` hook."""
    name = get_act_name("resid_post", model.cfg.n_layers - 1)
    out = []
    for start in range(0, len(tokens), batch_size):
        _, cache = model.run_with_cache(tokens[start : start + batch_size], names_filter=name)
        out.append(cache[name][:, -1, :])  # [chunk, d_model]
    return torch.cat(out).contiguous()


def ground_truth(tokens: Int[Tensor, "n n_ctx"]) -> dict[str, Int[Tensor, " n"]]:
    """The variables a latent may encode, for every sequence.

    Returns ``{"max", "query", "nonmax", "copies"}``: the maximum; the query token (the last
    token, whose position reads the answer); the largest token strictly below the maximum, or
    ``-1`` when every token is the maximum; the number of copies of the maximum (``1..n_ctx``).
    """
    if tokens.ndim != 2:
        raise ValueError(f"tokens must be [n, n_ctx], got shape {tuple(tokens.shape)}")
    mx = tokens.max(dim=-1).values  # [n]
    is_max = tokens == mx[:, None]
    nonmax = torch.where(is_max, torch.full_like(tokens, -1), tokens).max(dim=-1).values
    return {"max": mx, "query": tokens[:, -1], "nonmax": nonmax, "copies": is_max.sum(-1)}


def activation_histogram(
    acts: Float[Tensor, "n d_sae"], values: Int[Tensor, " n"], n_values: int
) -> Float[Tensor, "d_sae n_values"]:
    """Activation-weighted distribution of ``values`` for every latent.

    Row ``j`` is ``sum_t acts[t, j] [values[t] = v] / sum_t acts[t, j]``; a latent that never fires
    gets a zero row. Values must lie in ``[0, n_values)``.

    Raises ValueError if shapes disagree, a value is out of range, or an activation is negative.
    """
    if acts.ndim != 2 or values.shape != (acts.shape[0],):
        raise ValueError(f"acts must be [n, d_sae] and values [n], got {tuple(acts.shape)}, {tuple(values.shape)}")
    if len(values) and (values.min() < 0 or values.max() >= n_values):
        raise ValueError(f"values must lie in [0, {n_values}), got range [{values.min()}, {values.max()}]")
    if (acts < 0).any():
        raise ValueError("activations must be non-negative (ReLU / TopK latents)")
    mass = acts.T.double() @ F.one_hot(values, n_values).double()  # [d_sae, n_values]
    return (mass / mass.sum(-1, keepdim=True).clamp_min(1e-300)).float()


def max_range(hist: Float[Tensor, "d_sae n_values"], mass: float = 0.8) -> Int[Tensor, "d_sae 2"]:
    """Shortest contiguous value range ``[lo, hi]`` holding at least ``mass`` of each row.

    Ties go to the lowest ``lo``; a zero row gives ``[-1, -1]``. Raises ValueError unless
    ``0 < mass <= 1``.
    """
    if not (0 < mass <= 1):
        raise ValueError(f"mass must be in (0, 1], got {mass!r}")
    d_sae, n = hist.shape
    cum = torch.cat([torch.zeros(d_sae, 1, dtype=torch.float64), hist.double().cumsum(-1)], dim=-1)
    lo = torch.arange(n)[:, None]
    hi = torch.arange(n)[None, :]
    inside = cum[:, 1:][:, None, :] - cum[:, :-1][:, :, None]  # [d_sae, lo, hi]: mass of [lo, hi]
    ok = (inside >= mass - 1e-9) & (hi >= lo)
    span = torch.where(ok, (hi - lo).expand_as(ok), torch.full_like(ok, n, dtype=torch.long))
    best = span.flatten(1).argmin(-1)  # first minimum: lowest lo, then lowest hi
    out = torch.stack([best // n, best % n], dim=-1)
    out[hist.sum(-1) <= 0] = -1
    return out


@dataclass
class LatentLabels:
    """Ground-truth labels of the latents of one SAE (see :func:`label_latents`).

    All tensors are ``[d_sae]``. ``max_top``: the maximum carrying most of the latent's activation
    mass; ``max_purity``: that mass fraction; ``max_mean``: activation-weighted mean maximum;
    ``max_lo``/``max_hi``: shortest range of maxima holding ``range_mass`` of the mass;
    ``gain``: for each secondary variable, the information (nats) the latent carries about it
    beyond what its maxima imply; ``secondary``: the variable with the largest gain;
    ``secondary_top``: that variable's most activation-weighted value; ``alive``: fired at least
    once; ``frequency``: fraction of sequences on which it fires.
    """

    max_top: Tensor
    max_purity: Tensor
    max_mean: Tensor
    max_lo: Tensor
    max_hi: Tensor
    gain: dict[str, Tensor]
    secondary: list[str]
    secondary_top: Tensor
    alive: Tensor
    frequency: Tensor
    range_mass: float = 0.8
    gain_threshold: float = 0.3

    def describe(self, j: int) -> str:
        """A short label such as ``"max 52-55"`` or ``"max 63 | query=63"``."""
        if not bool(self.alive[j]):
            return "dead"
        lo, hi = int(self.max_lo[j]), int(self.max_hi[j])
        text = f"max {lo}" if lo == hi else f"max {lo}-{hi}"
        if float(self.gain[self.secondary[j]][j]) >= self.gain_threshold:
            text += f" | {self.secondary[j]}={int(self.secondary_top[j])}"
        return text

    def describe_all(self) -> list[str]:
        return [self.describe(j) for j in range(len(self.alive))]


def label_latents(
    acts: Float[Tensor, "n d_sae"],
    tokens: Int[Tensor, "n n_ctx"],
    d_vocab: int,
    range_mass: float = 0.8,
    gain_threshold: float = 0.3,
) -> LatentLabels:
    """Label every latent by the maximum first, then by the secondary variable it selects.

    For latent ``j`` with activation-weighted joint distribution ``H_j(m, v)`` of the maximum
    ``m`` and a secondary variable ``v`` (query token, largest non-max token, copies of the max),
    the gain is ``KL(H_j(m, v) || H_j(m) p(v | m))`` in nats, ``p(v | m)`` measured on the same
    sequences: zero for a latent that depends on the maximum alone, ``log 2`` for one that
    keeps half of the values of ``v`` at every maximum. ``describe`` names the secondary variable
    when its gain reaches ``gain_threshold``. The non-max value ``-1`` (all tokens equal) has its
    own bin. ``acts`` should be non-negative; scale by decoder norms beforehand if latents are
    to be compared by magnitude (the labels themselves are scale-free per latent).

    Raises ValueError on mismatched shapes or tokens outside ``[0, d_vocab)``.
    """
    if acts.ndim != 2 or tokens.ndim != 2 or acts.shape[0] != tokens.shape[0]:
        raise ValueError(f"acts [n, d_sae] and tokens [n, n_ctx] must share n, got {tuple(acts.shape)}, {tuple(tokens.shape)}")
    if tokens.min() < 0 or tokens.max() >= d_vocab:
        raise ValueError(f"tokens must lie in [0, {d_vocab}), got range [{tokens.min()}, {tokens.max()}]")
    gt = ground_truth(tokens)
    n_ctx = tokens.shape[1]
    hist = activation_histogram(acts, gt["max"], d_vocab)  # [d_sae, d_vocab]
    purity, top = hist.max(-1)
    rng = max_range(hist, range_mass)
    alive = active(acts).any(0)
    secondary_values = {
        "query": (gt["query"], d_vocab),
        "nonmax": (gt["nonmax"] + 1, d_vocab + 1),  # -1 -> bin 0
        "copies": (gt["copies"] - 1, n_ctx),
    }
    gains: dict[str, Tensor] = {}
    tops: dict[str, Tensor] = {}
    for name, (v, n_v) in secondary_values.items():
        joint_idx = gt["max"] * n_v + v
        joint = activation_histogram(acts, joint_idx, d_vocab * n_v).double().view(-1, d_vocab, n_v)
        counts = torch.bincount(joint_idx, minlength=d_vocab * n_v).double().view(d_vocab, n_v)
        p_v_given_m = counts / counts.sum(-1, keepdim=True).clamp_min(1)  # [d_vocab, n_v]
        baseline = joint.sum(-1, keepdim=True) * p_v_given_m  # [d_sae, d_vocab, n_v]
        ratio = torch.where(joint > 0, joint / baseline.clamp_min(1e-300), torch.ones_like(joint))
        gains[name] = (joint * ratio.log()).sum((-1, -2)).float()
        marginal = joint.sum(1)  # [d_sae, n_v]
        offset = {"query": 0, "nonmax": -1, "copies": 1}[name]
        tops[name] = marginal.argmax(-1) + offset
    stacked = torch.stack([gains[s] for s in SECONDARY_VARIABLES])  # [3, d_sae]
    best = stacked.argmax(0)
    secondary = [SECONDARY_VARIABLES[i] for i in best.tolist()]
    secondary_top = torch.stack([tops[s] for s in SECONDARY_VARIABLES]).gather(0, best[None])[0]
    values = torch.arange(d_vocab, dtype=torch.float32)
    return LatentLabels(
        max_top=torch.where(alive, top, torch.full_like(top, -1)),
        max_purity=purity,
        max_mean=hist @ values,
        max_lo=rng[:, 0],
        max_hi=rng[:, 1],
        gain=gains,
        secondary=secondary,
        secondary_top=secondary_top,
        alive=alive,
        frequency=active(acts).float().mean(0),
        range_mass=range_mass,
        gain_threshold=gain_threshold,
    )


def variance_explained(
    resid: Float[Tensor, "n d_model"], tokens: Int[Tensor, "n n_ctx"], d_vocab: int
) -> dict[str, float]:
    """Fraction of the variance of ``resid`` explained by the group means of each ground-truth
    variable and of the pairs (max, secondary): ``1 - sum ||x - mean_group(x)||^2 / sum ||x - mean(x)||^2``.

    Keys: ``"max"``, ``"query"``, ``"nonmax"``, ``"copies"``, ``"max+query"``, ``"max+nonmax"``,
    ``"max+copies"``. Raises ValueError if ``resid`` and ``tokens`` disagree on ``n``.
    """
    if resid.ndim != 2 or resid.shape[0] != tokens.shape[0]:
        raise ValueError(f"resid [n, d_model] and tokens [n, n_ctx] must share n, got {tuple(resid.shape)}, {tuple(tokens.shape)}")
    gt = ground_truth(tokens)
    codes = {"max": (gt["max"], d_vocab), "query": (gt["query"], d_vocab),
             "nonmax": (gt["nonmax"] + 1, d_vocab + 1), "copies": (gt["copies"] - 1, tokens.shape[1])}
    for name in SECONDARY_VARIABLES:
        v, n_v = codes[name]
        codes[f"max+{name}"] = (gt["max"] * n_v + v, d_vocab * n_v)
    x = resid.double()
    total = (x - x.mean(0)).square().sum()
    out = {}
    for name, (group, n_groups) in codes.items():
        sums = torch.zeros(n_groups, x.shape[1], dtype=torch.float64).index_add_(0, group, x)
        means = sums / torch.bincount(group, minlength=n_groups).clamp_min(1)[:, None]
        out[name] = float(1 - (x - means[group]).square().sum() / total)
    return out


def summarize_labels(labels: LatentLabels, purity: float = 0.5) -> dict[str, float]:
    """Splitting statistics of one SAE from its :class:`LatentLabels`.

    ``alive``: latents that fire; ``median_span``: median number of maxima in a latent's
    ``range_mass`` range; ``pure``: latents with ``max_purity > purity`` (dedicated to one
    maximum); ``maxima_covered``: distinct maxima with a dedicated latent; ``latents_per_max``:
    mean number of dedicated latents per covered maximum; ``secondary_<var>``: latents whose gain
    on that variable reaches ``gain_threshold``.
    """
    alive = labels.alive
    span = (labels.max_hi - labels.max_lo + 1)[alive].double()
    pure = alive & (labels.max_purity > purity)
    covered = labels.max_top[pure].unique().numel()
    out = {
        "alive": int(alive.sum()),
        "median_span": float(span.quantile(0.5)) if len(span) else float("nan"),
        "pure": int(pure.sum()),
        "maxima_covered": covered,
        "latents_per_max": int(pure.sum()) / covered if covered else float("nan"),
    }
    for name in SECONDARY_VARIABLES:
        out[f"secondary_{name}"] = int((alive & (labels.gain[name] >= labels.gain_threshold)).sum())
    return out


def plot_max_histograms(hists: dict[str, Float[Tensor, "d_sae d_vocab"]], title: str = "") -> Figure:
    """One panel per SAE: every alive latent (rows, sorted by activation-weighted mean maximum)
    against the sequence maximum (columns), coloured by the latent's activation mass on that
    maximum (rows of :func:`activation_histogram`). Coarse latents are wide bands; latents
    dedicated to one maximum make a diagonal. Dead (all-zero) rows are dropped.

    Raises ValueError for an empty dict or a histogram that is not 2-D.
    """
    if not hists:
        raise ValueError("hists is empty")
    fig = Figure(figsize=(2.6 * len(hists), 3.2), layout="constrained")
    axes = fig.subplots(1, len(hists), squeeze=False)[0]
    for ax, (name, h) in zip(axes, hists.items()):
        if h.ndim != 2:
            raise ValueError(f"histogram {name!r} must be [d_sae, d_vocab], got {tuple(h.shape)}")
        h = h.detach()[h.sum(-1) > 0].double()
        order = (h @ torch.arange(h.shape[1], dtype=torch.float64)).argsort(stable=True)
        im = ax.imshow(h[order].numpy(), aspect="auto", cmap="Greys", vmin=0.0, vmax=1.0,
                       interpolation="nearest", extent=(-0.5, h.shape[1] - 0.5, len(h) - 0.5, -0.5))
        ax.set_title(f"{name}\n{len(h)} alive latents", fontsize=9)
        ax.set_xlabel("sequence max")
        ax.set_yticks([])
    axes[0].set_ylabel("latents (by mean max)")
    fig.colorbar(im, ax=list(axes), shrink=0.8, label="activation mass")
    if title:
        fig.suptitle(title)
    return fig


# ---------------------------------------------------------------------------- nesting of the split tree
Node = tuple[int, int]  # (level, latent), as in saelib.experiments.feature_trees


@dataclass(frozen=True)
class NestingViolation:
    """A parent -> child link whose child leaves its parent's range of maxima.

    Attributes:
        parent, child: the ``(level, latent)`` nodes.
        parent_range, child_range: ``(lo, hi)`` shortest ranges of maxima holding ``range_mass``
            of each latent's activation mass (:func:`max_range`).
        inside_mass: the child's activation mass on maxima inside ``parent_range`` (0 to 1).
        mass_below, mass_above: its mass on maxima below ``lo`` / above ``hi`` of the parent range.
        child_mean: the child's activation-weighted mean maximum.
        distance: how far ``child_mean`` lies outside the parent range, in maxima (0 if inside).
        side: ``"below"`` or ``"above"``, where most of the outside mass is.
    """

    parent: Node
    child: Node
    parent_range: tuple[int, int]
    child_range: tuple[int, int]
    inside_mass: float
    mass_below: float
    mass_above: float
    child_mean: float
    distance: float
    side: str

    def describe(self) -> str:
        """e.g. ``"0/3 (max 0-18) -> 3/17 (max 29-30): 0.91 of its mass above, mean max 29.4"``."""
        (pl, pi), (cl, ci) = self.parent, self.child
        rng = lambda r: f"max {r[0]}" if r[0] == r[1] else f"max {r[0]}-{r[1]}"
        outside = self.mass_below if self.side == "below" else self.mass_above
        return (f"{pl}/{pi} ({rng(self.parent_range)}) -> {cl}/{ci} ({rng(self.child_range)}): "
                f"{outside:.2f} of its mass {self.side}, mean max {self.child_mean:.1f}")


@dataclass
class SplitNesting:
    """Whether the split tree across widths is nested (see :func:`split_nesting`).

    Per link (``n_links``, in sorted order of ``links``): ``parent_range`` / ``child_range``
    ``[n_links, 2]`` (long, maxima), ``inside_mass`` / ``mass_below`` / ``mass_above`` /
    ``child_mean`` ``[n_links]`` (float64; masses are fractions of the child's activation mass),
    ``nested`` ``[n_links]`` (bool: ``inside_mass >= nested_mass``) and ``range_nested``
    ``[n_links]`` (bool: the child's range lies inside the parent's). ``fraction_nested`` and
    ``fraction_range_nested`` are their means (NaN without links); ``by_level`` maps each parent
    level to the fraction of its links that are nested; ``violations`` lists the links that are
    not nested, largest outside mass first.
    """

    links: list[tuple[Node, Node]]
    parent_range: Tensor
    child_range: Tensor
    inside_mass: Tensor
    mass_below: Tensor
    mass_above: Tensor
    child_mean: Tensor
    nested: Tensor
    range_nested: Tensor
    fraction_nested: float
    fraction_range_nested: float
    by_level: dict[int, float]
    violations: list[NestingViolation]
    range_mass: float
    nested_mass: float

    @property
    def n_links(self) -> int:
        return len(self.links)


def split_nesting(
    links: Any,
    hists: Sequence[Float[Tensor, "d_sae n_values"]],
    range_mass: float = 0.8,
    nested_mass: float | None = None,
) -> SplitNesting:
    """Is the split tree nested: does every child's activation mass over the sequence maximum lie
    inside its parent's range of maxima?

    For each link parent ``(l, i)`` -> child ``(m, j)``: the parent's range ``[lo, hi]`` is the
    shortest range of maxima holding ``range_mass`` of its activation mass (:func:`max_range`, as
    :func:`label_latents` uses for ``max_lo`` / ``max_hi``); the child's ``inside_mass`` is its
    activation mass on maxima in ``[lo, hi]``. The link is **nested** when
    ``inside_mass >= nested_mass`` (default ``range_mass``: the child keeps at least as much of its
    mass inside the parent's range as the parent itself does, so a child that copies its parent is
    nested and one dedicated to a maximum inside the range is too). ``range_nested`` is the
    stricter set test: the child's own ``range_mass`` range lies inside the parent's. This is the
    nesting Gross's splitting picture implies (his comment: a width-``d_vocab`` latent per
    maximum splitting further by secondary variables; a coarse latent's children refine its
    maxima); the criterion and its thresholds are this project's choice.

    Args:
        links: the parent -> child links: a graph whose nodes are ``(level, latent)`` (e.g.
            :func:`saelib.experiments.feature_trees.build_feature_dag` or its
            :func:`~saelib.experiments.feature_trees.best_parent_tree`; its ``edges()`` are used), or an
            iterable of ``(parent, child)`` node pairs.
        hists: per level, ``[d_sae_level, n_values]`` activation histograms over the maximum
            (:func:`activation_histogram` of that SAE's activations and
            ``ground_truth(tokens)["max"]``); rows sum to 1 for alive latents.
        range_mass: mass of the parent's range, in ``(0, 1]`` (``label_latents``'s default 0.8).
        nested_mass: inside mass a nested child needs, in ``(0, 1]``; default ``range_mass``.

    Returns a :class:`SplitNesting`.

    Raises ValueError for a ``range_mass`` / ``nested_mass`` outside ``(0, 1]``, histograms that
    are not 2-D or disagree on ``n_values``, a link whose level or latent has no histogram row, or
    a linked latent whose histogram row is all zero (a dead latent cannot be a parent or child).
    """
    if not (0 < range_mass <= 1):
        raise ValueError(f"range_mass must be in (0, 1], got {range_mass!r}")
    nested_mass = range_mass if nested_mass is None else nested_mass
    if not (0 < nested_mass <= 1):
        raise ValueError(f"nested_mass must be in (0, 1], got {nested_mass!r}")
    hs = [h.detach().double() for h in hists]
    if any(h.ndim != 2 for h in hs) or len({h.shape[1] for h in hs}) > 1:
        raise ValueError(f"hists must be [d_sae, n_values] with one n_values, got {[tuple(h.shape) for h in hs]}")
    pairs = sorted((tuple(a), tuple(b)) for a, b in (links.edges() if hasattr(links, "edges") else links))
    n_values = hs[0].shape[1] if hs else 0
    values = torch.arange(n_values, dtype=torch.float64)
    ranges = [max_range(h, range_mass) for h in hs]  # per level [d_sae, 2]

    def row(node: Node) -> Tensor:
        level, j = node
        if not (0 <= level < len(hs)) or not (0 <= j < hs[level].shape[0]):
            raise ValueError(f"link node {node} has no histogram row ({len(hs)} levels)")
        if hs[level][j].sum() <= 0:
            raise ValueError(f"link node {node} is a dead latent (all-zero histogram row)")
        return hs[level][j]

    p_rng, c_rng, inside, below, above, mean = [], [], [], [], [], []
    for parent, child in pairs:
        row(parent)
        h = row(child) / row(child).sum()  # [n_values]
        lo, hi = ranges[parent[0]][parent[1]].tolist()
        p_rng.append((lo, hi))
        c_rng.append(tuple(ranges[child[0]][child[1]].tolist()))
        inside.append(float(h[lo:hi + 1].sum()))
        below.append(float(h[:lo].sum()))
        above.append(float(h[hi + 1:].sum()))
        mean.append(float(h @ values))
    t = lambda xs: torch.tensor(xs, dtype=torch.float64)
    parent_range = torch.tensor(p_rng, dtype=torch.long).reshape(-1, 2)
    child_range = torch.tensor(c_rng, dtype=torch.long).reshape(-1, 2)
    inside_t = t(inside)
    nested = inside_t >= nested_mass - 1e-9
    range_nested = (child_range[:, 0] >= parent_range[:, 0]) & (child_range[:, 1] <= parent_range[:, 1])
    frac = lambda b: float(b.double().mean()) if len(b) else float("nan")
    levels = sorted({p[0] for p, _ in pairs})
    by_level = {lv: frac(nested[[p[0] == lv for p, _ in pairs]]) for lv in levels}
    violations = []
    for k in torch.nonzero(~nested).flatten().tolist():
        lo, hi = p_rng[k]
        side = "below" if below[k] > above[k] else "above"
        distance = max(lo - mean[k], mean[k] - hi, 0.0)
        violations.append(NestingViolation(pairs[k][0], pairs[k][1], p_rng[k], c_rng[k], inside[k], below[k],
                                           above[k], mean[k], distance, side))
    violations.sort(key=lambda v: (v.inside_mass, v.parent, v.child))
    return SplitNesting(
        links=pairs, parent_range=parent_range, child_range=child_range, inside_mass=inside_t,
        mass_below=t(below), mass_above=t(above), child_mean=t(mean), nested=nested, range_nested=range_nested,
        fraction_nested=frac(nested), fraction_range_nested=frac(range_nested), by_level=by_level,
        violations=violations, range_mass=range_mass, nested_mass=nested_mass,
    )


@dataclass
class MaximaCoverage:
    """Which sequence maxima have a latent dedicated to them (see :func:`maxima_coverage`).

    Attributes:
        dedicated: ``[n_values]`` long, dedicated latents per maximum.
        covered: maxima with at least one dedicated latent.
        exactly_one: maxima with exactly one (Gross's "one feature for each sequence maximum").
        uncovered: the maxima without one, ascending.
        n_values: number of maxima (``d_vocab``).
        fraction: ``covered / n_values``.
        purity: the purity threshold used.
    """

    dedicated: Tensor
    covered: int
    exactly_one: int
    uncovered: list[int]
    n_values: int
    fraction: float
    purity: float


def maxima_coverage(labels: LatentLabels, d_vocab: int, purity: float = 0.5) -> MaximaCoverage:
    """Coverage of the ``d_vocab`` sequence maxima by dedicated latents.

    A latent is dedicated to maximum ``m`` when it is alive, ``max_top == m`` and
    ``max_purity > purity`` (more than ``purity`` of its activation mass on ``m``; notebook 05's
    ``PURITY``), as in :func:`summarize_labels`, whose ``maxima_covered`` equals ``covered``.
    Gross (comment on Apollo Research 2024) predicts that an SAE of width ``d_vocab`` "should find one feature for
    each sequence maximum (roughly)": ``covered == exactly_one == d_vocab``.

    Raises ValueError unless ``0 <= purity < 1`` and ``d_vocab >= 1``, or if a dedicated latent's
    maximum is outside ``[0, d_vocab)``.
    """
    if not (0 <= purity < 1):
        raise ValueError(f"purity must be in [0, 1), got {purity!r}")
    if not isinstance(d_vocab, int) or d_vocab < 1:
        raise ValueError(f"d_vocab must be an int >= 1, got {d_vocab!r}")
    tops = labels.max_top[labels.alive & (labels.max_purity > purity)]
    if len(tops) and (tops.min() < 0 or tops.max() >= d_vocab):
        raise ValueError(f"dedicated latents' maxima must lie in [0, {d_vocab}), got {tops.tolist()}")
    dedicated = torch.bincount(tops, minlength=d_vocab)
    covered = int((dedicated > 0).sum())
    return MaximaCoverage(
        dedicated=dedicated, covered=covered, exactly_one=int((dedicated == 1).sum()),
        uncovered=torch.nonzero(dedicated == 0).flatten().tolist(), n_values=d_vocab,
        fraction=covered / d_vocab, purity=purity,
    )


@dataclass
class SplitRun:
    """One seed's SAEs across widths, analysed as notebook 05 does (see :func:`analyse_split_run`).

    Attributes:
        widths: the SAE widths, narrowest first (level ``l`` of the graphs is ``widths[l]``).
        labels: per width, the :class:`LatentLabels` of its latents.
        summary: per width, :func:`summarize_labels` plus ``"distinct"`` (groups of latents that
            are not duplicates, :func:`saelib.experiments.feature_trees.duplicate_groups`).
        dag: parent -> child links between consecutive widths (directed MCS >= threshold).
        tree: the best-parent forest of ``dag``.
        root: the narrowest-width node whose descendants at width ``d_vocab`` are dedicated to the
            most distinct maxima; ``split_maxima`` those maxima (ascending).
        nesting: :func:`split_nesting` of the best-parent tree.
        coverage: :func:`maxima_coverage` at width ``d_vocab``.
        chain: widths spanned by the longest parent -> child chain of ``tree``.
    """

    widths: list[int]
    labels: dict[int, LatentLabels]
    summary: dict[int, dict[str, float]]
    dag: Any
    tree: Any
    root: tuple[int, int]
    split_maxima: list[int]
    nesting: SplitNesting
    coverage: MaximaCoverage
    chain: int

    @property
    def coarse_ratio(self) -> float:
        """Median maxima per latent at the narrowest width over that at width ``d_vocab``."""
        return self.summary[self.widths[0]]["median_span"] / self.summary[self.coverage.n_values]["median_span"]


def analyse_split_run(
    acts: Sequence[Float[Tensor, "n d_sae"]],
    tokens: Int[Tensor, "n n_ctx"],
    widths: Sequence[int],
    d_vocab: int,
    threshold: float = 0.6,
    purity: float = 0.5,
) -> SplitRun:
    """Label one seed's SAEs (``acts[l]``: width ``widths[l]``'s decoder-norm-scaled activations
    on ``tokens``), link consecutive widths by directed masked cosine similarity (Nabeshima;
    :mod:`saelib.experiments.feature_trees`), and measure Gross's splitting claims: how a
    narrow latent splits into latents dedicated to single maxima, whether the split tree is
    nested (:func:`split_nesting`), and how many maxima get a latent at width ``d_vocab``
    (:func:`maxima_coverage`).

    Raises ValueError if ``acts`` and ``widths`` differ in length, ``d_vocab`` is not one of the
    widths, or as the functions called.
    """
    widths = list(widths)
    if len(acts) != len(widths):
        raise ValueError(f"got {len(acts)} activation tensors for {len(widths)} widths")
    if d_vocab not in widths:
        raise ValueError(f"d_vocab={d_vocab} must be one of the widths {widths}")
    labels = {w: label_latents(a, tokens, d_vocab) for w, a in zip(widths, acts)}
    summary = {w: {**summarize_labels(labels[w], purity), "distinct": len(ft.duplicate_groups(a))}
               for w, a in zip(widths, acts)}
    dag = ft.build_feature_dag(list(acts), threshold=threshold, labels=[labels[w].describe_all() for w in widths])
    tree = ft.best_parent_tree(dag)
    level_vocab, lab = widths.index(d_vocab), labels[d_vocab]
    split = {r: sorted({int(lab.max_top[j]) for _, j in ft.descendants_at_level(tree, r, level_vocab)
                        if lab.max_purity[j] > purity}) for r in sorted(n for n in tree if n[0] == 0)}
    root = max(split, key=lambda r: len(split[r]))  # the first such root on ties
    hists = [activation_histogram(a, ground_truth(tokens)["max"], d_vocab) for a in acts]
    return SplitRun(
        widths=widths, labels=labels, summary=summary, dag=dag, tree=tree, root=root, split_maxima=split[root],
        nesting=split_nesting(tree, hists, labels[widths[0]].range_mass),
        coverage=maxima_coverage(lab, d_vocab, purity), chain=len(ft.longest_chain(tree)),
    )
