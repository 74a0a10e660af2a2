"""lightning_reg: regularization techniques for PyTorch Lightning."""

from lightning_reg.core import ParamSelection

__version__ = "0.1.0"

__all__ = ["ParamSelection", "__version__"]
