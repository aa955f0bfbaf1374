"""Sparse autoencoders trained many at once along an instance dimension.

One :class:`SAE` object holds ``n_inst`` independent SAEs (several seeds, or a hyperparameter
sweep) whose parameters carry a leading ``inst`` dimension, as in Toy Models of Superposition
and ARENA 1.3. Instances never interact: every loss is a sum over instances, gradient clipping
and the adaptive L1 coefficient are per instance (see :mod:`saelib.core.train`).

Shapes (one vocabulary everywhere)::

    W_enc  [inst, d_in, d_sae]      b_enc [inst, d_sae]
    W_dec  [inst, d_sae, d_out]     b_dec [inst, d_out]  (zeros, not trained, if use_b_dec=False)
    x      [batch, inst, d_in]      (or [batch, d_in], broadcast to every instance)
    acts   [batch, inst, d_sae]

``d_out`` equals ``d_in`` for an SAE. A transcoder / sparse MLP (Dunefsky et al. 2024, arXiv
2406.11944; Nabeshima's sparse MLPs) reads one activation and writes another: set ``d_out`` and
``apply_b_dec_to_input=False``.

Architectures:

* ``"relu"``: ``acts = ReLU((x - b_dec) @ W_enc + b_enc)``, trained with an L1 penalty weighted
  by decoder norms (Anthropic, "Towards Monosemanticity" update, 2024).
* ``"topk"``: keep the ``k`` largest pre-activations per sample, then ReLU (Gao et al. 2024,
  arXiv 2406.04093).
* ``"batchtopk"``: keep the ``k * batch`` largest pre-activations over the whole batch per instance
  while training; at inference a single threshold per instance, the running mean of the smallest
  kept activation (Bussmann et al. 2024, arXiv 2412.06410).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch
from jaxtyping import Float
from torch import Tensor, nn

__all__ = ["SAEConfig", "SAE", "dtype_name", "float32_sum"]

Architecture = Literal["relu", "topk", "batchtopk"]


@dataclass
class SAEConfig:
    """Configuration of a batch of ``n_inst`` SAEs with identical shapes.

    Attributes:
        d_in: input dimension.
        d_sae: number of latents per SAE.
        n_inst: number of independent SAEs trained at once.
        architecture: ``"relu"``, ``"topk"`` or ``"batchtopk"``.
        k: active latents per sample for TopK / BatchTopK (ignored for ReLU).
        use_b_dec: False gives the bias-free variant (b_dec fixed at 0), used for closed-form
            comparisons (the optimum of :mod:`saelib.experiments.hedging` assumes no bias).
        dec_init_norm: initial norm of every decoder row (Nabeshima: 0.1).
        batchtopk_threshold_ema: EMA rate of the BatchTopK inference threshold.
        d_out: output dimension; None means ``d_in`` (an autoencoder).
        apply_b_dec_to_input: subtract ``b_dec`` from the input before encoding (SAELens's
            default for SAEs; must be False when ``d_out != d_in``).
        seed: seed of the initialisation; each instance gets its own draw.
        device: where the parameters live, a ``torch.device`` string (SAELens's convention):
            ``"cpu"`` (default), ``"cuda"``, ``"cuda:1"``, ``"mps"`` ... Training follows it: every
            tensor :func:`saelib.core.train.train_sae` makes is made on the parameters' device.
        dtype: parameter dtype name (SAELens's convention): ``"float32"`` (default),
            ``"float64"``, ``"float16"`` or ``"bfloat16"`` (``"torch.float64"`` and
            ``torch.float64`` are accepted and stored as ``"float64"``). The initial weights
            are drawn in float32 on the CPU and then cast, so every device and dtype starts
            from the same draw (rounded to the dtype).
    """

    d_in: int
    d_sae: int
    n_inst: int = 1
    d_out: int | None = None
    apply_b_dec_to_input: bool = True
    architecture: Architecture = "relu"
    k: int | None = None
    use_b_dec: bool = True
    dec_init_norm: float = 0.1
    batchtopk_threshold_ema: float = 0.01
    seed: int = 0
    device: str = "cpu"
    dtype: str = "float32"

    def __post_init__(self) -> None:
        self.dtype = dtype_name(self.dtype)  # validates; raises ValueError
        try:
            self.device = str(torch.device(self.device))
        except (RuntimeError, TypeError) as e:
            raise ValueError(f"SAEConfig.device must be a torch device string, got {self.device!r}: {e}") from e
        for name in ("d_in", "d_sae", "n_inst"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"SAEConfig.{name} must be a positive int, got {value!r}")
        if self.d_out is None:
            self.d_out = self.d_in
        if not isinstance(self.d_out, int) or self.d_out < 1:
            raise ValueError(f"SAEConfig.d_out must be a positive int or None, got {self.d_out!r}")
        if self.apply_b_dec_to_input and self.d_out != self.d_in:
            raise ValueError(
                f"SAEConfig.apply_b_dec_to_input=True needs d_out == d_in, got d_in={self.d_in}, "
                f"d_out={self.d_out}"
            )
        if self.architecture not in ("relu", "topk", "batchtopk"):
            raise ValueError(
                f"SAEConfig.architecture must be 'relu', 'topk' or 'batchtopk', "
                f"got {self.architecture!r}"
            )
        if self.architecture != "relu":
            if not isinstance(self.k, int) or not (1 <= self.k <= self.d_sae):
                raise ValueError(
                    f"SAEConfig.k must be an int in [1, d_sae={self.d_sae}] for "
                    f"architecture={self.architecture!r}, got {self.k!r}"
                )
        if not (self.dec_init_norm > 0):
            raise ValueError(f"SAEConfig.dec_init_norm must be > 0, got {self.dec_init_norm!r}")

    @property
    def torch_dtype(self) -> torch.dtype:
        """``dtype`` as a ``torch.dtype``."""
        return _DTYPES[self.dtype]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SAEConfig":
        """Inverse of :meth:`to_dict`; dicts saved before ``device`` / ``dtype`` existed load
        with the defaults (``"cpu"``, ``"float32"``)."""
        return cls(**d)


_DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16}


def dtype_name(dtype: str | torch.dtype) -> str:
    """The short name (``"float32"``, ``"float64"``, ``"float16"``, ``"bfloat16"``) of a
    floating dtype given as a name, ``"torch.<name>"`` or a ``torch.dtype``.

    Raises ValueError for anything else.
    """
    name = str(dtype).removeprefix("torch.")
    if name not in _DTYPES:
        raise ValueError(f"SAEConfig.dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    return name


# Below this many multiply-adds in the encoder product (inst * batch * d_in * d_sae) the skipped
# input-gradient product costs less than the custom autograd function's Python overhead (measured:
# toy SAEs with 20 latents train ~15 % slower through it), so small SAEs use plain autograd.
_CENTERED_ENCODE_MIN_MACS = 1 << 24


def _matmul_dtype(weight: Tensor) -> torch.dtype:
    """The dtype a product with ``weight`` runs in: the autocast dtype inside an autocast region
    on the weight's device (bf16 under :func:`saelib.core.precision.autocast`), else the weight's."""
    device_type = weight.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return weight.dtype


def float32_sum(t: Tensor, dim: int, keepdim: bool = False) -> Tensor:
    """``t.sum(dim)``, accumulated and returned in float32 when ``t`` is a low-precision (bf16 or
    float16) tensor; float32 and float64 tensors are summed exactly as ``t.sum(dim)`` does."""
    if t.dtype in (torch.bfloat16, torch.float16):
        return t.sum(dim, keepdim=keepdim, dtype=torch.float32)
    return t.sum(dim, keepdim=keepdim)


class _CenteredEncode(torch.autograd.Function):
    """``(x - b_dec) @ W_enc`` per instance, with ``b_dec``'s gradient taken without the input gradient.

    Shapes: ``x`` ``[inst, batch, d_in]``, ``b_dec`` ``[inst, d_in]``, ``W_enc`` ``[inst, d_in, d_sae]``
    -> ``[inst, batch, d_sae]``. The forward is exactly autograd's ``torch.bmm(x - b_dec, W_enc)``.
    Autograd would form the input gradient ``g @ W_enc^T`` (a ``batch x d_sae x d_in`` product,
    one sixth of a ReLU SAE step's matmul FLOPs) only to sum it over the batch for ``b_dec``; by
    linearity ``dL/db_dec = -(sum_batch g) @ W_enc^T``, a vector-matrix product. The full input
    gradient is still computed when ``x`` itself requires a gradient. Same values as autograd up to
    float rounding (the batch sum happens before the product instead of after).
    """

    @staticmethod
    def forward(ctx, x: Tensor, b_dec: Tensor, W_enc: Tensor) -> Tensor:
        # under bf16 autocast the product runs in bf16: cast once here and keep the bf16 copies
        # for the backward (which runs outside the autocast region)
        dtype = _matmul_dtype(W_enc)
        centered = (x - b_dec[:, None, :]).to(dtype)
        W = W_enc.to(dtype)
        ctx.save_for_backward(centered, W)
        ctx.dtypes = (x.dtype, b_dec.dtype, W_enc.dtype)
        return torch.bmm(centered, W)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        centered, W_enc = ctx.saved_tensors
        x_dtype, b_dtype, W_dtype = ctx.dtypes
        grad = grad.to(centered.dtype)
        need_x, need_b, need_W = ctx.needs_input_grad
        grad_x = grad_b = grad_W = None
        if need_W:
            grad_W = torch.bmm(centered.transpose(1, 2), grad).to(W_dtype)  # [inst, d_in, d_sae]
        if need_x:
            grad_x = torch.bmm(grad, W_enc.transpose(1, 2))  # [inst, batch, d_in]
            if need_b:
                grad_b = -float32_sum(grad_x, 1).to(b_dtype)
            grad_x = grad_x.to(x_dtype)
        elif need_b:
            grad_sum = float32_sum(grad, 1, keepdim=True).to(W_enc.dtype)  # the batch sum in float32
            grad_b = -torch.bmm(grad_sum, W_enc.transpose(1, 2))[:, 0].to(b_dtype)  # [inst, d_in]
        return grad_x, grad_b, grad_W


class SAE(nn.Module):
    """``n_inst`` sparse autoencoders with a shared shape (see the module docstring)."""

    def __init__(self, cfg: SAEConfig):
        super().__init__()
        self.cfg = cfg
        g = torch.Generator().manual_seed(cfg.seed)
        inst, d_in, d_sae, d_out = cfg.n_inst, cfg.d_in, cfg.d_sae, cfg.d_out
        W_enc = torch.randn(inst, d_in, d_sae, generator=g) / d_in**0.5
        if d_out == d_in:  # decoder starts as the (rescaled) transpose of the encoder
            W_dec = W_enc.transpose(1, 2)
        else:
            W_dec = torch.randn(inst, d_sae, d_out, generator=g)
        W_dec = W_dec / W_dec.norm(dim=-1, keepdim=True) * cfg.dec_init_norm
        # drawn on the CPU in float32 (the same draw for every device and dtype), then placed
        like = {"device": cfg.device, "dtype": cfg.torch_dtype}
        self.W_enc = nn.Parameter(W_enc.to(**like))  # [inst, d_in, d_sae]
        self.b_enc = nn.Parameter(torch.zeros(inst, d_sae, **like))
        self.W_dec = nn.Parameter(W_dec.contiguous().to(**like))  # [inst, d_sae, d_out]
        if cfg.use_b_dec:
            self.b_dec = nn.Parameter(torch.zeros(inst, d_out, **like))
        else:
            self.register_buffer("b_dec", torch.zeros(inst, d_out, **like))
        # BatchTopK inference threshold per instance; NaN until first training batch.
        self.register_buffer("threshold", torch.full((inst,), float("nan"), **like))

    # ------------------------------------------------------------------ shapes
    @property
    def n_inst(self) -> int:
        return self.cfg.n_inst

    @property
    def d_sae(self) -> int:
        return self.cfg.d_sae

    @property
    def d_in(self) -> int:
        return self.cfg.d_in

    @property
    def d_out(self) -> int:
        assert self.cfg.d_out is not None
        return self.cfg.d_out

    def expand_instances(self, x: Tensor, d: int | None = None) -> Float[Tensor, "batch inst d"]:
        """``x`` as one input per instance, ``[batch, inst, d]``: a ``[batch, d]`` input is shared by
        every instance (an expanded view, no copy); a ``[batch, n_inst, d]`` input is returned as is.
        ``d`` defaults to ``d_in`` (pass ``d_out`` for a transcoder's targets).

        Raises ValueError if the last dimension is not ``d`` or the shape is neither of the two.
        """
        d = self.d_in if d is None else d
        if x.shape[-1] != d:
            raise ValueError(f"last dimension {x.shape[-1]} != expected {d}")
        if x.ndim == 2:
            return x[:, None, :].expand(-1, self.n_inst, -1)
        if x.ndim == 3 and x.shape[1] == self.n_inst:
            return x
        raise ValueError(
            f"input must be [batch, d_in] or [batch, n_inst={self.n_inst}, d_in], "
            f"got shape {tuple(x.shape)}"
        )

    # ------------------------------------------------------------------ forward
    def pre_acts(self, x: Tensor) -> Float[Tensor, "batch inst d_sae"]:
        """Encoder pre-activations ``(x - b_dec) @ W_enc + b_enc`` (no ``- b_dec`` for transcoders)."""
        # one batched matmul over instances on an [inst, batch, .] layout; the result is a
        # transposed view [batch, inst, d_sae] (no permute copies in forward or backward). The bias
        # is added separately: baddbmm's fused add rounds differently for some shapes (d_sae = 1)
        x = self.expand_instances(x).transpose(0, 1)  # [inst, batch, d_in]
        if self.cfg.apply_b_dec_to_input:
            if (
                torch.is_grad_enabled()
                and self.b_dec.requires_grad
                and x.shape[0] * x.shape[1] * self.d_in * self.d_sae >= _CENTERED_ENCODE_MIN_MACS
            ):
                pre = _CenteredEncode.apply(x, self.b_dec, self.W_enc).transpose(0, 1)
                return pre + self.b_enc.to(pre.dtype)
            x = x - self.b_dec[:, None, :]
        # under bf16 autocast the product is bf16 and so, by casting the bias, is the sum: the
        # element-wise passes over [batch, inst, d_sae] stay in bf16 (no-op casts in float32)
        pre = torch.bmm(x, self.W_enc).transpose(0, 1)
        return pre + self.b_enc.to(pre.dtype)

    def activation(self, pre: Float[Tensor, "batch inst d_sae"]) -> Float[Tensor, "batch inst d_sae"]:
        """Apply the architecture's sparsifying non-linearity to pre-activations."""
        arch = self.cfg.architecture
        if arch == "relu":
            return torch.relu(pre)
        k = self.cfg.k
        assert k is not None
        if arch == "topk":
            vals, idx = pre.topk(k, dim=-1)
            return torch.zeros_like(pre).scatter(-1, idx, torch.relu(vals))
        # batchtopk
        batch, inst, d_sae = pre.shape
        if self.training:
            flat = pre.transpose(0, 1).reshape(inst, batch * d_sae)  # [inst, batch*d_sae]
            vals, idx = flat.topk(min(k * batch, flat.shape[1]), dim=-1)
            vals = torch.relu(vals)
            out = torch.zeros_like(flat).scatter(-1, idx, vals)
            with torch.no_grad():
                pos = torch.where(vals > 0, vals, torch.full_like(vals, float("inf")))
                kept_min = pos.min(dim=-1).values  # [inst]
                kept_min = torch.where(torch.isinf(kept_min), torch.zeros_like(kept_min), kept_min)
                rate = self.cfg.batchtopk_threshold_ema
                self.threshold.copy_(
                    torch.where(
                        torch.isnan(self.threshold),
                        kept_min,
                        (1 - rate) * self.threshold + rate * kept_min,
                    )
                )
            return out.reshape(inst, batch, d_sae).transpose(0, 1)
        if torch.isnan(self.threshold).any():
            raise RuntimeError("BatchTopK SAE has no inference threshold yet: train it first")
        return torch.where(pre > self.threshold[:, None], pre, torch.zeros_like(pre))

    def encode(self, x: Tensor) -> Float[Tensor, "batch inst d_sae"]:
        """Latent activations for ``x`` of shape ``[batch, d_in]`` or ``[batch, inst, d_in]``.

        A plain forward pass: for speed it does not check ``x`` for NaN/inf, which pass through
        (ReLU and TopK alike) into the activations. Data are checked where they enter training
        (:func:`saelib.core.train.train_sae`) and the metrics (:mod:`saelib.core.metrics`).

        Raises ValueError if the shape does not match ``d_in`` / ``n_inst``.
        """
        return self.activation(self.pre_acts(x))

    def decode(self, acts: Float[Tensor, "batch inst d_sae"]) -> Float[Tensor, "batch inst d_out"]:
        """Reconstruction ``acts @ W_dec + b_dec`` (a transposed view of an [inst, batch, d_out]
        tensor, like :meth:`pre_acts`)."""
        out = torch.bmm(acts.transpose(0, 1), self.W_dec).transpose(0, 1)
        return out + self.b_dec.to(out.dtype)

    def forward(self, x: Tensor) -> tuple[Float[Tensor, "batch inst d_out"], Float[Tensor, "batch inst d_sae"]]:
        """Return ``(x_hat, acts)``."""
        acts = self.encode(x)
        return self.decode(acts), acts

    # ------------------------------------------------------------------ helpers
    def decoder_norms(self) -> Float[Tensor, "inst d_sae"]:
        return self.W_dec.norm(dim=-1)

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        """Rescale every decoder row to unit norm (the encoder absorbs the scale)."""
        norms = self.W_dec.norm(dim=-1, keepdim=True).clamp_min(1e-8)  # [inst, d_sae, 1]
        self.W_dec.div_(norms)
        self.W_enc.mul_(norms.transpose(1, 2))
        self.b_enc.mul_(norms[..., 0])

    @torch.no_grad()
    def permute_latents(self, perm: Tensor) -> None:
        """Reorder latents per instance: ``perm`` is ``[inst, d_sae]`` long (new j ← old perm[j])."""
        if perm.shape != (self.n_inst, self.d_sae):
            raise ValueError(f"perm must have shape {(self.n_inst, self.d_sae)}, got {tuple(perm.shape)}")
        self.W_enc.copy_(self.W_enc.gather(2, perm[:, None, :].expand_as(self.W_enc)))
        self.b_enc.copy_(self.b_enc.gather(1, perm))
        self.W_dec.copy_(self.W_dec.gather(1, perm[:, :, None].expand_as(self.W_dec)))

    def instance(self, i: int) -> "SAE":
        """A single-instance copy of instance ``i`` (e.g. for saving or per-model analysis), on
        the device and in the dtype of this SAE's parameters (its config says so, even if this
        SAE was moved with ``.to`` after it was made).

        Raises IndexError if ``i`` is not in ``[0, n_inst)``.
        """
        if not (0 <= i < self.n_inst):
            raise IndexError(f"instance {i} out of range for n_inst={self.n_inst}")
        where = {"device": str(self.W_enc.device), "dtype": dtype_name(self.W_enc.dtype)}
        cfg = SAEConfig.from_dict({**self.cfg.to_dict(), "n_inst": 1, **where})
        out = SAE(cfg)
        with torch.no_grad():
            for name, t in list(self.named_parameters()) + list(self.named_buffers()):
                getattr(out, name).copy_(t[i : i + 1])
        out.train(self.training)
        return out
