"""The compatibility matrix's DDP column: every technique under 2-rank DDP (gloo)."""

from __future__ import annotations

from tests.helpers.ddp import ddp_trainer_kwargs
from tests.helpers.matrix import BY_NAME, build_run, make_loader, state_hash


def fit_technique(rank: int, name: str, precision: str = "32-true") -> tuple[str, list[str], int]:
    technique = BY_NAME[name]
    module, trainer, recorder = build_run(
        technique, max_steps=3, precision=precision, **ddp_trainer_kwargs()
    )
    val = make_loader(2, seed=1) if technique.needs_val else None
    trainer.fit(module, make_loader(6, seed=rank), val)
    return state_hash(module, buffers=False), sorted(recorder.keys), trainer.global_step


def fit_all(rank: int, names: list[str], precision: str) -> dict[str, tuple[str, list[str], int]]:
    return {name: fit_technique(rank, name, precision) for name in names}
