"""Shared test helpers: a tiny model zoo, data, a LightningModule and a 2-rank DDP pool."""
