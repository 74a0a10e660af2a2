"""Bundled datasets (scikit-learn, nothing downloaded) as in-memory tensors and loaders.

``digits``: 1,797 8×8 grey images of hand-written digits, 10 classes, shaped ``(N, 1, 8, 8)``.
``breast_cancer``: 569 tumours, 30 tabular features, 2 classes.

Features are standardised with the *training* subset's statistics (per feature for tabular
data, one scalar for images so blank pixels stay blank). The split is stratified and fixed by
``split_seed``; the rest of the data after the training subset is the validation set.

Batches are lists ``[x, y]`` (not tuples), so batch-rewriting callbacks can change them in
place. The dataset implements ``__getitems__``, so a DataLoader fetches a whole batch with one
index operation instead of collating single samples.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset

__all__ = [
    "DATASETS",
    "DatasetInfo",
    "DemoData",
    "DemoDataModule",
    "TensorListDataset",
    "load_dataset",
    "make_loader",
]


@dataclass(frozen=True)
class DatasetInfo:
    """Static facts about a bundled dataset (no loading needed to validate the CLI)."""

    name: str
    n_samples: int
    num_classes: int
    kind: str  # "image" or "tabular"
    default_train_size: int
    description: str
    default_epochs: int = 20
    default_batch_size: int = 64

    @property
    def max_train_size(self) -> int:
        """At least 100 samples stay for validation."""
        return self.n_samples - 100

    min_train_size: int = 20


DATASETS: dict[str, DatasetInfo] = {
    "digits": DatasetInfo(
        "digits", 1797, 10, "image", 300, "sklearn load_digits: 8x8 grey digits, 10 classes"
    ),
    "breast_cancer": DatasetInfo(
        "breast_cancer",
        569,
        2,
        "tabular",
        100,
        "sklearn load_breast_cancer: 30 tabular features, 2 classes",
        default_epochs=60,
        default_batch_size=32,
    ),
}


class TensorListDataset(Dataset):
    """``[x[i], y[i]]`` items; ``__getitems__`` returns a whole batch as a list ``[x, y]``."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        if len(x) != len(y):
            raise ValueError(f"x and y must have the same length, got {len(x)} and {len(y)}")
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> list[torch.Tensor]:
        return [self.x[i], self.y[i]]

    def __getitems__(self, indices: list[int]) -> list[torch.Tensor]:
        idx = torch.as_tensor(indices, dtype=torch.long)
        return [self.x[idx], self.y[idx]]


def _identity_collate(batch: Any) -> Any:
    return batch


def make_loader(
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    batch_size: int,
    shuffle: bool,
    seed: int = 0,
) -> DataLoader:
    """An in-memory DataLoader of list batches (``num_workers=0``)."""
    generator = torch.Generator().manual_seed(seed) if shuffle else None
    return DataLoader(
        TensorListDataset(x, y),
        batch_size=batch_size,
        shuffle=shuffle,
        generator=generator,
        collate_fn=_identity_collate,
        num_workers=0,
    )


@dataclass
class DemoData:
    """A train/validation split of one bundled dataset, as tensors."""

    info: DatasetInfo
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])

    @property
    def num_classes(self) -> int:
        return self.info.num_classes

    def feature_std(self) -> torch.Tensor:
        """Per-feature standard deviation of the training inputs (shape of one input)."""
        return self.x_train.std(dim=0)


def load_dataset(name: str = "digits", *, train_size: int | None = None, split_seed: int = 0):
    """Load a bundled dataset, split it (stratified) and standardise it.

    Raises:
        ValueError: for an unknown dataset or a ``train_size`` outside
            ``[20, n_samples - 100]``.
    """
    if name not in DATASETS:
        raise ValueError(f"`dataset` must be one of {sorted(DATASETS)}; got {name!r}")
    info = DATASETS[name]
    train_size = info.default_train_size if train_size is None else train_size
    if not info.min_train_size <= train_size <= info.max_train_size:
        raise ValueError(
            f"`train_size` must be in [{info.min_train_size}, {info.max_train_size}] for "
            f"{name}, got {train_size}"
        )
    from sklearn import datasets
    from sklearn.model_selection import train_test_split

    if name == "digits":
        raw = datasets.load_digits()
        x_all = torch.tensor(raw.data, dtype=torch.float32).reshape(-1, 1, 8, 8)
    else:
        raw = datasets.load_breast_cancer()
        x_all = torch.tensor(raw.data, dtype=torch.float32)
    y_all = torch.tensor(raw.target, dtype=torch.long)
    idx_train, idx_val = train_test_split(
        torch.arange(len(y_all)).numpy(),
        train_size=train_size,
        stratify=y_all.numpy(),
        random_state=split_seed,
    )
    idx_train = torch.as_tensor(idx_train)
    idx_val = torch.as_tensor(idx_val)
    x_train, x_val = x_all[idx_train], x_all[idx_val]
    if info.kind == "image":
        mean, std = x_train.mean(), x_train.std()
    else:
        mean, std = x_train.mean(dim=0), x_train.std(dim=0).clamp_min(1e-6)
    x_train = (x_train - mean) / std
    x_val = (x_val - mean) / std
    return DemoData(info, x_train, y_all[idx_train], x_val, y_all[idx_val])


class DemoDataModule(pl.LightningDataModule):
    """A LightningDataModule over a bundled dataset (for LightningCLI and the examples).

    Args:
        dataset: ``"digits"`` or ``"breast_cancer"``.
        train_size: number of training samples; the rest is validation.
        batch_size: training batch size (validation uses one batch of up to 2048).
        split_seed: seed of the stratified split.

    Raises:
        ValueError: for an unknown dataset or an out-of-range ``train_size`` / ``batch_size``.

    Example:
        >>> dm = DemoDataModule("digits", train_size=300)
        >>> dm.setup("fit"); x, y = next(iter(dm.train_dataloader())); tuple(x.shape)
        (64, 1, 8, 8)
    """

    def __init__(
        self,
        dataset: str = "digits",
        train_size: int | None = None,
        batch_size: int = 64,
        split_seed: int = 0,
    ) -> None:
        super().__init__()
        if dataset not in DATASETS:
            raise ValueError(f"`dataset` must be one of {sorted(DATASETS)}; got {dataset!r}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"`batch_size` must be in [1, inf], got {batch_size!r}")
        self.dataset = dataset
        self.train_size = train_size
        self.batch_size = batch_size
        self.split_seed = split_seed
        self.data: DemoData | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.data is None:
            self.data = load_dataset(
                self.dataset, train_size=self.train_size, split_seed=self.split_seed
            )

    def _loaded(self) -> DemoData:
        if self.data is None:
            raise RuntimeError("DemoDataModule: call `setup()` before asking for a dataloader.")
        return self.data

    def train_dataloader(self) -> DataLoader:
        d = self._loaded()
        return make_loader(d.x_train, d.y_train, batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        d = self._loaded()
        return make_loader(d.x_val, d.y_val, batch_size=2048, shuffle=False)
