"""Write the student edition of the book's notebooks (hand-written plumbing): `make student`.

The student edition is every chapter notebook with its exercise solutions removed and everything
else kept: the chapter's text, code and outputs, each exercise's statement, its starter cell and
its check. What a solution is, is marked in the notebooks themselves, for sphinx-exercise (which
renders them as hidden solutions in the book):

* a markdown block ``:::{solution} LABEL`` ... ``:::`` (a written solution), and
* everything between a markdown cell that opens with ````{solution-start} LABEL``` and the
  markdown cell that holds ````{solution-end}``` (a solution with code cells; the book runs them,
  so CI checks every check against its solution). Text after the end marker is kept.

The outputs of the exercises section are cleared: they could give an answer away. The results and
data the notebooks read (``results/``, ``bench/results/``) are copied next to them, so the
relative paths still work. Grading is described in ``book/running.md``.

    python tools/student.py [--out _build/student]
"""
from __future__ import annotations

import argparse
import re
import shutil
import sys
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parents[1]
SOLUTION_BLOCK = re.compile(r"^:::\{solution\}.*?^:::[ \t]*$\n?", re.S | re.M)
START = re.compile(r"^```\{solution-start\}", re.M)
END = re.compile(r"^```\{solution-end\}\s*\n```[ \t]*$\n?", re.M)
COPIED = ("results", "bench/results")


def strip_solutions(nb) -> tuple[object, int]:
    """(the notebook without its solutions, how many were removed)."""
    cells, inside, removed = [], False, 0
    for cell in nb.cells:
        src = cell.source
        if inside:
            end = END.search(src) if cell.cell_type == "markdown" else None
            if end is None:
                continue                                  # a cell of the solution
            inside, src = False, src[end.end():]
        if cell.cell_type == "markdown":
            src, n = SOLUTION_BLOCK.subn("", src)
            removed += n
            start = START.search(src)
            if start:
                inside, removed = True, removed + 1
                end = END.search(src, start.end())       # start and end in one cell
                src = src[:start.start()] + (src[end.end():] if end else "")
                inside = end is None
        if src.strip() or cell.cell_type == "code":
            cell.source = src.strip("\n") if cell.cell_type == "markdown" else src
            cells.append(cell)
    if inside:
        raise ValueError("a solution-start without its solution-end")
    nb.cells = cells
    return nb, removed


def clear_exercise_outputs(nb) -> None:
    """No outputs from '## Exercises' on (they could give an answer away)."""
    on = False
    for cell in nb.cells:
        if cell.cell_type == "markdown" and re.search(r"^## Exercises", cell.source, re.M):
            on = True
        if cell.cell_type == "markdown" and re.search(r"^## Going further", cell.source, re.M):
            on = False
        if on and cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None


def write_student_edition(out: Path) -> dict:
    """Write out/notebooks/*.ipynb and copy COPIED; returns {notebook name: solutions removed}."""
    if out.exists():
        shutil.rmtree(out)
    (out / "notebooks").mkdir(parents=True)
    report = {}
    for path in sorted((ROOT / "notebooks").glob("*.ipynb")):      # the chapters and appendices
        nb, n = strip_solutions(nbformat.read(path, as_version=4))
        clear_exercise_outputs(nb)
        nbformat.write(nb, out / "notebooks" / path.name)
        report[path.name] = n
    for folder in COPIED:
        if (ROOT / folder).exists():
            shutil.copytree(ROOT / folder, out / folder)
    return report


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "_build" / "student"))
    args = ap.parse_args(argv)
    report = write_student_edition(Path(args.out))
    for name, n in report.items():
        print(f"{name}: {n} solution(s) removed")
    print(f"student edition: {args.out}/notebooks ({len(report)} notebooks)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
