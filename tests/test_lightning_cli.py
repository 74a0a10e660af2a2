"""Every weight-space callback loads from a LightningCLI YAML ``trainer.callbacks`` entry."""

from __future__ import annotations

import pytest
import yaml
from lightning.pytorch.cli import LightningCLI

from lightning_reg.max_norm import MaxNormCallback, WeightConstraintCallback
from lightning_reg.penalties import ElasticNetCallback, L1Callback, L2Callback
from tests.helpers.models import ClassifierModule, list_loader, random_classification

ENTRIES = [
    ("lightning_reg.penalties.L2Callback", {"strength": 0.01, "decoupled": True}, L2Callback),
    ("lightning_reg.penalties.L1Callback", {"strength": 0.001, "proximal": True}, L1Callback),
    ("lightning_reg.penalties.ElasticNetCallback", {"l1": 0.001, "l2": 0.01}, ElasticNetCallback),
    ("lightning_reg.max_norm.MaxNormCallback", {"max_norm": 2.0, "dim": None}, MaxNormCallback),
    (
        "lightning_reg.max_norm.WeightConstraintCallback",
        {"constraint": "non_neg", "params": "all"},
        WeightConstraintCallback,
    ),
]


def test_callbacks_load_from_yaml_and_fit(tmp_path):
    config = {
        "trainer": {
            "accelerator": "cpu",
            "max_steps": 2,
            "logger": False,
            "enable_checkpointing": False,
            "enable_progress_bar": False,
            "callbacks": [{"class_path": c, "init_args": a} for c, a, _ in ENTRIES],
        },
        "model": {"lr": 0.1},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    cli = LightningCLI(
        ClassifierModule, run=False, save_config_callback=None, args=["--config", str(path)]
    )
    found = {type(cb): cb for cb in cli.trainer.callbacks}
    for _, args, cls in ENTRIES:
        assert cls in found
        for key, value in args.items():
            got = getattr(found[cls], key, None)
            if got is not None:
                assert got == value or str(got) == str(value)
    x, y = random_classification(32)
    cli.trainer.fit(cli.model, list_loader(x, y))
    assert cli.trainer.global_step == 2
    assert all((p >= 0).all() for p in cli.model.parameters())  # non_neg on "all" held


def test_yaml_with_bad_value_fails_with_the_argument_name(tmp_path):
    config = {
        "trainer": {
            "callbacks": [
                {
                    "class_path": "lightning_reg.max_norm.MaxNormCallback",
                    "init_args": {"max_norm": -1},
                }
            ]
        }
    }
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(config))
    with pytest.raises((ValueError, SystemExit)):
        LightningCLI(ClassifierModule, run=False, args=["--config", str(path)])
