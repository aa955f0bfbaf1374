"""The experiments the notebooks run, one module each: toy hierarchies (``toy_experiments``,
``hierarchy_analysis``, ``absorption``, ``hedging``, ``matryoshka_probes``), max-of-K and
feature trees (``max_of_k``, ``feature_trees``), the sparse-MLP pipeline (``sparse_mlp``),
polysemanticity checks (``polysemanticity``), and the rule that checks a notebook's claims
(``claims``). Their figure functions return ``matplotlib.figure.Figure`` objects."""
