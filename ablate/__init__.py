"""Hydra multirun ablations of CNNs on CIFAR-10."""
import ablate.resolvers  # noqa: F401  (registers ${scaled:N} and ${job_folder:...} for conf/)
