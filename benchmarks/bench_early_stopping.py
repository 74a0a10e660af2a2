"""Early stopping with best-weight restoring: the cost of a snapshot, and of the whole callback.

* snapshot: our copy into preallocated CPU buffers (:class:`BestWeights`) against what
  other code does on each improvement: Keras' ``model.get_weights()`` (new host arrays each time,
  here ``{k: v.detach().cpu().clone()}``) and the common PyTorch recipe
  ``copy.deepcopy(model.state_dict())``. Model: an MLP with about 4.2 M parameters (16 MiB).
* fit: a small Trainer fit with ``EarlyStoppingCallback(restore_best_weights=True)`` against
  Lightning's ``EarlyStopping`` (which cannot restore), same metric stream: the whole overhead.
* copies: weight copies counted with a ``TorchDispatchMode`` during that fit (copies whose source
  is a parameter or buffer of the module): one per tensor per improvement, nothing else.
* device memory: with a CUDA device, the bytes allocated on it by a snapshot (must be 0).

Run: ``python -m benchmarks.bench_early_stopping``.
"""

from __future__ import annotations

import copy
import warnings

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from benchmarks.common import Row, format_table, interleaved_ms
from lightning_reg.early_stopping import BestWeights, EarlyStoppingCallback


def _big_model(device: str = "cpu") -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Linear(1024, 1024) for _ in range(4)]).to(device)


class _CountWeightCopies(TorchDispatchMode):
    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.sources = {t.data_ptr() for t in module.state_dict().values()}
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        src = args[1] if name == "copy_" else args[0] if name in ("_to_copy", "clone") else None
        if isinstance(src, torch.Tensor) and src.data_ptr() in self.sources:
            self.count += 1
        return func(*args, **(kwargs or {}))


def _snapshot_rows(quick: bool) -> list[Row]:
    model = _big_model()
    best = BestWeights()

    def ours() -> None:
        best.save(model)

    def keras_like() -> None:
        {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}

    def deepcopy() -> None:
        copy.deepcopy(model.state_dict())

    ms = interleaved_ms(
        {"ours": ours, "keras": keras_like, "deepcopy": deepcopy},
        repeats=5 if quick else 20,
        warmup=2,
    )
    tag = "early_stopping/snapshot 4.2M params"
    return [
        Row(tag, "preallocated CPU buffers", "get_weights-style clone", ms["ours"], ms["keras"]),
        Row(tag, "preallocated CPU buffers", "deepcopy(state_dict)", ms["ours"], ms["deepcopy"]),
    ]


def _fit_rows(quick: bool) -> tuple[list[Row], str]:
    import lightning.pytorch as pl
    import torch.nn.functional as F
    from torch.utils.data import DataLoader

    class Scripted(pl.LightningModule):
        def __init__(self, stream: list[float]) -> None:
            super().__init__()
            self.net = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 4))
            self.stream = stream

        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.cross_entropy(self.net(x), y)

        def validation_step(self, batch, batch_idx):
            self.log("val_loss", torch.tensor(self.stream[self.current_epoch]))

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    epochs = 6 if quick else 12
    # improves on every other epoch, never runs out of patience
    stream = [1.0 / (1 + e // 2) + (0.05 if e % 2 else 0.0) for e in range(epochs)]
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(16, 32, generator=g), torch.randint(0, 4, (16,), generator=g))] * 4
    loader = DataLoader(data, batch_size=None)
    from lightning.pytorch.callbacks import EarlyStopping

    classes = {"ours": EarlyStoppingCallback, "lightning": EarlyStopping}
    counts: dict[str, int] = {}

    def fit(label: str, count: bool = False) -> None:
        es = classes[label]("val_loss", patience=100)
        module = Scripted(stream)
        trainer = pl.Trainer(
            accelerator="cpu",
            max_epochs=epochs,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            num_sanity_val_steps=0,
            callbacks=[es],
        )
        if not count:
            trainer.fit(module, loader, loader)
            return
        with _CountWeightCopies(module) as counter:
            trainer.fit(module, loader, loader)
        counts[label] = counter.count
        counts["tensors"] = len(module.state_dict())
        counts[f"{label}_snapshots"] = es.best_weights.saves if label == "ours" else 0

    ms = interleaved_ms(
        {"ours": lambda: fit("ours"), "lightning": lambda: fit("lightning")},
        repeats=1 if quick else 2,
        warmup=1,
    )
    fit("ours", count=True)
    fit("lightning", count=True)
    note = (
        f"weight copies in a {epochs}-epoch fit: ours {counts['ours']} = "
        f"{counts['ours_snapshots']} improvements x {counts['tensors']} tensors; "
        f"Lightning's EarlyStopping {counts['lightning']}"
    )
    row = Row(
        f"early_stopping/fit {epochs} epochs",
        "EarlyStoppingCallback(restore)",
        "lightning EarlyStopping",
        ms["ours"],
        ms["lightning"],
        kind="overhead",
        target="~1x",
        note=note,
    )
    return [row], note


def _device_memory_note() -> str:
    if not torch.cuda.is_available():
        return "no CUDA device: device-memory check skipped (best weights live in CPU buffers)"
    model = _big_model("cuda")
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    peak_before = torch.cuda.max_memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    best = BestWeights()
    best.save(model)
    best.save(model)
    buffers = best.state
    torch.cuda.synchronize()
    extra = torch.cuda.memory_allocated() - before
    peak_extra = torch.cuda.max_memory_allocated() - before
    del peak_before
    pinned = all(b.is_pinned() for b in buffers.values())
    return (
        f"CUDA: a snapshot allocated {extra} B on the device (peak +{peak_extra} B); "
        f"host buffers pinned: {pinned}"
    )


def run(quick: bool = False) -> list[Row]:
    warnings.filterwarnings("ignore")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the machine is shared; one thread gives steadier ratios
    try:
        rows = _snapshot_rows(quick)
        fit_rows, note = _fit_rows(quick)
    finally:
        torch.set_num_threads(threads)
    rows += fit_rows
    run.notes = [note, _device_memory_note()]  # type: ignore[attr-defined]
    return rows


if __name__ == "__main__":
    import logging

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    table = format_table(run())
    print(table)
    for line in run.notes:  # type: ignore[attr-defined]
        print(f"- {line}")
