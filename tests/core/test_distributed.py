"""Data-parallel training (saelib.core.distributed, train_sae under torch.distributed): two CPU
processes over gloo give the weights of one process on the combined batch.

The tolerance is derived from float summation order, not fitted to the result. Each rank sums
its B/2 rows and the two partial sums are added; one process sums all B rows. Both orders lie
within (B - 1)·u of the exact sum (u: unit roundoff; relative to the sum of absolute terms), so
they differ by at most 2(B - 1)·u. Adam moves a weight by at most about ``lr`` per step, so a
relative error e in the step costs at most ``lr·e`` per step, summed over the steps. A factor K =
100 covers what this bound leaves out: Adam's division by sqrt(v), the clipping norm, cancellation
in the sums (the bound is relative to the absolute terms) and feedback through the weights over 20
steps. With B = 64, 20 steps, lr = 3e-2::

    atol = K · steps · lr · 2(B - 1)·u  =  4.5e-4 (float32, u = 2^-24),  8.4e-13 (float64, u = 2^-53)

with rtol = 0. The weights move by O(0.1) over the run, about 1000x this atol in float32. A
discrete decision taken differently (a latent permutation, a resampling draw, a ReLU at its
boundary) would differ by O(0.01 .. 1) and fail, as it should.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from saelib.core.distributed import DataParallel, data_parallel
from tests.builders import free_port

WORKER = Path(__file__).with_name("ddp_worker.py")
REPO = Path(__file__).resolve().parents[2]
STEPS, BATCH, LR, K = 20, 64, 3e-2, 100  # as in ddp_worker.py
UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.float64: 2.0**-53}


def atol_for(dtype: torch.dtype) -> float:
    return K * STEPS * LR * 2 * (BATCH - 1) * UNIT_ROUNDOFF[dtype]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> dict:
    """Run tests/core/ddp_worker.py as 2 gloo ranks (what ``torchrun --nproc_per_node=2`` sets up);
    killed after 50 s so CI can never hang."""
    out = tmp_path_factory.mktemp("ddp") / "result.pt"
    port = free_port()
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": "2",
           "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    procs = [
        subprocess.Popen([sys.executable, str(WORKER), str(out)], env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for r in range(2)
    ]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=50)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert all(p.returncode == 0 for p in procs), "\n".join(logs)
    return torch.load(out)


def test_two_gloo_ranks_equal_one_process_on_the_combined_batch(two_ranks):
    ddp, single = two_ranks["ddp"], two_ranks["single"]
    assert two_ranks["identical_on_ranks"]  # parameters stay bit-identical on every rank
    assert set(ddp) == set(single) and len(ddp) == 4
    for case in ddp:
        for name, want in single[case].items():
            got = ddp[case][name]
            assert got.dtype == want.dtype, (case, name)
            if name == "threshold" or name.startswith("history.step"):
                assert torch.equal(got.nan_to_num(7.0), want.nan_to_num(7.0)), (case, name)
                continue
            atol = atol_for(want.dtype if want.is_floating_point() else torch.float32)
            diff = (got - want).abs().max().item()
            assert diff <= atol, f"{case}.{name}: max |diff| {diff:.3g} > atol {atol:.3g}"
        moved = (single[case]["W_dec"] - single[case]["init.W_dec"]).abs().max().item()
        assert moved > 100 * atol_for(single[case]["W_enc"].dtype), case  # the test is not vacuous


def test_batch_not_divisible_by_world_size_raises(two_ranks):
    assert "batch_size=63 must be divisible by the torch.distributed world size 2" in two_ranks["odd_batch_error"]
    with pytest.raises(ValueError, match=r"batch_size=7 .* world size 2"):
        DataParallel(rank=0, world_size=2).local_rows(7)


def test_batchtopk_refused_under_ddp(two_ranks):
    assert "BatchTopK" in two_ranks["batchtopk_error"]


def test_local_rows_split_the_batch_in_rank_order():
    assert [DataParallel(r, 4).local_rows(8) for r in range(4)] == [slice(0, 2), slice(2, 4), slice(4, 6), slice(6, 8)]


def test_no_process_group_means_single_process():
    assert data_parallel() is None
