"""The data side of :func:`saelib.core.train.train_sae`: the data sources it accepts (a data
function, stored activations, a pair of them for a transcoder, or one function per instance), the
random streams that drive them and the other draws of a run, with their two seeding schemes, and
the batch of each step.

Seeding (``TrainConfig.independent_instances``): by default one CPU generator per stream (data,
Matryoshka prefixes, dead-latent resampling) for all instances at once, seeded ``seed``,
``seed + 1_000_003`` and ``seed + 2_000_003``; with independent instances one generator per instance
and stream, seeded from ``(seed, instance id, stream)`` by :func:`instance_generators`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from .sae import SAE
from .train_config import TrainConfig

__all__ = [
    "DataFunction",
    "DataSource",
    "Sampler",
    "batch_sampler",
    "DATA_STREAM",
    "PREFIX_STREAM",
    "RESAMPLE_STREAM",
    "instance_generators",
    "RandomStreams",
    "seed_streams",
    "next_batch",
]

# ``(batch_size, generator) -> x``: ``x`` is ``[batch, d_in]`` (or ``[batch, inst, d_in]``), or for a
# transcoder a pair ``(inputs [batch, (inst,) d_in], targets [batch, (inst,) d_out])``
DataFunction = Callable[[int, torch.Generator], Tensor | tuple[Tensor, Tensor]]
# what train_sae accepts as ``data``: a data function, stored activations ``[n_samples, d_in]``, a
# pair of them ``(inputs, targets)`` for a transcoder, or one data function per instance
DataSource = DataFunction | Tensor | tuple[Tensor, Tensor] | list[DataFunction]
# ``(batch_size, generator) -> batch``, as batch_sampler returns it: a data function's output, or
# stored rows ``(inputs [batch, d_in], targets [batch, d_out])``
Sampler = Callable[[int, torch.Generator], Any]


def _check_stored(t: Tensor, d: int, what: str) -> None:
    if t.ndim != 2 or t.shape[1] != d:
        raise ValueError(f"{what} tensor must be [n_samples, {d}], got {tuple(t.shape)}")
    if not torch.isfinite(t).all():
        bad = (~torch.isfinite(t)).any(dim=1).nonzero().flatten()[:5].tolist()
        raise ValueError(f"{what} tensor contains NaN/inf (rows {bad} ...)")


def batch_sampler(
    data: DataSource, d_in: int, d_out: int, rows: slice | None = None
) -> tuple[Sampler, bool]:
    """Turn stored activations (a tensor, or an ``(inputs, targets)`` pair) into a sampler.

    ``data`` is a data function (returned as it is), a tensor ``[n_samples, d_in]`` (an
    autoencoder's inputs and targets) or a pair ``(inputs [n_samples, d_in], targets [n_samples,
    d_out])``; stored rows are drawn uniformly with replacement, ``torch.randint`` with the
    generator given to ``sample``, and stay on their device (the step moves them).

    Returns ``(sample, check_batches)``: stored tensors are checked for NaN/inf here, once, so
    ``check_batches`` is False for them and True for a data function, whose every batch
    :func:`saelib.core.train.train_sae` checks. With ``rows`` (data-parallel training)
    ``sample(batch, g)`` draws the combined batch of ``batch`` rows with ``g`` and returns only rows
    ``rows`` of it (stored data gathers only those rows; a data function makes the whole batch).

    Raises ValueError for one tensor when ``d_out != d_in`` (a transcoder needs a pair), a stored
    tensor that is not ``[n_samples, d]`` or holds NaN/inf (naming up to five bad rows), or inputs
    and targets with different numbers of rows.
    """
    if isinstance(data, Tensor):
        if d_out != d_in:
            raise ValueError(
                f"a transcoder (d_in={d_in}, d_out={d_out}) trains on a pair (inputs, targets), "
                f"got one tensor of shape {tuple(data.shape)} as data"
            )
        data = (data, data)
    if isinstance(data, tuple):
        inputs, targets = data
        _check_stored(inputs, d_in, "input activation")
        if targets is not inputs:
            _check_stored(targets, d_out, "target activation")
            if len(targets) != len(inputs):
                raise ValueError(f"inputs have {len(inputs)} rows but targets have {len(targets)}")

        def sample(batch: int, g: torch.Generator) -> tuple[Tensor, Tensor]:
            idx = torch.randint(len(inputs), (batch,), generator=g)
            if rows is not None:
                idx = idx[rows]
            return inputs[idx], targets[idx]

        return sample, False
    if rows is None:
        return data, True

    def local_part(batch: int, g: torch.Generator) -> Tensor | tuple[Tensor, Tensor]:
        out = data(batch, g)
        return tuple(t[rows] for t in out) if isinstance(out, tuple) else out[rows]  # type: ignore[return-value]

    return local_part, True


# the random streams of one instance under TrainConfig.independent_instances
DATA_STREAM, PREFIX_STREAM, RESAMPLE_STREAM = 0, 1, 2


def instance_generators(seed: int, instance_ids: Sequence[int], stream: int) -> list[torch.Generator]:
    """One CPU generator per instance for one random stream (data, prefixes or resampling).

    The generator of instance id ``i`` is seeded with a 64-bit state that numpy's
    ``SeedSequence(entropy=seed, spawn_key=(i, stream))`` hashes from the three numbers, so it is
    the same in every run that gives this instance id and seed, and unrelated to the stream of
    any other ``(seed, id, stream)`` (unlike ``seed + i``, where seed 0's instance 1 would be seed
    1's instance 0). ``stream`` is :data:`DATA_STREAM`, :data:`PREFIX_STREAM` or
    :data:`RESAMPLE_STREAM`; ``seed`` is taken modulo ``2**64``.

    Returns ``len(instance_ids)`` generators, in the order of ``instance_ids`` (a repeated id gets
    a second generator in the same state). Raises what numpy's ``SeedSequence`` raises for a
    negative instance id or stream (ValueError/TypeError; ``TrainConfig`` admits ids >= 0 only).
    """
    entropy = seed % 2**64  # SeedSequence takes non-negative ints only
    return [
        torch.Generator().manual_seed(
            int(np.random.SeedSequence(entropy, spawn_key=(i, stream)).generate_state(1, np.uint64)[0])
        )
        for i in instance_ids
    ]


def _stacked_batch(
    sample: Sampler | list[Sampler],
    batch_size: int,
    generators: list[torch.Generator],
    step: int,
    index: list[int] | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """One batch per generator, stacked along the instance axis: ``[batch, inst, d]`` (a pair of
    them for ``(inputs, targets)`` data); with ``index``, instance ``i`` gets the batch of
    ``generators[index[i]]`` (instances that share an id share one draw). ``sample`` may be a list
    with one function per generator (per-instance data functions): the samplers of
    :func:`batch_sampler`.

    Raises ValueError if the data function returns anything but one instance's ``[batch, d]``.
    """
    samplers = sample if isinstance(sample, list) else [sample] * len(generators)
    parts = [f(batch_size, g) for f, g in zip(samplers, generators)]
    for part in parts:
        for t in part if isinstance(part, tuple) else (part,):
            if t.ndim != 2:
                raise ValueError(
                    f"with TrainConfig.independent_instances the data function is called once per "
                    f"instance with that instance's generator and must return one instance's batch "
                    f"[batch, d], got shape {tuple(t.shape)} at step {step}"
                )
    if index is not None:
        parts = [parts[j] for j in index]
    if isinstance(parts[0], tuple):
        return tuple(torch.stack(ts, dim=1) for ts in zip(*parts))  # type: ignore[return-value]
    return torch.stack(parts, dim=1)


@dataclass
class RandomStreams:
    """The random streams of a run (CPU generators): one generator each, or one per instance
    (``TrainConfig.independent_instances``). ``data`` drives the batches (:func:`next_batch`),
    ``prefix`` the Matryoshka prefix draws and ``resample`` dead-latent resampling."""

    data: torch.Generator | list[torch.Generator]
    prefix: torch.Generator | list[torch.Generator]
    resample: torch.Generator | list[torch.Generator]
    # independent instances whose ids repeat: one data generator per distinct id, and the
    # position of each instance's generator in ``data`` (None when every id is distinct)
    data_index: list[int] | None = None


def seed_streams(cfg: TrainConfig, n_inst: int, share_data: bool = True) -> RandomStreams:
    """Seed the data, prefix and resampling streams of a run of ``n_inst`` instances from
    ``cfg.seed`` (the two schemes of the module docstring, chosen by ``cfg.independent_instances``).

    With independent instances and ``share_data`` (one data function for all instances), instances
    that share an id in ``cfg.instance_ids`` share one data generator (``data_index`` maps each
    instance to it); ``share_data=False`` (one data function per instance) gives every instance
    its own.

    Raises ValueError if ``cfg.instance_ids`` does not have ``n_inst`` ids.
    """
    if cfg.independent_instances:  # one generator per instance and stream
        ids = list(range(n_inst)) if cfg.instance_ids is None else list(cfg.instance_ids)
        if len(ids) != n_inst:
            raise ValueError(f"TrainConfig.instance_ids has {len(ids)} ids but n_inst={n_inst}")
        # with one data function, an id's data stream is drawn once per step and shared; with one
        # function per instance every instance draws (from its id's stream) with its own function
        distinct = list(dict.fromkeys(ids)) if share_data else ids
        return RandomStreams(
            instance_generators(cfg.seed, distinct, DATA_STREAM),
            *(instance_generators(cfg.seed, ids, s) for s in (PREFIX_STREAM, RESAMPLE_STREAM)),
            data_index=None if len(distinct) == len(ids) else [distinct.index(i) for i in ids],
        )
    # prefix sampling and dead-latent resampling draw from their own streams, so that neither
    # changes the data any instance sees
    return RandomStreams(
        torch.Generator().manual_seed(cfg.seed),
        torch.Generator().manual_seed(cfg.seed + 1_000_003),
        torch.Generator().manual_seed(cfg.seed + 2_000_003),
    )


def next_batch(
    sample: Sampler | list[Sampler], streams: RandomStreams, cfg: TrainConfig, sae: SAE, check: bool, step: int
) -> tuple[Tensor, Tensor, Tensor | None]:
    """This step's ``(x_in, target, data_ok)`` on the SAE's device and dtype, as the data source
    shapes them (``[batch, d_in]`` / ``[batch, d_out]`` or ``[batch, inst, d_in]`` /
    ``[batch, inst, d_out]``); ``target is x_in`` for an autoencoder; ``data_ok`` a 0-d bool (all
    finite) when ``check``, else None.

    ``sample`` is :func:`batch_sampler`'s sampler (or one per instance), drawn with
    ``streams.data``: once per step, or with ``cfg.independent_instances`` once per instance
    generator, the batches stacked to ``[batch, inst, d]``.

    Raises ValueError if a transcoder's data function returns one tensor, or (independent
    instances) if a data function returns anything but one instance's ``[batch, d]``; the
    messages name the step.
    """
    if cfg.independent_instances:
        batch = _stacked_batch(sample, cfg.batch_size, streams.data, step, streams.data_index)  # type: ignore[arg-type]
    else:
        batch = sample(cfg.batch_size, streams.data)  # type: ignore[operator]
    if isinstance(batch, tuple):
        x_in, x = batch
    elif sae.d_out != sae.d_in:
        raise ValueError(
            f"a transcoder (d_in={sae.d_in}, d_out={sae.d_out}) needs (inputs, targets) "
            f"batches, but the data function returned one tensor of shape {tuple(batch.shape)} "
            f"at step {step}"
        )
    else:
        x_in = x = batch
    like = {"device": sae.W_enc.device, "dtype": sae.W_enc.dtype}
    if x is x_in:  # to the SAE's device and dtype (no copy when already there)
        x_in = x = x_in.to(**like)
    else:
        x_in, x = x_in.to(**like), x.to(**like)
    data_ok: Tensor | None = None  # folded into the divergence check
    if check:
        data_ok = torch.isfinite(x_in).all()
        if x is not x_in:
            data_ok = data_ok & torch.isfinite(x).all()
    return x_in, x, data_ok

