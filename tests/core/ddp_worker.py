"""One rank of tests/core/test_distributed.py (not a test module itself: run by that test with the
environment ``torchrun`` would set: RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT).

Every rank trains the cases of :func:`cases` data-parallel over gloo. Rank 0 then leaves the
process group, trains the same cases in one process on the combined batch, and saves both, with
the checks that need a process group, to the file named by the first argument.
"""

import sys
from datetime import timedelta

import torch
import torch.distributed as dist

from saelib.core.matryoshka import MatryoshkaConfig
from saelib.core.sae import SAE, SAEConfig
from saelib.data.toy_data import nabeshima_tree
from saelib.core.train import TrainConfig, train_sae

STEPS, BATCH, LR = 20, 64, 3e-2  # the test's tolerance is derived from these
TREE = nabeshima_tree()


def tree_data(batch: int, g: torch.Generator) -> torch.Tensor:
    return TREE.sample(batch, g)[0]


def cases() -> dict[str, tuple[SAEConfig, object, TrainConfig]]:
    """name -> (SAE config, data, train config); small enough for a few seconds in all."""
    base = dict(steps=STEPS, batch_size=BATCH, lr=LR, warmup_steps=5, l1_coeff=0.05, log_every=5, progress=False)
    stored = TREE.sample(1000, torch.Generator().manual_seed(1))[0]
    return {
        # the adaptive sparsity controller reads the combined batch's L0
        "relu_target_l0": (SAEConfig(d_in=20, d_sae=24, n_inst=2, seed=0), tree_data,
                           TrainConfig(**base, target_l0=3.0, l1_warmup_frac=0.1)),
        # random prefixes, latent permutation, dead-latent resampling, a batch-level penalty
        "matryoshka_resample_freq": (SAEConfig(d_in=20, d_sae=24, n_inst=2, seed=1), stored,
                                     TrainConfig(**base, penalty="smooth_l0_freq", resample_dead_every=5,
                                                 matryoshka=MatryoshkaConfig(mode="random", n_prefixes=4,
                                                                             permute_latents=True))),
        # one data stream per instance; TopK
        "topk_independent": (SAEConfig(d_in=20, d_sae=24, n_inst=2, architecture="topk", k=3, seed=2), tree_data,
                             TrainConfig(**base, independent_instances=True)),
        # the same as the first case in float64: differences shrink with the unit roundoff
        "relu_target_l0_float64": (SAEConfig(d_in=20, d_sae=24, n_inst=2, seed=0, dtype="float64"), tree_data,
                                   TrainConfig(**base, target_l0=3.0, l1_warmup_frac=0.1)),
    }


def train_all() -> dict[str, dict[str, torch.Tensor]]:
    out = {}
    for name, (sae_cfg, data, train_cfg) in cases().items():
        sae = SAE(sae_cfg)
        init_W_dec = sae.W_dec.detach().clone()
        hist = train_sae(sae, data, train_cfg)
        out[name] = {k: v.detach().clone() for k, v in sae.state_dict().items()}
        out[name]["init.W_dec"] = init_W_dec
        out[name].update({f"history.{k}": v for k, v in hist.as_tensors().items()})
    return out


def same_on_every_rank(results: dict[str, dict[str, torch.Tensor]]) -> bool:
    """Whether every rank holds bit-identical weights and histories."""
    ok = True
    for tensors in results.values():
        for t in tensors.values():
            parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
            dist.all_gather(parts, t.contiguous())
            ok &= all(torch.equal(p.nan_to_num(7.0), t.nan_to_num(7.0)) for p in parts)
    return ok


def expect_error(kind: type[Exception], fn) -> str:
    try:
        fn()
    except kind as e:
        return str(e)
    return ""


def main(out_path: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=timedelta(seconds=30))
    ddp = train_all()
    identical = same_on_every_rank(ddp)
    sae_cfg, data, train_cfg = cases()["relu_target_l0"]
    odd = TrainConfig(**{**train_cfg.to_dict(), "batch_size": BATCH - 1})
    odd_batch_error = expect_error(ValueError, lambda: train_sae(SAE(sae_cfg), data, odd))
    topk_cfg = SAEConfig(d_in=20, d_sae=24, architecture="batchtopk", k=3)
    batchtopk_error = expect_error(NotImplementedError, lambda: train_sae(SAE(topk_cfg), data, train_cfg))
    rank = dist.get_rank()
    dist.barrier()
    dist.destroy_process_group()
    if rank == 0:  # now one process: the combined batch
        single = train_all()
        torch.save({"ddp": ddp, "single": single, "identical_on_ranks": identical,
                    "odd_batch_error": odd_batch_error, "batchtopk_error": batchtopk_error}, out_path)


if __name__ == "__main__":
    main(sys.argv[1])
