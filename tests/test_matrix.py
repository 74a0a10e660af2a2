"""Compatibility matrix: every technique crossed with every setting.

Settings: 2-rank CPU DDP (gloo), bf16-mixed, gradient accumulation, gradient clipping, manual
optimization with two optimizers, a resume from a mid-epoch checkpoint, a LightningCLI YAML,
and torch.compile of the model. Each run must complete, log the technique's keys, keep DDP
replicas identical, and (resume) end exactly where the uninterrupted run ends.
"""

from __future__ import annotations

import pytest
import torch
import yaml
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.cli import LightningCLI

from tests.distributed.scenarios_matrix import fit_all
from tests.helpers.matrix import (
    TECHNIQUES,
    MatrixModule,
    ResumableLoader,
    Technique,
    build_run,
    make_batches,
    make_loader,
    state_hash,
)

NAMES = [t.name for t in TECHNIQUES]
by_name = pytest.mark.parametrize("technique", TECHNIQUES, ids=NAMES)


def _val(technique: Technique):
    return make_loader(2, seed=1) if technique.needs_val else None


def _assert_ran(module, trainer, recorder, technique, steps):
    assert trainer.global_step == steps
    for p in module.parameters():
        assert torch.isfinite(p).all()
    missing = [k for k in technique.log_keys if not any(key.startswith(k) for key in recorder.keys)]
    assert not missing, f"{technique.name}: keys {missing} not logged; saw {sorted(recorder.keys)}"


@by_name
@pytest.mark.parametrize(
    "setting",
    [
        {"precision": "bf16-mixed"},
        {"accumulate_grad_batches": 2},
        {"gradient_clip_val": 0.5},
    ],
    ids=["bf16", "accumulate", "clip"],
)
def test_technique_runs_in_setting(technique, setting):
    module, trainer, recorder = build_run(technique, max_steps=2, **setting)
    trainer.fit(module, make_loader(6), _val(technique))
    _assert_ran(module, trainer, recorder, technique, 2)


@by_name
def test_technique_with_two_optimizers_in_manual_optimization(technique):
    module, trainer, recorder = build_run(technique, manual=True, max_steps=4)
    trainer.fit(module, make_loader(6), _val(technique))
    # manual optimization: global_step counts each optimizer's step
    _assert_ran(module, trainer, recorder, technique, 4)


class GlobalRNGState(Callback):
    """Checkpoints the global torch RNG, for the model's own dropout in the resume test."""

    def state_dict(self):
        return {"torch": torch.get_rng_state()}

    def load_state_dict(self, state):
        torch.set_rng_state(state["torch"])


@by_name
def test_resume_from_mid_epoch_checkpoint_equals_uninterrupted_run(technique, tmp_path):
    batches = make_batches(6)
    extra = [GlobalRNGState()] if technique.name == "dropout_schedule" else []
    saver = ModelCheckpoint(tmp_path, every_n_train_steps=3, save_top_k=-1, save_last=False)

    full, trainer, _ = build_run(
        technique,
        max_steps=6,
        deterministic_model=True,
        enable_checkpointing=True,
        callbacks=[*extra, saver],
    )
    trainer.fit(full, ResumableLoader(batches), _val(technique))
    (ckpt,) = [p for p in tmp_path.glob("*.ckpt") if "step=3" in p.name]

    resumed, trainer, _ = build_run(
        technique, max_steps=6, deterministic_model=True, callbacks=extra
    )
    trainer.fit(resumed, ResumableLoader(batches), _val(technique), ckpt_path=ckpt)
    assert trainer.global_step == 6
    assert state_hash(resumed) == state_hash(full), f"{technique.name}: resume diverged"


@by_name
def test_technique_loads_from_lightning_cli_yaml(technique, tmp_path):
    config = {
        "trainer": {
            "accelerator": "cpu",
            "max_steps": 1,
            "logger": False,
            "enable_checkpointing": False,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "num_sanity_val_steps": 0,
            "limit_val_batches": 1,
            "val_check_interval": 1 if technique.needs_val else None,
            "callbacks": list(technique.yaml),
        },
        "model": {"jacobian_weight": technique.jacobian_weight},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    cli = LightningCLI(
        MatrixModule, run=False, save_config_callback=None, args=["--config", str(path)]
    )
    own = [type(cb).__name__ for cb in cli.trainer.callbacks]
    for entry in technique.yaml:
        assert entry["class_path"].rsplit(".", 1)[1] in own
    cli.trainer.fit(cli.model, make_loader(2), _val(technique))
    assert cli.trainer.global_step == 1


@by_name
def test_technique_with_compiled_model(technique):
    module, trainer, recorder = build_run(technique, max_steps=2)
    module.model = torch.compile(module.model, backend="aot_eager")
    if technique.name == "jacobian":
        # Documented limitation (docs/distributed.md): AOTAutograd has no double backward.
        with pytest.raises(RuntimeError, match="does not currently support double backward"):
            trainer.fit(module, make_loader(6), _val(technique))
        return
    trainer.fit(module, make_loader(6), _val(technique))
    _assert_ran(module, trainer, recorder, technique, 2)


@pytest.mark.ddp
@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_every_technique_under_two_rank_ddp(ddp_pool, precision):
    names = NAMES if precision == "32-true" else [n for n in NAMES if n != "monitor"]
    rank0, rank1 = ddp_pool.run(fit_all, names, precision)
    for name in names:
        h0, keys, steps = rank0[name]
        h1, _, _ = rank1[name]
        assert steps == 3, f"{name}: stopped at step {steps}"
        assert h0 == h1, f"{name}: DDP replicas diverged under {precision}"
        technique = next(t for t in TECHNIQUES if t.name == name)
        missing = [k for k in technique.log_keys if not any(x.startswith(k) for x in keys)]
        assert not missing, f"{name}: {missing} not logged under DDP"


def test_matrix_covers_every_public_callback():
    import lightning_reg

    public = {n for n in lightning_reg.__all__ if n.endswith("Callback")}
    covered = {type(cb).__name__ for t in TECHNIQUES for cb in t.callbacks()} | {
        "WeightPenaltyCallback",
        "WeightConstraintCallback",
    }
    assert public <= covered | {"BatchNormFreezeCallback", "MixUpCutMixCallback"}, public - covered
