"""The README's "Use it from Python" examples run as written and print what they claim.

Both fenced ``python`` blocks under that heading are read from README.md (not copied here) and
executed in order in one fresh namespace, as a reader pasting them into one session would; the
cache folder is a temporary one, so the second block takes its fallback (saving the SAE the first
block trained) unless a test puts a notebook's folder there first. The printed numbers are parsed
and checked against quantities computed here without saelib's metrics: the Hungarian MCC with
scipy, the share of each parent's samples in which a child fires (what a vanilla SAE that absorbs
its parents scores), and the SAE's encoding recomputed from the saved safetensors.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from scipy.optimize import linear_sum_assignment

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
HEADING = "## Use it from Python"
NOTEBOOK_01 = ROOT / "notebooks" / "01_toy_parent_child_mixing.ipynb"
NUMBER = r"([-+]?\d+(?:\.\d+)?(?:e[-+]?\d+)?)"

pytestmark = pytest.mark.usefixtures("single_thread")


def readme_blocks() -> list[tuple[int, str]]:
    """``(first line number, code)`` of each fenced ``python`` block of the README section."""
    text = README.read_text(encoding="utf-8")
    assert text.count(HEADING + "\n") == 1, f"README.md must have exactly one {HEADING!r} section"
    start = text.index(HEADING + "\n")
    end = text.find("\n## ", start + len(HEADING))
    section = text[start : len(text) if end < 0 else end]
    first_line = text[:start].count("\n") + 1
    blocks = []
    for m in re.finditer(r"^```python\n(.*?)^```$", section, flags=re.S | re.M):
        blocks.append((first_line + section[: m.start()].count("\n") + 1, m.group(1)))
    assert len(blocks) == 2, f"expected 2 python blocks under {HEADING!r}, found {len(blocks)}"
    return blocks


def run_block(index: int, namespace: dict) -> str:
    """Execute block ``index`` in ``namespace``; returns what it printed."""
    line, code = readme_blocks()[index]
    compiled = compile("\n" * (line - 1) + code, f"{README}", "exec")  # tracebacks give README's lines
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compiled, namespace)
    return out.getvalue()


def printed(pattern: str, text: str) -> float:
    m = re.search(pattern, text)
    assert m, f"pattern {pattern!r} not found in the printed output {text!r}"
    return float(m.group(1))


@pytest.fixture(scope="module")
def trained(single_thread, tmp_path_factory) -> tuple[dict, str]:
    """The first block run once for the module: ``(namespace, printed output)``."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SAELIB_CACHE_DIR", str(tmp_path_factory.mktemp("cache_block1")))
        torch.manual_seed(0)
        namespace = {"__name__": "readme_example"}
        return namespace, run_block(0, namespace)


def test_training_example_prints_recovery_and_absorption(trained):
    ns, out = trained
    assert out.count("\n") == 1, f"the example should print one line, got {out!r}"
    mcc_printed = printed(r"MCC " + NUMBER, out)
    l0_printed = printed(r"L0 " + NUMBER, out)
    full = printed(r"full-absorption rate " + NUMBER, out)
    fraction = printed(r"absorption fraction " + NUMBER, out)

    # MCC recomputed here: Hungarian matching of |cos(W_dec row, true feature)|
    W_dec = ns["sae"].W_dec[0].detach().double()  # [d_sae, d_in]
    features = ns["tree"].features.double()  # [n_feat, d_in]
    cos = torch.nn.functional.normalize(W_dec, dim=1) @ torch.nn.functional.normalize(features, dim=1).T
    rows, cols = linear_sum_assignment(cos.abs().numpy(), maximize=True)
    expected_mcc = float(cos.abs().numpy()[rows, cols].mean())
    assert mcc_printed == pytest.approx(expected_mcc, abs=1e-3)
    assert 0.7 < mcc_printed <= 1.0, "a trained SAE recovers most features (an untrained one: about 0.44)"
    assert 0.3 < l0_printed < 3.0, "the target L0 is the tree's E[L0] = 1.12"

    # a vanilla SAE absorbs each parent whenever one of its children fires: the full-absorption
    # rate is then the share of each parent's samples with a child on (0.6 for this tree)
    tree, coeffs = ns["tree"], ns["coeffs"]
    parents = [p for p in range(tree.n_features) if (tree.parent_index == p).any()]
    assert len(parents) == 3
    shares = []
    for p in parents:
        on = coeffs[:, p] > 0
        child_on = (coeffs[:, tree.parent_index == p] > 0).any(1)
        shares.append(float((on & child_on).sum() / on.sum()))
    assert full == pytest.approx(float(np.mean(shares)), abs=0.1)
    assert 0.0 <= full <= fraction + 1e-3 <= 1.0 + 1e-3


def _relu_encode(folder: Path, x: torch.Tensor) -> torch.Tensor:
    """ReLU((x - b_dec) @ W_enc + b_enc) from the saved weights, ``[batch, d_sae]``."""
    w = load_file(str(folder / "sae_weights.safetensors"))
    cfg = json.loads((folder / "cfg.json").read_text())
    assert cfg["architecture"] == "standard" and cfg["apply_b_dec_to_input"] is True
    return torch.relu((x - w["b_dec"]) @ w["W_enc"] + w["b_enc"])


def test_saelens_example_saves_and_opens_the_trained_sae(trained, cache_dir):
    ns = dict(trained[0])
    out = run_block(1, ns)
    folder = Path(ns["folder"])
    assert folder.parent.parent == cache_dir and (folder / "cfg.json").is_file(), (
        f"with no notebook output the example saves under the cache, got {folder}"
    )
    assert out.startswith(f"StandardSAE from {folder}: 20 latents")
    assert printed(r"activation gap " + NUMBER, out) <= 1e-5
    x = ns["x"]
    with torch.no_grad():
        expected = _relu_encode(folder, x)  # [batch, d_sae]
        torch.testing.assert_close(ns["lens_sae"].encode(x), expected)
        torch.testing.assert_close(ns["saelib_sae"].encode(x)[:, 0], expected)
        torch.testing.assert_close(ns["sae"].eval().encode(x)[:, 0], expected)  # the SAE of block 1
    assert (expected > 0).any(), "the batch should activate some latents"


def test_saelens_example_opens_notebook_01s_folder_when_present(trained, cache_dir):
    from saelib.core.persistence import save_sae
    from saelib.core.sae import SAE, SAEConfig

    relative = Path("notebooks", "01_toy_parent_child_mixing", "matryoshka", "seed_0")
    assert relative.as_posix() in NOTEBOOK_01.read_text(encoding="utf-8"), (
        "the README opens the folder notebook 01 reports saving; the notebook no longer names it"
    )
    other = SAE(SAEConfig(d_in=20, d_sae=20, seed=7))  # stands in for the notebook's SAE
    with torch.no_grad():
        other.b_enc.fill_(0.5)
    save_sae(other, cache_dir / relative)
    ns = dict(trained[0])
    out = run_block(1, ns)
    assert Path(ns["folder"]) == cache_dir / relative
    assert not (cache_dir / "readme_example").exists(), "with the notebook's folder there, nothing is saved"
    assert printed(r"activation gap " + NUMBER, out) <= 1e-5
    with torch.no_grad():
        expected = _relu_encode(cache_dir / relative, ns["x"])
        torch.testing.assert_close(ns["saelib_sae"].encode(ns["x"])[:, 0], expected)
        torch.testing.assert_close(other.eval().encode(ns["x"])[:, 0], expected)
        assert not torch.allclose(ns["sae"].eval().encode(ns["x"])[:, 0], expected), "opened block 1's SAE"
