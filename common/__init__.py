"""Shared core of fineprune: models, data, usage statistics, scoring, masks, pruning."""
__version__ = "0.1.0"
