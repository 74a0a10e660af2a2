"""Hard class labels to soft ``(B, K, ...)`` targets, shared by label smoothing and mixing.

The class dimension is dim 1, as ``F.cross_entropy`` expects, so the soft targets work with the
loss the user already has. Smoothing is affine in ``y``, so it commutes with MixUp/CutMix.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lightning_reg.core.validation import check_int


def check_labels(targets: torch.Tensor, num_classes: int) -> None:
    """Raise if integer ``targets`` hold a label outside ``[0, num_classes)``.

    This reads two numbers back to the host: on an accelerator, call it once (the first step),
    not every step.

    Raises:
        ValueError: naming ``num_classes`` and the labels found.
    """
    if targets.is_floating_point() or targets.numel() == 0:
        return
    low, high = torch.aminmax(targets)
    if bool((low < 0) | (high >= num_classes)):
        raise ValueError(
            f"Class labels must be in [0, {num_classes - 1}] for num_classes={num_classes}, got "
            f"labels in [{int(low)}, {int(high)}]. Set `num_classes` to the number of classes of "
            "your dataset (ignore_index labels such as -100 are not supported)."
        )


def to_soft_targets(
    targets: torch.Tensor,
    num_classes: int,
    *,
    smoothing: float = 0.0,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """``(1 − s)·onehot(y) + s/K`` for labels, ``(1 − s)·y + s/K`` for soft targets.

    Labels ``(B,)`` give ``(B, K)``; labels ``(B, d1, ...)`` give ``(B, K, d1, ...)``. Float
    targets must already have ``K`` entries along dim 1. Label ranges are checked on the CPU,
    where it is free; on an accelerator ``F.one_hot`` fails on the device instead (see
    :func:`check_labels` for a clear message once).

    Args:
        targets: integer class labels, or float soft targets.
        num_classes: the number of classes ``K`` (>= 1).
        smoothing: the label-smoothing ``s`` (not validated here; callers check [0, 1]).
        dtype: the float dtype of targets built from labels.

    Raises:
        ValueError: if a label is outside ``[0, K)``, soft targets do not have ``K`` classes
            along dim 1, or the targets are neither integer nor float.

    Example:
        >>> to_soft_targets(torch.tensor([1, 0]), 2, smoothing=0.2)
        tensor([[0.1000, 0.9000],
                [0.9000, 0.1000]])
    """
    k = check_int("num_classes", num_classes, 1)
    if targets.is_floating_point():
        if targets.ndim < 2 or targets.shape[1] != k:
            raise ValueError(
                f"Soft (float) targets must have shape (B, num_classes={k}, ...), got "
                f"{tuple(targets.shape)}; pass integer class labels, or fix `num_classes`."
            )
        soft = targets
    else:
        if targets.dtype == torch.bool or targets.is_complex():
            raise ValueError(f"Targets must be integer class labels or float, got {targets.dtype}")
        if targets.device.type == "cpu":
            check_labels(targets, k)
        soft = F.one_hot(targets.long(), k).to(dtype)
        soft = soft.movedim(-1, 1) if soft.ndim > 2 else soft
    return soft * (1.0 - smoothing) + smoothing / k if smoothing else soft
