"""`REPORT.html`: the page a researcher opens first, one self-contained file (tables, claims, curves, sample grids).

It is REPORT.md rendered (markdown-it-py, CommonMark plus tables), with what REPORT.md links to brought into the
page: a linked PNG (curves, guidance sweep, sample grids) becomes the picture itself, embedded as a data URI, and
a linked markdown table becomes the table. One file, no relative paths: it opens the same from a DVC checkout,
an e-mail or a CI artifact. Why not `snakemake --report`: it documents the DAG's jobs, not the study's verdicts,
and needs the workdir's metadata, which a colleague who only pulled `results/` does not have.

When the page loads, a small script writes "images N/M loaded" into the title (tests read it in a headless
browser: every image must load).
"""
from __future__ import annotations

import base64
import html
import re
from pathlib import Path

from markdown_it import MarkdownIt

from .provenance import atomic_write_bytes

NAME = "REPORT.html"

_STYLE = """
body { font: 15px/1.5 system-ui, sans-serif; max-width: 1200px; margin: 2em auto; padding: 0 1em; color: #222; }
table { border-collapse: collapse; margin: 1em 0; font-size: 13px; display: block; overflow-x: auto; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: left; white-space: nowrap; }
th { background: #f3f3f3; }
figure { margin: 1em 0; } figure img { max-width: 100%; image-rendering: pixelated; border: 1px solid #ddd; }
figcaption { font-size: 13px; color: #555; }
code { background: #f6f6f6; padding: 0 3px; }
"""

_CHECK = """
window.addEventListener("load", () => {
  const images = Array.from(document.images);
  const loaded = images.filter((img) => img.complete && img.naturalWidth > 0).length;
  document.title = `images ${loaded}/${images.length} loaded`;
});
"""

_LINK = re.compile(r'<a href="([^"]+)">(.*?)</a>')


def _markdown() -> MarkdownIt:
    return MarkdownIt("commonmark", {"html": False}).enable("table")


def _inline(results: Path, match: re.Match) -> str:
    """A link to a results file, brought into the page: PNG as a figure, markdown as its rendered table."""
    target, label = html.unescape(match.group(1)), match.group(2)
    path = results / target
    if not path.is_file() or ".." in Path(target).parts:
        return match.group(0)
    if path.suffix == ".png":
        data = base64.b64encode(path.read_bytes()).decode()
        return (f'</p><figure><img src="data:image/png;base64,{data}" alt="{html.escape(target)}">'
                f"<figcaption>{label}</figcaption></figure><p>")
    if path.suffix == ".md":
        return f"<details open><summary>{label}</summary>{_markdown().render(path.read_text())}</details>"
    return match.group(0)


def write_html_report(results: Path, title: str) -> Path:
    """Render `results/REPORT.md` (without a study: the runs table and every figure) into `results/REPORT.html`,
    every linked figure and table inside it."""
    results = Path(results)
    report = results / "REPORT.md"
    if report.is_file():
        text = report.read_text()
    else:  # a config without a `study`: the runs table and every figure
        text = "\n".join([f"# {title}", "", (results / "tables" / "runs.md").read_text(), "", "## Plots", ""]
                          + [f"- [{p.stem}]({p.relative_to(results).as_posix()})"
                             for p in sorted((results / "plots").rglob("*.png"))])
    body = _markdown().render(text)
    body = _LINK.sub(lambda m: _inline(results, m), body).replace("<p></p>", "")
    page = (f"<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<style>{_STYLE}</style><script>{_CHECK}</script></head>\n<body>\n{body}\n</body></html>\n")
    out = results / NAME
    atomic_write_bytes(out, page.encode())
    return out
