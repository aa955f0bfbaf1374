"""Tests for saelib.experiments.polysemanticity on planted latent activations with known answers."""

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot  # noqa: E402  (the tests close figures through pyplot)

import pytest
import torch
from matplotlib.figure import Figure

from saelib.experiments.polysemanticity import (
    Context,
    bos_profile,
    bottom_contexts,
    contexts_html,
    dense_latents,
    examine_latents,
    latent_density,
    plot_contexts,
    plot_density_histogram,
    plot_latent_report,
    plot_position_profiles,
    position_dependence,
    position_profile,
    reports_html,
    reports_table,
    top_contexts,
)


def decode(ids):
    return [f"t{i}" for i in ids]


def test_latent_density_by_hand():
    acts = torch.zeros(2, 4, 3)  # [n_seq, pos, d_sae]
    acts[:, 0, :] = 1.0  # BOS fires everything: excluded
    acts[0, 1, 0] = 0.5
    acts[1, 2, 0] = 2.0
    acts[:, 1:, 1] = 1.0
    # latent 0: 2 of 6 non-BOS tokens; latent 1: all; latent 2: none
    assert torch.allclose(latent_density(acts), torch.tensor([2 / 6, 1.0, 0.0]))
    assert torch.allclose(latent_density(acts, drop_bos=False), torch.tensor([4 / 8, 1.0, 2 / 8]))
    with pytest.raises(ValueError, match="n_seq, pos, d_sae"):
        latent_density(acts[0])


def test_dense_latents_order_and_threshold():
    density = torch.tensor([0.05, 0.5, 0.1, 0.2, 0.5])
    assert dense_latents(density).tolist() == [1, 4, 3]  # 0.1 is not > 0.1; ties by index
    assert dense_latents(density, 0.3).tolist() == [1, 4]
    with pytest.raises(ValueError, match="threshold"):
        dense_latents(density, 1.0)


def planted():
    tokens = torch.arange(3 * 10).view(3, 10)
    acts = torch.zeros(3, 10)
    acts[0, 0] = 100.0  # BOS: must be ignored
    acts[1, 5] = 10.0
    acts[2, 2] = 7.0
    acts[0, 8] = 0.5  # bottom 10 % of max (10): <= 1.0
    acts[2, 9] = 1.0
    acts[1, 1] = 0.2
    acts[0, 4] = 3.0  # not in the bottom decile
    return acts, tokens


def test_top_contexts_planted():
    acts, tokens = planted()
    top = top_contexts(acts, tokens, decode, k=2, window=(2, 1))
    assert [(c.seq, c.pos, c.act) for c in top] == [(1, 5, 10.0), (2, 2, 7.0)]
    c = top[0]
    assert c.tokens == ["t13", "t14", "t15", "t16"] and c.center == 2
    assert c.acts == [0.0, 0.0, 10.0, 0.0]
    # window clipped at the sequence start
    assert top[1].tokens == ["t20", "t21", "t22", "t23"] and top[1].center == 2
    # asking for more than the number of firings returns them all (6 non-BOS firings)
    assert len(top_contexts(acts, tokens, decode, k=50)) == 6
    assert top_contexts(acts, tokens, decode, k=1, skip_bos=False)[0].pos == 0


def test_bottom_contexts_are_in_the_bottom_decile():
    acts, tokens = planted()
    bottom = bottom_contexts(acts, tokens, decode, k=10, frac=0.1)
    assert sorted((c.seq, c.pos) for c in bottom) == [(0, 8), (1, 1), (2, 9)]
    assert [c.act for c in bottom] == sorted([c.act for c in bottom], reverse=True)
    two = bottom_contexts(acts, tokens, decode, k=2, frac=0.1, seed=1)
    assert len(two) == 2 and all(0 < c.act <= 1.0 for c in two)
    assert [(c.seq, c.pos) for c in two] == [(c.seq, c.pos) for c in bottom_contexts(acts, tokens, decode, k=2, seed=1)]
    assert bottom_contexts(torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.long), decode) == []
    with pytest.raises(ValueError, match="frac"):
        bottom_contexts(acts, tokens, decode, frac=0.0)
    with pytest.raises(ValueError, match="n_seq, pos"):
        bottom_contexts(acts, tokens[:, :5], decode)


def test_position_dependence_extremes():
    g = torch.Generator().manual_seed(0)
    positional = torch.arange(32.0).expand(500, 32).clone()  # a function of position only
    assert position_dependence(positional) == pytest.approx(1.0)
    iid = torch.rand(5000, 32, generator=g)  # independent of position
    assert position_dependence(iid) < 0.01
    assert position_dependence(torch.ones(4, 8)) == 0.0
    mixed = positional + 1023**0.5 * torch.rand(500, 32, generator=g)  # both variances (32²-1)/12: eta² ~ 1/2
    assert 0.35 < position_dependence(mixed) < 0.65


def test_position_profile_and_bos():
    acts = torch.zeros(4, 5)
    acts[:, 1:] = 2.0
    acts[0, 3] = 0.0
    prof = position_profile(acts)
    assert prof["freq"].tolist() == [0.0, 1.0, 1.0, 0.75, 1.0]
    assert prof["mean"].tolist() == [0.0, 2.0, 2.0, 1.5, 2.0]
    assert bos_profile(acts) == {"bos": 0.0, "non_bos": 15 / 16}


def test_contexts_html_escapes_and_highlights():
    ctx = [Context(seq=0, pos=1, act=2.0, tokens=["<b>", " x&y", "\n"], acts=[0.0, 2.0, 1.0], center=1)]
    out = contexts_html(ctx, title="latent 3")
    assert "&lt;b&gt;" in out and " x&amp;y" in out and "<b>latent 3</b>" in out
    assert out.count("<span") == 3
    assert "rgba(220,40,40,1.00)" in out and "rgba(220,40,40,0.50)" in out and "rgba(220,40,40,0.00)" in out
    assert "underline" in out


def test_plots_return_figures():
    acts, tokens = planted()
    figs = [
        plot_density_histogram({"a": torch.tensor([0.0, 0.01, 0.2, 0.5]), "b": torch.tensor([0.001, 0.3])}),
        plot_contexts(top_contexts(acts, tokens, decode, k=3), title="$x$ tokens"),
        plot_latent_report(acts, tokens, decode, title="latent 0"),
    ]
    for fig in figs:
        assert isinstance(fig, Figure)
        fig.canvas.draw()
        matplotlib.pyplot.close(fig)


def test_examine_latents_planted():
    acts1, tokens = planted()
    acts = torch.stack([acts1, torch.zeros_like(acts1), torch.ones_like(acts1)], dim=-1)  # [3, 10, 3]
    reports = examine_latents(acts, tokens, decode, latents=[0, 2], k=3)
    r0, r2 = reports
    assert r0.latent == 0 and r0.density == pytest.approx(6 / 27) and r0.bos_freq == pytest.approx(1 / 3)
    assert r0.max_act == 10.0 and [c.act for c in r0.top] == [10.0, 7.0, 3.0]
    assert all(0 < c.act <= 1.0 for c in r0.bottom)
    assert r0.top_tokens[0] == ("t15", 1)  # token id 15 = seq 1, pos 5
    assert r2.density == 1.0 and r2.bos_freq == 1.0 and r2.position_eta2 == 0.0
    table = reports_table(reports)
    assert table.count("\n") == 3 and "| 0 | 0.222 | 33% |" in table
    html = reports_html(reports)
    assert html.count("<hr>") == 2 and "latent 2: density 1.000" in html
    with pytest.raises(ValueError, match="out of range"):
        examine_latents(acts, tokens, decode, latents=[3])
    with pytest.raises(ValueError, match="matching tokens"):
        examine_latents(acts[:2], tokens, decode, latents=[0])
    fig = plot_position_profiles(acts, [0, 1, 2], n_cols=2)
    assert isinstance(fig, Figure)
    assert sum(ax.get_visible() for ax in fig.axes[:4]) == 3  # 3 panels on a 2x2 grid, the 4th hidden
    matplotlib.pyplot.close(fig)


def test_sequence_latents_match_direct_encoding():
    from saelib.core.sae import SAE, SAEConfig
    from saelib.experiments.polysemanticity import sequence_latents

    sae = SAE(SAEConfig(d_in=4, d_sae=6, n_inst=2, seed=1))
    x = torch.randn(3, 5, 4)
    got = sequence_latents(sae, x, scale=2.0, instance=1, batch_size=4)
    assert got.shape == (3, 5, 6)
    assert torch.allclose(got[2, 3], sae.encode(2.0 * x[2, 3][None])[0, 1])
    with pytest.raises(ValueError, match="instance"):
        sequence_latents(sae, x, instance=2)


def test_reports_html_standalone_page():
    acts1, tokens = planted()
    reps = examine_latents(acts1[..., None], tokens, decode, latents=[0], k=2)
    page = reports_html(reps, title="L1 <SAE>")
    assert page.startswith("<!DOCTYPE html>") and "<title>L1 &lt;SAE&gt;</title>" in page and "CC BY-SA 4.0" in page
    assert reports_html(reps) in page


def test_mask_keeps_padding_out_of_every_statistic():
    # two documents of lengths 4 and 2, padded to 4 (pads hold 0, as pad_by_document writes)
    mask = torch.tensor([[True] * 4, [True, True, False, False]])
    acts = torch.zeros(2, 4, 2)
    acts[0, 1:, 0] = 1.0  # latent 0 fires on all 3 non-BOS tokens of doc 0 ...
    acts[1, 1, 0] = 1.0  # ... and on the only non-BOS token of doc 1: every valid token
    acts[0, 2, 1] = 3.0
    # 4 valid non-BOS tokens; without the mask the 2 pads would count as silent tokens
    assert torch.allclose(latent_density(acts, mask=mask), torch.tensor([1.0, 0.25]))
    assert torch.allclose(latent_density(acts), torch.tensor([4 / 6, 1 / 6]))
    assert bos_profile(acts[:, :, 0], mask) == {"bos": 0.0, "non_bos": 1.0}
    prof = position_profile(acts[:, :, 1], mask)
    assert prof["count"].tolist() == [2, 2, 1, 1]
    assert prof["mean"].tolist() == [0.0, 0.0, 3.0, 0.0] and prof["freq"].tolist() == [0.0, 0.0, 1.0, 0.0]
    with pytest.raises(ValueError, match="mask"):
        latent_density(acts, mask=mask[:, :3])


def test_position_dependence_with_unequal_counts_by_hand():
    # valid non-BOS values: position 1 -> [1, 3], position 2 -> [5] (doc 1 ends after position 1)
    a = torch.tensor([[0.0, 1.0, 5.0], [0.0, 3.0, 0.0]])
    mask = torch.tensor([[True, True, True], [True, True, False]])
    mean = 3.0
    total = (1 - mean) ** 2 + (3 - mean) ** 2 + (5 - mean) ** 2  # 8
    between = 2 * (2 - mean) ** 2 + 1 * (5 - mean) ** 2  # 6
    assert position_dependence(a, mask=mask) == pytest.approx(between / total)


def test_contexts_stop_at_the_document_end():
    tokens = torch.tensor([[0, 1, 2, 3, 4], [0, 5, 6, 0, 0]])
    mask = torch.tensor([[True] * 5, [True, True, True, False, False]])
    acts = torch.zeros(2, 5)
    acts[1, 2] = 2.0
    acts[1, 4] = 9.0  # a pad position: never a context
    (ctx,) = top_contexts(acts, tokens, decode, k=3, window=(5, 3), mask=mask)
    assert (ctx.seq, ctx.pos) == (1, 2) and ctx.tokens == ["t0", "t5", "t6"]


# ---------------------------------------------------------------------------- flat activations (activation stores)
def _trained_like_sae(architecture="relu"):
    from saelib.core.sae import SAE, SAEConfig

    sae = SAE(SAEConfig(d_in=5, d_sae=12, architecture=architecture, k=3 if architecture != "relu" else None, seed=2))
    with torch.no_grad():
        sae.b_enc.copy_(0.3 * torch.randn(1, 12))
        sae.b_dec.copy_(0.5 * torch.randn(1, 5))
    return sae


@pytest.mark.parametrize("architecture", ["relu", "topk"])
def test_encode_latents_equals_the_full_encoding_columns(architecture):
    from saelib.experiments.polysemanticity import encode_latents

    sae = _trained_like_sae(architecture)
    x = torch.randn(37, 5)
    full = sae.encode(0.7 * x)[:, 0]  # [n, d_sae]
    picked = [7, 0, 3]
    torch.testing.assert_close(encode_latents(sae, x, picked, scale=0.7, batch_size=8), full[:, picked])
    torch.testing.assert_close(encode_latents(sae, x, scale=0.7), full)


def test_encode_latents_errors():
    from saelib.experiments.polysemanticity import encode_latents

    sae = _trained_like_sae()
    with pytest.raises(ValueError, match=r"latent\(s\) \[12\]"):
        encode_latents(sae, torch.randn(4, 5), [1, 12])
    with pytest.raises(ValueError, match="d_in=5"):
        encode_latents(sae, torch.randn(4, 6))


def test_sae_statistics_match_the_metrics_on_the_kept_rows():
    from saelib.core.metrics import feature_density, fvu, l0
    from saelib.experiments.polysemanticity import sae_statistics

    sae = _trained_like_sae()
    x = torch.randn(50, 5)
    keep = torch.rand(50) > 0.3
    stats = sae_statistics(sae, x, keep, scale=2.0, batch_size=7)
    xk = 2.0 * x[keep]
    with torch.no_grad():
        x_hat, a = sae(xk)
    assert stats["n_tokens"] == int(keep.sum())
    assert stats["L0"] == pytest.approx(float(l0(a[:, 0])), rel=1e-6)
    assert stats["FVU"] == pytest.approx(float(fvu(xk, x_hat[:, 0])), rel=1e-5)
    torch.testing.assert_close(stats["density"], feature_density(a[:, 0]))
    assert stats["dead_frac"] == pytest.approx(float((feature_density(a[:, 0]) == 0).float().mean()))


def test_sae_statistics_errors():
    from saelib.experiments.polysemanticity import sae_statistics

    sae = _trained_like_sae()
    with pytest.raises(ValueError, match="keep selects no row"):
        sae_statistics(sae, torch.randn(4, 5), torch.zeros(4, dtype=torch.bool))
    with pytest.raises(ValueError, match="keep must be"):
        sae_statistics(sae, torch.randn(4, 5), torch.ones(3, dtype=torch.bool))


def test_examine_latents_reports_the_sae_index_of_each_column():
    acts = torch.zeros(2, 5, 2)
    acts[0, 2, 0], acts[1, 3, 1] = 1.0, 2.0
    tokens = torch.arange(10).view(2, 5)
    reps = examine_latents(acts, tokens, decode, [1, 0], latent_ids=[40, 7])
    assert [r.latent for r in reps] == [7, 40]
    assert reps[0].max_act == 2.0
    with pytest.raises(ValueError, match="latent_ids has 1 entries for 2 columns"):
        examine_latents(acts, tokens, decode, [0], latent_ids=[3])


def test_position_profiles_name_columns_by_sae_index_and_leave_bos_out_of_the_curve():
    acts = torch.zeros(30, 6, 2)
    acts[:, 0, 1] = 100.0  # a huge BOS activation
    acts[:, 1:, 1] = 1.0
    fig = plot_position_profiles(acts, [1], latent_ids=[11, 42], min_count=1)
    ax = fig.axes[0]
    assert ax.get_title().startswith("latent 42 ") and "BOS 100%" in ax.get_title()
    xs, ys = ax.lines[0].get_data()
    assert list(xs) == [1, 2, 3, 4, 5] and max(ys) == 1.0  # BOS not drawn


def test_sae_statistics_per_document_sums_and_their_intervals():
    from saelib.core.metrics import active, fvu
    from saelib.experiments.polysemanticity import sae_statistics, statistic_intervals

    sae = _trained_like_sae()
    g = torch.Generator().manual_seed(3)
    x = torch.randn(60, 5, generator=g)
    doc = torch.arange(6).repeat_interleave(10)  # 6 documents of 10 rows
    keep = torch.ones(60, dtype=torch.bool)
    keep[::10] = False  # each document's BOS row
    stats = sae_statistics(sae, x, keep, scale=2.0, batch_size=7, doc=doc)
    per = stats["per_document"]
    assert per["tokens"].tolist() == [9.0] * 6
    xk = 2.0 * x
    with torch.no_grad():
        x_hat, a = sae(xk)
    mean = xk[keep].mean(0)
    for d in range(6):  # each document's sums, by hand
        rows = (doc == d) & keep
        assert per["active"][d] == pytest.approx(float(active(a[rows, 0]).sum()))
        assert per["sq_err"][d] == pytest.approx(float((xk[rows] - x_hat[rows, 0]).pow(2).sum()), rel=1e-5)
        assert per["sq_dev"][d] == pytest.approx(float((xk[rows] - mean).pow(2).sum()), rel=1e-5)
        torch.testing.assert_close(torch.from_numpy(per["fired"][d]).float(), active(a[rows, 0]).float().sum(0))
    assert per["sq_err"].sum() / per["sq_dev"].sum() == pytest.approx(float(fvu(xk[keep], x_hat[keep, 0])), rel=1e-5)
    ci = statistic_intervals(stats, dense_threshold=0.3, n_boot=300)
    assert ci["L0"].estimate == pytest.approx(stats["L0"]) and ci["FVU"].estimate == pytest.approx(stats["FVU"])
    assert ci["dense_frac"].estimate == pytest.approx(float((stats["density"] > 0.3).float().mean()))
    for c in ci.values():
        assert c.low <= c.estimate <= c.high and c.n == 6
    with pytest.raises(ValueError, match="per-document"):
        statistic_intervals(sae_statistics(sae, x, keep))
    with pytest.raises(ValueError, match="doc must be"):
        sae_statistics(sae, x, keep, doc=doc[:5])
