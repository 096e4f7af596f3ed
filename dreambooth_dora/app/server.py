"""The browser app's page and server: the tabs (one module each) on one shared base model and job manager.

    python app.py [--host 127.0.0.1] [--port 7860] [--auth USER:PASS] [--share] [--base MODEL] [--data-dir DIR]

Binds 127.0.0.1 unless told otherwise; --auth and --share are opt-in. Ctrl-C / SIGTERM stop running trainings
(each saves a checkpoint) before the server exits. See docs/ARCHITECTURE.md, The browser app.
"""

from __future__ import annotations

import argparse
import signal
import sys
import tempfile
import threading
from pathlib import Path

import gradio as gr

from dreambooth_dora import threads
from dreambooth_dora.app import adapters_tab, analysis_tab, generate_tab, registry, train_tab
from dreambooth_dora.app import backend as ub
from dreambooth_dora.app.jobs import JobManager
from dreambooth_dora.app.shared import PRIVATE, Engine, Shared
from dreambooth_dora.sd.pipelines import ModelLoadError

DEFAULT_BASE = "builtin:toy"
FALLBACK_BASE = "builtin:tiny-sd15"
BASE_PRESETS = {"builtin:toy": "toy_subject"}  # the preset a page opens with on this base (its subject's words)
CSS = """
#progress { font-size: 1.05rem; min-height: 2.2em; }
#base-notice { border-left: 4px solid #d97706; padding-left: .6rem; }
.adapter-row { align-items: center; }
"""
INTRO = (
    "# DreamBooth-DoRA\nTeach the model a subject from a few photos: **Train** an adapter, use it in **Generate**, "
    "share it from **Adapters**, and look inside it in **Analysis**."
)


def build_ui(
    manager: JobManager, engine: Engine, data_dir: Path, notice: str, cli_runs: Path | None = None
) -> gr.Blocks:
    ctx = Shared(manager, engine, data_dir, cli_runs)
    default_preset = BASE_PRESETS.get(engine.studio.base, "")
    with gr.Blocks(title="DreamBooth-DoRA") as demo:
        gr.Markdown(INTRO)
        if notice:
            gr.Markdown(f"**Note:** {notice}", elem_id="base-notice")
        ctx.base_info = gr.Markdown(ctx.base_line(), elem_id="base-info")
        with gr.Tabs():
            train = train_tab.build(ctx, default_preset if default_preset in ub.list_presets() else "")
            generate_tab.build(ctx, train.base)
            adapters_tab.build(ctx)
            analysis_tab.build(ctx)
        for fn, outputs in [(ctx.base_line, [ctx.base_info]), *ctx.page_loads]:
            demo.load(fn, None, outputs, **PRIVATE)
        for fn, kwargs in ctx.apis:  # outside gr.Tabs, which may hold only tabs
            gr.api(fn, **kwargs)
    return demo


def _load_engine(base: str | None) -> tuple[Engine, str]:
    """The requested base; the default one falls back to the tiny random model when it is not built yet."""
    try:
        return Engine(base or DEFAULT_BASE), ""
    except ModelLoadError as e:
        if base is not None:
            sys.exit(f"error: {e}")
        notice = (
            f"The default base model could not be loaded, so this server uses **{FALLBACK_BASE}** (random weights: "
            f"fine for trying the app, but its images are noise). Reason: {e}"
        )
        print("notice: " + notice.replace("**", ""), flush=True)
        return Engine(FALLBACK_BASE), notice


def _arguments(argv: list[str] | None) -> tuple[argparse.Namespace, tuple[str, str] | None]:
    p = argparse.ArgumentParser(description="DreamBooth-DoRA in the browser")
    p.add_argument("--host", default="127.0.0.1", help="bind address (0.0.0.0 exposes it to your network)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--auth", metavar="USER:PASS", help="require this login")
    p.add_argument("--share", action="store_true", help="also serve through a public gradio.live link")
    p.add_argument("--base", help=f"base model (default {DEFAULT_BASE})")
    p.add_argument("--data-dir", type=Path, default=Path("outputs/app"), help="where runs, adapters and images go")
    p.add_argument(
        "--runs-dir",
        type=Path,
        default=Path("outputs"),
        help="also list the adapters of the command-line trainer's run folders here (default outputs/)",
    )
    threads.add_argument(p)  # applied by app.py before torch loads
    args = p.parse_args(argv)
    if args.auth is None:
        return args, None
    user, sep, password = args.auth.partition(":")
    if not (sep and user and password):
        p.error("--auth expects USER:PASS, e.g. --auth alice:s3cret")
    return args, (user, password)


def main(argv: list[str] | None = None) -> int:
    args, auth = _arguments(argv)
    data_dir = args.data_dir.expanduser().resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    engine, notice = _load_engine(args.base)
    manager = JobManager(data_dir)
    # Files handed to the browser (samples, images, adapters) must come from an allowed folder; the working and
    # temp folders are allowed by Gradio already, so other data / runs dirs are added (never served without auth
    # if auth is set).
    cli_runs = args.runs_dir.expanduser().resolve()
    demo = build_ui(manager, engine, data_dir, notice, cli_runs)
    known = [Path.cwd().resolve(), Path(tempfile.gettempdir()).resolve()]
    allowed = [str(d) for d in (data_dir, cli_runs) if not any(d.is_relative_to(k) for k in known)]
    if args.share and auth is None:
        print("warning: --share without --auth: anyone with the link can use this app and its files", flush=True)
    stop_requested = threading.Event()
    demo.queue(default_concurrency_limit=1).launch(
        server_name=args.host, server_port=args.port, auth=auth, share=args.share, prevent_thread_lock=True,
        theme=gr.themes.Soft(), css=CSS, allowed_paths=allowed,
        max_file_size=registry.MAX_ADAPTER_BYTES,
    )  # fmt: skip
    for sig in (signal.SIGTERM, signal.SIGINT):  # Gradio does not stop child processes: we do
        signal.signal(sig, lambda *_: stop_requested.set())
    try:
        while not stop_requested.wait(0.5):
            pass
    finally:
        print("stopping: running trainings save a checkpoint…", flush=True)
        manager.shutdown()
        demo.close()
    return 0
