"""The parts that :func:`saelib.core.train.train_sae` composes, one concern each, each tested alone
(``tests/core/test_train_parts.py``):

* :func:`step_loss`: the loss of one step, per instance: reconstruction (plain or Matryoshka,
  :func:`saelib.core.matryoshka.matryoshka_loss`) plus the coefficient times the sparsity penalty
  (:class:`SparsityPenalty`);
* :class:`SparsityController`: the sparsity coefficient: a linear warm-up, then Nabeshima's
  multiplicative steering of the batch L0 towards a target;
* :class:`DeadLatentResampler`: re-initialising latents that did not fire in a window;
* :class:`LatentPermuter`: Nabeshima's latent permutation with its Adam moments.

The loss and the penalty are per instance (``[inst]``), so that instances never share a gradient.
Every tensor is made on the SAE's device in its dtype; random draws come from CPU generators.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from .distributed import DataParallel
from .matryoshka import PerInstanceMatryoshka, latent_weights, matryoshka_loss
from .metrics import active, squared_error
from .penalties import BatchMean, per_latent_penalty
from .sae import SAE, float32_sum

__all__ = ["SparsityPenalty", "step_loss", "SparsityController", "DeadLatentResampler", "LatentPermuter"]


# ---------------------------------------------------------------------------- the loss of one step
def _penalty(
    acts: Tensor, scale: Tensor, kinds: list[str], freq_target: list[float], batch_mean: BatchMean | None = None
) -> Tensor:
    """Per-latent penalty ``[inst, d_sae]``, each instance with its own penalty kind.

    ``acts`` are ReLU outputs (>= 0), so the L1 penalty ``mean_batch(a_j * scale_j)`` is computed
    as ``scale_j * sum_batch(a_j) / batch``: one reduction over the ``[batch, inst, d_sae]`` tensor
    instead of a product, a reduction and two products in the backward (equal up to rounding).
    ``batch_mean`` goes to batch-level penalties (see :func:`saelib.core.penalties.per_latent_penalty`).
    """
    if all(k == "l1" for k in kinds):
        return float32_sum(acts, 0) * (scale / acts.shape[0])  # bf16 acts: the batch sum in float32
    if all(k == kinds[0] for k in kinds):
        return per_latent_penalty(acts, scale, kinds[0], freq_target, batch_mean)
    out = acts.new_zeros(acts.shape[1:])
    for kind in dict.fromkeys(kinds):
        ids = [i for i, k in enumerate(kinds) if k == kind]
        idx = torch.tensor(ids, device=acts.device)
        out = out.index_copy(
            0, idx, per_latent_penalty(acts[:, idx], scale[idx], kind, [freq_target[i] for i in ids], batch_mean)
        )
    return out


@dataclass
class SparsityPenalty:
    """The sparsity penalty of every instance, ``sum_j w_j mean_batch penalty(a_j s_j)`` (``[inst]``).

    Attributes:
        kinds: one penalty name per instance (:data:`saelib.core.penalties.PENALTIES` or
            :data:`saelib.core.penalties.BATCH_PENALTIES`).
        freq_target: one target firing frequency per instance (used by ``smooth_l0_freq`` only).
        scale_by_decoder_norm: ``s_j = ||W_dec[j]||`` (True) or 1 (False).
        batch_mean: the batch mean of batch-level penalties (None: over this process's batch;
            data-parallel training passes the combined batch's).

    ``w_j`` is 1, or, for Matryoshka instances with ``weight_sparsity_by_prefix``, the latent's
    weight over the prefixes (:func:`saelib.core.matryoshka.latent_weights`, routed like the
    reconstruction when the plan routes gradients).
    """

    kinds: list[str]
    freq_target: list[float]
    scale_by_decoder_norm: bool = True
    batch_mean: BatchMean | None = None

    def __call__(
        self,
        sae: SAE,
        acts: Float[Tensor, "batch inst d_sae"],
        weights: Float[Tensor, "inst d_sae"] | None = None,
        matryoshka: PerInstanceMatryoshka | None = None,
    ) -> Float[Tensor, " inst"]:
        """The penalty of one batch; ``weights`` are this step's prefix weights (Matryoshka only)."""
        if self.scale_by_decoder_norm:
            scale = sae.decoder_norms()
        else:
            scale = torch.ones(sae.n_inst, sae.d_sae, device=sae.W_enc.device, dtype=sae.W_enc.dtype)
        pen = _penalty(acts, scale, self.kinds, self.freq_target, self.batch_mean)  # [inst, d_sae]
        if weights is not None and matryoshka is not None and matryoshka.sparsity_by_prefix.any():
            by_prefix = matryoshka.sparsity_by_prefix[:, None]
            scale_in = matryoshka.inner_grad_scale if matryoshka.routes_gradient else None
            lw = latent_weights(weights, scale_in)
            pen = pen * torch.where(by_prefix, lw, torch.ones_like(weights))
        return pen.sum(-1)


def step_loss(
    sae: SAE,
    x_in: Float[Tensor, "batch d_in"] | Float[Tensor, "batch inst d_in"],
    x: Float[Tensor, "batch inst d_out"],
    coeff: Float[Tensor, " inst"],
    penalty: SparsityPenalty | None = None,
    matryoshka: PerInstanceMatryoshka | None = None,
    weights: Float[Tensor, "inst d_sae"] | None = None,
    keep: Float[Tensor, "batch inst d_sae"] | None = None,
) -> tuple[Float[Tensor, " inst"], Float[Tensor, "batch inst d_out"], Float[Tensor, "batch inst d_sae"]]:
    """The training loss of one batch per instance, with the forward pass it came from.

    ``loss = recon + coeff * penalty``: ``recon`` is ``mean_batch ||x - x_hat||²`` (squared error
    summed over ``d_out``) or, with ``matryoshka`` and this step's prefix ``weights``, the
    Matryoshka loss (:func:`saelib.core.matryoshka.matryoshka_loss` with the plan's gradient routing
    and the term weights ``keep``); no penalty term when ``penalty`` is None (TopK / BatchTopK).

    Returns ``(loss [inst], x_hat, acts)``.
    Raises ValueError if ``matryoshka`` is given without ``weights``, or as
    :func:`saelib.core.matryoshka.matryoshka_loss`.
    """
    x_hat, acts = sae(x_in)
    if matryoshka is None:
        recon = squared_error(x, x_hat).mean(0)  # [inst]
    else:
        if weights is None:
            raise ValueError("a Matryoshka step loss needs this step's prefix weights")
        gamma = matryoshka.inner_grad_scale if matryoshka.routes_gradient else None
        recon = matryoshka_loss(x, acts, sae.W_dec, sae.b_dec, weights, gamma, keep)
    if penalty is None:
        return recon, x_hat, acts
    return recon + coeff * penalty(sae, acts, weights, matryoshka), x_hat, acts


# ---------------------------------------------------------------------------- sparsity coefficient
class SparsityController:
    """The sparsity coefficient of every instance over training.

    In force at step ``s`` (0-based): ``min(1, (s + 1) / warmup_steps) * coeff`` (a linear ramp
    from 0). With a ``target`` L0, from the end of the warm-up on, :meth:`update` multiplies
    ``coeff`` by ``1 - eps`` where the batch L0 is below the target and by ``1 + eps`` elsewhere
    (Nabeshima's ``noanabeshima/matryoshka-saes`` controller, credited there to Glen Taggart).

    Args:
        coeff: ``[inst]`` starting coefficients.
        target: ``[inst]`` target L0 (latents per sample), or None to keep ``coeff`` fixed.
        eps: the multiplicative step, in ``[0, 1)``.
        warmup_steps: steps of the linear ramp (at least 1 is used).
    """

    def __init__(self, coeff: Float[Tensor, " inst"], target: Float[Tensor, " inst"] | None, eps: float, warmup_steps: int):
        self.coeff = coeff
        self.target = target
        self.eps = eps
        self.warmup_steps = max(1, warmup_steps)

    @property
    def steers(self) -> bool:
        """True if the coefficient follows a target L0 (:meth:`update` then needs the batch L0)."""
        return self.target is not None

    def in_force(self, step: int) -> Float[Tensor, " inst"]:
        """The coefficient that multiplies the penalty at ``step`` (a new tensor)."""
        ramp = min(1.0, (step + 1) / self.warmup_steps)
        return ramp * self.coeff

    def update(self, step: int, l0: Float[Tensor, " inst"] | None) -> None:
        """Steer after ``step`` given that step's batch L0 (ignored without a target)."""
        if self.target is not None and step + 1 >= self.warmup_steps:
            assert l0 is not None
            self.coeff = torch.where(l0 < self.target, self.coeff * (1 - self.eps), self.coeff * (1 + self.eps))


# ---------------------------------------------------------------------------- Adam moments
def _latent_adam_moments(sae: SAE, opt: torch.optim.Optimizer) -> Iterator[tuple[Tensor, int]]:
    """Every Adam moment (``exp_avg``, ``exp_avg_sq``) that ``opt`` holds for the per-latent
    parameters ``W_enc`` ``[inst, d_in, d_sae]``, ``b_enc`` ``[inst, d_sae]`` and ``W_dec``
    ``[inst, d_sae, d_out]``, with the dimension that indexes latents (2, 1, 1); a parameter
    without a step yet has none. Edit them in place to move or reset latents' moments."""
    for p, latent_dim in ((sae.W_enc, 2), (sae.b_enc, 1), (sae.W_dec, 1)):
        state = opt.state.get(p, {})
        for key in ("exp_avg", "exp_avg_sq"):
            if key in state:
                yield state[key], latent_dim


# ---------------------------------------------------------------------------- dead latents
@torch.no_grad()
def _resample_dead(
    sae: SAE,
    opt: torch.optim.Optimizer,
    dead: Tensor,
    x_in: Tensor,
    err: Tensor,
    g: torch.Generator | Sequence[torch.Generator],
) -> None:
    """Point each dead latent (``dead`` is ``[inst, d_sae]`` bool) at an input of the batch drawn
    with probability proportional to its squared reconstruction error (``err`` is ``[batch, inst]``).

    ``g`` is one (CPU) generator for all draws, or one per instance (each instance's dead latents
    then draw from its own, so the draws do not depend on the other instances). The draws happen
    on the CPU whatever the SAE's device, so they are the same on every device.
    """
    inst_idx, lat_idx = dead.nonzero(as_tuple=True)
    if len(inst_idx) == 0:
        return
    x_in = sae.expand_instances(x_in)  # [batch, inst, d_in]
    probs = (err.T[inst_idx] + 1e-12).cpu()  # [n_dead, batch]
    if isinstance(g, torch.Generator):
        rows = torch.multinomial(probs, 1, generator=g)[:, 0]
    else:
        inst_cpu = inst_idx.cpu()
        rows = torch.empty_like(inst_cpu)
        for i in inst_cpu.unique().tolist():
            sel = inst_cpu == i
            rows[sel] = torch.multinomial(probs[sel], 1, generator=g[i])[:, 0]
    v = x_in[rows.to(x_in.device), inst_idx]
    if sae.cfg.apply_b_dec_to_input:
        v = v - sae.b_dec[inst_idx]
    v = v / v.norm(dim=-1, keepdim=True).clamp_min(1e-8)  # [n_dead, d_in]
    enc_norm = sae.W_enc.norm(dim=1).mean(dim=1)[inst_idx]  # typical encoder column norm
    sae.W_enc[inst_idx, :, lat_idx] = v * enc_norm[:, None]
    sae.b_enc[inst_idx, lat_idx] = 0.0
    if sae.d_out == sae.d_in:
        sae.W_dec[inst_idx, lat_idx] = v * sae.cfg.dec_init_norm
    for moment, latent_dim in _latent_adam_moments(sae, opt):
        index = (inst_idx, slice(None), lat_idx) if latent_dim == 2 else (inst_idx, lat_idx)
        moment[index] = 0.0


class DeadLatentResampler:
    """Dead-latent resampling (a simplified version of Anthropic's neuron resampling, "Towards
    Monosemanticity" 2023): every ``every`` steps, while ``step < until_step``, each latent that
    fired on no sample since the last resampling is pointed at an input of the current batch,
    drawn with probability proportional to its instance's squared reconstruction error; the
    encoder column gets the instances's typical norm, ``b_enc`` 0, the decoder row (autoencoders
    only) ``dec_init_norm``, and their Adam moments are zeroed.

    Args:
        every: steps between resamplings (>= 1).
        until_step: no resampling at or after this step (``train_sae``: half the steps).
        generators: one CPU generator for all draws, or one per instance.
        n_inst, d_sae, device: shape and place of the "fired" record.
        dp: data-parallel training: "fired" and the batch are combined over ranks, so every rank
            resamples alike.
    """

    def __init__(
        self,
        every: int,
        until_step: int,
        generators: torch.Generator | Sequence[torch.Generator],
        n_inst: int,
        d_sae: int,
        device: torch.device | str,
        dp: DataParallel | None = None,
    ):
        self.every, self.until_step, self.generators, self.dp = every, until_step, generators, dp
        self.fired = torch.zeros(n_inst, d_sae, dtype=torch.bool, device=device)

    @torch.no_grad()
    def __call__(
        self,
        step: int,
        sae: SAE,
        opt: torch.optim.Optimizer,
        acts: Float[Tensor, "batch inst d_sae"],
        x_in: Tensor,
        x: Float[Tensor, "batch inst d_out"],
        x_hat: Float[Tensor, "batch inst d_out"],
    ) -> bool:
        """Record which latents fired at ``step`` and resample if one is due; True if it was."""
        self.fired |= active(acts).any(dim=0)
        if (step + 1) % self.every != 0 or step >= self.until_step:
            return False
        err = squared_error(x, x_hat)  # [batch, inst]
        if self.dp is None:
            _resample_dead(sae, opt, ~self.fired, x_in, err, self.generators)
        else:  # every rank resamples alike from the combined batch
            dp = self.dp
            _resample_dead(sae, opt, ~dp.any(self.fired), dp.gather_rows(x_in), dp.gather_rows(err), self.generators)
        self.fired.zero_()
        return True


# ---------------------------------------------------------------------------- latent permutation
@torch.no_grad()
def _permute_with_optimizer(sae: SAE, opt: torch.optim.Optimizer, perm: Tensor) -> None:
    """Permute latents and the matching Adam moments so optimisation continues seamlessly."""
    sae.permute_latents(perm)
    for moment, latent_dim in _latent_adam_moments(sae, opt):
        shape = [1] * moment.ndim
        shape[0], shape[latent_dim] = perm.shape
        moment.copy_(moment.gather(latent_dim, perm.view(shape).expand_as(moment)))


class LatentPermuter:
    """Nabeshima's latent permutation (``noanabeshima/matryoshka-saes``): after every step, sort
    the latents of each permuting instance by an EMA of their batch-mean squared
    decoder-norm-scaled activation ``(a_j ||W_dec[j]||)²``, descending (stable), moving the Adam
    moments along; other instances keep their order.

    Args:
        permute: ``[inst]`` bool, the instances that permute.
        ema: the EMA decay, one float or ``[inst, 1]``.
        d_sae: latents per instance.
        device, dtype: of the EMA statistic (the SAE's).
        batch_mean: the batch mean of the statistic (data-parallel: over the combined batch).
    """

    def __init__(
        self,
        permute: Bool[Tensor, " inst"],
        ema: float | Tensor,
        d_sae: int,
        device: torch.device | str,
        dtype: torch.dtype,
        batch_mean: Callable[[Tensor], Tensor] = lambda t: t.mean(0),
    ):
        self.permute, self.ema, self.batch_mean = permute, ema, batch_mean
        self.sq_act_ema = torch.zeros(len(permute), d_sae, device=device, dtype=dtype)

    @classmethod
    def for_plan(
        cls, plan: PerInstanceMatryoshka | None, sae: SAE, batch_mean: Callable[[Tensor], Tensor] = lambda t: t.mean(0)
    ) -> "LatentPermuter | None":
        """The permuter of a Matryoshka plan, or None when no instance permutes. The decay is a
        float when every instance shares it (the arithmetic of a single config), else ``[inst, 1]``."""
        if plan is None or not plan.permute.any():
            return None
        uniform = bool((plan.permute_ema == plan.permute_ema[0]).all())
        ema = plan.configs[0].permute_ema if uniform else plan.permute_ema[:, None]
        return cls(plan.permute, ema, sae.d_sae, sae.W_enc.device, sae.W_enc.dtype, batch_mean)

    @torch.no_grad()
    def __call__(self, sae: SAE, opt: torch.optim.Optimizer, acts: Float[Tensor, "batch inst d_sae"]) -> Tensor:
        """Update the statistic with this batch and permute; returns the permutation ``[inst, d_sae]``."""
        scaled_sq = self.batch_mean((acts * sae.decoder_norms()).pow(2))
        ema = self.ema
        self.sq_act_ema.mul_(ema).add_((1 - ema) * scaled_sq)
        perm = self.sq_act_ema.argsort(dim=-1, descending=True, stable=True)
        if not self.permute.all():  # instances that do not permute keep their order
            keep = torch.arange(perm.shape[-1], device=perm.device).expand_as(perm)
            perm = torch.where(self.permute[:, None], perm, keep)
        _permute_with_optimizer(sae, opt, perm)
        self.sq_act_ema = self.sq_act_ema.gather(1, perm)
        return perm
