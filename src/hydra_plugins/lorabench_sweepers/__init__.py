"""Hydra plugins shipped with lorabench (Hydra discovers plugins under `hydra_plugins`)."""
