"""`python -m jaxsae.analysis RUN_DIR --features 3 17 42 [--source eval] [--tokens N] [--top 20] [--format md|html]`.

Writes one page per feature (density, top logit effects, top activating contexts), an index and a
density histogram into --out (default RUN_DIR/analysis). User errors (no checkpoint, a feature past
d_sae, an unknown source) end with one line and exit status 2, before any model is loaded.
The work is in `jaxsae.analysis`.
"""

from __future__ import annotations

import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "delta":  # `python -m jaxsae.analysis delta RUN`: jaxsae.analysis.delta
        from jaxsae.analysis.delta import main as delta_main

        return delta_main(argv[1:])
    from jaxsae import cli
    from jaxsae.analysis.stream import SOURCE_HELP

    ap = cli.ArgumentParser(prog="python -m jaxsae.analysis", description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", type=Path, help="a run directory written by python -m jaxsae.train")
    ap.add_argument("--features", type=int, nargs="+", required=True, metavar="F", help="feature indices")
    ap.add_argument("--source", default="eval", help=SOURCE_HELP)
    ap.add_argument("--tokens", type=int, default=100_000, help="tokens to scan (default 100000)")
    ap.add_argument("--top", type=int, default=20, help="top contexts per feature (default 20)")
    ap.add_argument("--format", dest="fmt", default="md", help="md (default) or html")
    ap.add_argument("--out", type=Path, default=None, help="output directory (default RUN_DIR/analysis)")
    ap.add_argument("--left", type=int, default=12, help="tokens shown before the peak (default 12)")
    ap.add_argument("--right", type=int, default=4, help="tokens shown after the peak (default 4)")
    ap.add_argument("--batch", type=int, default=8, help="contexts per forward pass (default 8)")
    ap.add_argument("--sae", default=None, metavar="NAME", help="a sweep's SAE, by name (e.g. k16-s0)")
    ap.add_argument("--no-progress", dest="progress", action="store_false", help="hide the progress bar")
    a = ap.parse_args(argv)

    def work() -> int:
        from jaxsae.analysis.pipeline import Request, analyze, check

        req = Request(a.run_dir, tuple(a.features), a.source, a.tokens, a.top, a.fmt, a.out, a.left, a.right,
                      a.batch, progress=a.progress, sae=a.sae)
        check(req)  # fail fast, before loading anything
        print(analyze(req))
        return 0

    return cli.guarded(work)


if __name__ == "__main__":
    sys.exit(main())
