"""Figures from the outputs folder: reward–cost grids, safety ratios, Elo scatter, training curves."""
