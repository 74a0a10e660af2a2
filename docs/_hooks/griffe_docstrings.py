"""Griffe extension: two spellings in the project's docstrings, read the way they are meant.

- ``Example:``: DESIGN asks for "Args, Raises, an Example, and a Reference". Griffe's Google
  parser knows only the plural ``Examples:``; the singular becomes an admonition whose ``>>>``
  lines render as Markdown (quote marks, and ``['1']`` read as a link). The title is renamed
  before parsing, so the doctest renders as a code block.
- Sphinx roles such as ``:class:`Foo``` and ``:meth:`bar```: Markdown shows the role's name as
  text. The role is dropped and the name stays as inline code.

Only the docstring text that mkdocstrings renders changes; the source files are not touched.
"""

from __future__ import annotations

import re
from typing import Any

from griffe import Extension, Object

EXAMPLE = re.compile(r"^(?P<indent>[ \t]*)Example:[ \t]*$", re.MULTILINE)
ROLE = re.compile(r":(?:py:)?(?:class|meth|func|attr|mod|data|obj|exc|const):`~?(?P<name>[^`]+)`")


def normalize(text: str) -> str:
    """``text`` with ``Example:`` titles made plural and Sphinx roles made inline code."""
    return ROLE.sub(r"`\g<name>`", EXAMPLE.sub(r"\g<indent>Examples:", text))


class DocstringDialect(Extension):
    """Normalize every loaded docstring before it is parsed (see the module docstring)."""

    def on_instance(self, *, obj: Object, **kwargs: Any) -> None:
        """Rewrite ``obj``'s docstring, if it has one."""
        if obj.docstring is not None:
            obj.docstring.value = normalize(obj.docstring.value)
