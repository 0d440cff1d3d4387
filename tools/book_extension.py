"""The book's own Sphinx extension (hand-written plumbing), loaded by _config.yml's
`sphinx.local_extensions`. Two jobs, both so that every page works offline and without console
errors (tests/test_browser.py checks both):

- Widgets without a CDN. The notebooks' tqdm progress bars are ipywidgets; _config.yml points
  myst-nb at `_static/jupyter-widgets/embed.js`, and this copies ipywidgets' HTML manager there
  (npm's @jupyter-widgets/html-manager, which tools/setup.sh unpacks into the virtual
  environment) when the build finishes. Without it, a Sphinx warning says so.
- One copy of each inline script. Sphinx 7.4, the newest that Jupyter Book 1 allows, writes an
  inline script twice when an extension adds it after the builder is set up (the builder keeps it
  under the file name None, re-adds it from the registry under '', and the two differ).
  sphinx-thebe adds `const THEBE_JS_URL = ...` that way, and the second copy throws "Identifier
  'THEBE_JS_URL' has already been declared" on every page.
"""
import sys
from pathlib import Path

from sphinx.util import logging
from sphinx.util.fileutil import copy_asset

logger = logging.getLogger(__name__)
HTML_MANAGER = Path(sys.prefix) / "share" / "jupyter-widgets-html-manager"  # tools/setup.sh


def copy_html_manager(app, exception):
    if exception is not None or app.builder.format != "html":
        return
    if not (HTML_MANAGER / "embed.js").is_file():
        logger.warning(f"ipywidgets' HTML manager is missing from {HTML_MANAGER} (tools/setup.sh "
                       "unpacks it with npm): the notebooks' widgets will not render")
        return
    copy_asset(str(HTML_MANAGER), str(Path(app.outdir) / "_static" / "jupyter-widgets"),
               excluded=lambda path: path.endswith(".map"))


def drop_repeated_inline_scripts(app, pagename, templatename, context, doctree):
    seen, kept = set(), []
    for script in context.get("script_files", []):
        attributes = getattr(script, "attributes", {})
        if not getattr(script, "filename", script) and "body" in attributes:  # an inline script
            key = tuple(sorted(attributes.items()))
            if key in seen:
                continue
            seen.add(key)
        kept.append(script)
    context["script_files"] = kept  # a new list: the builder's own is reused for every page


def setup(app):
    app.connect("build-finished", copy_html_manager)
    app.connect("html-page-context", drop_repeated_inline_scripts)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
