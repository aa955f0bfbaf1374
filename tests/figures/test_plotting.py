"""Tests for saelib.figures.plotting: figure contents, no global pyplot state, deterministic atomic saving."""

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402
from PIL import Image  # noqa: E402

import saelib.core.persistence  # noqa: E402
from saelib.figures.plotting import cosine_heatmap, figures_root, sae_feature_heatmaps, save_figure  # noqa: E402

# seaborn 0.13 calls Colormap.set_bad, which matplotlib 3.11 marks pending-deprecated.
pytestmark = pytest.mark.filterwarnings("ignore:The set_bad function:PendingDeprecationWarning")


@pytest.fixture(autouse=True)
def _no_show(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("library code must not call plt.show()")

    monkeypatch.setattr(plt, "show", fail)
    yield
    plt.close("all")


def block_rects(ax) -> list[tuple[float, float, float, float]]:
    return sorted(
        (p.get_x(), p.get_y(), p.get_width(), p.get_height())
        for p in ax.patches
        if isinstance(p, Rectangle) and not p.get_fill()
    )


def tick_texts(labels) -> list[str]:
    return [t.get_text() for t in labels]


# ---------------------------------------------------------------------------- cosine_heatmap
def test_cosine_heatmap_draws_values_blocks_and_labels():
    cos = torch.tensor([[0.9, -0.5, 0.0], [0.1, 0.2, -1.0], [0.0, 0.3, 0.7], [0.4, 0.0, 0.0]])
    n_figs = len(plt.get_fignums())
    fig = cosine_heatmap(cos, row_labels=list("abcd"), col_labels=["p", "c1", "c2"],
                         blocks=[(0, 1), (1, 3)], title="dec", annotate=True)
    assert isinstance(fig, Figure)
    assert len(plt.get_fignums()) == n_figs  # not registered with pyplot
    ax = fig.axes[0]
    mesh = ax.collections[0]
    np.testing.assert_allclose(np.ma.getdata(mesh.get_array()).reshape(4, 3), cos.numpy(), rtol=0, atol=1e-7)
    # diverging map centred at 0 on [-1, 1]: 0 maps to the map's midpoint
    norm = mesh.norm
    assert (norm.vmin, norm.vmax) == (-1.0, 1.0)
    assert norm(0.0) == pytest.approx(0.5)
    assert block_rects(ax) == [(0, 0, 1, 1), (1, 1, 2, 2)]
    assert tick_texts(ax.get_xticklabels()) == ["p", "c1", "c2"]
    assert tick_texts(ax.get_yticklabels()) == list("abcd")
    assert ax.get_title() == "dec"
    assert sorted(t.get_text() for t in ax.texts) == sorted(f"{v:.2f}" for v in cos.flatten().tolist())


def test_cosine_heatmap_into_given_axes_and_custom_range():
    fig = Figure()
    ax1, ax2 = fig.subplots(1, 2)
    out = cosine_heatmap(np.array([[0.2, -0.1]]), ax=ax2, vmin=-0.5, vmax=0.5)
    assert out is fig
    assert len(ax1.collections) == 0 and len(ax2.collections) == 1
    assert (ax2.collections[0].norm.vmin, ax2.collections[0].norm.vmax) == (-0.5, 0.5)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(blocks=[(2, 5)]), "block"),
        (dict(blocks=[(2, 2)]), "block"),
        (dict(row_labels=["a"]), "row_labels"),
        (dict(col_labels=["a", "b", "c", "d", "e"]), "col_labels"),
        (dict(vmin=1.0, vmax=1.0), "vmin"),
    ],
)
def test_cosine_heatmap_validates(kwargs, match):
    with pytest.raises(ValueError, match=match):
        cosine_heatmap(torch.zeros(3, 4), **kwargs)


def test_cosine_heatmap_rejects_non_matrix():
    with pytest.raises(ValueError, match="2-D"):
        cosine_heatmap(torch.zeros(3))


# ---------------------------------------------------------------------------- sae_feature_heatmaps
def planted_sae(d_in=6, n_feat=3):
    """Features e0, e1, e2; latent 4 = f0, latent 1 = -f1 (scaled), latent 0 = f2; latents 2, 3
    are weak mixtures. Expected Hungarian order: [4, 1, 0, 2, 3]."""
    features = torch.eye(n_feat, d_in)
    W_dec = torch.zeros(5, d_in)
    W_dec[4, 0], W_dec[1, 1], W_dec[0, 2] = 1.0, -2.0, 0.5
    W_dec[2] = torch.tensor([0.1, 0.1, 0.1, 1.0, 0.0, 0.0])
    W_dec[3] = torch.tensor([0.0, 0.1, 0.0, 0.0, 1.0, 0.0])
    W_enc = W_dec.T.clone()
    W_enc[3, 4] = 1.0  # encoder of latent 4 = e0 + e3: cosine 1/sqrt(2) with f0
    return W_enc, W_dec, features


def test_sae_feature_heatmaps_hungarian_order_and_panels():
    W_enc, W_dec, features = planted_sae()
    b_dec = torch.tensor([1.0, 1.0, 0.0, 0.0, 0.0, 0.0])
    fig = sae_feature_heatmaps(W_enc, W_dec, b_dec, features, feature_names=["P", "C1", "C2"],
                               blocks=[(0, 3)], title="toy")
    assert isinstance(fig, Figure)
    heat_axes = [ax for ax in fig.axes if ax.collections and ax.get_label() != "<colorbar>"]
    ax_enc, ax_dec, ax_bias = heat_axes
    expected_rows = ["4", "1", "0", "2", "3"]
    assert tick_texts(ax_dec.get_yticklabels()) == expected_rows
    assert tick_texts(ax_enc.get_yticklabels()) == expected_rows
    assert tick_texts(ax_dec.get_xticklabels()) == ["P", "C1", "C2"]
    dec_vals = np.ma.getdata(ax_dec.collections[0].get_array()).reshape(5, 3)
    np.testing.assert_allclose(np.diag(dec_vals[:3]), [1.0, -1.0, 1.0], atol=1e-6)
    np.testing.assert_allclose(dec_vals[3], [0.1 / np.sqrt(1.03)] * 3, atol=1e-6)  # latent 2
    np.testing.assert_allclose(dec_vals[4], [0.0, 0.1 / np.sqrt(1.01), 0.0], atol=1e-6)  # latent 3
    enc_vals = np.ma.getdata(ax_enc.collections[0].get_array()).reshape(5, 3)
    assert enc_vals[0, 0] == pytest.approx(1 / np.sqrt(2), abs=1e-6)
    bias_vals = np.ma.getdata(ax_bias.collections[0].get_array()).reshape(1, 3)
    np.testing.assert_allclose(bias_vals, [[1 / np.sqrt(2), 1 / np.sqrt(2), 0.0]], atol=1e-6)
    assert block_rects(ax_dec) == [(0, 0, 3, 3)] and block_rects(ax_enc) == [(0, 0, 3, 3)]
    assert fig.get_suptitle() == "toy"


def test_sae_feature_heatmaps_without_bias_and_shape_errors():
    W_enc, W_dec, features = planted_sae()
    fig = sae_feature_heatmaps(W_enc, W_dec, None, features)
    heat_axes = [ax for ax in fig.axes if ax.collections and ax.get_label() != "<colorbar>"]
    assert len(heat_axes) == 2
    with pytest.raises(ValueError, match="d_in"):
        sae_feature_heatmaps(W_enc, W_dec, None, torch.eye(3, 7))
    with pytest.raises(ValueError):
        sae_feature_heatmaps(W_enc[None], W_dec[None], None, features)  # forgot [i]


# ---------------------------------------------------------------------------- save_figure
def small_figure(seed: int = 0) -> Figure:
    g = torch.Generator().manual_seed(seed)
    return cosine_heatmap(torch.rand(4, 3, generator=g) * 2 - 1, blocks=[(0, 2)], title="t", annotate=True)


def test_save_figure_writes_png_and_pdf_byte_identically(tmp_path):
    paths = save_figure(small_figure(), "01_demo/heat", root=tmp_path)
    assert paths == [tmp_path / "01_demo" / "heat.png", tmp_path / "01_demo" / "heat.pdf"]
    png, pdf = (p.read_bytes() for p in paths)
    assert png.startswith(b"\x89PNG") and pdf.startswith(b"%PDF")
    # no timestamps / software versions in the metadata
    assert "Software" not in Image.open(paths[0]).info
    assert b"CreationDate" not in pdf and b"ModDate" not in pdf
    # re-saving the same figure, and a freshly rebuilt one, gives byte-identical files
    save_figure(small_figure(), "01_demo/heat", root=tmp_path)
    assert (paths[0].read_bytes(), paths[1].read_bytes()) == (png, pdf)
    other = save_figure(small_figure(), "heat", root=tmp_path / "again")
    assert (other[0].read_bytes(), other[1].read_bytes()) == (png, pdf)
    # and a different figure does not
    save_figure(small_figure(seed=1), "different", root=tmp_path)
    assert (tmp_path / "different.png").read_bytes() != png


@pytest.mark.parametrize("name", ["/abs/fig", "../fig", "a/../b", "a/b/c", "fig.png", "a/fig.pdf",
                                  "", "a//b", "./fig", "a\\b"])
def test_save_figure_rejects_bad_names(tmp_path, name):
    with pytest.raises(ValueError):
        save_figure(small_figure(), name, root=tmp_path)
    assert list(tmp_path.rglob("*")) == []


def test_figures_root_resolution(tmp_path, monkeypatch):
    project = tmp_path / "proj"
    (project / "notebooks" / "deep").mkdir(parents=True)
    (project / "saelib").mkdir()
    monkeypatch.delenv("SAELIB_FIGURES_DIR", raising=False)
    monkeypatch.chdir(project / "notebooks" / "deep")
    assert figures_root() == (project / "figures").resolve()
    paths = save_figure(small_figure(), "x/fig")
    assert paths[0] == (project / "figures" / "x" / "fig.png").resolve() and paths[0].exists()
    monkeypatch.setenv("SAELIB_FIGURES_DIR", str(tmp_path / "env_figs"))
    assert figures_root() == tmp_path / "env_figs"
    monkeypatch.delenv("SAELIB_FIGURES_DIR")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert figures_root() == elsewhere.resolve() / "figures"


def test_save_figure_is_atomic(tmp_path, monkeypatch):
    paths = save_figure(small_figure(), "fig", root=tmp_path)
    old = [p.read_bytes() for p in paths]

    def broken_replace(src, dst):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(saelib.core.persistence.os, "replace", broken_replace)
    with pytest.raises(OSError, match="simulated"):
        save_figure(small_figure(seed=3), "fig", root=tmp_path)
    assert [p.read_bytes() for p in paths] == old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fig.pdf", "fig.png"]  # no temp files left
