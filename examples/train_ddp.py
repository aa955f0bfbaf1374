"""Train an SAE data-parallel over ``torch.distributed`` with :func:`saelib.core.train.train_sae`.

Run with torchrun (one process per CPU process or GPU)::

    torchrun --nproc_per_node=2 examples/train_ddp.py --out sae_ddp

Every rank builds the same SAE and calls ``train_sae`` with the same arguments; ``train_sae`` sees
the process group, gives each rank ``batch_size / nproc`` rows of every batch and averages the
gradients, so the result equals one process on the whole batch up to float rounding. Ranks use
gloo on CPUs and nccl on GPUs (rank ``LOCAL_RANK`` takes ``cuda:LOCAL_RANK``). Only rank 0 shows
progress and saves the SAE. Without torchrun the script trains in one process.
"""

import argparse
import os

import torch
import torch.distributed as dist

from saelib.core.persistence import save_sae
from saelib.core.sae import SAE, SAEConfig
from saelib.data.toy_data import nabeshima_tree
from saelib.core.train import TrainConfig, train_sae


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="sae_ddp", help="folder rank 0 saves the SAE to (SAELens layout)")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=512, help="combined batch; must divide by nproc")
    args = parser.parse_args()

    distributed = "RANK" in os.environ  # set by torchrun
    device = "cpu"
    if distributed:
        if torch.cuda.is_available():
            device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    elif torch.cuda.is_available():
        device = "cuda"

    tree = nabeshima_tree()
    sae = SAE(SAEConfig(d_in=tree.d, d_sae=tree.n_features, device=device, seed=0))
    cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, target_l0=tree.expected_l0(), seed=0)
    history = train_sae(sae, lambda batch, g: tree.sample(batch, g)[0], cfg)

    if not distributed or dist.get_rank() == 0:
        folder = save_sae(sae, args.out)
        print(f"final L0 {history.final('l0').tolist()}, FVU {history.final('fvu').tolist()}; saved to {folder}")
    if distributed:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
