"""`hydra/launcher=slurm` and `=local`: submitit's launchers, with a job that ends without a result
(scancel, a node failure) counted in the sweep summary instead of ending the sweep."""
