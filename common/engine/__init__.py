"""The engine: label-free fine-pruning, forward passes only (statistics, scores, masks, stop rules, heads)."""
