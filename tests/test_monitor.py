"""RegularizationMonitorCallback: documented keys, values against independent references."""

from __future__ import annotations

import csv
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import CSVLogger

from lightning_reg.monitor import RegularizationMonitorCallback, layer_key
from tests.helpers.models import (
    ClassifierModule,
    SmallCNN,
    list_loader,
    random_classification,
    tiny_trainer,
)

NUM_CLASSES = 3


def _data(n: int = 64, seed: int = 0):
    x, y = random_classification(n, num_classes=NUM_CLASSES, seed=seed, image=True)
    return x, y


def _module(seed: int = 0) -> ClassifierModule:
    torch.manual_seed(seed)
    return ClassifierModule(SmallCNN(num_classes=NUM_CLASSES), lr=0.1)


def reference_ece(probs: torch.Tensor, target: torch.Tensor, n_bins: int = 15) -> float:
    """ECE from its definition (Guo et al. 2017), in float64, with a Python loop over bins."""
    conf, pred = probs.double().max(dim=1)
    correct = (pred == target).double()
    total = 0.0
    n = len(target)
    for k in range(n_bins):
        lo, hi = k / n_bins, (k + 1) / n_bins
        mask = (conf > lo) & (conf <= hi)
        if mask.any():
            total += mask.sum().item() / n * abs(correct[mask].mean() - conf[mask].mean()).item()
    return total


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path) as f:
        return list(csv.DictReader(f))


def _column(rows: list[dict[str, str]], key: str) -> list[float]:
    return [float(r[key]) for r in rows if r.get(key) not in (None, "")]


# ---------------------------------------------------------------------------- validation
@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(every_n_steps=0), ValueError, r"every_n_steps.*\[1, inf\].*0"),
        (dict(num_classes=1), ValueError, r"num_classes.*\[2, inf\].*1"),
        (dict(histogram_bins=0), ValueError, r"histogram_bins.*0"),
        (dict(ece_bins=0), ValueError, r"ece_bins.*0"),
        (dict(every_n_steps=2.5), TypeError, r"every_n_steps.*integer"),
        (dict(gap_metrics="loss"), TypeError, r"gap_metrics.*sequence"),
        (dict(target_key=1.0), TypeError, r"target_key"),
        (dict(params="biases"), ValueError, r"params.*'weights'.*'biases'"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        RegularizationMonitorCallback(**kwargs)


def test_layer_key():
    assert layer_key("model.features.0.weight") == "model.features.0"
    assert layer_key("model.gamma") == "model.gamma"


# ------------------------------------------------------------------- step diagnostics
def test_step_metrics_match_reference():
    module = _module()
    with torch.no_grad():
        conv = module.model.features[0].weight
        conv[:2] = 0.0  # 2 of 8 output channels exactly zero
        module.model.head.weight[0, :3] = 0.0
    monitor = RegularizationMonitorCallback()
    monitor.on_train_start(None, module)  # type: ignore[arg-type]
    got = monitor.compute_step_metrics()

    weights = {n: p for n, p in module.named_parameters() if p.ndim >= 2 and "features.1" not in n}
    assert {f"reg/monitor/norm/{layer_key(n)}" for n in weights} | {
        "reg/monitor/norm/total",
        "reg/monitor/sparsity",
    } == set(got)
    for name, p in weights.items():
        expected = math.sqrt(sum(float(v) ** 2 for v in p.detach().flatten()))
        assert got[f"reg/monitor/norm/{layer_key(name)}"].item() == pytest.approx(expected, 1e-5)
    total = math.sqrt(sum(float(v) ** 2 for p in weights.values() for v in p.detach().flatten()))
    assert got["reg/monitor/norm/total"].item() == pytest.approx(total, 1e-5)
    zeros = sum(int(v == 0) for p in weights.values() for v in p.detach().flatten().tolist())
    numel = sum(p.numel() for p in weights.values())
    assert zeros >= conv[:2].numel() + 3
    assert got["reg/monitor/sparsity"].item() == pytest.approx(zeros / numel, abs=1e-7)


def test_csv_logger_gets_documented_keys_on_schedule(tmp_path):
    x, y = _data(64)
    xv, yv = _data(48, seed=1)
    module = _module()
    monitor = RegularizationMonitorCallback(every_n_steps=3, num_classes=NUM_CLASSES)
    calls = []
    original = monitor.compute_step_metrics

    def counting():
        calls.append(trainer.global_step)
        return original()

    monitor.compute_step_metrics = counting  # type: ignore[method-assign]
    logger = CSVLogger(tmp_path, name="m", version=0)
    trainer = tiny_trainer(max_epochs=2, callbacks=[monitor], logger=logger, log_every_n_steps=1)
    trainer.fit(module, list_loader(x, y, 16), list_loader(xv, yv, 16))

    # 4 batches x 2 epochs = 8 steps; every 3rd step -> steps 3 and 6, computed only then.
    assert calls == [3, 6]
    rows = _read_csv(Path(logger.log_dir) / "metrics.csv")
    header = set(rows[0])
    layers = ["model.features.0", "model.features.3", "model.head"]
    for key in [
        *(f"reg/monitor/norm/{n}" for n in layers),
        "reg/monitor/norm/total",
        "reg/monitor/sparsity",
        "reg/monitor/gap/loss",
        "reg/monitor/ece",
    ]:
        assert key in header, key
    assert len(_column(rows, "reg/monitor/sparsity")) == 2
    assert len(_column(rows, "reg/monitor/ece")) == 2  # one per validation epoch
    assert len(_column(rows, "reg/monitor/gap/loss")) == 2
    # The last ECE is that of the final model on the validation set.
    module.eval()
    with torch.no_grad():
        probs = F.softmax(module(xv), dim=1)
    assert _column(rows, "reg/monitor/ece")[-1] == pytest.approx(reference_ece(probs, yv), 1e-5)
    # The gap is the logged train metric minus the logged validation metric.
    metrics = trainer.callback_metrics
    expected_gap = float(metrics["train_loss"] - metrics["val_loss"])
    assert float(metrics["reg/monitor/gap/loss"]) == pytest.approx(expected_gap, 1e-6)
    assert _column(rows, "reg/monitor/gap/loss")[-1] == pytest.approx(expected_gap, 1e-6)


def test_norm_logged_at_last_step_equals_final_weights(tmp_path):
    x, y = _data(64)
    module = _module()
    monitor = RegularizationMonitorCallback(every_n_steps=4)
    logger = CSVLogger(tmp_path, name="m", version=0)
    trainer = tiny_trainer(max_epochs=1, callbacks=[monitor], logger=logger)
    trainer.fit(module, list_loader(x, y, 16))
    rows = _read_csv(Path(logger.log_dir) / "metrics.csv")
    logged = _column(rows, "reg/monitor/norm/model.head")
    assert len(logged) == 1  # step 4 of 4
    assert logged[-1] == pytest.approx(module.model.head.weight.norm().item(), 1e-6)
    assert monitor.last_metrics["reg/monitor/norm/model.head"] == pytest.approx(logged[-1])


def test_default_schedule_follows_log_every_n_steps(tmp_path):
    x, y = _data(96)
    monitor = RegularizationMonitorCallback()
    logger = CSVLogger(tmp_path, name="m", version=0)
    trainer = tiny_trainer(max_epochs=1, callbacks=[monitor], logger=logger, log_every_n_steps=2)
    trainer.fit(_module(), list_loader(x, y, 16))
    rows = _read_csv(Path(logger.log_dir) / "metrics.csv")
    norm_steps = [int(r["step"]) for r in rows if r.get("reg/monitor/sparsity")]
    loss_steps = [int(r["step"]) for r in rows if r.get("train_loss")]
    assert norm_steps == loss_steps == [1, 3, 5]  # Lightning's own logging steps


def test_no_logger_computes_nothing():
    x, y = _data(32)
    monitor = RegularizationMonitorCallback(every_n_steps=1)
    monitor.compute_step_metrics = lambda: pytest.fail("computed without a logger")  # type: ignore
    tiny_trainer(max_epochs=1, callbacks=[monitor]).fit(_module(), list_loader(x, y, 16))


# ------------------------------------------------------------------------------ the ECE
class _DictOutputModule(ClassifierModule):
    """Validation calls the inner model (no hook fires) and returns the logits in a dict."""

    def validation_step(self, batch, batch_idx):
        logits = self.model(batch[0])
        self.log("val_loss", F.cross_entropy(logits, batch[1]))
        return {"logits": logits}


class _HiddenLogitsModule(ClassifierModule):
    def validation_step(self, batch, batch_idx):
        self.log("val_loss", F.cross_entropy(self.model(batch[0]), batch[1]))


def test_ece_from_returned_logits(tmp_path):
    x, y = _data(32)
    xv, yv = _data(40, seed=2)
    torch.manual_seed(0)
    module = _DictOutputModule(SmallCNN(num_classes=NUM_CLASSES))
    monitor = RegularizationMonitorCallback(num_classes=NUM_CLASSES, ece_bins=10)
    trainer = tiny_trainer(max_epochs=1, callbacks=[monitor])
    trainer.fit(module, list_loader(x, y, 16), list_loader(xv, yv, 16))
    module.eval()
    with torch.no_grad():
        probs = F.softmax(module.model(xv), dim=1)
    got = float(trainer.callback_metrics["reg/monitor/ece"])
    assert got == pytest.approx(reference_ece(probs, yv, n_bins=10), 1e-5)


def test_ece_without_logits_raises_with_a_fix():
    x, y = _data(32)
    torch.manual_seed(0)
    module = _HiddenLogitsModule(SmallCNN(num_classes=NUM_CLASSES))
    monitor = RegularizationMonitorCallback(num_classes=NUM_CLASSES)
    trainer = tiny_trainer(max_epochs=1, callbacks=[monitor])
    with pytest.raises(RuntimeError, match=r"needs the validation logits.*\{'logits'"):
        trainer.fit(module, list_loader(x, y, 16), list_loader(x, y, 16))


def test_ece_wrong_num_classes_raises():
    x, y = _data(32)
    monitor = RegularizationMonitorCallback(num_classes=5)
    with pytest.raises(RuntimeError, match=r"shape \(16, 3\).*\(batch, 5\)"):
        tiny_trainer(max_epochs=1, callbacks=[monitor]).fit(
            _module(), list_loader(x, y, 16), list_loader(x, y, 16)
        )


def test_missing_gap_metric_warns_once_and_training_goes_on():
    x, y = _data(32)
    monitor = RegularizationMonitorCallback(gap_metrics=("acc",))
    trainer = tiny_trainer(max_epochs=2, callbacks=[monitor])
    with pytest.warns(UserWarning, match=r"no 'train_acc' in trainer.callback_metrics") as got:
        trainer.fit(_module(), list_loader(x, y, 16), list_loader(x, y, 16))
    assert trainer.current_epoch == 2
    ours = [w for w in got if "gap_metrics" in str(w.message)]
    assert len(ours) == 1 and "train_loss" in str(ours[0].message)  # names what was logged


def test_fp16_and_float64_weights_give_exact_statistics():
    module = _module()
    head = module.model.head
    head.half()
    with torch.no_grad():
        head.weight.fill_(1.0)  # all ones: an fp16 count or sum of squares would overflow
    big = torch.nn.Linear(300, 300, bias=False).half()
    with torch.no_grad():
        big.weight.fill_(1.0)
    module.model.big = big
    monitor = RegularizationMonitorCallback()
    monitor.on_train_start(None, module)  # type: ignore[arg-type]
    got = monitor.compute_step_metrics()
    assert got["reg/monitor/norm/model.big"].item() == pytest.approx(300.0)
    assert got["reg/monitor/sparsity"].item() == pytest.approx(0.0, abs=1e-6)
    module.double()
    got = RegularizationMonitorCallback()
    got.on_train_start(None, module)  # type: ignore[arg-type]
    assert got.compute_step_metrics()["reg/monitor/norm/total"].dtype == torch.float64


def test_selection_follows_what_is_trainable():
    """Frozen weights drop out of the norms and come back when unfrozen (BackboneFinetuning)."""
    module = _module()
    monitor = RegularizationMonitorCallback()
    monitor.on_train_start(None, module)  # type: ignore[arg-type]
    assert "reg/monitor/norm/model.head" in monitor.compute_step_metrics()
    module.model.head.weight.requires_grad_(False)
    assert "reg/monitor/norm/model.head" not in monitor.compute_step_metrics()
    module.model.head.weight.requires_grad_(True)
    assert "reg/monitor/norm/model.head" in monitor.compute_step_metrics()
    # A replaced layer or parameter is seen too (the selection is cached between steps).
    module.model.head = torch.nn.Linear(module.model.head.in_features, 3)
    assert monitor.selected(module)[-1].param is module.model.head.weight
    module.model.head.weight = torch.nn.Parameter(torch.zeros(3, module.model.head.in_features))
    assert monitor.compute_step_metrics()["reg/monitor/norm/model.head"] == 0


def test_nan_weights_are_counted_and_left_out_of_histograms():
    pytest.importorskip("wandb")
    module = _module()
    with torch.no_grad():
        module.model.head.weight[0, :2] = float("nan")
        module.model.head.weight[1, 0] = float("inf")
        module.model.features[0].weight.fill_(float("nan"))  # no finite entry at all
    monitor = RegularizationMonitorCallback()
    monitor.on_train_start(None, module)  # type: ignore[arg-type]
    hists = monitor._histograms()  # torch.histc used to raise on a NaN range
    finite = torch.isfinite(module.model.head.weight).sum().item()
    assert sum(hists["reg/monitor/hist/model.head"].histogram) == finite
    assert "reg/monitor/hist/model.features.0" not in hists

    class Logger:
        logged: dict = {}

        def log_metrics(self, metrics, step):
            self.logged.update(metrics)

    trainer = SimpleNamespace(loggers=[Logger()], global_step=0, fit_loop=None)
    metrics = monitor.log_step_metrics(trainer)  # type: ignore[arg-type]
    weight = module.model.features[0].weight
    assert metrics["reg/monitor/nonfinite"] == 3 + weight.numel()


def test_hook_removed_after_validation():
    x, y = _data(32)
    module = _module()
    monitor = RegularizationMonitorCallback(num_classes=NUM_CLASSES)
    tiny_trainer(max_epochs=1, callbacks=[monitor]).fit(
        module, list_loader(x, y, 16), list_loader(x, y, 16)
    )
    assert not module._forward_hooks


def test_bf16_mixed_logs_finite_values(tmp_path):
    x, y = _data(32)
    monitor = RegularizationMonitorCallback(every_n_steps=1, num_classes=NUM_CLASSES)
    logger = CSVLogger(tmp_path, name="m", version=0)
    trainer = tiny_trainer(max_epochs=1, callbacks=[monitor], logger=logger, precision="bf16-mixed")
    module = _module()
    trainer.fit(module, list_loader(x, y, 16), list_loader(x, y, 16))
    assert monitor.last_metrics and all(math.isfinite(v) for v in monitor.last_metrics.values())
    head = monitor.last_metrics["reg/monitor/norm/model.head"]  # the last step's weights
    assert head == pytest.approx(module.model.head.weight.norm().item(), rel=1e-6)
    assert math.isfinite(float(trainer.callback_metrics["reg/monitor/ece"]))


# ------------------------------------------------------------------------------- wandb
def test_offline_wandb_logger_gets_keys_and_histograms(tmp_path):
    wandb = pytest.importorskip("wandb")
    from lightning.pytorch.loggers import WandbLogger

    x, y = _data(64)
    logger = WandbLogger(
        project="lightning-reg-tests",
        save_dir=str(tmp_path),
        mode="offline",
        settings=wandb.Settings(silent=True, console="off", x_disable_stats=True),
    )
    monitor = RegularizationMonitorCallback(every_n_steps=2, num_classes=NUM_CLASSES)
    trainer = tiny_trainer(max_epochs=1, callbacks=[monitor], logger=logger)
    module = _module()
    trainer.fit(module, list_loader(x, y, 16), list_loader(x, y, 16))
    run = logger.experiment
    try:
        keys = set(run.summary.keys())
        for key in (
            "reg/monitor/norm/model.head",
            "reg/monitor/norm/total",
            "reg/monitor/sparsity",
            "reg/monitor/ece",
            "reg/monitor/gap/loss",
        ):
            assert key in keys, key
        hist = run.summary["reg/monitor/hist/model.head"]
        assert hist["_type"] == "histogram"
        assert sum(hist["values"]) == module.model.head.weight.numel()
        norm = run.summary["reg/monitor/norm/model.head"]
        assert norm == pytest.approx(module.model.head.weight.norm().item(), 1e-6)
    finally:
        run.finish()
    assert list((tmp_path / "wandb").glob("offline-run-*"))


# -------------------------------------------------------------------------------- DDP
def _ddp_ece_scenario(rank: int, tmp: str) -> dict:
    from lightning_reg.monitor import RegularizationMonitorCallback as Monitor
    from tests.helpers.ddp import ddp_trainer_kwargs

    x, y = random_classification(64, num_classes=NUM_CLASSES, seed=0, image=True)
    xv, yv = random_classification(40, num_classes=NUM_CLASSES, seed=3, image=True)
    torch.manual_seed(0)
    module = ClassifierModule(SmallCNN(num_classes=NUM_CLASSES), lr=0.1)
    monitor = Monitor(every_n_steps=1, num_classes=NUM_CLASSES)
    trainer = tiny_trainer(
        max_epochs=1,
        callbacks=[monitor],
        logger=CSVLogger(tmp, name="ddp", version=0),
        **ddp_trainer_kwargs(),
    )
    trainer.fit(module, list_loader(x, y, 8), list_loader(xv, yv, 10))
    module.eval()
    with torch.no_grad():
        probs = F.softmax(module(xv), dim=1)
    return {
        "ece": float(trainer.callback_metrics["reg/monitor/ece"]),
        "reference": reference_ece(probs, yv),
        "logged_keys": sorted(monitor.last_metrics),
    }


@pytest.mark.ddp
def test_ddp_ece_covers_all_ranks_and_only_rank_zero_computes_norms(ddp_pool, tmp_path):
    r0, r1 = ddp_pool.run(_ddp_ece_scenario, str(tmp_path))
    # Each rank validated half of the set; the synced ECE is that of the whole set.
    assert r0["ece"] == pytest.approx(r0["reference"], 1e-5)
    assert r1["ece"] == pytest.approx(r0["ece"])
    assert "reg/monitor/norm/total" in r0["logged_keys"]
    assert r1["logged_keys"] == []
