"""Configuration: Hydra composition of conf/, the typed run settings, and where files live."""
