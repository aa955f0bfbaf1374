"""The sparse-MLP experiment (Nabeshima 2024b, REFERENCES.md): transcoders
trained on an LM's MLP layers over a sweep of sparsity penalties, spliced into the model to
measure loss recovered, compared neuron by neuron with the original MLP, and set against the
published numbers in tables and figures.

What a transcoder (sparse MLP) is, where it reads and writes, and how its normalisation folds
into its weights: :mod:`saelib.core.transcoder` (:class:`~saelib.core.transcoder.SparseMLP`,
:func:`~saelib.core.transcoder.mlp_hook_names`, :func:`~saelib.core.transcoder.fold_scales`).

**Penalty and normalisation.** Nabeshima's objective is MSE plus ``2**S`` times the mean latent
activation per token. Here, before training, inputs and targets are each multiplied by a fixed
scalar so that their mean squared norm over the training tokens equals ``d_model`` (one unit of
variance per dimension; :func:`saelib.core.normalisation.normalisation_scale`). The objective
per instance is then::

    mean_tokens ||y - y_hat||² / d_model  +  2**S * mean_tokens mean_j (a_j * ||W_dec[j]||)

i.e. per-element MSE plus ``2**S`` times the mean over latents of the decoder-norm-weighted
activation (weighting by the decoder norm stops the optimiser from shrinking activations while
growing decoder rows; with unit-norm decoder rows it is the plain mean activation). In
:func:`saelib.core.train.train_sae` units (squared error summed over ``d_model``, penalty summed
over latents) that is ``l1_coeff = d_model * 2**S / d_sae``. After training the two scalars are
folded into the weights (:func:`saelib.core.transcoder.fold_scales`), so a trained sparse MLP
maps raw MLP inputs to raw MLP outputs and latent activations are unchanged.

**Loss recovered** (:func:`spliced_losses`), on held-out sequences, with the MLP output of one
layer replaced at every position except BOS (position 0) by, in turn, zeros, its mean over the
training tokens, and each sparse MLP's output::

    loss recovered      = 1 - (L_sparse - L_orig) / (L_zero - L_orig)
    loss recovered (mean ablation) = 1 - (L_sparse - L_orig) / (L_mean - L_orig)

Averaging order: each ``L`` is the mean next-token cross-entropy over every predicted token of
the held-out set (positions 1..pos-1 of every sequence, all tokens weighted equally); the ratio is
taken of these means (not a mean of per-batch or per-sequence ratios). The KL column is
``mean_tokens KL(p_orig || p_spliced)`` in nats over the same predicted tokens.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import torch
from jaxtyping import Float, Int
from matplotlib import colormaps
from matplotlib.figure import Figure
from torch import Tensor
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer, utils

from ..core.metrics import active, cosine_matrix
from ..core.normalisation import normalisation_scale
from ..core.precision import autocast, resolve_precision
from ..core.sae import SAE, SAEConfig
from ..core.train import TrainConfig, train_sae
from ..core.transcoder import SparseMLP, fold_scales, mlp_hook_names
from .bootstrap import ConfidenceInterval, bootstrap_ratio_ci

if TYPE_CHECKING:
    from ..data.corpus import DocumentTokens
    from ..lm.models import LanguageModel

__all__ = [
    "NABESHIMA_LOSS_ORIG",
    "NABESHIMA_LOSS_ZERO",
    "NABESHIMA_LOSS_SPARSE_S6",
    "NABESHIMA_RECOVERED_S6",
    "ANTHROPIC_A1_RECOVERED",
    "SPARSE_MLP_TRAINING",
    "SparseMLPConfig",
    "LossRecovered",
    "penalty_coefficients",
    "sparse_mlp_train_config",
    "train_sparse_mlps",
    "train_sparse_mlps_with_checkpoints",
    "spliced_losses_many",
    "loss_recovered",
    "spliced_losses",
    "neuron_cosines",
    "max_neuron_cosines",
    "SparseMLPSweep",
    "sparse_mlp_sweep",
    "recovered_at_l0",
    "loss_recovered_table",
    "loss_recovered_overview",
    "plot_loss_recovered",
    "plot_neuron_cosines",
]

# Published numbers (Nabeshima 2024b): 4-layer ReLU TinyStories model, 20K sparse neurons per
# layer, S = 6; and Anthropic's A/1 autoencoder (Towards Monosemanticity, Bricken et al. 2023).
NABESHIMA_LOSS_ORIG = 1.128
NABESHIMA_LOSS_ZERO = (3.72, 1.84, 1.56, 2.07)
NABESHIMA_LOSS_SPARSE_S6 = (1.24, 1.18, 1.21, 1.26)
NABESHIMA_RECOVERED_S6 = (0.96, 0.93, 0.81, 0.86)
ANTHROPIC_A1_RECOVERED = 0.79


# The training settings of the sparse-MLP sweep: Adam (betas 0.9, 0.999) at a peak learning rate of 2e-3,
# 50 warm-up steps, constant, then a linear decay to 10 % over the last 30 % of the steps; the penalty
# ramps up from 0 over the first 10 %. The sparsity settings (``l1_coeff`` from ``S``, the L1 penalty
# scaled by decoder norms) and ``log_every`` are set by :func:`train_sparse_mlps`.
SPARSE_MLP_TRAINING = TrainConfig(
    steps=1500, batch_size=512, lr=2e-3, betas=(0.9, 0.999), warmup_steps=50, l1_warmup_frac=0.1, decay_frac=0.3
)
_SET_BY_TRAIN_SPARSE_MLPS = ("l1_coeff", "penalty", "scale_penalty_by_decoder_norm", "log_every")


@dataclass(init=False)
class SparseMLPConfig:
    """Sparse-MLP sweep settings (one :class:`SAE` instance per penalty exponent ``S``).

    Attributes:
        S_values: penalty exponents; the penalty is ``2**S`` on the mean latent activation per
            token (see the module docstring for the normalisation).
        d_sae: sparse neurons per sparse MLP.
        train: how each layer's sparse MLPs train (steps, tokens per step ``batch_size``, the
            Adam schedule, ``seed`` of the initialisation and of the token sampling, ``progress``
            bars, ...): :data:`SPARSE_MLP_TRAINING` unless given. Its ``l1_coeff``, ``penalty``,
            ``scale_penalty_by_decoder_norm`` and ``log_every`` are set by
            :func:`train_sparse_mlps`.
        device: where the sparse MLPs train and live (``SAEConfig.device``; the stored
            activations may stay on the CPU).
        dtype: their parameter dtype (``SAEConfig.dtype``).

    Any other keyword argument is a :class:`saelib.core.train.TrainConfig` field and replaces
    that field of ``train``: ``SparseMLPConfig(steps=300, seed=1)`` trains as
    ``SparseMLPConfig(train=dataclasses.replace(SPARSE_MLP_TRAINING, steps=300, seed=1))``.

    Raises ValueError for empty or non-finite ``S_values``, or a keyword among the four fields
    that :func:`train_sparse_mlps` sets; TypeError for a keyword that is not a ``TrainConfig``
    field; what ``TrainConfig`` raises for a bad value.
    """

    S_values: tuple[float, ...]
    d_sae: int
    train: TrainConfig
    device: str
    dtype: str

    def __init__(
        self,
        S_values: Sequence[float] = (-2.0, 0.0, 2.0, 4.0),
        d_sae: int = 2048,
        train: TrainConfig | None = None,
        device: str = "cpu",
        dtype: str = "float32",
        **train_fields: Any,
    ) -> None:
        fixed = [k for k in _SET_BY_TRAIN_SPARSE_MLPS if k in train_fields]
        if fixed:
            raise ValueError(f"SparseMLPConfig: {fixed} are set by train_sparse_mlps from S_values and steps")
        self.S_values = tuple(float(s) for s in S_values)
        self.d_sae = d_sae
        self.train = replace(SPARSE_MLP_TRAINING if train is None else train, **train_fields)
        self.device = device
        self.dtype = dtype
        if not self.S_values:
            raise ValueError("SparseMLPConfig.S_values must not be empty")
        if not all(math.isfinite(s) for s in self.S_values):
            raise ValueError(f"SparseMLPConfig.S_values must be finite, got {self.S_values}")


def penalty_coefficients(S_values: Sequence[float], d_model: int, d_sae: int) -> list[float]:
    """``l1_coeff`` per instance for :func:`saelib.core.train.train_sae`: ``d_model * 2**S / d_sae``
    (see the module docstring)."""
    return [d_model * 2.0**s / d_sae for s in S_values]


def train_sparse_mlps(
    mlp_in: Float[Tensor, "n_tok d_model"],
    mlp_out: Float[Tensor, "n_tok d_model"],
    cfg: SparseMLPConfig,
    layer: int = 0,
    hooks: tuple[str, str] = ("", ""),
) -> SparseMLP:
    """Train one sparse MLP per ``S`` in ``cfg.S_values`` (as instances of one SAE) to map
    ``mlp_in`` to ``mlp_out`` (stored activations, BOS excluded; see the module docstring for the
    objective), and fold the normalisation into the weights.

    Raises ValueError if the two tensors differ in length or are not 2-D, and
    :class:`saelib.core.train.TrainingDivergedError` if training diverges.
    """
    return train_sparse_mlps_with_checkpoints(mlp_in, mlp_out, cfg, layer, hooks)[-1]


def train_sparse_mlps_with_checkpoints(
    mlp_in: Float[Tensor, "n_tok d_model"],
    mlp_out: Float[Tensor, "n_tok d_model"],
    cfg: SparseMLPConfig,
    layer: int = 0,
    hooks: tuple[str, str] = ("", ""),
    checkpoints: Sequence[int] = (),
) -> list[SparseMLP]:
    """:func:`train_sparse_mlps`, also keeping the sparse MLPs after each of ``checkpoints``
    optimiser steps (each in ``[1, cfg.train.steps)``) of the same run: returns them, fewest steps
    first, then the trained ones (last). Training tokens drawn at a checkpoint: ``steps *
    cfg.train.batch_size``. Raises ValueError for a checkpoint out of range, and as
    :func:`train_sparse_mlps`.
    """
    import copy

    steps = sorted({int(c) for c in checkpoints})
    if any(not 1 <= c < cfg.train.steps for c in steps):
        raise ValueError(f"checkpoints must be step counts in [1, steps={cfg.train.steps}), got {list(checkpoints)}")
    if mlp_in.ndim != 2 or mlp_out.ndim != 2 or len(mlp_in) != len(mlp_out):
        raise ValueError(f"mlp_in and mlp_out must be [n_tok, d] with equal n_tok, got {tuple(mlp_in.shape)}, {tuple(mlp_out.shape)}")
    d_model_in, d_model_out = mlp_in.shape[1], mlp_out.shape[1]
    in_scale, out_scale = normalisation_scale(mlp_in), normalisation_scale(mlp_out)
    sae_cfg = SAEConfig(
        d_in=d_model_in,
        d_sae=cfg.d_sae,
        d_out=d_model_out,
        n_inst=len(cfg.S_values),
        apply_b_dec_to_input=False,
        architecture="relu",
        seed=cfg.train.seed,
        device=cfg.device,
        dtype=cfg.dtype,
    )
    sae = SAE(sae_cfg)
    train_cfg = sparse_mlp_train_config(cfg, d_model_out)
    snapshots: list[SAE] = []

    def keep(step: int, trained: SAE) -> None:  # step counts from 0: the state after step + 1 steps
        if step + 1 in steps:
            snapshots.append(copy.deepcopy(trained).eval())

    history = train_sae(sae, (mlp_in * in_scale, mlp_out * out_scale), train_cfg, callback=keep if steps else None)
    out = []
    for trained in snapshots + [sae]:
        fold_scales(trained, in_scale, out_scale)
        out.append(SparseMLP(trained, layer, cfg.S_values, hooks[0], hooks[1], in_scale, out_scale,
                             history if trained is sae else None))
    return out


def sparse_mlp_train_config(cfg: SparseMLPConfig, d_model_out: int) -> TrainConfig:
    """The :class:`saelib.core.train.TrainConfig` that :func:`train_sparse_mlps` trains with:
    ``cfg.train`` with the L1 penalty scaled by decoder norms, one ``l1_coeff`` per ``S``
    (:func:`penalty_coefficients` for targets of width ``d_model_out``) and 20 logged rows."""
    return replace(
        cfg.train,
        l1_coeff=penalty_coefficients(cfg.S_values, d_model_out, cfg.d_sae),
        penalty="l1",
        scale_penalty_by_decoder_norm=True,
        log_every=max(1, cfg.train.steps // 20),
    )


# ---------------------------------------------------------------------------------------- loss recovered
def loss_recovered(loss_spliced: float | Tensor, loss_orig: float, loss_ablated: float) -> float | Tensor:
    """``1 - (L_spliced - L_orig) / (L_ablated - L_orig)``: 1 when splicing costs nothing, 0 when
    it is as bad as the ablation. Raises ValueError if ``L_ablated <= L_orig`` (undefined)."""
    if not loss_ablated > loss_orig:
        raise ValueError(f"loss recovered needs L_ablated > L_orig, got {loss_ablated} <= {loss_orig}")
    return 1 - (loss_spliced - loss_orig) / (loss_ablated - loss_orig)


@dataclass
class LossRecovered:
    """Spliced losses for one layer (nats per predicted token, held-out text).

    ``loss_sparse`` and ``kl_sparse`` hold one value per ``S``; ``kl_*`` is the mean
    ``KL(p_orig || p_spliced)``; ``l0`` is each instance's mean number of active sparse neurons
    per spliced held-out token. ``per_document`` holds each held-out document's sums (float64,
    ``[n_docs]``; ``[inst, n_docs]`` for ``"sparse"`` and ``"kl_sparse"``): ``"orig"``, ``"zero"``,
    ``"sparse"`` (cross-entropy summed over its predicted tokens), ``"kl_sparse"``, ``"n_pred"``,
    for the bootstrap intervals :meth:`recovered_ci` and :meth:`kl_ci`."""

    layer: int
    S_values: tuple[float, ...]
    loss_orig: float
    loss_zero: float
    loss_mean: float
    loss_sparse: list[float]
    kl_zero: float
    kl_mean: float
    kl_sparse: list[float]
    l0: list[float]
    n_tokens: int
    per_document: dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    def recovered_ci(self, instance: int, n_boot: int = 1000, level: float = 0.95, seed: int = 0) -> ConfidenceInterval:
        """Loss recovered of sparse MLP ``instance`` (zero ablation) with a percentile-bootstrap
        interval over held-out documents: the ratio of the per-document sums of ``L_zero -
        L_sparse`` and ``L_zero - L_orig`` (:func:`saelib.experiments.bootstrap.bootstrap_ratio_ci`;
        its estimate equals :attr:`recovered`). Raises ValueError when the per-document sums were
        not kept (a result not made by :func:`spliced_losses`), and as the bootstrap does."""
        if not self.per_document:
            raise ValueError("no per-document losses: compute the result with spliced_losses")
        d = self.per_document
        return bootstrap_ratio_ci(d["zero"] - d["sparse"][instance], d["zero"] - d["orig"], n_boot, level, seed)

    def kl_ci(self, instance: int, n_boot: int = 1000, level: float = 0.95, seed: int = 0) -> ConfidenceInterval:
        """Mean KL(p_orig || p_spliced) per predicted token of sparse MLP ``instance``, with a
        bootstrap interval over held-out documents (nats). Raises ValueError as :meth:`recovered_ci`."""
        if not self.per_document:
            raise ValueError("no per-document losses: compute the result with spliced_losses")
        d = self.per_document
        return bootstrap_ratio_ci(d["kl_sparse"][instance], d["n_pred"], n_boot, level, seed)

    @property
    def recovered(self) -> list[float]:
        """Loss recovered against zero-ablation, per ``S``."""
        return [float(loss_recovered(s, self.loss_orig, self.loss_zero)) for s in self.loss_sparse]

    @property
    def recovered_vs_mean(self) -> list[float]:
        """Loss recovered against mean-ablation, per ``S``."""
        return [float(loss_recovered(s, self.loss_orig, self.loss_mean)) for s in self.loss_sparse]


def _ce_and_kl(
    logits: Float[Tensor, "b pos vocab"],
    ref: tuple[Tensor, Tensor] | None,
    tokens: Int[Tensor, "b pos"],
    valid: Tensor,
) -> tuple[Tensor, Tensor, tuple[Tensor, Tensor]]:
    """Per row ``[b]``: next-token cross-entropy and KL(ref || this) summed over the predicted
    tokens that are ``valid`` (``[b, pos-1]`` bool: the target lies inside its document), float32
    per token, float64 sums on the CPU (KL zeros without ``ref``); and this pass as a reference:
    ``(probs [b, pos, vocab], sum_v p log p [b, pos])``.

    With ``z`` the logits and ``lse`` their log-sum-exp, ``log p = z - lse``, so the cross-entropy
    is ``lse - z[target]`` and ``KL(ref || this) = sum_v q log q - sum_v q z + lse`` (``q`` the
    reference probabilities, which sum to 1): one log-sum-exp and one dot product per token, with no
    vocabulary-sized temporary."""
    z = logits.float()  # [b, pos, vocab]
    b, pos, vocab = z.shape
    lse = torch.logsumexp(z, -1)  # [b, pos]
    nxt = torch.cat([tokens[:, 1:], tokens[:, :1]], 1)  # the next token (the last position's is unused)
    ce = (lse - z.gather(-1, nxt[..., None])[..., 0])[:, :-1]  # [b, pos-1]
    kl = torch.zeros(b, dtype=torch.float64)
    if ref is None:
        logp = z - lse[..., None]
        probs = logp.exp()
        ref = (probs, torch.bmm(probs.view(-1, 1, vocab), logp.view(-1, vocab, 1)).view(b, pos))
    else:
        probs, neg_entropy = ref
        cross = torch.bmm(probs.view(-1, 1, vocab), z.reshape(-1, vocab, 1)).view(b, pos)  # sum_v q z
        kl = (neg_entropy - cross + lse)[:, :-1].double().masked_fill(~valid, 0).sum(-1).cpu()
    return ce.double().masked_fill(~valid, 0).sum(-1).cpu(), kl, ref


@torch.no_grad()
def spliced_losses(
    model: HookedTransformer,
    tokens: "Int[Tensor, 'n_seq pos'] | DocumentTokens",
    sparse_mlp: SparseMLP,
    mean_mlp_out: Float[Tensor, " d_model"],
    tokens_per_batch: int = 2048,
    skip_bos: bool = True,
    progress: bool = True,
    precision: str = "float32",
) -> LossRecovered:
    """Original, zero-ablated, mean-ablated and sparse-MLP-spliced losses for one layer (see the
    module docstring for definitions and the averaging order).

    ``tokens``: full rows ``[n_seq, pos]``, or document-aligned rows
    (:class:`saelib.data.corpus.DocumentTokens`), whose padding is never predicted nor read (a causal
    model's valid positions do not see it). Rows are batched by length, ``tokens_per_batch``
    tokens per forward pass. One clean pass per batch caches the residual stream before the MLP
    (``hook_resid_mid``), the MLP's input and output; every variant then writes
    ``resid_mid + new MLP output`` and runs only the blocks after the layer
    (``start_at_layer``), which gives the same logits as replacing ``hook_mlp_out`` in a full
    pass (tested) at a fraction of the cost for late layers. Each held-out row is one document
    (for :meth:`LossRecovered.recovered_ci`).

    The replacement happens at positions 1.. when ``skip_bos`` (BOS keeps its own MLP output in
    every variant, since the sparse MLP never saw BOS in training), else at every position.
    ``precision`` (``"float32"``, ``"bfloat16"`` or ``"auto"``, :mod:`saelib.core.precision`):
    every forward (the model's and the sparse MLP's) runs in it; the losses and KL are computed
    from float32 log-probabilities either way.
    Raises ValueError if ``mean_mlp_out`` has the wrong width, or for an unknown ``precision``.
    """
    return spliced_losses_many(model, tokens, [sparse_mlp], mean_mlp_out, tokens_per_batch, skip_bos, progress,
                               precision)[0]


@torch.no_grad()
def spliced_losses_many(
    model: HookedTransformer,
    tokens: "Int[Tensor, 'n_seq pos'] | DocumentTokens",
    sparse_mlps: Sequence[SparseMLP],
    mean_mlp_out: Float[Tensor, " d_model"],
    tokens_per_batch: int = 2048,
    skip_bos: bool = True,
    progress: bool = True,
    precision: str = "float32",
) -> list[LossRecovered]:
    """:func:`spliced_losses` of several sparse MLPs of one layer (e.g. the checkpoints of one
    run), sharing the clean pass and the two ablations: one :class:`LossRecovered` per sparse MLP,
    in order, each the same as :func:`spliced_losses` of it alone. Raises ValueError for an empty
    list or sparse MLPs of different layers, and as :func:`spliced_losses`."""
    from ..lm.activations import length_batches
    from ..data.corpus import DocumentTokens

    d_model = model.cfg.d_model
    if not sparse_mlps or len({sm.layer for sm in sparse_mlps}) != 1:
        raise ValueError(f"need sparse MLPs of one layer, got layers {[sm.layer for sm in sparse_mlps]}")
    if mean_mlp_out.shape != (d_model,):
        raise ValueError(f"mean_mlp_out must be [{d_model}], got {tuple(mean_mlp_out.shape)}")
    if not isinstance(tokens, DocumentTokens):
        n, pos = tokens.shape
        tokens = DocumentTokens(tokens, torch.full((n,), pos, dtype=torch.long, device=tokens.device),
                                tuple(map(str, range(n))), 0, torch.zeros(n, dtype=torch.bool, device=tokens.device))
    layer = sparse_mlps[0].layer
    in_hook, out_hook = mlp_hook_names(model, layer)
    mid_hook = utils.get_act_name("resid_mid", layer)
    n_docs = len(tokens.lengths)
    start = 1 if skip_bos else 0
    per_doc = {name: np.zeros(n_docs) for name in ("orig", "zero", "mean", "kl_zero", "kl_mean", "n_pred")}
    sparse = [{"ce": np.zeros((sm.sae.n_inst, n_docs)), "kl": np.zeros((sm.sae.n_inst, n_docs)),
               "l0": np.zeros(sm.sae.n_inst)} for sm in sparse_mlps]
    n_spliced = 0
    cache: dict[str, Tensor] = {}
    device = next(model.parameters()).device  # tokens go to the model
    precision = resolve_precision(precision, device)

    def keep(act: Tensor, hook: Any) -> None:
        cache[hook.name] = act

    batches = length_batches(tokens.lengths, tokens_per_batch)
    for rows in tqdm(batches, disable=not progress, desc=f"splice layer {layer}", mininterval=1.0):
        width = int(tokens.lengths[rows[0]])
        batch = tokens.tokens[rows, :width].to(device)
        valid_pos = torch.arange(width, device=device)[None, :] < tokens.lengths[rows, None].to(device)  # [b, width]
        valid = valid_pos[:, 1:]  # predicted tokens inside their document
        spliced = valid_pos.clone()
        spliced[:, :start] = False  # positions whose MLP output is replaced
        with autocast(precision, device):
            logits = model.run_with_hooks(batch, fwd_hooks=[(h, keep) for h in (mid_hook, in_hook, out_hook)])
        ce, _, ref = _ce_and_kl(logits, None, batch, valid)
        per_doc["orig"][rows] = ce.numpy()
        per_doc["n_pred"][rows] = valid.sum(-1).cpu().numpy()
        mid, mlp_in, mlp_out = cache[mid_hook], cache[in_hook], cache[out_hook]

        def splice(value: Tensor) -> tuple[Tensor, Tensor]:  # value: [d_model] or [b, width, d_model]
            new_out = mlp_out.clone()
            new_out[:, start:] = value[:, start:] if value.ndim == 3 else value
            with autocast(precision, device):
                logits = model(mid + new_out, start_at_layer=layer + 1)
            ce, kl, _ = _ce_and_kl(logits, ref, batch, valid)
            return ce, kl

        for name, value in (("zero", mlp_out.new_zeros(d_model)), ("mean", mean_mlp_out.to(mlp_out))):
            ce, kl = splice(value)
            per_doc[name][rows], per_doc[f"kl_{name}"][rows] = ce.numpy(), kl.numpy()
        for sm, sums in zip(sparse_mlps, sparse):
            with autocast(precision, sm.sae.W_enc.device):  # one encode for every instance
                flat_out, flat_acts = sm.sae(mlp_in.reshape(-1, mlp_in.shape[-1]).to(sm.sae.W_enc))
            outs = flat_out.to(mlp_out).reshape(*mlp_in.shape[:2], sm.sae.n_inst, -1)  # [b, width, inst, d_model]
            acts = flat_acts.to(mlp_out.device).reshape(*mlp_in.shape[:2], sm.sae.n_inst, -1)  # [b, width, inst, d_sae]
            for i in range(sm.sae.n_inst):
                ce, kl = splice(outs[..., i, :])
                sums["ce"][i, rows], sums["kl"][i, rows] = ce.numpy(), kl.numpy()
                sums["l0"][i] += float(active(acts[..., i, :][spliced]).sum())
        n_spliced += int(spliced.sum())
    n_pred = per_doc["n_pred"].sum()
    return [LossRecovered(
        layer=layer,
        S_values=tuple(sm.S_values),
        loss_orig=float(per_doc["orig"].sum() / n_pred),
        loss_zero=float(per_doc["zero"].sum() / n_pred),
        loss_mean=float(per_doc["mean"].sum() / n_pred),
        loss_sparse=(sums["ce"].sum(-1) / n_pred).tolist(),
        kl_zero=float(per_doc["kl_zero"].sum() / n_pred),
        kl_mean=float(per_doc["kl_mean"].sum() / n_pred),
        kl_sparse=(sums["kl"].sum(-1) / n_pred).tolist(),
        l0=(sums["l0"] / max(n_spliced, 1)).tolist(),
        n_tokens=int(n_pred),
        per_document={"orig": per_doc["orig"], "zero": per_doc["zero"], "sparse": sums["ce"],
                      "kl_sparse": sums["kl"], "n_pred": per_doc["n_pred"]},
    ) for sm, sums in zip(sparse_mlps, sparse)]


# ---------------------------------------------------------------------------------------- neuron cosines
def neuron_cosines(model: HookedTransformer, sparse_mlp: SparseMLP) -> dict[str, Float[Tensor, "inst d_sae d_mlp"]]:
    """Cosine similarity of every sparse neuron with every original MLP neuron of the layer:
    ``"enc"`` compares encoder columns with the MLP's input weights ``W_in`` (columns; for a
    model with normalisation, scaled by the ``ln2`` weight so both read the same vector), and
    ``"dec"`` compares decoder rows with the MLP's output weights ``W_out`` (rows).

    For a gated MLP the input weights are ``W_in`` (the linear branch), not ``W_gate``.
    Source: Nabeshima 2024b (the "neuron simulator" effect fading as S grows).
    """
    block = model.blocks[sparse_mlp.layer]
    W_in = block.mlp.W_in.detach()  # [d_model, d_mlp]
    W_out = block.mlp.W_out.detach()  # [d_mlp, d_model]
    ln2 = getattr(block, "ln2", None)
    if ln2 is not None and hasattr(ln2, "w"):
        W_in = W_in * ln2.w.detach()[:, None]
    enc = torch.stack([cosine_matrix(sparse_mlp.sae.W_enc[i].detach().T, W_in.T) for i in range(sparse_mlp.sae.n_inst)])
    dec = torch.stack([cosine_matrix(sparse_mlp.sae.W_dec[i].detach(), W_out) for i in range(sparse_mlp.sae.n_inst)])
    return {"enc": enc, "dec": dec}


def max_neuron_cosines(
    cos: Float[Tensor, "inst d_sae d_mlp"], alive: Float[Tensor, "inst d_sae"] | None = None
) -> list[Float[Tensor, " n_alive"]]:
    """For each instance, every (alive) sparse neuron's largest cosine with any original neuron."""
    best = cos.max(dim=-1).values  # [inst, d_sae]
    if alive is None:
        return list(best)
    return [best[i][alive[i].bool()] for i in range(best.shape[0])]


# ---------------------------------------------------------------------------------------- sweep
@dataclass
class SparseMLPSweep:
    """Everything :func:`sparse_mlp_sweep` measured, keyed by layer.

    Attributes:
        sparse_mlps: the trained sparse MLPs (one SAE instance per ``S``).
        results: spliced losses on the held-out sequences.
        best_cos: ``{"enc" | "dec": [Tensor[n_alive] per S]}`` (on the CPU), each alive sparse
            neuron's best cosine with an original neuron (:func:`max_neuron_cosines`).
        alive_frac: per ``S``, fraction of sparse neurons that fired on the training tokens.
        seconds: wall time of activation collection, training and evaluation.
        curve: the spliced losses at each checkpoint of the run, then the final ones (the
            same as ``results``): ``{layer: [LossRecovered per checkpoint]}``.
        best_cos_curve, alive_frac_curve: ``best_cos`` and ``alive_frac`` at each point of
            ``curve`` (the last ones are ``best_cos`` and ``alive_frac``).
        tokens_seen: training tokens drawn at each point of ``curve``.
    """

    cfg: SparseMLPConfig
    layers: list[int]
    sparse_mlps: dict[int, SparseMLP] = field(default_factory=dict, repr=False)
    results: dict[int, LossRecovered] = field(default_factory=dict)
    best_cos: dict[int, dict[str, list[Tensor]]] = field(default_factory=dict, repr=False)
    alive_frac: dict[int, list[float]] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=lambda: {"collect": 0.0, "train": 0.0, "evaluate": 0.0})
    curve: dict[int, list[LossRecovered]] = field(default_factory=dict, repr=False)
    best_cos_curve: dict[int, list[dict[str, list[Tensor]]]] = field(default_factory=dict, repr=False)
    alive_frac_curve: dict[int, list[list[float]]] = field(default_factory=dict, repr=False)
    tokens_seen: list[int] = field(default_factory=list)


def sparse_mlp_sweep(
    lm: "LanguageModel",
    train_docs: "DocumentTokens",
    heldout_docs: "DocumentTokens",
    cfg: SparseMLPConfig,
    layers: Sequence[int] | None = None,
    tokens_per_batch: int = 2048,
    checkpoints: Sequence[int] = (),
) -> SparseMLPSweep:
    """For each layer: train one sparse MLP per ``S`` on the MLP's input and output over
    ``train_docs`` (every non-BOS token; harvested once for all layers with
    :func:`saelib.lm.activations.harvest_activations`, so cached), splice them into the model on
    ``heldout_docs`` (:func:`spliced_losses`; mean ablation with the training mean) and compare
    their neurons with the original MLP's (:func:`neuron_cosines`). Layers are trained one at a
    time, so memory holds one layer's activations.

    ``checkpoints``: optimiser-step counts at which the sparse MLPs of the same run are also
    spliced in (:func:`train_sparse_mlps_with_checkpoints`, :func:`spliced_losses_many`), for a
    convergence curve (``curve``, ``tokens_seen``).

    ``seconds`` records ``"collect"`` (harvest, or reading the cache), ``"train"`` and
    ``"evaluate"``. Raises ValueError for a layer the model does not have or a checkpoint out of
    range.
    """
    from ..lm.activations import harvest_activations

    model = lm.model
    layers = list(range(model.cfg.n_layers)) if layers is None else list(layers)
    out = SparseMLPSweep(cfg, layers)
    out.tokens_seen = [int(c) * cfg.train.batch_size for c in sorted({int(c) for c in checkpoints})]
    out.tokens_seen.append(cfg.train.steps * cfg.train.batch_size)
    hooks = {layer: mlp_hook_names(model, layer) for layer in layers}
    t0 = time.perf_counter()
    precision = cfg.train.precision  # harvest, training and splicing in one precision
    store = harvest_activations(lm, train_docs, [h for pair in hooks.values() for h in pair], progress=cfg.train.progress,
                                precision=precision)
    rows = store.rows()  # every non-BOS token
    out.seconds["collect"] += time.perf_counter() - t0
    for layer in layers:
        t0 = time.perf_counter()
        x = y = None  # the previous layer's activations go before this layer's are read
        x, y = store.read(hooks[layer][0], rows), store.read(hooks[layer][1], rows)  # in memory, float32
        t1 = time.perf_counter()
        sms = train_sparse_mlps_with_checkpoints(x, y, cfg, layer=layer, hooks=hooks[layer], checkpoints=checkpoints)
        sm = sms[-1]
        t2 = time.perf_counter()
        out.curve[layer] = spliced_losses_many(model, heldout_docs, sms, y.mean(0), tokens_per_batch=tokens_per_batch,
                                               progress=cfg.train.progress, precision=precision)
        out.results[layer] = out.curve[layer][-1]
        out.best_cos_curve[layer], out.alive_frac_curve[layer] = [], []
        for point in sms:
            alive = torch.zeros(point.sae.n_inst, point.sae.d_sae, dtype=torch.bool, device=point.sae.W_enc.device)
            for i in range(0, len(x), 2048):
                alive |= active(point.latents(x[i : i + 2048])).any(0)
            cos = neuron_cosines(model, point)
            out.best_cos_curve[layer].append(
                {part: [v.cpu() for v in max_neuron_cosines(cos[part], alive)] for part in ("enc", "dec")})
            out.alive_frac_curve[layer].append(alive.float().mean(-1).tolist())
        out.best_cos[layer], out.alive_frac[layer] = out.best_cos_curve[layer][-1], out.alive_frac_curve[layer][-1]
        out.sparse_mlps[layer] = sm
        out.seconds["collect"] += t1 - t0
        out.seconds["train"] += t2 - t1
        out.seconds["evaluate"] += time.perf_counter() - t2
    return out


# ---------------------------------------------------------------------------------------- reporting
def recovered_at_l0(result: LossRecovered, max_l0: float) -> dict[str, float] | None:
    """The swept ``S`` with the highest loss recovered (zero ablation) among those whose L0 is at
    most ``max_l0``: ``{"S", "L0", "recovered", "recovered_vs_mean", "kl", "instance"}``
    (``instance``: its index, for :meth:`LossRecovered.recovered_ci`), or None when every ``S`` is
    denser than ``max_l0``. Raises ValueError if ``max_l0 <= 0``."""
    if not max_l0 > 0:
        raise ValueError(f"max_l0 must be > 0, got {max_l0}")
    ok = [i for i, l0 in enumerate(result.l0) if l0 <= max_l0]
    if not ok:
        return None
    i = max(ok, key=lambda j: result.recovered[j])
    return {"S": result.S_values[i], "L0": result.l0[i], "recovered": result.recovered[i],
            "recovered_vs_mean": result.recovered_vs_mean[i], "kl": result.kl_sparse[i], "instance": i}


def loss_recovered_table(results: Sequence[LossRecovered], max_l0: float, dead_frac: dict[int, list[float]] | None = None) -> str:
    """A Markdown table laid out like Nabeshima 2024b's numbers, one row per layer, at the sparsest
    operating point allowed: the ``S`` with the highest loss recovered among those with
    ``L0 <= max_l0`` (:func:`recovered_at_l0`), next to Nabeshima's S = 6 numbers for the layer of
    the same rank in his 4-layer model (``results`` in layer order; his L0 is not published) and
    Anthropic's A/1 79 %. ``dead_frac[layer][i]``: fraction of dead sparse neurons per ``S``."""
    lines = [
        f"| layer | S | L0 | dead | L_orig | L_zero | L_mean | L_sparse | KL | recovered (zero) | recovered (mean) "
        "| Nabeshima layer | his L_zero | his L_sparse (S=6) | his recovered |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for rank, r in enumerate(results):
        ref = (
            (str(rank), f"{NABESHIMA_LOSS_ZERO[rank]:.2f}", f"{NABESHIMA_LOSS_SPARSE_S6[rank]:.2f}",
             f"{NABESHIMA_RECOVERED_S6[rank]:.0%}") if rank < len(NABESHIMA_LOSS_ZERO) else ("", "", "", "")
        )
        best = recovered_at_l0(r, max_l0)
        if best is None:
            lines.append(f"| {r.layer} | none with L0 <= {max_l0:g} (lowest {min(r.l0):.1f}) | | | {r.loss_orig:.3f} "
                         f"| {r.loss_zero:.3f} | {r.loss_mean:.3f} | | | | | {' | '.join(ref)} |")
            continue
        i = r.S_values.index(best["S"])
        dead = f"{dead_frac[r.layer][i]:.1%}" if dead_frac is not None else ""
        lines.append(
            f"| {r.layer} | {best['S']:g} | {best['L0']:.1f} | {dead} | {r.loss_orig:.3f} | {r.loss_zero:.3f} "
            f"| {r.loss_mean:.3f} | {r.loss_sparse[i]:.3f} | {r.kl_sparse[i]:.3f} | {r.recovered[i]:.1%} "
            f"| {r.recovered_vs_mean[i]:.1%} | {' | '.join(ref)} |"
        )
    lines.append(
        f"\nL0: active sparse neurons per token. Nabeshima's original loss {NABESHIMA_LOSS_ORIG}; Anthropic's A/1 "
        f"autoencoder recovered {ANTHROPIC_A1_RECOVERED:.0%}."
    )
    return "\n".join(lines)


def loss_recovered_overview(results: Sequence[LossRecovered], dead_frac: dict[int, list[float]] | None = None) -> str:
    """A Markdown table of every layer and every swept ``S``: loss recovered against zero and
    mean ablation, KL (nats/token), L0 and the dead fraction."""
    lines = ["| layer | S | L0 | dead | recovered (zero) | recovered (mean) | KL |", "|---|---|---|---|---|---|---|"]
    for r in results:
        for i, S in enumerate(r.S_values):
            dead = f"{dead_frac[r.layer][i]:.1%}" if dead_frac is not None else ""
            lines.append(f"| {r.layer} | {S:g} | {r.l0[i]:.1f} | {dead} | {r.recovered[i]:.1%} "
                         f"| {r.recovered_vs_mean[i]:.1%} | {r.kl_sparse[i]:.4f} |")
    return "\n".join(lines)


def plot_loss_recovered(results: Sequence[LossRecovered], max_l0: float | None = None) -> Figure:
    """Loss recovered against zero and mean ablation, and KL, against L0 (log scale), one line
    per layer through its ``S`` values (labelled). Anthropic's 79 % is the dashed line;
    Nabeshima's S = 6 values (his layers 0-3, L0 not published) are the dotted lines at the
    right edge; ``max_l0`` is marked as a vertical line."""
    fig = Figure(figsize=(14, 4))
    axes = fig.subplots(1, 3)
    colors = colormaps["viridis"](np.linspace(0, 0.9, max(1, len(results))))
    for r, c in zip(results, colors):
        axes[0].plot(r.l0, r.recovered, "o-", color=c, label=f"layer {r.layer}")
        axes[1].plot(r.l0, r.recovered_vs_mean, "o-", color=c, label=f"layer {r.layer}")
        axes[2].plot(r.l0, r.kl_sparse, "o-", color=c, label=f"layer {r.layer}")
        for x, y, S in zip(r.l0, r.recovered, r.S_values):
            axes[0].annotate(f"S={S:g}", (x, y), textcoords="offset points", xytext=(3, 3), fontsize=6, color=c)
    for rank, v in enumerate(NABESHIMA_RECOVERED_S6):
        axes[0].axhline(v, xmin=0.9, xmax=1.0, color="black", ls=":", lw=1.2,
                        label="Nabeshima S=6, his layers 0-3 (L0 not published)" if rank == 0 else None)
    for ax in axes[:2]:
        ax.axhline(ANTHROPIC_A1_RECOVERED, color="grey", ls="--", lw=1, label="Anthropic A/1 (79%)")
        ax.set_ylabel("loss recovered")
    for ax in axes:
        ax.set_xscale("log")
        ax.set_xlabel("L0 (active sparse neurons per token)")
        if max_l0 is not None:
            ax.axvline(max_l0, color="red", lw=0.8, alpha=0.6, label=f"L0 = {max_l0:g}" if ax is axes[0] else None)
    axes[2].set_yscale("log")
    axes[0].set_title("vs zero ablation")
    axes[1].set_title("vs mean ablation")
    axes[2].set_title("KL(original || spliced), nats/token")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    return fig


def plot_neuron_cosines(
    best_cos: dict[int, dict[str, list[Tensor]]], S_values: Sequence[float], bins: int = 40
) -> Figure:
    """Histograms of every alive sparse neuron's best cosine with an original MLP neuron:
    rows = layers, columns = encoder / decoder, one curve per ``S``.

    ``best_cos[layer]["enc" | "dec"]`` is the list (one per ``S``) from :func:`max_neuron_cosines`.
    """
    layers = sorted(best_cos)
    fig = Figure(figsize=(9, 2.1 * len(layers)))
    axes = fig.subplots(len(layers), 2, squeeze=False, sharex=True)
    colors = colormaps["plasma"](np.linspace(0, 0.85, len(S_values)))
    edges = np.linspace(0, 1, bins + 1)
    for row, layer in enumerate(layers):
        for col, part in enumerate(("enc", "dec")):
            ax = axes[row, col]
            for s, vals, c in zip(S_values, best_cos[layer][part], colors):
                v = vals.detach().cpu().numpy()
                if v.size:
                    ax.hist(np.clip(v, 0, 1), bins=edges, histtype="step", color=c, density=True, label=f"S={s:g}")
            ax.set_title(f"layer {layer}, {'encoder vs W_in' if part == 'enc' else 'decoder vs W_out'}", fontsize=9)
            ax.set_yticks([])
    axes[0, 0].legend(fontsize=7)
    for ax in axes[-1]:
        ax.set_xlabel("best cosine with an original neuron")
    fig.tight_layout()
    return fig
