"""``lightning-reg``: run the regularization ablation, or list the techniques.

Examples::

    lightning-reg list
    lightning-reg ablate                       # MNIST-1D, MLP, every technique, 3 seeds
    lightning-reg ablate --search              # try each technique's strength grid first
    lightning-reg ablate --fast --out /tmp/a   # smoke run: 2 seeds, few epochs
    lightning-reg ablate --model cnn --techniques l2 dropout stochastic_depth ghost_bn
    lightning-reg ablate --config run.yaml --monitor val_acc --mode max   # your own model

Bad input (an unknown technique or dataset, an out-of-range number, a broken ``--config``, a
``--monitor`` the model does not log) prints one line on stderr and exits with code 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

__all__ = ["build_parser", "main", "run"]

FAST_SEEDS = 2
DEFAULT_SEEDS = 3
#: Per-dataset training defaults: epochs, batch size, validation interval, optimizer, lr.
DEFAULTS: dict[str, dict[str, Any]] = {
    "mnist1d": dict(epochs=60, batch_size=512, val_every=5, optimizer="adam", lr=1e-2),
    "digits": dict(epochs=20, batch_size=64, val_every=2, optimizer="sgd", lr=0.05),
    "breast_cancer": dict(epochs=60, batch_size=32, val_every=2, optimizer="sgd", lr=0.05),
}
FAST_EPOCHS = {"mnist1d": 20, "digits": 4, "breast_cancer": 4}


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line on stderr (exit code 2)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be in [1, inf], got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be in (0, inf), got {text}")
    return value


def _devices(text: str) -> int | str:
    return int(text) if text.isdigit() else text


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``lightning-reg``."""
    from lightning_reg.demo.data import DATASETS
    from lightning_reg.demo.techniques import all_names

    parser = _Parser(
        prog="lightning-reg",
        description="Regularization for PyTorch Lightning: which regularizer helps, by how much.",
    )
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    sub.add_parser("list", help="print each technique with its class, formula, paper and grid")
    ab = sub.add_parser(
        "ablate",
        help="train the same model with no regularization, each technique and a combined recipe",
        description=(
            "Train the same model once with no regularization, once per technique (at its "
            "default strength, or at the strength --search picks on validation) and once with "
            "a combined recipe, over several seeds; print and write the results table."
        ),
    )
    ab.add_argument(
        "--techniques",
        nargs="+",
        metavar="NAME",
        help=f"subset to run (space or comma separated) from: {', '.join(all_names())}. "
        "'baseline' is always added. Default: all of them.",
    )
    ab.add_argument("--dataset", choices=list(DATASETS), default="mnist1d")
    ab.add_argument(
        "--model",
        choices=["mlp", "cnn"],
        default="mlp",
        help="mlp: the plain 40-100-100-10 ReLU MLP (default); cnn: a 1-D residual CNN with "
        "BatchNorm (digits: the residual 2-D CNN)",
    )
    ab.add_argument(
        "--search",
        action="store_true",
        help="run each technique's strength grid and keep the strength with the best mean "
        "validation metric; write search.csv",
    )
    ab.add_argument(
        "--config",
        type=Path,
        help="a LightningCLI YAML (model:, data:, trainer:) with your own LightningModule and "
        "LightningDataModule",
    )
    ab.add_argument("--monitor", default="val_loss", help="--config: metric to compare (val_loss)")
    ab.add_argument("--mode", choices=["min", "max"], default="min", help="--config: min or max")
    ab.add_argument("--seeds", type=_positive_int, help=f"seeds per row (default {DEFAULT_SEEDS})")
    ab.add_argument(
        "--epochs",
        type=_positive_int,
        help="epochs per run (default: "
        + ", ".join(f"{k} {v['epochs']}" for k, v in DEFAULTS.items())
        + "; --config: the YAML's trainer.max_epochs)",
    )
    ab.add_argument(
        "--train-size",
        type=int,
        help="training samples "
        + ", ".join(
            f"({d.name}: default {d.default_train_size}, "
            f"range [{d.min_train_size}, {d.max_train_size}])"
            for d in DATASETS.values()
        ),
    )
    ab.add_argument("--batch-size", type=_positive_int, help="default: mnist1d 512, digits 64")
    ab.add_argument("--val-every", type=_positive_int, help="validate every N epochs")
    ab.add_argument("--optimizer", choices=["sgd", "adam"], help="default: mnist1d adam, else sgd")
    ab.add_argument("--lr", type=_positive_float, help="learning rate (mnist1d 0.01, else 0.05)")
    ab.add_argument("--accelerator", default="cpu", help="passed to the Trainer (default cpu)")
    ab.add_argument("--devices", type=_devices, default=1, help="passed to the Trainer")
    ab.add_argument("--precision", default=None, help="passed to the Trainer, e.g. bf16-mixed")
    ab.add_argument(
        "--threads",
        type=_positive_int,
        default=1,
        help="torch CPU threads (default 1: the models are tiny, more threads only contend)",
    )
    ab.add_argument(
        "--fast",
        action="store_true",
        help=f"smoke run: {FAST_SEEDS} seeds, few epochs, 1 noise draw",
    )
    ab.add_argument("--out", type=Path, default=Path("ablation"), help="output folder")
    ab.add_argument("--logger", choices=["wandb", "csv", "tensorboard", "none"], default="wandb")
    ab.add_argument(
        "--wandb-mode",
        choices=["offline", "online", "disabled"],
        default="offline",
        help="offline (default) writes runs under --out/wandb; online needs `wandb login`",
    )
    ab.add_argument("--wandb-project", default="lightning-reg")
    parser.ablate_parser = ab  # type: ignore[attr-defined]
    return parser


def _technique_list(
    parser: argparse.ArgumentParser, raw: Sequence[str] | None, *, architecture: bool
) -> list[str]:
    from lightning_reg.demo.ablation import validate_techniques
    from lightning_reg.demo.techniques import ARCHITECTURE, all_names

    if not raw:
        return [n for n in all_names() if architecture or n not in ARCHITECTURE]
    names = [n.strip() for item in raw for n in item.split(",") if n.strip()]
    try:
        validate_techniques(names)
    except ValueError as err:
        parser.error(f"argument --techniques: {err}")
    return list(dict.fromkeys(["baseline", *names]))


def _launched_worker() -> bool:
    """Whether this process is a non-zero rank started by Lightning's DDP launcher."""
    return any(os.environ.get(k, "0") != "0" for k in ("LOCAL_RANK", "NODE_RANK", "RANK"))


def _print_list() -> int:
    from rich.console import Console
    from rich.table import Table

    from lightning_reg.demo.techniques import all_names, describe

    table = Table(title="lightning-reg techniques")
    for col in ("name", "class", "formula", "paper", "grid (default)"):
        table.add_column(col)
    for name in all_names():
        t = describe(name)
        grid = ", ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in t.grid)
        table.add_row(
            name,
            t.classes,
            t.formula,
            t.paper,
            f"{t.knob} ∈ {{{grid}}} ({t.default})" if grid else "-",
        )
    Console(width=None if sys.stdout.isatty() else 220).print(table)
    return 0


def _config(args: argparse.Namespace, ab: argparse.ArgumentParser) -> Any:
    from lightning_reg.demo.ablation import AblationConfig
    from lightning_reg.demo.data import DATASETS

    info = DATASETS[args.dataset]
    if args.train_size is not None and not (
        info.min_train_size <= args.train_size <= info.max_train_size
    ):
        ab.error(
            f"argument --train-size: must be in [{info.min_train_size}, {info.max_train_size}] "
            f"for {args.dataset}, got {args.train_size}"
        )
    if args.model == "cnn" and info.kind == "tabular":
        ab.error("argument --model: cnn needs mnist1d or digits, not breast_cancer")
    if args.config is not None and not args.config.is_file():
        ab.error(f"argument --config: no such file: {args.config}")
    if args.logger == "wandb" and args.wandb_mode != "disabled":
        try:
            import wandb  # noqa: F401
        except ImportError:
            ab.error("--logger wandb needs `pip install wandb` (or use --logger csv)")
    d = DEFAULTS[args.dataset]
    epochs = args.epochs or (FAST_EPOCHS[args.dataset] if args.fast else d["epochs"])
    return AblationConfig(
        techniques=_technique_list(
            ab, args.techniques, architecture=args.config is None and args.model == "mlp"
        ),
        dataset=args.dataset,
        model=args.model,
        seeds=args.seeds or (FAST_SEEDS if args.fast else DEFAULT_SEEDS),
        epochs=epochs,
        train_size=args.train_size,
        batch_size=args.batch_size or d["batch_size"],
        val_every=args.val_every or (min(2, d["val_every"]) if args.fast else d["val_every"]),
        lr=args.lr or d["lr"],
        optimizer=args.optimizer or d["optimizer"],
        search=args.search,
        accelerator=args.accelerator,
        devices=args.devices,
        precision=args.precision,
        out=args.out,
        logger="none" if args.logger == "wandb" and args.wandb_mode == "disabled" else args.logger,
        wandb_mode=args.wandb_mode,
        wandb_project=args.wandb_project,
        fast=args.fast,
        config=args.config,
        epochs_override=args.epochs if args.config is not None else None,
        monitor=args.monitor,
        mode=args.mode,
    )


def run(
    argv: Sequence[str] | None = None,
    *,
    wandb_hook: Callable[[str, Any], None] | None = None,
) -> tuple[int, Any]:
    """Parse ``argv`` and run; return ``(exit code, AblationResult or None)``.

    ``wandb_hook(name, run)`` sees each wandb run (and the final table run) just before it is
    finished, while ``run.summary`` is still readable.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "list":
        return _print_list(), None
    ab: argparse.ArgumentParser = parser.ablate_parser  # type: ignore[attr-defined]
    cfg = _config(args, ab)
    backend = None
    if cfg.config is not None:
        from lightning_reg.demo.config import ConfigBackend, ConfigError

        try:
            backend = ConfigBackend(cfg)
        except ConfigError as err:
            ab.error(str(err))

    import torch
    from lightning.fabric.utilities.rank_zero import rank_zero_only
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    from lightning_reg.demo.ablation import run_ablation
    from lightning_reg.demo.config import ConfigError
    from lightning_reg.demo.report import log_wandb_table, rich_table, write_all

    out_console = Console(width=None if sys.stdout.isatty() else 260)
    err_console = Console(stderr=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        with Progress(
            TextColumn("[bold]ablation[/] {task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("runs"),
            TimeElapsedColumn(),
            TextColumn("left"),
            TimeRemainingColumn(),
            console=err_console,
            disable=_launched_worker(),
            transient=True,
        ) as bar:
            task = bar.add_task("starting", total=None)

            def progress(description: str, done: int, total: int) -> None:
                bar.update(task, description=description, completed=done, total=total)

            result = run_ablation(cfg, backend=backend, progress=progress, wandb_hook=wandb_hook)
    except ConfigError as err:
        ab.error(str(err))
    finally:
        torch.set_num_threads(threads)
    if rank_zero_only.rank != 0:
        # With --devices > 1 every rank runs the whole loop (each fit is collective); only rank
        # zero reports.
        return 0, result
    command = "lightning-reg " + " ".join(sys.argv[1:] if argv is None else argv)
    files = write_all(result, command)
    out_console.print(rich_table(result))
    if cfg.logger == "wandb":
        table_run = log_wandb_table(result, [files["effects"], files["curves"]])
        if wandb_hook is not None:
            wandb_hook("table", table_run)
        table_run.finish()
        result.wandb_runs["table"] = table_run
    out_console.print(f"wrote {', '.join(str(p) for p in files.values())}")
    if cfg.logger == "wandb" and cfg.wandb_mode == "offline":
        out_console.print(
            f"wandb runs (offline, group {result.ablation_id}) are in {cfg.out / 'wandb'}; "
            f"upload them with: wandb sync {cfg.out / 'wandb'}/offline-run-*"
        )
    return 0, result


def main(argv: Sequence[str] | None = None) -> int:
    """Console-script entry point of ``lightning-reg``."""
    return run(argv)[0]


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
