"""Batched on-device augmentation vs the per-sample torchvision v2 pipeline; MixUp overhead.

Anchor: ``torchvision.transforms.v2`` (flip + RandomResizedCrop + Gaussian noise) applied per
sample, as a DataLoader worker does, on a 256×3×32×32 batch. Compared in the same process:
kornia's ``AugmentationSequential`` (batched), our kornia-backed chain, and our fused
``RandomAffineCrop`` (one affine warp per sample) + ``GaussianNoise``. Goal: fused ≥ 5× on CPU.

Second part: the per-step overhead of MixUp / CutMix (callback rewrite + soft-target loss) on a
small CNN training step (goal ≤ 1.1×).

Run: ``python -m benchmarks.bench_augmentation``
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from benchmarks.common import Row, format_table, interleaved_ms, time_ms
from lightning_reg.augmentation import (
    Compose,
    DataAugmentationCallback,
    GaussianNoise,
    RandomAffineCrop,
    RandomHorizontalFlip,
    RandomResizedCrop,
)
from lightning_reg.mixing import CutMixCallback, MixUpCallback


def _pipelines(x: torch.Tensor, device: str = "cpu") -> dict[str, object]:
    import kornia.augmentation as K
    import torchvision.transforms.v2 as T

    size = x.shape[-1]
    tv = T.Compose(
        [
            T.RandomHorizontalFlip(),
            T.RandomResizedCrop(size, antialias=True),
            T.GaussianNoise(sigma=0.05, clip=False),
        ]
    )
    kornia = K.AugmentationSequential(
        K.RandomHorizontalFlip(),
        K.RandomResizedCrop((size, size)),
        K.RandomGaussianNoise(std=0.05, p=1.0),
    )
    fused = Compose([RandomAffineCrop(size, hflip=0.5), GaussianNoise(0.05)])
    chain = Compose([RandomHorizontalFlip(), RandomResizedCrop(size), GaussianNoise(0.05)])
    callback = DataAugmentationCallback(fused, seed=0)
    g = torch.Generator(device=device).manual_seed(0)
    xd = x.to(device)
    if device != "cpu":
        kornia = kornia.to(device)
        return {
            "kornia_batched": lambda: kornia(xd),
            "ours_chain": lambda: chain(xd, g),
            "ours_fused": lambda: fused(xd, g),
            "ours_fused_callback": lambda: callback.augment(xd),
        }
    return {
        "tv2_per_sample": lambda: torch.stack([tv(img) for img in x]),
        "kornia_batched": lambda: kornia(x),
        "ours_chain": lambda: chain(x, g),
        "ours_fused": lambda: fused(x, g),
        "ours_fused_callback": lambda: callback.augment(x),
    }


def _step_fns(batch: int = 64, classes: int = 10) -> dict[str, object]:
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, classes),
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x = torch.rand(batch, 3, 32, 32)
    y = torch.randint(0, classes, (batch,))
    mix = MixUpCallback(0.2, num_classes=classes, seed=0)
    cut = CutMixCallback(1.0, num_classes=classes, seed=0)

    def step(inputs: torch.Tensor, targets: torch.Tensor) -> None:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(inputs), targets).backward()
        opt.step()

    return {
        "plain": lambda: step(x, y),
        "mixup": lambda: step(*mix.mix_batch(x, y)),
        "cutmix": lambda: step(*cut.mix_batch(x, y)),
    }


def run(quick: bool = False) -> list[Row]:
    torch.manual_seed(0)
    x = torch.rand(64 if quick else 256, 3, 32, 32)
    repeats = 3 if quick else 10
    ms = interleaved_ms(_pipelines(x), repeats=repeats, warmup=1 if quick else 3)
    base = ms["tv2_per_sample"]
    shape = "x".join(map(str, x.shape))
    rows = [
        Row(f"augment {shape} CPU", name, "tv2 per-sample", ms[name], base, target=target)
        for name, target in (
            ("kornia_batched", ""),
            ("ours_chain", ""),
            ("ours_fused", ">= 5x"),
            ("ours_fused_callback", ">= 5x"),
        )
    ]
    if torch.cuda.is_available() and not quick:
        fns = _pipelines(x, "cuda")
        for name, fn in fns.items():
            rows.append(
                Row(
                    f"augment {shape} CUDA vs tv2 CPU",
                    name,
                    "tv2 per-sample (CPU)",
                    time_ms(fn, repeats=50, warmup=5),
                    base,
                    target=">= 20x" if name.startswith("ours_fused") else "",
                )
            )
    step = interleaved_ms(_step_fns(), repeats=5 if quick else 30, warmup=2)
    for name in ("mixup", "cutmix"):
        rows.append(
            Row(
                "train step 64x3x32x32 small CNN",
                f"{name} callback rewrite + step",
                "plain step",
                step[name],
                step["plain"],
                kind="overhead",
                target="<= 1.1x",
            )
        )
    return rows


if __name__ == "__main__":
    print(format_table(run()))
