"""The rendered book in a real browser (issue 12).

The book is built once for this module without executing the notebooks (they carry the outputs
of their default run), served from 127.0.0.1, and every page of _toc.yml is opened in headless
Chromium (Debian's `chromium`, driven by Playwright with that system browser) with every request
that leaves 127.0.0.1 blocked, so the checks also prove that the book works offline. A page must:
load without console errors or failed requests; load every image; have its math typeset by the
MathJax that the build bundles (no raw TeX left); list every chapter in its sidebar; and, for a
chapter notebook, carry a Colab launch button for that notebook's path in the repository that
_config.yml names. The same build must emit no Sphinx warning.

Where Chromium or Playwright is missing, the browser checks skip with the reason; under CI
(CI=true) they fail instead: tools/setup.sh installs both.
"""
import functools
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urljoin, urlsplit

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CONFIG = yaml.safe_load((ROOT / "_config.yml").read_text())
TOC = yaml.safe_load((ROOT / "_toc.yml").read_text())
ANSI = re.compile(r"\x1b\[[0-9;]*m")
# TeX that MathJax would have replaced: \( \) \[ \] $$ or a command such as \frac{ or \mathrm{.
RAW_TEX = re.compile(r"\\[()\[\]]|\$\$|\\[A-Za-z]+\{")


def toc_docs(node) -> list[str]:
    """Every `file:` of _toc.yml in reading order, the root first."""
    if isinstance(node, list):
        return [doc for item in node for doc in toc_docs(item)]
    if not isinstance(node, dict):
        return []
    own = [node[key] for key in ("root", "file") if key in node]
    children = [node.get(key) for key in ("parts", "chapters", "sections")]
    return own + [doc for child in children for doc in toc_docs(child)]


DOCS = toc_docs(TOC)


def colab_url(doc: str) -> str:
    """The Colab launch URL of a notebook, computed from _config.yml's repository settings."""
    owner, name = urlsplit(CONFIG["repository"]["url"]).path.strip("/").split("/")[:2]
    book_path = CONFIG["repository"].get("path_to_book", "").strip("/")
    path = f"{book_path}/{doc}.ipynb" if book_path else f"{doc}.ipynb"
    base = CONFIG["launch_buttons"]["colab_url"].rstrip("/")
    return f"{base}/github/{owner}/{name}/blob/{CONFIG['repository']['branch']}/{path}"


def unavailable(reason: str):
    """Skip with the reason; under CI, where tools/setup.sh installed the browser, fail instead."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason}; CI must run the browser test (tools/setup.sh installs it)")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def book(tmp_path_factory):
    """Build the book without executing notebooks; returns (html folder, warnings, seconds)."""
    out = tmp_path_factory.mktemp("book")
    config = dict(CONFIG, execute=dict(CONFIG["execute"], execute_notebooks="off"))
    local = CONFIG["sphinx"].get("local_extensions", {})  # paths relative to _config.yml's folder
    config["sphinx"] = dict(CONFIG["sphinx"], local_extensions={
        name: str(ROOT / path) for name, path in local.items()})
    (out / "_config.yml").write_text(yaml.safe_dump(config))
    jb = Path(sys.executable).with_name("jupyter-book")
    start = time.perf_counter()
    run = subprocess.run([str(jb), "build", str(ROOT), "--path-output", str(out),
                          "--config", str(out / "_config.yml")],
                         capture_output=True, text=True, timeout=600)
    seconds = time.perf_counter() - start
    log = ANSI.sub("", run.stdout + run.stderr)
    assert run.returncode == 0, f"jupyter-book build failed:\n{log[-3000:]}"
    warnings = [line for line in log.splitlines() if "WARNING:" in line]
    return out / "_build" / "html", warnings, seconds


def test_build_has_no_sphinx_warnings(book):
    html, warnings, seconds = book
    assert not warnings, f"{len(warnings)} Sphinx warnings (build {seconds:.0f} s):\n" + \
        "\n".join(warnings)
    assert (html / "_static" / "mathjax" / Path(CONFIG["sphinx"]["config"]["mathjax_path"]).name
            ).is_file(), "MathJax is not bundled into _static"


class QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args):  # no access log on stderr
        pass


@pytest.fixture(scope="module")
def site(book):
    """The built book served over HTTP on 127.0.0.1 (as on GitHub Pages); yields its base URL."""
    handler = functools.partial(QuietHandler, directory=str(book[0]))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}/"
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def browser():
    """Headless Debian Chromium, driven by Playwright (which downloads no browser here)."""
    names = ("chromium", "chromium-browser", "google-chrome")  # Debian's; Ubuntu's; Chrome
    executable = os.environ.get("CHROMIUM") or next(filter(None, map(shutil.which, names)), None)
    if not executable:
        unavailable(f"none of {names} is installed (Debian: apt-get install chromium; "
                    "or set CHROMIUM to a Chromium executable)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        unavailable("the Python package playwright is not installed (requirements.txt)")
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=executable)
        yield chromium
        chromium.close()


# Runs in the page once it has loaded: waits for every image, for MathJax and for the widgets'
# HTML manager to have drawn every widget, then reports.
INSPECT = """async () => {
  const views = [...document.querySelectorAll('script[type$="widget-view+json"]')];
  const drawn = v => {  // the HTML manager puts a div.widget-subarea before the view's script
    const area = v.previousElementSibling;
    return area && area.classList.contains("widget-subarea") && area.children.length > 0
      && !area.textContent.includes("Error displaying widget");
  };
  for (let i = 0; i < 100 && !views.every(drawn); i++)
    await new Promise(done => setTimeout(done, 100));
  const images = [...document.images];
  await Promise.all(images.map(i => { i.loading = "eager"; return i.decode().catch(() => null); }));
  const math = [...document.querySelectorAll(".math")];
  if (math.length && window.MathJax && MathJax.startup) await MathJax.startup.promise;
  const prose = document.querySelector("article").cloneNode(true);
  prose.querySelectorAll("pre, code, script, style, .math").forEach(e => e.remove());
  return {
    brokenImages: images.filter(i => !(i.complete && i.naturalWidth > 0))
                        .map(i => i.getAttribute("src")),
    mathjax: window.MathJax && MathJax.version ? MathJax.version : null,
    mathjaxScripts: [...document.scripts].map(s => s.src).filter(s => /mathjax/i.test(s)),
    math: math.length,
    untypeset: math.filter(e => !e.querySelector("mjx-container"))
                   .map(e => e.textContent.slice(0, 80)),
    texErrors: [...document.querySelectorAll("mjx-merror")]
                   .map(e => e.getAttribute("data-mjx-error") || e.textContent),
    widgets: views.length,
    undrawn: views.filter(v => !drawn(v)).map(v => v.textContent.slice(0, 80)),
    prose: prose.textContent,
    sidebar: [...document.querySelectorAll("nav.bd-docs-nav a")].map(a => a.href.split("#")[0]),
    colab: [...document.querySelectorAll('a[href*="colab.research.google.com"]')]
               .map(a => a.href),
  };
}"""


def visit(browser, site: str, doc: str) -> dict:
    """Open one page with everything outside `site` blocked; what INSPECT reports, plus the
    console errors, failed requests and blocked requests."""
    page = browser.new_page()
    errors, blocked = [], []
    page.on("console", lambda m: errors.append(f"console: {m.text}") if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(f"uncaught: {e}"))
    page.on("requestfailed", lambda r: r.url.startswith(site) and errors.append(
        f"failed: {r.url} {r.failure}"))

    def route(r):
        if r.request.url.startswith(site):
            return r.continue_()
        blocked.append(r.request.url)
        return r.abort()

    page.route("**/*", route)
    response = page.goto(urljoin(site, f"{doc}.html"), wait_until="load")
    found = page.evaluate(INSPECT)
    page.close()
    return dict(found, status=response.status, errors=errors, blocked=blocked)


@pytest.mark.parametrize("doc", DOCS)
def test_page_in_chromium(browser, site, doc):
    page = visit(browser, site, doc)
    assert page["status"] == 200
    assert not page["blocked"], f"requests leaving the book (offline, they fail): {page['blocked']}"
    assert not page["errors"], "\n".join(page["errors"])
    assert not page["brokenImages"], f"images that did not load: {page['brokenImages']}"
    assert not page["undrawn"], f"{len(page['undrawn'])} of {page['widgets']} widgets not drawn"
    assert not page["untypeset"] and not page["texErrors"], \
        f"math not typeset: {page['untypeset'][:5]}, TeX errors: {page['texErrors'][:5]}"
    raw = RAW_TEX.findall(page["prose"])
    assert not raw, f"raw TeX outside math and code: {raw[:10]}"
    if page["math"]:  # typeset by the bundled MathJax 3, served from this book
        assert page["mathjax"] and page["mathjax"].startswith("3."), page["mathjax"]
        assert page["mathjaxScripts"] and all(s.startswith(site) for s in page["mathjaxScripts"])
    missing = [d for d in DOCS if urljoin(site, f"{d}.html") not in page["sidebar"]]
    assert not missing, f"sidebar does not list {missing}"
    is_notebook = (ROOT / f"{doc}.ipynb").is_file()
    assert page["colab"] == ([colab_url(doc)] if is_notebook else []), page["colab"]

