"""The documentation site: API coverage, links, nav, and the hook that renders the results.

The site itself is built by ``mkdocs build --strict`` in ``.ci/run``; these tests check what can
be checked without building it, and say which name or link is wrong.
"""

from __future__ import annotations

import ast
import importlib.util
import re
import sys
from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
API_BLOCK = re.compile(r"^:::\s+lightning_reg\.(?P<name>[A-Za-z_][\w.]*)\s*$", re.MULTILINE)
FENCE = re.compile(r"^(?P<fence>`{3,}|~{3,}).*?^(?P=fence)\s*$", re.MULTILINE | re.DOTALL)
INLINE_CODE = re.compile(r"(`+)(?:(?!\1).)+?\1", re.DOTALL)
MD_LINK = re.compile(r"!?\[(?:[^\]\[]|\[[^\]]*\])*\]\((?P<url>[^)\s]+)(?:\s+\"[^\"]*\")?\)")
AUTOLINK = re.compile(r"<(?P<url>https?://[^>\s]+)>")

#: Where a link may leave the repository: papers and the upstream projects we build on.
ALLOWED_HOSTS = {
    # papers
    "arxiv.org",
    "doi.org",
    "jmlr.org",
    "proceedings.mlr.press",
    "papers.nips.cc",
    "proceedings.neurips.cc",
    "openreview.net",
    "openaccess.thecvf.com",
    "aclanthology.org",
    "link.springer.com",
    # upstream projects and their documentation
    "lightning.ai",
    "pytorch.org",
    "docs.pytorch.org",
    "huggingface.co",
    "timm.fast.ai",
    "keras.io",
    "docs.wandb.ai",
    "wandb.ai",
    "scikit-learn.org",
    "torchmetrics.readthedocs.io",
    "kornia.readthedocs.io",
    "www.mkdocs.org",
    "squidfunk.github.io",
    "mkdocstrings.github.io",
    "keepachangelog.com",
    "semver.org",
}
ALLOWED_GITHUB_OWNERS = {
    "Lightning-AI",
    "pytorch",
    "huggingface",
    "rwightman",
    "mosaicml",
    "facebookresearch",
    "keras-team",
    "greydanus",
    "kornia",
    "wandb",
}


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


hooks = _load("lightning_reg_docs_hooks", DOCS / "_hooks" / "results.py")


def public_names() -> set[str]:
    """``lightning_reg.__all__``, read from the source (no import of torch needed)."""
    tree = ast.parse((ROOT / "lightning_reg" / "__init__.py").read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets
        ):
            return {n for n in ast.literal_eval(node.value) if not n.startswith("__")}
    raise AssertionError("lightning_reg/__init__.py has no literal __all__")


def doc_pages() -> list[Path]:
    return sorted(p for p in DOCS.rglob("*.md") if "_hooks" not in p.parts)


def documented_names() -> dict[str, list[str]]:
    """``{name: [pages]}`` for every ``::: lightning_reg.<name>`` block of the site."""
    found: dict[str, list[str]] = {}
    for page in doc_pages():
        for m in API_BLOCK.finditer(page.read_text(encoding="utf-8")):
            found.setdefault(m["name"], []).append(str(page.relative_to(ROOT)))
    return found


def links(path: Path) -> list[str]:
    """The targets of the Markdown links and images of ``path``, code excluded.

    A docs page may link to a repository file outside ``docs/`` (an example): the site shows it
    as text (``docs/_hooks/results.py``), GitHub as a link; either way the file must exist.
    """
    text = FENCE.sub("", path.read_text(encoding="utf-8"))
    text = INLINE_CODE.sub("", text)
    return [m["url"] for m in MD_LINK.finditer(text)] + [m["url"] for m in AUTOLINK.finditer(text)]


def external_allowed(url: str) -> bool:
    parsed = urlparse(url)
    host = parsed.netloc.lower()
    if host == "github.com":
        owner = parsed.path.strip("/").split("/")[0]
        return owner in ALLOWED_GITHUB_OWNERS
    return host in ALLOWED_HOSTS or any(host.endswith("." + h) for h in ALLOWED_HOSTS)


# ------------------------------------------------------------------------------------------------
# API reference
# ------------------------------------------------------------------------------------------------


def test_every_public_name_is_in_the_api_reference():
    missing = public_names() - set(documented_names())
    assert not missing, (
        f"public names without a `::: lightning_reg.<name>` block in docs/: {sorted(missing)}; "
        "add each to its technique's page (or docs/api.md)"
    )


def test_api_blocks_name_public_objects_once():
    documented = documented_names()
    unknown = {n: pages for n, pages in documented.items() if n not in public_names()}
    assert not unknown, (
        f"API blocks for names not in lightning_reg.__all__ (renamed or removed?): {unknown}; "
        "reference objects by their top-level name"
    )
    twice = {n: pages for n, pages in documented.items() if len(pages) > 1}
    assert not twice, f"documented more than once (duplicate anchors): {twice}"


# ------------------------------------------------------------------------------------------------
# Links and navigation
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path",
    [ROOT / "README.md", *doc_pages()],
    ids=lambda p: str(p.relative_to(ROOT)),
)
def test_links_stay_in_the_repository(path: Path):
    bad = []
    for url in links(path):
        scheme = urlparse(url).scheme
        if scheme in ("http", "https"):
            if not external_allowed(url):
                bad.append(f"{url}: external, not a paper or upstream project")
            continue
        if scheme or url.startswith("#"):
            if scheme not in ("", "mailto"):
                bad.append(f"{url}: unexpected scheme")
            continue
        target = (path.parent / url.split("#", 1)[0]).resolve()
        if not target.exists():
            bad.append(f"{url}: no such file")
        elif not target.is_relative_to(ROOT):
            bad.append(f"{url}: leaves the repository")
    assert not bad, f"{path.relative_to(ROOT)}:\n" + "\n".join(bad)


def test_link_checker_rejects_what_it_should(tmp_path: Path):
    page = tmp_path / "p.md"
    page.write_text(
        "[a](../shared/reference/x.md) [b](https://example.com/x) [c](https://arxiv.org/abs/1)\n"
        "`[not a link](nowhere.md)`\n```\n[nor this](nowhere.md)\n```\n<https://evil.test/>\n"
        "````markdown\n```bash\nx\n```\n[nor this, in a longer fence](nowhere.md)\n````\n"
    )
    assert links(page) == [
        "../shared/reference/x.md",
        "https://example.com/x",
        "https://arxiv.org/abs/1",
        "https://evil.test/",
    ]
    assert external_allowed("https://arxiv.org/abs/1603.09382")
    assert external_allowed("https://github.com/Lightning-AI/pytorch-lightning")
    assert not external_allowed("https://github.com/someone/else")
    assert not external_allowed("https://example.com/")


def _nav_files(nav) -> list[str]:
    out = []
    for item in nav:
        value = next(iter(item.values())) if isinstance(item, dict) else item
        out += _nav_files(value) if isinstance(value, list) else [value]
    return out


def test_nav_pages_exist_and_every_page_is_in_the_nav():
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text(encoding="utf-8"))
    nav = _nav_files(config["nav"])
    missing = [p for p in nav if not (DOCS / p).is_file()]
    assert not missing, f"nav entries without a page: {missing}"
    pages = {
        str(p.relative_to(DOCS)) for p in doc_pages() if p.relative_to(DOCS).parts[0] != "results"
    }
    assert not pages - set(nav), f"pages missing from the nav: {sorted(pages - set(nav))}"


def test_readme_keeps_its_setup_commands_first():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    first_block = re.search(r"```bash\n(.*?)```", readme, re.DOTALL)
    assert first_block is not None
    assert first_block[1].splitlines()[:2] == [
        'pip install -e ".[demo]" && lightning-reg ablate --out ablation_out',
        'pip install -e ".[dev]" && pytest',
    ]
    assert readme.index("```bash") < readme.index("\n## ")
    assert "mkdocs build --strict" in readme
    assert "../shared" not in readme


def test_technique_pages_follow_the_reference_order():
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text(encoding="utf-8"))
    techniques = next(item["Techniques"] for item in config["nav"] if "Techniques" in item)
    order = [next(iter(item.values())) for item in techniques]
    assert order[:9] == [
        "penalties.md",
        "dropout.md",
        "augmentation.md",
        "early-stopping.md",
        "batch-norm.md",
        "label-smoothing.md",
        "max-norm.md",
        "stochastic-depth.md",
        "jacobian.md",
    ]
    for page in order:
        text = (DOCS / page).read_text(encoding="utf-8")
        assert "## API" in text and ":::" in text, f"{page} has no API block"


# ------------------------------------------------------------------------------------------------
# The results hook
# ------------------------------------------------------------------------------------------------

CSV_HEADER = "technique,seeds,test_acc_mean,test_acc_ci,delta_acc,delta_acc_ci,p_value,ece_mean"


def _csv(tmp_path: Path, text: str) -> list[dict[str, str]]:
    path = tmp_path / "results.csv"
    path.write_text(text)
    return hooks.read_results(path)


def test_hook_reads_nothing_when_the_results_are_not_committed(tmp_path: Path):
    assert hooks.read_results(tmp_path / "results.csv") is None
    assert "Results pending" in hooks.pending()


def test_hook_renders_requested_rows_with_the_baseline_first(tmp_path: Path):
    rows = _csv(
        tmp_path,
        CSV_HEADER + ",extra_column\n"
        "baseline,5,0.671,0.012,0.0,0.0,1.0,0.20,x\n"
        "l2,5,0.702,0.010,0.031,0.008,0.004,0.15,y\n"
        "dropout,5,0.680,0.011,0.009,0.02,0.31,0.18,z\n",
    )
    table, missing = hooks.render_rows(rows, ["l2"])
    lines = table.splitlines()
    assert missing == []
    assert lines[0] == "| technique | test acc % | Δ acc pp | p (paired) | ECE % |"
    assert lines[2] == "| `baseline` | 67.1 ± 1.2 | +0.0 ± 0.0 | 1.000 | 20.0 |"
    assert lines[3] == "| `l2` | 70.2 ± 1.0 | +3.1 ± 0.8 | 0.004 * | 15.0 |"
    assert "dropout" not in table and "extra_column" not in table
    assert "95 % confidence interval over 5 seeds" in table


def test_hook_renders_the_demo_layout_skipped_rows_and_page_specific_columns(tmp_path: Path):
    # the layout `lightning-reg ablate` writes: status/strength/reason, Δ and p, <metric>_mean/_ci
    rows = _csv(
        tmp_path,
        "technique,status,strength,seeds,delta_acc,delta_acc_ci,p_value,test_acc_mean,"
        "test_acc_ci,stopped_epoch_mean,stopped_epoch_ci,reason\n"
        "baseline,ok,-,3,0,0,nan,0.67,0.01,nan,nan,\n"
        "early_stopping,ok,patience 10,3,0.02,0.01,0.03,0.69,0.01,23.3,4.1,\n"
        "jacobian,skipped,,0,nan,nan,nan,nan,nan,nan,nan,needs JacobianPenaltyMixin\n",
    )
    table = hooks.render_rows(rows, ["early_stopping", "jacobian"])[0].splitlines()
    assert table[0] == (
        "| technique | strength | test acc % | Δ acc pp | p (paired) | stopped at epoch |"
    )
    assert table[2] == "| `baseline` | - | 67.0 ± 1.0 | +0.0 ± 0.0 | – | – |"
    assert (
        table[3]
        == "| `early_stopping` | patience 10 | 69.0 ± 1.0 | +2.0 ± 1.0 | 0.030 * | 23.3 ± 4.1 |"
    )
    assert table[4] == "| `jacobian` |  | skipped: needs JacobianPenaltyMixin |  |  |  |"
    # a page without early stopping does not get its (empty) epoch column
    assert "stopped at epoch" not in hooks.render_rows(rows, ["baseline"])[0]


def test_hook_tolerates_missing_columns_percent_files_and_unknown_names(tmp_path: Path):
    rows = _csv(tmp_path, "technique,test_acc_mean,test_acc_std\nbaseline,67.1,1.5\nl2,70.2,\n")
    table, missing = hooks.render_rows(rows, ["l2", "nope"])
    assert missing == ["nope"]
    assert "| `l2` | 70.2 |" in table  # already in percent: not scaled again; empty spread
    assert "| `baseline` | 67.1 ± 1.5 |" in table
    assert "standard deviation" in table
    # a layout the hook does not know is shown verbatim rather than dropped
    rows = _csv(tmp_path, "technique,score\nl2,0.5\n")
    assert hooks.render_rows(rows, ["l2"])[0].splitlines()[2] == "| l2 | 0.5 |"


def test_hook_markers_name_techniques_of_the_ablation():
    from lightning_reg.demo import techniques

    known = set(techniques.all_names())
    for page in doc_pages():
        for m in hooks.ROW_MARKER.finditer(page.read_text(encoding="utf-8")):
            names = {n.strip() for n in m["names"].split(",")}
            assert names <= known, (
                f"{page.name}: {names - known} are not `lightning-reg list` names"
            )


def test_hook_markers_match_the_committed_results():
    rows = hooks.read_results(DOCS / hooks.RESULTS_CSV)
    if rows is None:
        pytest.skip("docs/results/results.csv is not committed yet: pages say 'results pending'")
    known = {r.get("technique") for r in rows}
    for page in doc_pages():
        for m in hooks.ROW_MARKER.finditer(page.read_text(encoding="utf-8")):
            names = {n.strip() for n in m["names"].split(",")}
            assert names <= known, f"{page.name}: no rows {names - known} in results.csv"


def test_hook_include_keeps_links_inside_the_site(tmp_path: Path):
    (tmp_path / "docs" / "guides").mkdir(parents=True)
    (tmp_path / "docs" / "guides" / "x.md").write_text("x")
    (tmp_path / "bench").mkdir()
    source = tmp_path / "bench" / "README.md"
    source.write_text(
        "[script](bench_x.py) [guide](../docs/guides/x.md#a) ![plot](plot.png) "
        "[paper](https://arxiv.org/abs/1) [top](#top)\n"
    )
    out = hooks.include_markdown(source, tmp_path / "docs", tmp_path / "docs")
    assert out == (
        "script (`bench/bench_x.py`) [guide](guides/x.md#a) *plot* "
        "[paper](https://arxiv.org/abs/1) [top](#top)\n"
    )


def test_hook_turns_links_to_repository_files_into_text_outside_code(tmp_path: Path):
    docs = tmp_path / "docs"
    docs.mkdir()
    text = (
        "[example](../examples/a.yaml) [`examples/b.py`](../examples/b.py) "
        "[page](other.md) [outside](../../elsewhere.md)\n```\n[kept](../examples/a.yaml)\n```\n"
        "````md\n```\n```\n[kept](../examples/a.yaml)\n````\n"
    )
    out = hooks.rewrite_links(text, docs, docs, docs, tmp_path)
    assert out == (
        "example (`examples/a.yaml`) `examples/b.py` [page](other.md) "
        "[outside](../../elsewhere.md)\n```\n[kept](../examples/a.yaml)\n```\n"
        "````md\n```\n```\n[kept](../examples/a.yaml)\n````\n"
    )


def test_docstring_dialect_extension():
    pytest.importorskip("griffe")
    ext = _load("lightning_reg_docs_griffe", DOCS / "_hooks" / "griffe_docstrings.py")
    text = "Uses :class:`Foo` and :meth:`~a.b`.\n\n    Example:\n        >>> 1\n"
    assert ext.normalize(text) == "Uses `Foo` and `a.b`.\n\n    Examples:\n        >>> 1\n"
