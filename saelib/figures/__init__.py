"""Figures shared by several experiments: heatmaps, sweep plots and the one deterministic export
(``plotting.save_figure``), and the variant-comparison figures (``comparison_plots``). Every
function returns a ``matplotlib.figure.Figure``; nothing here imports ``matplotlib.pyplot``."""
