"""The Train tab: images, prompts, a preset, the settings table (app/form.py), start / stop / resume, and the
live progress of the watched job. API endpoints: ``/start`` (named parameters), ``/stop`` and ``/resume`` (a job
id each), ``/status``."""

from __future__ import annotations

import inspect
import json
from dataclasses import dataclass
from pathlib import Path

import gradio as gr
from PIL import Image

from dreambooth_dora.adapters.inject import AdapterError, check_rank
from dreambooth_dora.app import backend as ub
from dreambooth_dora.app import form
from dreambooth_dora.app.shared import LIVE, PRIVATE, Shared, error_text
from dreambooth_dora.training.config import ConfigError
from dreambooth_dora.training.data import DataError, base_fit_warning

NO_PRESET = "(app defaults)"
TICK_S = 0.5  # progress polling period
FOLLOW_S = 3.0  # how often an idle page looks for a training started elsewhere
START_INPUTS = ("images", "preset", "instance_prompt", "class_prompt", "validation_prompt", "base_model",
                "other_settings", *form.NAMES)  # fmt: skip


@dataclass
class TrainTab:
    base: gr.Textbox  # the base model a training uses (Generate's base switch updates it)


def _field_widget(field: form.FormField, value):
    common = dict(label=field.label, elem_id=field.elem_id, info=field.info or None)
    if field.widget in ("integer", "number"):
        return gr.Number(value, precision=0 if field.widget == "integer" else None, **common)
    if field.widget == "radio":
        return gr.Radio(list(field.choices), value=value, **common)
    if field.widget == "checkbox":
        return gr.Checkbox(value, **common)
    if field.widget == "checkboxes":
        return gr.CheckboxGroup(list(field.choices), value=value, **common)
    return gr.Dropdown(list(field.choices), value=value, **common)


def _rows(rows: tuple, values: dict, widgets: dict) -> None:
    for names in rows:
        with gr.Row():
            widgets |= {n: _field_widget(form.BY_NAME[n], values[n]) for n in names}


def _more_settings(values: dict, widgets: dict, other: str, validation: str) -> tuple[gr.Textbox, gr.Textbox]:
    with gr.Accordion("More settings", open=False):
        val_prompt = gr.Textbox(
            validation, label="Validation prompt (empty: the instance prompt)", elem_id="val-prompt"
        )
        _rows(form.MORE_ROWS, values, widgets)
        other_box = gr.Textbox(
            other, lines=3, label="Other settings (YAML, any key of the training config; a preset fills it)",
            elem_id="other-settings",
        )  # fmt: skip
    return val_prompt, other_box


def _preset_update(ctx: Shared, name: str) -> tuple[dict, dict, str, str]:
    """(form values, prompts, other settings, info) for a preset name (or the app defaults)."""
    values = form.defaults(ctx.engine.studio.native_size)
    if not name or name == NO_PRESET:
        return values, {}, "", ""
    preset = ub.read_preset(name)
    info = preset.purpose
    if preset.images is not None:
        check = ub.check_uploads(sorted(preset.images.iterdir()))
        captions = ", with captions" if check.captions else ""
        where = f"`{preset.images.name}`{captions}"
        info += f"\n\nImages: with no upload, the preset's {len(check.accepted)} images ({where}) are used."
    return values | preset.form, preset.prompts, preset.other, info


def build(ctx: Shared, default_preset: str) -> TrainTab:
    values, prompts, other, preset_info_text = _preset_update(ctx, default_preset)
    instance_default = prompts.get("instance_prompt", "a photo of sks dog")
    with gr.Tab("Train", id="train"):
        job_state = gr.State("")  # the job this browser watches
        seen_state = gr.State(None)  # what the progress widgets show now (skip unchanged ticks)
        followed_state = gr.State("")  # the running job this page last knew of
        selection_state = gr.State([])  # the paths of the last image selection (a new one replaces it)
        timer = gr.Timer(TICK_S, active=False)
        follow_timer = gr.Timer(FOLLOW_S)
        with gr.Row():
            with gr.Column():
                files = gr.File(
                    label="Training images: drop 3-20 photos of your subject (PNG, JPEG, WebP…; a .txt with the "
                    "same name is that image's caption)",
                    file_count="multiple", type="filepath", elem_id="train-images",
                )  # fmt: skip
                upload_report = gr.Markdown(elem_id="upload-report")
                preview = gr.Gallery(label="Images to train on", columns=6, height=180, fit_columns=False,
                                     elem_id="upload-preview")  # fmt: skip
                with gr.Row():
                    start_btn = gr.Button("Start training", variant="primary", elem_id="start")
                    stop_btn = gr.Button("Stop", variant="stop", elem_id="stop")
                    resume_btn = gr.Button("Resume", elem_id="resume")
                train_message = gr.Markdown(elem_id="train-message")
                progress = gr.Markdown("Looking for a running training…", elem_id="progress")
                loss_plot = gr.LinePlot(ub.loss_frame(None), x="step", y="loss", title="Training loss", height=240,
                                        elem_id="loss-plot")  # fmt: skip
                samples = gr.Gallery(label="Latest validation images", columns=4, height=200, fit_columns=False,
                                     elem_id="samples")  # fmt: skip
            with gr.Column():
                with gr.Row():
                    token = gr.Dropdown(list(ub.IDENTIFIER_TOKENS), value="sks", allow_custom_value=True,
                                        label="Identifier", info="a rare word that will mean your subject")  # fmt: skip
                    class_word = gr.Textbox("dog", label="Class word", info="what the subject is: dog, person…",
                                            elem_id="class-word")  # fmt: skip
                instance_prompt = gr.Textbox(instance_default, label="Instance prompt", elem_id="instance-prompt")
                class_prompt = gr.Textbox(prompts.get("class_prompt", "a photo of a dog"), label="Class prompt",
                                          info="several: one per line (class image k is made from line k mod n)",
                                          lines=2, max_lines=8, elem_id="class-prompt")  # fmt: skip
                with gr.Row():
                    preset = gr.Dropdown([NO_PRESET, *ub.list_presets()], value=default_preset or NO_PRESET,
                                         label="Preset", elem_id="preset")  # fmt: skip
                    base = gr.Textbox(ctx.engine.studio.base, label="Base model", elem_id="train-base")
                preset_info = gr.Markdown(preset_info_text, elem_id="preset-info")
                widgets = {}
                _rows(form.MAIN_ROWS, values, widgets)
                val_prompt, other_box = _more_settings(values, widgets, other, prompts.get("validation_prompt", ""))
    form_widgets = [widgets[name] for name in form.NAMES]
    prompt_boxes = [instance_prompt, class_prompt, val_prompt]

    def on_files(paths):
        check = ub.check_uploads(paths)
        return check.describe(), [(str(src), name) for src, name in check.accepted]

    files.change(on_files, files, [upload_report, preview], **PRIVATE)
    _replace_on_new_upload(files, selection_state, train_message)
    for w in (token, class_word):
        w.change(ub.identifier_prompts, [token, class_word], [instance_prompt, class_prompt], **PRIVATE)

    def on_preset(name):
        new_values, new_prompts, new_other, info = _preset_update(ctx, name)
        shown = [new_prompts.get(k, gr.skip()) for k in form.PROMPT_FIELDS]
        return [new_values[k] for k in form.NAMES] + shown + [new_other, info]

    preset.change(on_preset, preset, [*form_widgets, *prompt_boxes, other_box, preset_info], **PRIVATE)
    _wire_jobs(ctx, job_state, timer, train_message, start_btn, stop_btn, resume_btn,
               [files, preset, *prompt_boxes, base, other_box, *form_widgets])  # fmt: skip
    settings_widgets = [*form_widgets, *prompt_boxes, base]  # in _job_settings' order
    _wire_progress(ctx, job_state, seen_state, followed_state, timer, follow_timer, progress, loss_plot, samples,
                   train_message, settings_widgets)  # fmt: skip
    return TrainTab(base)


def _replace_on_new_upload(files: gr.File, kept: gr.State, message: gr.Markdown) -> None:
    """A new selection of images replaces the one before (the file widget itself would add it to the list);
    removing single files with their × still works, and so does clearing. ``kept`` holds the last selection
    (made inside the tab: a component created between tabs breaks Gradio's tab bar)."""

    def on_upload(paths, before):
        paths = list(paths or [])
        new = [p for p in paths if p not in set(before)]
        if before and new and len(new) < len(paths):
            return new, new, f"Replaced the previous {len(paths) - len(new)} file(s) with the {len(new)} just added."
        return gr.skip(), paths, gr.skip()

    files.upload(on_upload, [files, kept], [files, kept, message], **PRIVATE)
    files.delete(lambda paths: list(paths or []), files, kept, **PRIVATE)
    files.clear(lambda: [], None, kept, **PRIVATE)


def start_job(ctx: Shared, args: dict) -> tuple[str, str]:
    """Validate the form, copy the images into a new run folder, queue the job; (job id, message), or
    ConfigError / DataError when something is wrong."""
    values = {k: args[k] for k in form.NAMES}
    prompts = {k: args[k] for k in form.PROMPT_FIELDS}
    base_model = (args.get("base_model") or "").strip() or ctx.engine.studio.base
    other = ub.parse_other_settings(args.get("other_settings"))
    config = ub.build_config({**values, **prompts, "base_model": base_model}, other)
    if config.base_model == ctx.engine.studio.base and config.kind != "full":
        try:
            check_rank(ctx.engine.studio.pipe, config.rank, config.targets)
        except AdapterError as e:
            raise ConfigError(str(e)) from None
    check = ub.check_uploads(args.get("images"))
    preset_images = None
    if not check.accepted and not check.rejected and args.get("preset") not in (None, "", NO_PRESET):
        preset_images = ub.read_preset(args["preset"]).images
    if preset_images is not None:
        check = ub.check_uploads(sorted(preset_images.iterdir()))
    if not check.accepted:
        raise DataError("no usable training image; upload 3-20 photos of the subject\n" + check.describe())
    job_id, run_dir = ctx.manager.new_run_dir()
    images = run_dir / "instance_images"
    ub.copy_uploads(check, images)
    ctx.manager.submit(job_id, config.model_copy(update={"instance_data_dir": images}))
    refused = f"; {len(check.rejected)} file(s) refused (listed under the images)" if check.rejected else ""
    source = " (the preset's)" if preset_images is not None else ""
    misfit = base_fit_warning(config.base_model, [Image.open(src).size for src, _ in check.accepted])
    warning = f"\n\n**Warning:** {misfit}" if misfit else ""
    return job_id, f"Started `{job_id}` with {len(check.accepted)} image(s){source}{refused}.{warning}"


def _start_handler(ctx: Shared):
    """The Start button's handler, whose parameters carry the form's names (they name /start's API parameters)."""

    def start(*values):
        try:
            job_id, message = start_job(ctx, dict(zip(START_INPUTS, values, strict=True)))
        except (ConfigError, DataError) as e:
            return error_text("Cannot start", e), gr.skip(), gr.skip()
        return message, job_id, gr.Timer(active=True)

    params = [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD) for n in START_INPUTS]
    start.__signature__ = inspect.Signature(params)
    return start


def stop_job(ctx: Shared, job_id: str) -> tuple[str, str | None]:
    """(message, job id acted on) for Stop: the named job (or, from the page, the watched one)."""
    view = ctx.known_job(job_id)
    if view is None or view.status not in LIVE:
        what = f"`{job_id}` is {view.status}" if view else ("no such job" if job_id else "nothing is training")
        return f"Nothing to stop: {what}.", None
    ctx.manager.stop(view.id)
    return f"Stopping `{view.id}`: it saves a checkpoint first.", view.id


def resume_job(ctx: Shared, job_id: str) -> tuple[str, str | None]:
    view = ctx.known_job(job_id)
    if view is None or view.status not in ("stopped", "failed"):
        status = view.status if view else ("no such job" if job_id else "no run")
        return f"Only a stopped run can be resumed (`{job_id or '-'}`: {status}).", None
    ctx.manager.resume(view.id)
    return f"Resuming `{view.id}` from its last checkpoint.", view.id


def _wire_jobs(ctx, job_state, timer, message, start_btn, stop_btn, resume_btn, start_inputs) -> None:
    start_btn.click(_start_handler(ctx), start_inputs, [message, job_state, timer], api_name="start")

    def on_button(action, job_id):
        text, acted = action(ctx, job_id or getattr(ctx.watched(job_id), "id", ""))
        return (text, acted, gr.Timer(active=True)) if acted else (text, gr.skip(), gr.skip())

    stop_btn.click(lambda j: on_button(stop_job, j), job_state, [message, job_state, timer], **PRIVATE)
    resume_btn.click(lambda j: on_button(resume_job, j), job_state, [message, job_state, timer], **PRIVATE)

    def stop(job_id: str) -> str:
        """Stop the training ``job_id`` (it saves a checkpoint first)."""
        return stop_job(ctx, job_id)[0]

    def resume(job_id: str) -> str:
        """Resume the stopped training ``job_id`` from its last checkpoint."""
        return resume_job(ctx, job_id)[0]

    ctx.apis += [(stop, dict(api_name="stop")), (resume, dict(api_name="resume"))]


def _job_settings(view) -> list:
    """The form values, prompts and base of a job's config (what a reloaded page shows while it runs)."""
    try:
        config = json.loads((view.run_dir / "job.json").read_text())["config"]
    except (OSError, ValueError, KeyError):
        return [gr.skip()] * (len(form.NAMES) + len(form.PROMPT_FIELDS) + 1)
    names = [*form.NAMES, *form.PROMPT_FIELDS, "base_model"]
    return [config[n] if n in config else gr.skip() for n in names]


def _wire_progress(ctx, job_state, seen_state, followed_state, timer, follow_timer, progress, loss_plot, samples,
                   message, settings_widgets):  # fmt: skip
    def on_load():
        active = ctx.manager.active()
        view = active or next(iter(ctx.manager.jobs()), None)
        shown = _job_settings(active) if active is not None else [gr.skip()] * len(settings_widgets)
        if view is None:
            return "", gr.Timer(active=False), "", ub.progress_text(None), *shown
        return view.id, gr.Timer(active=True), active.id if active else "", ub.progress_text(view), *shown

    ctx.page_loads.append((on_load, [job_state, timer, followed_state, progress, *settings_widgets]))

    def tick(job_id, seen, shown_message):
        view = ctx.watched(job_id)
        if view is None:
            return gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.Timer(active=False)
        now = (view.id, view.status, view.step, view.queue_position, view.message, tuple(view.samples))
        timer_update = gr.skip() if view.status in LIVE else gr.Timer(active=False)
        if now == seen:
            return gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip(), timer_update
        shots = [(p, Path(p).stem) for p in view.samples if Path(p).is_file()]
        ended = seen is not None and seen[0] == view.id and seen[1] in LIVE and view.status not in LIVE
        stale = ended and (shown_message or "").startswith(("Resuming", "Stopping"))  # the job has ended since
        note = "" if stale else gr.skip()
        return ub.progress_text(view), ub.loss_frame(view), shots, now, view.id, note, timer_update

    shown = [progress, loss_plot, samples, seen_state, job_state, message, timer]
    timer.tick(tick, [job_state, seen_state, message], shown, concurrency_limit=None, show_progress="hidden", **PRIVATE)

    def follow(job_id, followed):
        """A training that started since the last look (from another browser) takes over an idle page."""
        active = ctx.manager.active()
        if active is None:  # forget the last one: the same job may be resumed later
            return gr.skip(), gr.skip(), "" if followed else gr.skip()
        if active.id == followed:
            return gr.skip(), gr.skip(), gr.skip()
        if active.id == job_id or (job_id and ctx.manager.view(job_id).status in LIVE):
            return gr.skip(), gr.skip(), active.id
        return active.id, gr.Timer(active=True), active.id

    follow_timer.tick(follow, [job_state, followed_state], [job_state, timer, followed_state],
                      concurrency_limit=None, show_progress="hidden", **PRIVATE)  # fmt: skip

    def status(job_id: str = "") -> dict:
        """The training ``job_id``, else the running one, else the latest."""
        view = ctx.watched(job_id)
        if view is None:
            return {"status": "none"}
        keys = ("id", "status", "step", "total", "steps_per_s", "eta_s", "queue_position", "message", "pid")
        return {k: getattr(view, k) for k in keys} | {"run_dir": str(view.run_dir), "samples": view.samples}

    ctx.apis.append((status, dict(api_name="status", concurrency_limit=None)))
