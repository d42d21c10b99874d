"""Feature pages and the index, in markdown or HTML.

Markdown shows each context as code spans with the peak token in **bold**, followed by the non-zero
activations of the window's tokens. HTML colours every token's background by its activation relative
to the feature's largest one, outlines the peak and shows the value on hover.
"""

from __future__ import annotations

import dataclasses
import html
import re

from jaxsae.analysis.tokens import is_blank, visible
from jaxsae.analysis.contexts import Example


@dataclasses.dataclass
class Context:
    """An example ready to show: the window's pieces and activations, the peak's index in them."""

    value: float
    context: int
    pieces: list[str]
    acts: list[float]
    peak: int  # index into pieces


@dataclasses.dataclass
class FeaturePage:
    feature: int
    density: float
    fired: int
    n_tokens: int
    top_logits: list[tuple[str, float]]
    bottom_logits: list[tuple[str, float]]
    contexts: list[Context]

    @property
    def max_act(self) -> float:
        return self.contexts[0].value if self.contexts else 0.0


def to_context(example: Example, pieces: list[str], left: int, right: int) -> Context:
    """`pieces` are the decoded tokens of example.tokens[window]."""
    a, _ = example.window(left, right)
    return Context(example.value, example.context, pieces, [float(v) for v in example.acts[a:a + len(pieces)]],
                   example.peak - a)


def page_name(feature: int, fmt: str) -> str:
    return f"feature_{feature:05d}.{fmt}"


def _density(p: FeaturePage) -> str:
    if not p.fired:
        return f"0 (never fired in {p.n_tokens:,} tokens)"
    return f"{p.density:.3g} ({p.fired:,} of {p.n_tokens:,} tokens)"


# ------------------------------------------------------------------------------------ markdown

def _code(s: str) -> str:
    """A markdown code span showing s exactly: a fence longer than any backtick run in s, and padding
    where CommonMark would strip a space or merge a backtick into the fence."""
    if not s:
        return ""
    fence = "`" * (max((len(r) for r in re.findall("`+", s)), default=0) + 1)
    pad = s[0] == "`" or s[-1] == "`" or (s[0] == " " and s[-1] == " " and s.strip() != "")
    return f"{fence} {s} {fence}" if pad else f"{fence}{s}{fence}"


def _cell(s: str) -> str:
    """Text for a GFM table cell: a pipe, even inside a code span, must be escaped."""
    return s.replace("|", "\\|")


def _md_token(piece: str) -> str:
    return visible(piece, spaces=is_blank(piece)) or "∅"


def _md_context(c: Context) -> str:
    left = _code(visible("".join(c.pieces[:c.peak])))
    right = _code(visible("".join(c.pieces[c.peak + 1:])))
    peak = f"**{_code(_md_token(c.pieces[c.peak]))}**"
    vals = " · ".join(f"{_code(_md_token(p))} {v:.2f}" for p, v in zip(c.pieces, c.acts) if v > 0)
    return f"{left}{peak}{right}<br>{vals}"


def _md_logits(items: list[tuple[str, float]]) -> str:
    return " ".join(f"{_code(_md_token(t))} {v:+.2f}" for t, v in items)


def feature_markdown(p: FeaturePage, run_name: str) -> str:
    lines = [f"# Feature {p.feature}", "", f"Run `{run_name}`. [All features](index.md)", "",
             f"- **density**: {_density(p)}", f"- **max activation seen**: {p.max_act:.3f}",
             f"- **top logit effects (+)**: {_md_logits(p.top_logits)}",
             f"- **top logit effects (−)**: {_md_logits(p.bottom_logits)}", "",
             "## Top contexts", ""]
    if not p.contexts:
        lines.append("The feature never fired on the analysed tokens.")
    else:
        lines += ["Peak token in **bold**; ↵ is a newline, · a space in a blank token; then every "
                  "token of the window with a non-zero activation.", "",
                  "| # | max act | context (stream index) |", "|---|---|---|"]
        for i, c in enumerate(p.contexts, 1):
            lines.append(f"| {i} | {c.value:.3f} | {_cell(_md_context(c))} (#{c.context}) |")
    return "\n".join(lines) + "\n"


def _peak_token(p: FeaturePage) -> str:
    return p.contexts[0].pieces[p.contexts[0].peak] if p.contexts else ""


def index_markdown(pages: list[FeaturePage], header: list[str], fmt: str = "md") -> str:
    lines = [*header, "", "![feature density histogram](density.png)", "",
             "| feature | density | max act | peak token of the top context | top logit effects (+) |",
             "|---|---|---|---|---|"]
    for p in pages:
        peak = _code(_md_token(_peak_token(p))) if p.contexts else ""
        logits = _md_logits(p.top_logits[:5])
        lines.append(f"| [{p.feature}]({page_name(p.feature, fmt)}) | {_density(p)} | {p.max_act:.3f} | "
                     f"{_cell(peak)} | {_cell(logits)} |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------- html

_CSS = """body{font-family:sans-serif;max-width:70em;margin:2em auto;padding:0 1em}
.ctx{font-family:monospace;white-space:pre-wrap;line-height:1.6}
.tok{border-radius:2px}.peak{outline:2px solid #b00;font-weight:bold}
table{border-collapse:collapse}td,th{border-bottom:1px solid #ddd;padding:.3em .6em;text-align:left;vertical-align:top}
code{background:#f3f3f3;padding:0 .2em}"""


def _doc(title: str, body: str) -> str:
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{_CSS}</style></head><body>\n{body}\n</body></html>\n")


def _html_token(piece: str, act: float, top: float, peak: bool) -> str:
    alpha = 0.0 if top <= 0 else min(1.0, max(0.0, act / top))
    text = html.escape(piece.replace("\n", "↵\n").replace("\t", "⇥\t")) or "∅"
    if peak and is_blank(piece):
        text = html.escape(visible(piece, spaces=True))
    cls = "tok peak" if peak else "tok"
    return (f"<span class='{cls}' style='background:rgba(255,80,0,{alpha:.2f})' "
            f"title='{act:.3f}'>{text}</span>")


def _html_logits(items: list[tuple[str, float]]) -> str:
    return " ".join(f"<code>{html.escape(visible(t, spaces=is_blank(t)))}</code> {v:+.2f}" for t, v in items)


def feature_html(p: FeaturePage, run_name: str) -> str:
    rows = []
    for i, c in enumerate(p.contexts, 1):
        toks = "".join(_html_token(t, a, p.max_act, j == c.peak) for j, (t, a) in enumerate(zip(c.pieces, c.acts)))
        rows.append(f"<tr><td>{i}</td><td>{c.value:.3f}</td><td><div class='ctx'>{toks}</div></td>"
                    f"<td>#{c.context}</td></tr>")
    table = ("<table><tr><th>#</th><th>max act</th><th>context (hover a token for its activation)</th>"
             "<th>stream index</th></tr>" + "".join(rows) + "</table>") if rows else \
        "<p>The feature never fired on the analysed tokens.</p>"
    body = (f"<h1>Feature {p.feature}</h1><p>Run <code>{html.escape(run_name)}</code>. "
            f"<a href='index.html'>All features</a></p><ul>"
            f"<li><b>density</b>: {_density(p)}</li><li><b>max activation seen</b>: {p.max_act:.3f}</li>"
            f"<li><b>top logit effects (+)</b>: {_html_logits(p.top_logits)}</li>"
            f"<li><b>top logit effects (−)</b>: {_html_logits(p.bottom_logits)}</li></ul>"
            f"<h2>Top contexts</h2>{table}")
    return _doc(f"Feature {p.feature}", body)


def index_html(pages: list[FeaturePage], header: list[str]) -> str:
    rows = "".join(
        f"<tr><td><a href='{page_name(p.feature, 'html')}'>{p.feature}</a></td><td>{_density(p)}</td>"
        f"<td>{p.max_act:.3f}</td><td><code>{html.escape(visible(_peak_token(p), True))}</code></td>"
        f"<td>{_html_logits(p.top_logits[:5])}</td></tr>" for p in pages)
    head = "".join(f"<p>{html.escape(h.lstrip('# '))}</p>" for h in header)
    body = (f"{head}<img src='density.png' alt='feature density histogram'><table><tr><th>feature</th>"
            f"<th>density</th><th>max act</th><th>peak token of the top context</th>"
            f"<th>top logit effects (+)</th></tr>{rows}</table>")
    return _doc("SAE features", body)
