"""``lightning-reg ablate --config run.yaml``: the ablation on the user's own model."""

from __future__ import annotations


class ConfigError(ValueError):
    """Bad ``--config`` input: the CLI prints it as one line and exits with code 2."""
