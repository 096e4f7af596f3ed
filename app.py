"""The browser app: upload photos → train a DoRA adapter → generate with it. Layout and wiring only:
See docs/ARCHITECTURE.md, The browser app.
training runs in worker processes (dreambooth_dora.jobs), generation in one shared Studio (one base loaded),
everything else in dreambooth_dora.ui_backend.

    python app.py [--host 127.0.0.1] [--port 7860] [--auth USER:PASS] [--share] [--base MODEL] [--data-dir DIR]

Binds 127.0.0.1 unless told otherwise; --auth and --share are opt-in. Ctrl-C / SIGTERM stop running trainings
(each saves a checkpoint) before the server exits.
"""

from __future__ import annotations

import argparse
import re
import signal
import sys
import tempfile
import threading
import time
import uuid
from functools import partial
from pathlib import Path

import gradio as gr

from dreambooth_dora.adapters.inject import AdapterError
from dreambooth_dora.app import backend as ub
from dreambooth_dora.app.jobs import JobManager
from dreambooth_dora.sd.pipelines import BUILTIN_NAMES, ModelLoadError
from dreambooth_dora.tools.analysis import AnalysisError
from dreambooth_dora.tools.generate import (
    SCHEDULER_NAMES,
    AdapterChoice,
    GenerationError,
    Settings,
    Studio,
    save_images,
)
from dreambooth_dora.training.config import ConfigError
from dreambooth_dora.training.data import DataError

DEFAULT_BASE = "builtin:toy"
FALLBACK_BASE = "builtin:tiny-sd15"
TICK_S = 0.5  # progress polling period
FOLLOW_S = 3.0  # how often an idle page looks for a training started elsewhere
LIVE = ("queued", "running", "stopping")
NO_PRESET = "(app defaults)"
CSS = """
#progress { font-size: 1.05rem; min-height: 2.2em; }
#base-notice { border-left: 4px solid #d97706; padding-left: .6rem; }
.adapter-row { align-items: center; }
"""
INTRO = (
    "# DreamBooth-DoRA\nTeach the model a subject from a few photos: **Train** an adapter, use it in **Generate**, "
    "share it from **Adapters**, and look inside it in **Analysis**."
)


class Engine:
    """The one loaded base model, shared by every browser; generation, checks and base switches take turns."""

    def __init__(self, base: str) -> None:
        self.lock = threading.Lock()
        self.studio = Studio(base)

    def switch(self, base: str) -> None:
        with self.lock:
            if base != self.studio.base:
                self.studio = Studio(base)  # ModelLoadError keeps the current one


def _error(title: str, err: Exception) -> str:
    first, *rest = str(err).strip().splitlines() or [""]
    return f"**{title}:** {first}" + "".join(f"\n- {line.strip()}" for line in rest if line.strip())


def _defaults(native: int) -> dict:
    return dict(
        max_train_steps=400, rank=16, alpha=16, learning_rate=1e-4, kind="dora", train_text_encoder=False,
        resolution=native, with_prior_preservation=False, num_class_images=50, train_batch_size=1, seed=0,
        validation_steps=100, validation_inference_steps=25, checkpointing_steps=100,
    )  # fmt: skip


def build_ui(manager: JobManager, engine: Engine, data_dir: Path, notice: str) -> gr.Blocks:
    native = engine.studio.native_size
    defaults = _defaults(native)

    def busy() -> set[str]:
        return {v.id for v in manager.jobs() if v.status in LIVE}

    def adapter_list() -> list[tuple[str, str]]:
        return [(e.key, e.label) for e in ub.list_adapters(data_dir)]

    def choose(key, label, on, strength, chosen):
        """One adapter row changed → this browser's choices, and the line that says which adapters are used."""
        chosen = {**chosen, key: {"enabled": bool(on), "strength": float(strength), "label": label}}
        used = [f"{c['label']} ×{c['strength']:g}" for c in chosen.values() if c["enabled"]]
        return chosen, "In use: " + ("; ".join(used) if used else "none (the base model alone)")

    with gr.Blocks(title="DreamBooth-DoRA") as demo:
        gr.Markdown(INTRO)
        if notice:
            gr.Markdown(f"**Note:** {notice}", elem_id="base-notice")
        base_info = gr.Markdown(elem_id="base-info")
        job_state = gr.State("")  # the job this browser watches
        seen_state = gr.State(None)  # what the progress widgets show now (skip unchanged ticks)
        adapters_state = gr.State([])  # [(key, label)] listed in this browser's Generate tab
        selection = gr.State({})  # key -> {"enabled", "strength"}: this browser's adapter choices
        extra_state = gr.State({})  # a preset's settings that have no widget
        followed_state = gr.State("")  # the running job this page last knew of
        timer = gr.Timer(TICK_S, active=False)  # progress polling while a job runs
        follow_timer = gr.Timer(FOLLOW_S)  # notices a training started from another browser

        # -- Train -------------------------------------------------------------------------------------------
        with gr.Tab("Train", id="train"):
            with gr.Row():
                with gr.Column():
                    files = gr.File(
                        label="Training images: drop 3-20 photos of your subject (PNG, JPEG, WebP…)",
                        file_count="multiple", type="filepath", elem_id="train-images",
                    )  # fmt: skip
                    upload_report = gr.Markdown(elem_id="upload-report")
                    preview = gr.Gallery(
                        label="Images to train on", columns=6, height=180, fit_columns=False, elem_id="upload-preview"
                    )
                    with gr.Row():
                        start_btn = gr.Button("Start training", variant="primary", elem_id="start")
                        stop_btn = gr.Button("Stop", variant="stop", elem_id="stop")
                        resume_btn = gr.Button("Resume", elem_id="resume")
                    train_message = gr.Markdown(elem_id="train-message")
                    progress = gr.Markdown(ub.progress_text(None), elem_id="progress")
                    loss_plot = gr.LinePlot(
                        ub.loss_frame(None), x="step", y="loss", title="Training loss", height=240, elem_id="loss-plot"
                    )
                    samples = gr.Gallery(
                        label="Latest validation images", columns=4, height=200, fit_columns=False, elem_id="samples"
                    )
                with gr.Column():
                    with gr.Row():
                        token = gr.Dropdown(
                            list(ub.IDENTIFIER_TOKENS), value="sks", allow_custom_value=True,
                            label="Identifier", info="a rare word that will mean your subject",
                        )  # fmt: skip
                        class_word = gr.Textbox(
                            "dog", label="Class word", info="what the subject is: dog, person…", elem_id="class-word"
                        )
                    instance_prompt = gr.Textbox(
                        "a photo of sks dog", label="Instance prompt", elem_id="instance-prompt"
                    )
                    with gr.Row():
                        prior = gr.Checkbox(False, label="Prior preservation", info="keeps the class word general")
                        class_prompt = gr.Textbox("a photo of a dog", label="Class prompt", elem_id="class-prompt")
                    with gr.Row():
                        preset = gr.Dropdown(
                            [NO_PRESET, *ub.list_presets()], value=NO_PRESET, label="Preset", elem_id="preset"
                        )
                        base = gr.Textbox(engine.studio.base, label="Base model", elem_id="train-base")
                    preset_info = gr.Markdown(elem_id="preset-info")
                    with gr.Row():
                        steps = gr.Number(defaults["max_train_steps"], label="Steps", precision=0, elem_id="steps")
                        rank = gr.Number(defaults["rank"], label="Rank", precision=0, elem_id="rank")
                        alpha = gr.Number(defaults["alpha"], label="Alpha", elem_id="alpha")
                        lr = gr.Number(defaults["learning_rate"], label="Learning rate", elem_id="lr")
                    with gr.Row():
                        kind = gr.Radio(["dora", "lora"], value="dora", label="Adapter", elem_id="kind")
                        resolution = gr.Number(native, label="Resolution (px)", precision=0, elem_id="resolution")
                        train_te = gr.Checkbox(False, label="Train the text encoder too")
                    with gr.Accordion("More settings", open=False):
                        with gr.Row():
                            val_prompt = gr.Textbox("", label="Validation prompt (empty: the instance prompt)")
                            val_steps = gr.Number(100, label="Validation images every N steps", precision=0,
                                                  elem_id="val-steps")  # fmt: skip
                            val_inf = gr.Number(25, label="Validation denoising steps", precision=0, elem_id="val-inf")
                        with gr.Row():
                            ckpt_steps = gr.Number(
                                100, label="Checkpoint every N steps", precision=0, elem_id="ckpt-steps"
                            )
                            seed = gr.Number(0, label="Seed", precision=0)
                            batch = gr.Number(1, label="Batch size", precision=0)
                            n_class = gr.Number(50, label="Class images (prior preservation)", precision=0)
        form = dict(
            max_train_steps=steps, rank=rank, alpha=alpha, learning_rate=lr, kind=kind, train_text_encoder=train_te,
            resolution=resolution, with_prior_preservation=prior, num_class_images=n_class, train_batch_size=batch,
            seed=seed, validation_steps=val_steps, validation_inference_steps=val_inf, checkpointing_steps=ckpt_steps,
        )  # fmt: skip
        form_widgets = [form[k] for k in ub.FORM_FIELDS]

        # -- Generate ----------------------------------------------------------------------------------------
        with gr.Tab("Generate", id="generate") as gen_tab:
            with gr.Row():
                with gr.Column(scale=3):
                    prompt = gr.Textbox("a photo of sks dog", label="Prompt", lines=2, elem_id="gen-prompt")
                    negative = gr.Textbox("", label="Negative prompt", elem_id="gen-negative")
                    with gr.Row():
                        random_seed = gr.Checkbox(True, label="Random seed", elem_id="random-seed")
                        gen_seed = gr.Number(1, label="Seed", precision=0, elem_id="gen-seed")
                        n_images = gr.Slider(1, 8, 2, step=1, label="Images", elem_id="n-images")
                    with gr.Row():
                        gen_steps = gr.Slider(1, 100, 25, step=1, label="Steps", elem_id="gen-steps")
                        guidance = gr.Slider(0, 20, 7.5, step=0.5, label="Guidance", elem_id="guidance")
                        scheduler = gr.Dropdown(list(SCHEDULER_NAMES), value="default", label="Scheduler")
                    with gr.Row():
                        width = gr.Number(native, label="Width", precision=0, elem_id="width")
                        height = gr.Number(native, label="Height", precision=0, elem_id="height")
                        mode = gr.Radio(
                            ["merged", "toggled"], value="merged", label="Adapter mode", elem_id="mode",
                            info="merged: folded into the weights (base speed); toggled: live layers",
                        )  # fmt: skip
                    gen_btn = gr.Button("Generate", variant="primary", elem_id="generate")
                    gen_message = gr.Markdown(elem_id="gen-message")
                with gr.Column(scale=2):
                    gr.Markdown("**Adapters** (tick to use; strength 1 = as trained, 0 = off)")
                    in_use = gr.Markdown("In use: none (the base model alone)", elem_id="adapters-in-use")

                    @gr.render(inputs=adapters_state)
                    def adapter_rows(entries):
                        if not entries:
                            gr.Markdown("No adapters yet: train one, or upload one in the Adapters tab.")
                        for key, label in entries:
                            with gr.Row(elem_classes="adapter-row"):
                                on = gr.Checkbox(False, label=label, key=f"on-{key}", scale=3)
                                strength = gr.Slider(-2, 2, 1.0, step=0.05, label="Strength", key=f"st-{key}", scale=2)
                            for widget in (on, strength):
                                widget.change(
                                    partial(choose, key, label), [on, strength, selection], [selection, in_use],
                                    api_visibility="private", show_progress="hidden",
                                )  # fmt: skip

                    with gr.Accordion("Base model (shared by everyone using this server)", open=False):
                        base_pick = gr.Dropdown(
                            list(BUILTIN_NAMES), value=engine.studio.base, allow_custom_value=True,
                            label="builtin name, hub id, diffusers folder or .safetensors", elem_id="base-pick",
                        )  # fmt: skip
                        load_base_btn = gr.Button("Load base model", elem_id="load-base")
            gallery = gr.Gallery(
                label="Images", columns=4, height="auto", fit_columns=False, format="png", elem_id="gen-gallery"
            )

        # -- Adapters ----------------------------------------------------------------------------------------
        with gr.Tab("Adapters", id="adapters") as ad_tab:
            table = gr.Dataframe(ub.adapter_table([]), interactive=False, wrap=True, elem_id="adapter-table")
            with gr.Row():
                pick = gr.Dropdown([], label="Adapter", elem_id="adapter-pick", scale=2)
                dl_native = gr.DownloadButton("Download adapter", interactive=False, elem_id="download-native")
                dl_kohya = gr.DownloadButton("Download kohya file", interactive=False, elem_id="download-kohya")
                delete_btn = gr.Button("Delete", variant="stop", elem_id="delete-adapter")
            gr.Markdown(
                "The adapter file loads here and in diffusers (`pipe.load_lora_weights`); the kohya file in "
                "ComfyUI, A1111 and Forge. Deleting a trained adapter deletes its run (checkpoints, samples)."
            )
            ad_upload = gr.File(
                label="Add an adapter: a .safetensors file, checked against the loaded base",
                file_types=[".safetensors"], type="filepath", elem_id="adapter-upload",
            )  # fmt: skip
            ad_message = gr.Markdown(elem_id="adapter-message")

        # -- Analysis ----------------------------------------------------------------------------------------
        with gr.Tab("Analysis", id="analysis") as an_tab:
            gr.Markdown(
                "How training changed each adapted weight: **ΔM** (magnitude) against **ΔD** (direction), per "
                "layer, at the steps a run saved (every quarter of its steps). Choose runs, then Analyze."
            )
            runs_box = gr.CheckboxGroup([], label="Runs", elem_id="analysis-runs")
            analyze_btn = gr.Button("Analyze", variant="primary", elem_id="analyze")
            an_plot = gr.Image(type="filepath", label="ΔM vs ΔD", interactive=False, elem_id="analysis-plot")
            slopes = gr.Markdown(elem_id="analysis-slopes")

        # == events ==========================================================================================
        private = dict(api_visibility="private")

        def on_load():
            active = manager.active()
            view = active or next(iter(manager.jobs()), None)
            info = f"Base model: **{engine.studio.base}** · data folder: `{data_dir}`"
            return (view.id if view else ""), gr.Timer(active=view is not None), info, active.id if active else ""

        demo.load(on_load, None, [job_state, timer, base_info, followed_state], **private)

        # Train: uploads, prompts, presets
        def on_files(paths):
            check = ub.check_uploads(paths)
            return check.describe(), [(str(src), name) for src, name in check.accepted]

        files.change(on_files, files, [upload_report, preview], **private)
        for w in (token, class_word):
            w.change(ub.identifier_prompts, [token, class_word], [instance_prompt, class_prompt], **private)

        def on_preset(name):
            if name == NO_PRESET:
                values, extra, info = defaults | {"resolution": engine.studio.native_size}, {}, ""
            else:
                values, extra, info = ub.read_preset(name)
                values = defaults | values
            if extra:
                info += "\n\nAlso from the preset: " + ", ".join(f"`{k}: {v}`" for k, v in extra.items())
            return [values[k] for k in ub.FORM_FIELDS] + [extra, info]

        preset.change(on_preset, preset, [*form_widgets, extra_state, preset_info], **private)

        # Train: start / stop / resume and live progress
        def start(paths, inst, cls, val, base_model, extra, *values):
            form_values = dict(zip(ub.FORM_FIELDS, values, strict=True))
            prompts = {"instance_prompt": inst, "class_prompt": cls, "validation_prompt": val}
            try:
                config = ub.build_config({**form_values, **prompts, "base_model": base_model.strip()}, extra)
                check = ub.check_uploads(paths)
                if not check.accepted:
                    raise DataError("no usable training image; upload 3-20 photos of the subject\n" + check.describe())
            except (ConfigError, DataError) as e:
                return _error("Cannot start", e), gr.skip(), gr.skip()
            job_id, run_dir = manager.new_run_dir()
            images = run_dir / "instance_images"
            ub.copy_uploads(check, images)
            manager.submit(job_id, config.model_copy(update={"instance_data_dir": images}))
            refused = f"; {len(check.rejected)} file(s) refused (listed under the images)" if check.rejected else ""
            return f"Started `{job_id}` with {len(check.accepted)} image(s){refused}.", job_id, gr.Timer(active=True)

        start_btn.click(
            start,
            [files, instance_prompt, class_prompt, val_prompt, base, extra_state, *form_widgets],
            [train_message, job_state, timer],
            api_name="start",
        )

        def watched(job_id: str):
            """The job ``job_id`` (checked against the run folders: it may come from an API call), else the running
            one, else the latest."""
            if job_id and re.fullmatch(r"[\w-]+", job_id) and (manager.runs / job_id / "job.json").is_file():
                return manager.view(job_id)
            return manager.active() or next(iter(manager.jobs()), None)

        def stop(job_id):
            view = watched(job_id)
            if view is None or view.status not in LIVE:
                return "Nothing is training.", gr.skip(), gr.skip()
            manager.stop(view.id)
            return f"Stopping `{view.id}`: it saves a checkpoint first.", view.id, gr.Timer(active=True)

        stop_btn.click(stop, job_state, [train_message, job_state, timer], api_name="stop")

        def resume(job_id):
            view = watched(job_id)
            if view is None or view.status not in ("stopped", "failed"):
                status = view.status if view else "no run"
                return f"Only a stopped run can be resumed (this one: {status}).", gr.skip(), gr.skip()
            manager.resume(view.id)
            return f"Resuming `{view.id}` from its last checkpoint.", view.id, gr.Timer(active=True)

        resume_btn.click(resume, job_state, [train_message, job_state, timer], api_name="resume")

        def tick(job_id, seen):
            view = watched(job_id)
            if view is None:
                return gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.Timer(active=False)
            now = (view.id, view.status, view.step, view.queue_position, view.message, tuple(view.samples))
            timer_update = gr.skip() if view.status in LIVE else gr.Timer(active=False)
            if now == seen:
                return gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip(), timer_update
            shots = [(p, Path(p).stem) for p in view.samples if Path(p).is_file()]
            return ub.progress_text(view), ub.loss_frame(view), shots, now, view.id, timer_update

        timer.tick(
            tick, [job_state, seen_state], [progress, loss_plot, samples, seen_state, job_state, timer],
            concurrency_limit=None, show_progress="hidden", **private,
        )  # fmt: skip

        def follow(job_id, followed):
            """A training that started since the last look (from another browser) takes over an idle page."""
            active = manager.active()
            if active is None:  # forget the last one: the same job may be resumed later
                return gr.skip(), gr.skip(), "" if followed else gr.skip()
            if active.id == followed:
                return gr.skip(), gr.skip(), gr.skip()
            if active.id == job_id or (job_id and manager.view(job_id).status in LIVE):
                return gr.skip(), gr.skip(), active.id
            return active.id, gr.Timer(active=True), active.id

        follow_timer.tick(
            follow, [job_state, followed_state], [job_state, timer, followed_state],
            concurrency_limit=None, show_progress="hidden", **private,
        )  # fmt: skip

        def status(job_id: str = "") -> dict:
            """The watched training: this job id, else the running one, else the latest."""
            view = watched(job_id)
            if view is None:
                return {"status": "none"}
            keys = ("id", "status", "step", "total", "steps_per_s", "eta_s", "queue_position", "message", "pid")
            return {k: getattr(view, k) for k in keys} | {"run_dir": str(view.run_dir), "samples": view.samples}

        gr.api(status, api_name="status", concurrency_limit=None)

        # Generate
        gen_tab.select(adapter_list, None, adapters_state, **private)

        def generate(text, neg, use_random, seed_value, n_steps, cfg, w, h, n, sched, how, chosen):
            entries = {e.key: e for e in ub.list_adapters(data_dir)}
            picked = [(entries[k], c["strength"]) for k, c in (chosen or {}).items() if k in entries and c["enabled"]]
            try:
                settings = Settings(
                    text, neg or "", int(n_steps), float(cfg), int(w) if w else None, int(h) if h else None,
                    None if use_random else int(seed_value or 0), int(n), sched,
                )  # fmt: skip
                with engine.lock:
                    engine.studio.use([AdapterChoice(e.path, s) for e, s in picked], how)
                    images = engine.studio.generate(settings)
            except (GenerationError, AdapterError) as e:
                return gr.skip(), _error("Cannot generate", e)
            folder = data_dir / "images" / time.strftime("%Y-%m-%d")
            paths = save_images(images, folder, prefix=f"{time.strftime('%H%M%S')}-{uuid.uuid4().hex[:4]}")
            used = ", ".join(f"{e.name} ×{s:g}" for e, s in picked) or "no adapter"
            items = []
            for path, g in zip(paths, images, strict=False):  # save_images adds grid.png last
                p = g.params
                caption = f"seed {p['seed']} · {p['mode']} · {used} · {p['steps']} steps · cfg {p['guidance']:g}"
                items.append((str(path), f"{caption} · {p['width']}×{p['height']}"))
            done = f"{len(items)} image(s) from **{images[0].params['base']}** ({images[0].params['mode']})."
            return items, done

        gen_inputs = [prompt, negative, random_seed, gen_seed, gen_steps, guidance, width, height, n_images]
        gen_btn.click(
            generate,
            [*gen_inputs, scheduler, mode, selection],
            [gallery, gen_message],
            api_name="generate",
            concurrency_limit=1,
        )

        def load_base(name):
            try:
                engine.switch((name or "").strip())
            except ModelLoadError as e:
                return _error("Cannot load the base model", e), gr.skip(), gr.skip(), gr.skip()
            size = engine.studio.native_size
            info = f"Base model: **{engine.studio.base}** ({size} px) · data folder: `{data_dir}`"
            return info, size, size, gr.update(value=engine.studio.base)

        load_base_btn.click(
            load_base, base_pick, [base_info, width, height, base], api_name="load_base", concurrency_limit=1
        )

        # Adapters
        def refresh_adapters(message=None):
            message = gr.skip() if message is None else message
            entries = ub.list_adapters(data_dir)
            choices = [(e.label, e.key) for e in entries]
            return ub.adapter_table(entries), gr.update(choices=choices, value=None), message

        ad_tab.select(refresh_adapters, None, [table, pick, ad_message], **private)

        def on_pick(key):
            entry = ub.find_adapter(data_dir, key)
            if entry is None:
                return gr.update(value=None, interactive=False), gr.update(value=None, interactive=False)
            kohya = entry.kohya_path
            return (
                gr.update(value=str(entry.path), interactive=True),
                gr.update(value=str(kohya) if kohya else None, interactive=kohya is not None),
            )

        pick.change(on_pick, pick, [dl_native, dl_kohya], **private)

        def on_adapter_upload(path):
            if not path:
                return gr.skip(), gr.skip(), gr.skip(), gr.skip()
            try:
                with engine.lock:
                    entry = ub.add_uploaded_adapter(Path(path), data_dir, engine.studio.pipe, engine.studio.base)
            except AdapterError as e:
                return *refresh_adapters(_error("Adapter refused", e)), None
            return *refresh_adapters(f"**Added** {entry.name} ({entry.kind}, rank {entry.rank})."), None

        ad_upload.upload(on_adapter_upload, ad_upload, [table, pick, ad_message, ad_upload], **private)

        def on_delete(key):
            entry = ub.find_adapter(data_dir, key) if key else None
            if entry is None:
                return refresh_adapters("Choose an adapter first." if key is None else None)
            try:
                return refresh_adapters(ub.delete_adapter(entry, busy()))
            except ConfigError as e:
                return refresh_adapters(_error("Cannot delete", e))

        delete_btn.click(
            on_delete, pick, [table, pick, ad_message], **private,
            js="(k) => (k && confirm('Delete this adapter? A trained one is deleted with its run folder.')) ? k : ''",
        )  # fmt: skip

        # Analysis
        def refresh_runs():
            return gr.update(choices=ub.analysable_runs(data_dir, busy()))

        an_tab.select(refresh_runs, None, runs_box, **private)

        def analyze(job_ids):
            try:
                png, text = ub.run_analysis(data_dir, job_ids or [], busy())
            except AnalysisError as e:
                return None, _error("Cannot analyse", e)
            return str(png), text

        analyze_btn.click(analyze, runs_box, [an_plot, slopes], concurrency_limit=1, **private)
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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="DreamBooth-DoRA in the browser")
    p.add_argument("--host", default="127.0.0.1", help="bind address (0.0.0.0 exposes it to your network)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--auth", metavar="USER:PASS", help="require this login")
    p.add_argument("--share", action="store_true", help="also serve through a public gradio.live link")
    p.add_argument("--base", help=f"base model (default {DEFAULT_BASE})")
    p.add_argument("--data-dir", type=Path, default=Path("outputs/app"), help="where runs, adapters and images go")
    args = p.parse_args(argv)
    auth = None
    if args.auth is not None:
        user, sep, password = args.auth.partition(":")
        if not (sep and user and password):
            p.error("--auth expects USER:PASS, e.g. --auth alice:s3cret")
        auth = (user, password)

    data_dir = args.data_dir.expanduser().resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    engine, notice = _load_engine(args.base)
    manager = JobManager(data_dir)
    demo = build_ui(manager, engine, data_dir, notice)
    # Files handed to the browser (samples, images, adapters) must come from an allowed folder; the working and
    # temp folders are allowed by Gradio already, so other data dirs are added (never served without auth if set).
    inside = any(data_dir.is_relative_to(Path(d).resolve()) for d in (Path.cwd(), tempfile.gettempdir()))
    if args.share and auth is None:
        print("warning: --share without --auth: anyone with the link can use this app and its files", flush=True)
    stop_requested = threading.Event()
    demo.queue(default_concurrency_limit=1).launch(
        server_name=args.host, server_port=args.port, auth=auth, share=args.share, prevent_thread_lock=True,
        theme=gr.themes.Soft(), css=CSS, allowed_paths=[] if inside else [str(data_dir)],
        max_file_size=ub.MAX_ADAPTER_BYTES,
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


if __name__ == "__main__":
    sys.exit(main())
