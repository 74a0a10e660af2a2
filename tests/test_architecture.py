"""The house rules of DESIGN.md, checked by parsing the package's source.

- Technique modules are leaves: `lightning_reg/<technique>.py` imports only `lightning_reg.core`.
- Private Lightning/torch names are touched only in ``lightning_reg/core/compat.py``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "lightning_reg"
TECHNIQUE_MODULES = sorted(p for p in PACKAGE.glob("*.py") if p.name != "__init__.py")
ALL_MODULES = sorted(PACKAGE.rglob("*.py"))
EXTERNAL_ROOTS = {"torch", "nn", "F", "pl", "lightning", "L", "torchvision", "timm", "transformers"}
# Private attributes of torch / Lightning objects, flagged on any receiver (even ``self``).
PRIVATE_ATTRS = {
    "_accelerator_connector",
    "_apply",
    "_batches_that_stepped",
    "_buffers",
    "_check_input_dim",
    "_checkpoint_connector",
    "_forward_hooks",
    "_forward_pre_hooks",
    "_get_scale_async",
    "_layer_sync",
    "_load_from_state_dict",
    "_logger_connector",
    "_modules",
    "_non_persistent_buffers_set",
    "_parameters",
    "_results",
    "_scale",
    "_trainer",
    "_version",
}


def _imported_modules(tree: ast.AST) -> list[str]:
    """Absolute names of every import; relative ones resolved from a top-level module."""
    names: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:  # `from .x import y` in lightning_reg/<technique>.py
                module = ".".join(filter(None, ["lightning_reg", module]))
            names.append(module)
            names.extend(f"{module}.{alias.name}" for alias in node.names)
    return names


def test_import_parser_sees_lazy_and_relative_imports() -> None:
    source = "def f():\n    from lightning_reg.mixing import a\nfrom . import dropout\n"
    assert {"lightning_reg.mixing", "lightning_reg.dropout"} <= set(
        _imported_modules(ast.parse(source))
    )


@pytest.mark.parametrize("path", TECHNIQUE_MODULES, ids=lambda p: p.name)
def test_technique_modules_are_leaves(path: Path) -> None:
    tree = ast.parse(path.read_text())
    own = [
        name
        for name in _imported_modules(tree)
        if name.startswith("lightning_reg") and not name.startswith("lightning_reg.core")
    ]
    assert not own, f"{path.name} imports another technique or the demo: {own}"


def _is_private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _chain(node: ast.AST) -> list[str]:
    parts: list[str] = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
    return parts[::-1]


def private_uses(source: str) -> list[str]:
    """Every place ``source`` touches a private torch/Lightning name, as ``line: what``."""
    found: list[str] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            root = node.module.split(".")[0]
            if root in EXTERNAL_ROOTS:
                parts = node.module.split(".") + [a.name for a in node.names]
                if any(_is_private(p) for p in parts):
                    found.append(f"{node.lineno}: from {node.module} import ...")
        elif isinstance(node, ast.Attribute):
            chain = _chain(node)
            if node.attr in PRIVATE_ATTRS:
                found.append(f"{node.lineno}: .{node.attr}")
            elif chain and chain[0] in EXTERNAL_ROOTS and _is_private(node.attr):
                found.append(f"{node.lineno}: {'.'.join(chain)}")
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id in {"getattr", "setattr", "hasattr"}
            and len(node.args) >= 2
            and isinstance(node.args[1], ast.Constant)
            and isinstance(node.args[1].value, str)
            and node.args[1].value in PRIVATE_ATTRS
        ):
            found.append(f"{node.lineno}: {node.func.id}(..., {node.args[1].value!r})")
    return found


def test_private_use_detector_sees_the_usual_forms() -> None:
    source = (
        "import torch\nfrom torch.nn.modules.batchnorm import _BatchNorm\n"
        "torch._foreach_add_(a, b)\nx = module._parameters\ny = getattr(t, '_logger_connector')\n"
        "self._own = 1\n"
    )
    assert sorted(u.split(":")[0] for u in private_uses(source)) == ["2", "3", "4", "5"]


@pytest.mark.parametrize(
    "path",
    [p for p in ALL_MODULES if p.name != "compat.py"],
    ids=lambda p: str(p.relative_to(PACKAGE)),
)
def test_private_names_only_in_compat(path: Path) -> None:
    uses = private_uses(path.read_text())
    assert not uses, f"{path.relative_to(PACKAGE)} touches private names (use core/compat): {uses}"
