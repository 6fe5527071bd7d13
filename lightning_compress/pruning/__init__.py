"""Pruning: masks, structured groups and the GradualPruning callback."""
