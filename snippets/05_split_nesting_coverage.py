# --- notebook 05: is the split tree nested, and how many maxima have a dedicated latent at width d_vocab ---
# Paste after section 5 (needs WIDTHS, D_VOCAB, PURITY, acts, labels, eval_tokens, dag, tree from the cells above).
# A parent -> child link is nested when the child keeps at least as much of its activation mass (over the
# sequence maximum) inside the parent's 80 % range of maxima as the parent itself does
# (`saelib.max_of_k.split_nesting`); `range_nested` is the stricter test that the child's own 80 % range lies
# inside the parent's. Coverage counts maxima with a latent that puts > PURITY of its mass on them.
from saelib import claims as cl

gt_max = mk.ground_truth(eval_tokens)["max"]  # [n_eval]
hists = [mk.activation_histogram(acts[w], gt_max, D_VOCAB) for w in WIDTHS]  # per width [w, d_vocab]
range_mass = labels[WIDTHS[0]].range_mass
nesting = {"best-parent tree": mk.split_nesting(tree, hists, range_mass),
           "DAG (all links)": mk.split_nesting(dag, hists, range_mass)}
for name, s in nesting.items():
    per_width = ", ".join(f"{WIDTHS[lv]}->{WIDTHS[lv + 1]} {f:.2f}" for lv, f in s.by_level.items())
    print(f"{name}: {s.n_links} links, nested (mass) {s.fraction_nested:.3f}, nested (range) "
          f"{s.fraction_range_nested:.3f}; by width: {per_width}")
s_tree = nesting["best-parent tree"]
print(f"best-parent links leaving their parent's range (level/latent, level 0 = width {WIDTHS[0]}), worst first:")
for v in s_tree.violations[:12]:
    print("  ", v.describe(), f"| {v.distance:.1f} maxima outside")
coverage = mk.maxima_coverage(labels[D_VOCAB], D_VOCAB, PURITY)
print(f"width {D_VOCAB}: {coverage.covered} of {D_VOCAB} maxima have a dedicated latent "
      f"({coverage.exactly_one} exactly one); uncovered: {coverage.uncovered}")

# Coverage is asserted at the level measured: the recorded run (seed 0) covered COVERAGE_RECORDED maxima; one SAE,
# so the tolerance is the binomial spread of a count over the D_VOCAB maxima, two standard errors below it.
COVERAGE_RECORDED = 42  # maxima covered at width d_vocab in the recorded full run (update if the run changes)
p_cov = min(COVERAGE_RECORDED, D_VOCAB) / D_VOCAB
COVERAGE_LEVEL = int(COVERAGE_RECORDED - 2 * (D_VOCAB * p_cov * (1 - p_cov)) ** 0.5)
GROSS = "Gross (seed 001)"
nesting_claims = [
    cl.finding("the split tree is nested: every best-parent link keeps the child's maxima in its parent's range",
               s_tree.fraction_nested == 1.0, source=GROSS, published="coarse latents split into finer ones",
               measured=s_tree.fraction_nested),
    cl.finding(f"one latent per maximum at width d_vocab: all {D_VOCAB} maxima covered", coverage.covered == D_VOCAB,
               source=GROSS, published=f"{D_VOCAB} of {D_VOCAB} (roughly)", measured=coverage.covered),
    cl.finding(f"at width d_vocab at least {COVERAGE_LEVEL} of the {D_VOCAB} maxima have a dedicated latent "
               f"(recorded {COVERAGE_RECORDED}, minus two binomial SE)", coverage.covered >= COVERAGE_LEVEL,
               measured=coverage.covered, published=f"{D_VOCAB} of {D_VOCAB} (Gross, roughly)"),
]
# In the checking cell: replace the notebook's two coverage claims by these (keep the "all covered" text, which
# NOT_REPRODUCED names), and add the nesting claim's text to NOT_REPRODUCED if the printed fraction is below 1.
