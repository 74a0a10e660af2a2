"""Every example runs in smoke mode; each LightningCLI config parses and fits one step."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
SCRIPTS = sorted(p for p in EXAMPLES.glob("*.py") if p.name != "cli.py")
#: LightningCLI configs of the demo model (``ablate_*.yaml`` are for ``lightning-reg ablate``).
CONFIGS = sorted(
    p for p in (EXAMPLES / "configs").glob("*.yaml") if not p.stem.startswith("ablate")
)
ABLATE_CONFIG = EXAMPLES / "configs" / "ablate_own_model.yaml"


def _load(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"lightning_reg_example_{path.stem}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_there_is_an_example_per_technique():
    names = {p.stem for p in SCRIPTS}
    assert {
        "l2_weight_decay",
        "l1_sparsity",
        "elastic_net",
        "max_norm",
        "dropout",
        "augmentation",
        "mixup_cutmix",
        "early_stopping",
        "batch_norm",
        "label_smoothing",
        "stochastic_depth",
        "jacobian",
        "monitor",
    } <= names
    assert len(CONFIGS) >= 2


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: p.stem)
def test_example_smoke(path, tmp_path):
    argv = ["--smoke"]
    if path.stem == "monitor":
        argv += ["--save-dir", str(tmp_path)]
    result = _load(path).main(argv)
    assert isinstance(result, dict) and result
    if path.stem == "max_norm":
        assert result["max_unit_norm"] <= 1.0 + 1e-6
    if path.stem == "stochastic_depth":
        # p_l = 1 - (l/L)(1 - p_L) for l = 1..4, p_L = 0.5
        expected = sum(1 - block / 4 * 0.5 for block in (1, 2, 3, 4))
        assert result["expected_depth"] == pytest.approx(expected)
    if path.stem == "batch_norm":
        assert result["ghost_layers"] == 10  # every BatchNorm of ResidualCNN(depth=2)
    if path.stem == "monitor":
        assert list((tmp_path / "wandb").glob("offline-run-*"))
        assert 0.0 < result["sparsity"] < 1.0


def test_mixup_and_cutmix_variants():
    module = _load(EXAMPLES / "mixup_cutmix.py")
    result = module.main(["--smoke", "--method", "cutmix"])
    assert 0.0 < result["mean_lambda"] <= 1.0  # logged by the CutMix callback on its steps


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.stem)
def test_lightning_cli_config_parses_and_fits_one_step(config, monkeypatch):
    import yaml
    from lightning.pytorch.callbacks import Callback

    monkeypatch.setattr(sys, "argv", ["examples/cli.py"])
    cli_module = _load(EXAMPLES / "cli.py")
    cli = cli_module.main(
        [
            "fit",
            "--config",
            str(config),
            "--trainer.max_epochs=1",
            "--trainer.limit_train_batches=1",
            "--trainer.limit_val_batches=1",
            "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false",
        ]
    )
    assert cli.trainer.global_step == 1
    ours = [cb for cb in cli.trainer.callbacks if type(cb).__module__.startswith("lightning_reg")]
    listed = yaml.safe_load(config.read_text())["trainer"]["callbacks"]
    assert [f"{type(cb).__module__}.{type(cb).__name__}" for cb in ours] == [
        entry["class_path"] for entry in listed
    ]
    assert all(isinstance(cb, Callback) for cb in ours)


def test_ablate_own_model_yaml_is_a_plain_lightning_cli_config(monkeypatch):
    """The ``--config`` example is the file ``LightningCLI ... fit --config`` accepts."""
    from lightning.pytorch.cli import LightningCLI

    monkeypatch.syspath_prepend(str(EXAMPLES.parent))
    cli = LightningCLI(
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_callback=None,
        args=["fit", "--config", str(ABLATE_CONFIG), "--trainer.max_epochs=2"],
    )
    assert type(cli.model).__name__ == "TinyClassifier"
    assert cli.trainer.current_epoch == 2 and "val_acc" in cli.trainer.callback_metrics
