"""Every chapter notebook follows the book's shape: a title, a papermill `parameters` cell, the
closing sections, an entry in the table of contents, and committed outputs of its default run."""
from pathlib import Path

import nbformat
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))     # the chapters
APPENDICES = sorted((ROOT / "notebooks").glob("A[0-9]_*.ipynb"))
CLOSING = ["## Summary", "## What we added to qlora_mini", "## Exercises", "## Going further"]


def toc_files(node) -> set[str]:
    """All `file:` entries of _toc.yml, recursively."""
    if isinstance(node, dict):
        found = {node["file"]} if "file" in node else set()
        return found.union(*(toc_files(v) for v in node.values() if isinstance(v, (dict, list))))
    if isinstance(node, list):
        return set().union(*(toc_files(v) for v in node))
    return set()


@pytest.fixture(scope="module")
def toc():
    data = yaml.safe_load((ROOT / "_toc.yml").read_text())
    return toc_files(data) | {data["root"]}


def test_there_are_chapters():
    assert NOTEBOOKS, "no chapter notebooks found"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_shape(path, toc):
    nb = nbformat.read(path, as_version=4)
    markdown = "\n".join(c.source for c in nb.cells if c.cell_type == "markdown")
    assert nb.cells[0].cell_type == "markdown" and nb.cells[0].source.startswith("# Chapter")
    params = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(params) == 1, "exactly one papermill `parameters` cell"
    positions = [markdown.find(h) for h in CLOSING]
    assert all(p >= 0 for p in positions), f"missing closing sections: {CLOSING}"
    assert positions == sorted(positions), f"closing sections out of order: {CLOSING}"
    assert path.relative_to(ROOT).with_suffix("").as_posix() in toc, "not listed in _toc.yml"


@pytest.mark.parametrize("path", NOTEBOOKS + APPENDICES, ids=lambda p: p.name)
def test_notebook_committed_executed(path):
    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code" and c.source.strip()]
    run = [c for c in code if "colab-setup" not in c.metadata.get("tags", [])]  # a no-op here
    assert all(c.execution_count for c in run), "commit the notebook executed (make notebooks)"
    errors = [o for c in code for o in c.outputs if o.output_type == "error"]
    assert not errors, f"committed outputs contain an error: {errors[0].get('ename')}"


MAX_CELL_LINES = 30  # the style guide's: a cell a reader takes in at once


def one_class(source: str) -> bool:
    """A cell that only defines one class: it may be longer than MAX_CELL_LINES, since a class
    reads whole (the limit is a guide; splitting a class to fit it would be worse)."""
    import ast
    try:
        body = ast.parse(source).body
    except SyntaxError:                    # IPython syntax (%magic): not a plain class
        return False
    return len(body) == 1 and isinstance(body[0], ast.ClassDef)


def test_code_cells_are_short():
    long = [f"{p.name}: {len(c.source.splitlines())} lines, {c.source.splitlines()[0][:50]!r}"
            for p in NOTEBOOKS + APPENDICES for c in nbformat.read(p, as_version=4).cells
            if c.cell_type == "code" and len(c.source.splitlines()) > MAX_CELL_LINES
            and not one_class(c.source)]
    assert not long, f"code cells over {MAX_CELL_LINES} lines:\n" + "\n".join(long)


def test_appendices_are_in_the_book(toc):
    assert APPENDICES, "no appendix notebooks found"
    for path in APPENDICES:
        nb = nbformat.read(path, as_version=4)
        assert nb.cells[0].source.startswith("# Appendix")
        assert path.relative_to(ROOT).with_suffix("").as_posix() in toc, "not listed in _toc.yml"
