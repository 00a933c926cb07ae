"""Hydra multirun ablations of CNNs on CIFAR-10."""
