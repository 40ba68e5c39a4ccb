"""`superdiff ui`: serve the studio (ui/app.py). Only the standard library is imported here,
so `superdiff --help` stays fast; gradio is imported when the command runs.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

from superdiff.cli import positive_int

__all__ = ["add_parser"]


def _ui(args: argparse.Namespace) -> int:
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    try:
        import gradio  # noqa: F401
    except ImportError:
        print("superdiff ui: gradio is not installed; install the studio's extra with "
              "`pip install 'superdiff[ui]'` (or `bash scripts/run.sh setup`)", file=sys.stderr)
        return 2
    from .app import Studio, build_app, launch

    if args.allow_root:
        roots = []
        for r in args.allow_root:
            p = Path(r).expanduser()
            if not p.is_dir():
                raise ValueError(f"--allow-root {r}: not a directory")
            roots.append(p.resolve())
    else:
        d = Path.cwd() / "models"
        roots = [d.resolve()] if d.is_dir() else []
    studio = Studio(allow_roots=roots, allow_hub=not args.no_hub, max_models=args.max_models,
                    max_steps=args.max_steps, max_images=args.max_images)
    # Gradio's own file cache lives inside the studio's temporary folder, so that stopping the
    # server (Ctrl+C or SIGTERM) leaves nothing behind
    os.environ.setdefault("GRADIO_TEMP_DIR", str(studio.outputs.root / "gradio-cache"))

    def _stop(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _stop)
    app = build_app(studio, max_concurrency=args.max_concurrency, max_queue=args.max_queue)
    where = ", ".join(map(str, roots)) or "none (bundled models only)"
    print(f"superdiff ui: http://{args.host}:{args.port}  (local model folders: {where}; hub ids: "
          f"{'off' if args.no_hub else 'on'}; {args.max_concurrency} job(s) at a time)", file=sys.stderr)
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print("superdiff ui: warning: listening beyond this machine; anyone who can reach the port can run jobs",
              file=sys.stderr)
    try:
        launch(app, host=args.host, port=args.port, share=args.share, block=True)
    except KeyboardInterrupt:
        pass
    finally:
        app.close()
        studio.outputs.cleanup()
        print("superdiff ui: stopped; temporary files removed", file=sys.stderr)
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    u = sub.add_parser(
        "ui", help="the Gradio studio: compose, compare methods and inspect traces in the browser",
        description="Serve the SuperDiff studio. Works offline with the bundled models; local diffusers folders "
                    "are offered only under --allow-root (default: ./models when it exists).")
    u.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    u.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    u.add_argument("--share", action="store_true", help="also open a public Gradio share link (needs the network)")
    u.add_argument("--allow-root", action="append", metavar="DIR",
                   help="a folder whose model sub-folders may be loaded; repeatable (default: ./models if present)")
    u.add_argument("--no-hub", action="store_true", help="refuse hub ids: bundled models and allowed folders only")
    u.add_argument("--max-concurrency", type=positive_int, default=1, help="jobs running at once (default 1)")
    u.add_argument("--max-queue", type=positive_int, default=16, help="jobs waiting at most (default 16)")
    u.add_argument("--max-models", type=positive_int, default=2, help="loaded models kept in memory (default 2)")
    u.add_argument("--max-steps", type=positive_int, default=200, help="steps allowed per request (default 200)")
    u.add_argument("--max-images", type=positive_int, default=8, help="images allowed per request (default 8)")
    u.set_defaults(func=_ui)
