"""`hydra/launcher=fused`: the jobs of a sweep that differ only in `seed` train as one stacked model."""
