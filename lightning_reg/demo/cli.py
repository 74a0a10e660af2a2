"""``lightning-reg``: run the regularization ablation, or list the techniques.

Examples::

    lightning-reg list
    lightning-reg ablate                       # digits, every technique, 3 seeds, ~5 min on CPU
    lightning-reg ablate --fast --out /tmp/a   # smoke run: 2 seeds, 3 epochs
    lightning-reg ablate --techniques baseline l1_proximal --dataset breast_cancer
    lightning-reg ablate --accelerator gpu --precision bf16-mixed --wandb-mode online

Bad input (an unknown technique or dataset, an out-of-range number) prints one line on stderr
and exits with code 2.
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
FAST_EPOCHS = 2


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
        description="Regularization for PyTorch Lightning: an ablation on bundled real data.",
    )
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    sub.add_parser("list", help="print each technique with its class, formula and paper")
    ab = sub.add_parser(
        "ablate",
        help="train the same model with no regularization, each technique and a combined recipe",
        description=(
            "Train the same model once with no regularization, once per technique and once "
            "with a combined recipe, over several seeds; print and write the results table."
        ),
    )
    ab.add_argument(
        "--techniques",
        nargs="+",
        metavar="NAME",
        help=f"subset to run (space or comma separated) from: {', '.join(all_names())}. "
        "'baseline' is always added. Default: every installed technique.",
    )
    ab.add_argument("--dataset", choices=sorted(DATASETS), default="digits")
    ab.add_argument("--seeds", type=_positive_int, help="seeds per technique (default 3)")
    ab.add_argument(
        "--epochs", type=_positive_int, help="epochs per run (default: digits 20, breast_cancer 60)"
    )
    ab.add_argument(
        "--train-size",
        type=int,
        help="training samples, the rest is validation "
        + ", ".join(
            f"({d.name}: default {d.default_train_size}, "
            f"range [{d.min_train_size}, {d.max_train_size}])"
            for d in DATASETS.values()
        ),
    )
    ab.add_argument("--batch-size", type=_positive_int, help="default: digits 64, breast_cancer 32")
    ab.add_argument("--val-every", type=_positive_int, help="validate every N epochs (default 2)")
    ab.add_argument(
        "--optimizer",
        choices=["sgd", "adam"],
        default="sgd",
        help="sgd: Nesterov momentum 0.9 (default); adam",
    )
    ab.add_argument("--lr", type=_positive_float, default=0.05, help="learning rate (default 0.05)")
    ab.add_argument("--accelerator", default="auto", help="passed to the Trainer")
    ab.add_argument("--devices", type=_devices, default=1, help="passed to the Trainer")
    ab.add_argument("--precision", default=None, help="passed to the Trainer, e.g. bf16-mixed")
    ab.add_argument(
        "--threads",
        type=_positive_int,
        default=1,
        help="torch CPU threads (default 1: the model is tiny, more threads only contend)",
    )
    ab.add_argument(
        "--fast",
        action="store_true",
        help=f"smoke run: {FAST_SEEDS} seeds, {FAST_EPOCHS} epochs, validation every epoch",
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


def _technique_list(parser: argparse.ArgumentParser, raw: Sequence[str] | None, kind: str):
    from lightning_reg.demo.ablation import default_techniques, validate_techniques

    if not raw:
        return default_techniques(kind)
    names = [n.strip() for item in raw for n in item.split(",") if n.strip()]
    try:
        validate_techniques(names)
    except ValueError as err:
        parser.error(f"argument --techniques: {err}")
    if "baseline" not in names:
        names.insert(0, "baseline")
    return list(dict.fromkeys(names))


def _launched_worker() -> bool:
    """Whether this process is a non-zero rank started by Lightning's DDP launcher."""
    return any(os.environ.get(k, "0") != "0" for k in ("LOCAL_RANK", "NODE_RANK", "RANK"))


def _print_list() -> int:
    from rich.console import Console
    from rich.table import Table

    from lightning_reg.demo.techniques import all_names, available, describe

    table = Table(title="lightning-reg techniques")
    for col in ("name", "class", "formula", "paper", "status"):
        table.add_column(col)
    for name in all_names():
        t = describe(name)
        ok, why = available(name)
        table.add_row(name, t.classes, t.formula, t.paper, "ok" if ok else f"missing: {why}")
    Console(width=None if sys.stdout.isatty() else 220).print(table)
    return 0


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

    from lightning_reg.demo.data import DATASETS

    info = DATASETS[args.dataset]
    ab_parser: argparse.ArgumentParser = parser.ablate_parser  # type: ignore[attr-defined]
    if args.train_size is not None and not (
        info.min_train_size <= args.train_size <= info.max_train_size
    ):
        ab_parser.error(
            f"argument --train-size: must be in [{info.min_train_size}, {info.max_train_size}] "
            f"for {args.dataset}, got {args.train_size}"
        )
    techniques = _technique_list(ab_parser, args.techniques, info.kind)
    if args.logger == "wandb" and args.wandb_mode != "disabled":
        try:
            import wandb  # noqa: F401
        except ImportError:
            ab_parser.error("--logger wandb needs `pip install wandb` (or use --logger csv)")

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

    from lightning_reg.demo.ablation import AblationConfig, run_ablation
    from lightning_reg.demo.report import log_wandb_table, rich_table, write_all

    cfg = AblationConfig(
        techniques=techniques,
        dataset=args.dataset,
        seeds=args.seeds or (FAST_SEEDS if args.fast else 3),
        epochs=args.epochs or (FAST_EPOCHS if args.fast else info.default_epochs),
        train_size=args.train_size,
        batch_size=args.batch_size or info.default_batch_size,
        val_every=args.val_every or (1 if args.fast else 2),
        lr=args.lr,
        optimizer=args.optimizer,
        accelerator=args.accelerator,
        devices=args.devices,
        precision=args.precision,
        out=args.out,
        logger=args.logger
        if not (args.logger == "wandb" and args.wandb_mode == "disabled")
        else "none",
        wandb_mode=args.wandb_mode,
        wandb_project=args.wandb_project,
        fast=args.fast,
    )
    out_console = Console(width=None if sys.stdout.isatty() else 240)
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
        ) as bar:
            task = bar.add_task("starting", total=None)

            def progress(description: str, done: int, total: int) -> None:
                bar.update(task, description=description, completed=done, total=total)

            result = run_ablation(cfg, progress=progress, wandb_hook=wandb_hook)
    finally:
        torch.set_num_threads(threads)
    if rank_zero_only.rank != 0:
        # With --devices > 1 every rank runs the whole loop (each fit is collective); only rank
        # zero reports.
        return 0, result
    files = write_all(result)
    out_console.print(rich_table(result))
    if cfg.logger == "wandb":
        table_run = log_wandb_table(result, files.get("png"))
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
