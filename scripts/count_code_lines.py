"""Count code lines (no docstrings, comments or blank lines) per module of lightning_reg.

Usage: python scripts/count_code_lines.py [--exclude-demo]
"""

from __future__ import annotations

import ast
import io
import sys
import tokenize
from pathlib import Path


def code_lines(path: Path) -> int:
    source = path.read_text()
    doc_lines: set[int] = set()
    for node in ast.walk(ast.parse(source)):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr):
            value = body[0].value
            if isinstance(value, ast.Constant) and isinstance(value.value, str):
                doc_lines.update(range(body[0].lineno, body[0].end_lineno + 1))
    lines: set[int] = set()
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type in (
            tokenize.COMMENT,
            tokenize.NL,
            tokenize.NEWLINE,
            tokenize.INDENT,
            tokenize.DEDENT,
            tokenize.ENDMARKER,
        ):
            continue
        lines.update(range(tok.start[0], tok.end[0] + 1))
    return len(lines - doc_lines)


def main() -> None:
    root = Path(__file__).resolve().parents[1] / "lightning_reg"
    exclude_demo = "--exclude-demo" in sys.argv
    total = 0
    for path in sorted(root.rglob("*.py")):
        if exclude_demo and "demo" in path.parts:
            continue
        n = code_lines(path)
        total += n
        print(f"{n:6d}  {path.relative_to(root.parent)}")
    print(f"{total:6d}  total")


if __name__ == "__main__":
    main()
