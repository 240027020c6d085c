"""Evaluation: image sources, feature extractors, metrics (FID, precision/recall, density/coverage,
CLIPScore, VQAScore), cached reference statistics, rank scoring, paper-style tables, Pareto fronts
and image grids. `evaluate.py` assembles them (eval/evaluate.py); `scripts/make_tables.py` reports.
"""
