"""Judging trained policies: quadrant classification with the scorer, pairwise GPT Elo, data selection."""
