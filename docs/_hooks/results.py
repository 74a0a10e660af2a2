"""MkDocs hook: render committed results into the pages at build time.

Three markers, each on a line of its own in a Markdown page:

- ``<!-- ablation-row: l2 -->`` (or ``l1_proximal, elastic_net``): a small table with those rows
  of ``docs/results/results.csv`` (the ablation's committed output), the baseline first. Until
  the file exists the marker renders a "results pending" note and the build still passes; a
  name that the file does not have is a build warning (so ``--strict`` fails on it).
- ``<!-- ablation-table -->``: every row of the same file.
- ``<!-- include: benchmarks/README.md -->``: a file of the repository (path from the root),
  pasted in, its links into ``docs/`` rewritten relative to the page.

On every page, a relative link to a repository file outside ``docs/`` (``../examples/x.py``)
becomes text that names the file: the site cannot serve it, while the Markdown on GitHub still
links to it. ``tests/test_docs.py`` checks that such files exist.

The table code is plain functions (``render_rows``, ``include_markdown``) so that
``tests/test_docs.py`` can test it without building the site.
"""

from __future__ import annotations

import csv
import logging
import math
import os
import re
from pathlib import Path
from typing import Any

log = logging.getLogger("mkdocs.hooks.lightning_reg")

RESULTS_CSV = Path("results") / "results.csv"  # relative to docs/
ROW_MARKER = re.compile(r"^<!--\s*ablation-row:\s*(?P<names>[\w ,.-]+?)\s*-->\s*$", re.MULTILINE)
TABLE_MARKER = re.compile(r"^<!--\s*ablation-table\s*-->\s*$", re.MULTILINE)
INCLUDE_MARKER = re.compile(r"^<!--\s*include:\s*(?P<path>[\w./-]+)\s*-->\s*$", re.MULTILINE)
FENCED = re.compile(r"^(?P<fence>`{3,}|~{3,}).*?^(?P=fence)[ \t]*$", re.MULTILINE | re.DOTALL)
LINK = re.compile(r"(?P<bang>!?)\[(?P<text>[^\]]*)\]\((?P<url>[^)\s]+)(?P<title>\s+\"[^\"]*\")?\)")

#: Known metric stems, in column order: (stem, header, kind). A column is shown when the CSV has
#: ``<stem>_mean`` or ``<stem>``; its spread comes from ``<stem>_ci`` (95 % CI) or ``<stem>_std``.
#: kind: "pct" (a fraction shown in percent), "pp" (a signed difference in points), "float",
#: "p" (a p-value), "epoch" and "s" (one and two decimals). A column whose rows on a page are all
#: empty is left out (the early-stopping epochs show only on that technique's page).
METRICS: tuple[tuple[str, str, str], ...] = (
    ("test_acc", "test acc %", "pct"),
    ("delta_acc", "Δ acc pp", "pp"),
    ("p_value", "p (paired)", "p"),
    ("gap", "train−test gap pp", "pct"),
    ("test_nll", "NLL", "float"),
    ("ece", "ECE %", "pct"),
    ("noisy_acc", "noisy acc %", "pct"),
    ("sparsity", "zero weights %", "pct"),
    ("max_unit_norm", "max ‖w_unit‖", "float"),
    ("stopped_epoch", "stopped at epoch", "epoch"),
    ("restored_epoch", "restored epoch", "epoch"),
    ("train_s_per_epoch", "s/epoch", "s"),
)
#: Used only when the preferred stem above is absent (older files: validation accuracy, val NLL).
FALLBACKS = {"test_acc": ("val_acc", "val acc %"), "test_nll": ("val_nll", "NLL")}
SETTING_COLUMNS = ("strength", "setting", "hparams", "chosen")


def pending(results_link: str = "ablation.md") -> str:
    """The note shown until ``docs/results/results.csv`` is committed."""
    return (
        '!!! note "Results pending"\n'
        "    The measured row appears here once the ablation's `docs/results/results.csv` is "
        f"committed (`lightning-reg ablate`, see [Results]({results_link})).\n"
    )


def read_results(path: Path) -> list[dict[str, str]] | None:
    """The rows of ``results.csv`` as dicts, or ``None`` when the file does not exist."""
    if not path.is_file():
        return None
    with open(path, newline="", encoding="utf-8-sig") as f:
        return [
            {k.strip(): (v or "").strip() for k, v in row.items() if k} for row in csv.DictReader(f)
        ]


def _number(text: str | None) -> float:
    try:
        return float(text) if text not in (None, "") else math.nan
    except ValueError:
        return math.nan


def _value(row: dict[str, str], stem: str) -> tuple[float, float, str]:
    """(mean, spread, spread kind) of one metric stem in one row; NaN where absent."""
    mean = _number(row.get(f"{stem}_mean", row.get(stem)))
    for suffix, kind in (("_ci", "ci"), ("_ci95", "ci"), ("_std", "sd")):
        if f"{stem}{suffix}" in row:
            return mean, _number(row[f"{stem}{suffix}"]), kind
    return mean, math.nan, ""


def _columns(rows: list[dict[str, str]]) -> list[tuple[str, str, str]]:
    keys = {k for row in rows for k in row}

    def present(stem: str) -> bool:
        return f"{stem}_mean" in keys or stem in keys

    columns = []
    for stem, header, kind in METRICS:
        if not present(stem) and stem in FALLBACKS and present(FALLBACKS[stem][0]):
            stem, header = FALLBACKS[stem]
        if present(stem):
            columns.append((stem, header, kind))
    return columns


def _is_fraction(rows: list[dict[str, str]]) -> bool:
    """True when accuracies are stored as fractions (0.67), not percent (67.0)."""
    values = [_value(row, stem)[0] for row in rows for stem in ("test_acc", "val_acc", "noisy_acc")]
    finite = [abs(v) for v in values if math.isfinite(v)]
    return not finite or max(finite) <= 1.0 + 1e-9


def _cell(mean: float, spread: float, kind: str, scale: float) -> str:
    if not math.isfinite(mean):
        return "–"
    if kind == "p":
        mark = " *" if mean < 0.05 else ""
        return (f"{mean:.3f}" if mean >= 0.001 else "< 0.001") + mark
    digits = {"pct": 1, "pp": 1, "epoch": 1, "s": 2}.get(kind, 3)
    if kind in ("pct", "pp"):
        mean, spread = mean * scale, spread * scale
    text = f"{mean:+.{digits}f}" if kind == "pp" else f"{mean:.{digits}f}"
    return text + (f" ± {spread:.{digits}f}" if math.isfinite(spread) else "")


def render_rows(
    rows: list[dict[str, str]], names: list[str] | None = None, results_link: str = "ablation.md"
) -> tuple[str, list[str]]:
    """A Markdown table of ``rows`` (all, or ``names`` with the baseline first).

    Returns the table and the requested names that the rows do not contain. Columns adapt to
    what the file has: known metrics are formatted, a file with none of them is shown as is.
    """
    by_name = {row.get("technique", ""): row for row in rows}
    missing = [n for n in names or [] if n not in by_name]
    if names is None:
        chosen = rows
    else:
        wanted = ["baseline", *names] if "baseline" in by_name else names
        chosen = [by_name[n] for n in dict.fromkeys(wanted) if n in by_name]
    if not chosen:
        return "", missing
    columns = _columns(rows)
    setting = next((c for c in SETTING_COLUMNS if any(c in row for row in rows)), None)
    if columns:  # leave out what none of the chosen rows has
        columns = [c for c in columns if any(math.isfinite(_value(row, c[0])[0]) for row in chosen)]
        columns = columns or _columns(rows)[:1]
    else:  # an unknown layout: show every column verbatim
        keys = list(dict.fromkeys(k for row in rows for k in row))
        lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
        lines += ["| " + " | ".join(row.get(k, "") for k in keys) + " |" for row in chosen]
        return "\n".join(lines) + "\n", missing
    scale = 100.0 if _is_fraction(rows) else 1.0
    headers = ["technique", *([setting] if setting else []), *(h for _, h, _ in columns)]
    lines = ["| " + " | ".join(headers) + " |", "|---|" + "---:|" * (len(headers) - 1)]
    spreads = set()
    for row in chosen:
        cells = [f"`{row.get('technique', '')}`", *([row.get(setting, "")] if setting else [])]
        if row.get("status", "ok") not in ("", "ok"):  # a skipped technique: say why
            reason = row.get("reason", "")
            cells.append(row["status"] + (f": {reason}" if reason else ""))
            cells += [""] * (len(columns) - 1)
            lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
            continue
        for stem, _, kind in columns:
            mean, spread, spread_kind = _value(row, stem)
            if math.isfinite(spread):
                spreads.add(spread_kind)
            cells.append(_cell(mean, spread, kind, scale))
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    seeds = next((row[k] for row in chosen for k in ("seeds", "n_seeds") if row.get(k)), None)
    legend = "Mean ± " + (
        "95 % confidence interval" if "ci" in spreads or not spreads else "standard deviation"
    )
    legend += f" over {seeds} seeds" if seeds else " over seeds"
    if any(stem == "p_value" for stem, _, _ in columns):
        legend += "; p: paired test against the baseline (same seeds), * for p < 0.05"
    legend += f". From the committed `docs/results/results.csv`; see [Results]({results_link})."
    return "\n".join(lines) + "\n\n" + legend + "\n", missing


def _rewrite_link(
    match: re.Match[str], source_dir: Path, docs_dir: Path, page_dir: Path, root: Path
) -> str:
    url = match["url"]
    if re.match(r"^[a-z][a-z0-9+.-]*:|^#|^/", url):
        return match[0]
    path, _, anchor = url.partition("#")
    target = (source_dir / path).resolve()
    if not target.is_relative_to(docs_dir.resolve()):
        if not target.is_relative_to(root.resolve()):
            return match[0]  # leaves the repository: left for `mkdocs --strict` to report
        # A repository file outside docs/ (an example, a script): the site cannot serve it,
        # so it becomes text that names the file. On GitHub the Markdown still links to it.
        text = match["text"]
        if match["bang"]:
            return f"*{text}*"
        if text.startswith("`") and text.endswith("`"):
            return text
        return f"{text} (`{target.relative_to(root.resolve()).as_posix()}`)"
    new = Path(os.path.relpath(target, page_dir.resolve())).as_posix()
    new += f"#{anchor}" if anchor else ""
    return f"{match['bang']}[{match['text']}]({new}{match['title'] or ''})"


def rewrite_links(
    text: str, source_dir: Path, docs_dir: Path, page_dir: Path, root: Path | None = None
) -> str:
    """``text``, written in ``source_dir``, with its relative links valid for ``page_dir``.

    Links into ``docs/`` are pointed at the same file from ``page_dir``; links to repository
    files outside ``docs/`` become text naming the file; links that leave the repository, and
    everything inside fenced code blocks, stay as they are.
    """
    root = root or docs_dir.parent

    def sub(part: str) -> str:
        return LINK.sub(lambda m: _rewrite_link(m, source_dir, docs_dir, page_dir, root), part)

    out, pos = [], 0
    for fence in FENCED.finditer(text):
        out += [sub(text[pos : fence.start()]), fence[0]]
        pos = fence.end()
    return "".join([*out, sub(text[pos:])])


def include_markdown(source: Path, docs_dir: Path, page_dir: Path, root: Path | None = None) -> str:
    """The text of ``source`` with its relative links made valid for a page in ``page_dir``."""
    text = source.read_text(encoding="utf-8")
    return rewrite_links(text, source.parent, docs_dir, page_dir, root)


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    """MkDocs event: replace the markers of this page."""
    docs_dir = Path(config["docs_dir"])
    root = Path(config["config_file_path"]).parent
    page_dir = docs_dir / Path(page.file.src_uri).parent
    src = page.file.src_uri

    def include(m: re.Match[str]) -> str:
        source = root / m["path"]
        if not source.is_file():
            log.warning("%s: include of %s, which does not exist", src, m["path"])
            return ""
        return include_markdown(source, docs_dir, page_dir, root)

    markdown = INCLUDE_MARKER.sub(include, markdown)
    markdown = rewrite_links(markdown, page_dir, docs_dir, page_dir, root)
    if not (ROW_MARKER.search(markdown) or TABLE_MARKER.search(markdown)):
        return markdown
    link = Path(os.path.relpath(docs_dir / "ablation.md", page_dir)).as_posix()
    rows = read_results(docs_dir / RESULTS_CSV)
    if rows is None:
        log.debug("%s: %s not committed yet; rendering 'results pending'", src, RESULTS_CSV)
        markdown = TABLE_MARKER.sub(lambda m: pending(link), markdown)
        return ROW_MARKER.sub(lambda m: pending(link), markdown)

    def one(m: re.Match[str]) -> str:
        names = [n.strip() for n in m["names"].split(",") if n.strip()]
        table, missing = render_rows(rows, names, link)
        if missing:
            known = ", ".join(r.get("technique", "?") for r in rows)
            log.warning("%s: no row %s in %s (it has: %s)", src, missing, RESULTS_CSV, known)
        return table or pending(link)

    markdown = TABLE_MARKER.sub(
        lambda m: render_rows(rows, None, link)[0] or pending(link), markdown
    )
    return ROW_MARKER.sub(one, markdown)
