"""LightningCLI: stack regularization callbacks from a YAML file.

    python examples/cli.py fit --config examples/configs/stacked.yaml
    python examples/cli.py fit --config examples/configs/mixup_depth.yaml
    python examples/cli.py fit --config examples/configs/stacked.yaml --trainer.fast_dev_run=1

Every callback of ``lightning_reg`` has full type hints, so LightningCLI builds it from its
``class_path`` and ``init_args``.
"""

from __future__ import annotations

from lightning.pytorch.cli import LightningCLI

from lightning_reg.demo.data import DemoDataModule
from lightning_reg.demo.model import DemoClassifier


def main(args: list[str] | None = None) -> LightningCLI:
    return LightningCLI(
        DemoClassifier,
        DemoDataModule,
        args=args,
        save_config_callback=None,
    )


if __name__ == "__main__":
    main()
