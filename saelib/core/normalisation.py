"""Activation normalisation: the one definition of each constant that inputs are multiplied by
before an SAE or transcoder trains on them.

Two normalisations are in use, and they are different quantities, not two ways to compute one:

* :func:`normalisation_scale` (LM activations: sparse MLPs, the LM SAEs of notebooks 07 and 08)
  is the ``c`` with ``mean_n ||c x||² = d``: one unit of variance per dimension.
  :func:`scale_from_mean_sq_norm` is the same constant from a mean squared norm computed
  elsewhere (e.g. streamed over a memory-mapped store,
  :meth:`saelib.lm.activations.ActivationStore.normalisation_scale`).
* :func:`mean_norm_scale` (toy hierarchies, :meth:`saelib.data.toy_data.ToyHierarchy.input_scale`)
  is Nabeshima's ``sqrt(d) / mean_n ||x||``: inputs of mean norm ``sqrt(d)``, the fixed point of
  his running normaliser, so his sparsity coefficients apply.
"""

from __future__ import annotations

import math

from jaxtyping import Float
from torch import Tensor

__all__ = ["normalisation_scale", "scale_from_mean_sq_norm", "mean_norm_scale"]


def scale_from_mean_sq_norm(mean_sq_norm: float, d: int, what: str = "activations have") -> float:
    """``sqrt(d / mean_sq_norm)``: the scalar ``c`` with ``mean ||c x||² = d`` for activations of
    width ``d`` whose mean squared norm is ``mean_sq_norm``.

    Raises ValueError (``what`` names the activations in the message) if ``mean_sq_norm`` is not
    > 0 (all-zero activations cannot be normalised)."""
    if not mean_sq_norm > 0:
        raise ValueError(f"{what} mean squared norm {mean_sq_norm}: cannot normalise")
    return math.sqrt(d / mean_sq_norm)


def normalisation_scale(x: Float[Tensor, "n d"]) -> float:
    """The scalar ``c`` with ``mean_n ||c x||² = d`` (mean squared norm in float64).

    Raises ValueError if ``x`` is all zeros."""
    return scale_from_mean_sq_norm(float(x.double().pow(2).sum(-1).mean()), x.shape[-1])


def mean_norm_scale(x: Float[Tensor, "n d"]) -> float:
    """Nabeshima's input normalisation: ``sqrt(d) / mean_n ||x||`` (norms in float64; rows that
    are all zero count, with norm 0), so that ``c x`` has mean norm ``sqrt(d)``.

    Raises ValueError if every row is zero."""
    mean_norm = float(x.double().norm(dim=-1).mean())
    if not mean_norm > 0:
        raise ValueError(f"all {len(x)} samples are zero: no input scale (firing probabilities too small?)")
    return math.sqrt(x.shape[-1]) / mean_norm
