"""Experiments: the pipeline over training seeds and bootstrapping rounds, pooled in one report."""
