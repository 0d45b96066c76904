"""lorabench's Hydra launcher plugins (Hydra accepts launchers only from the hydra_plugins namespace)."""
