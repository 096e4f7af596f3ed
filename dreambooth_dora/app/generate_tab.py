"""The Generate tab: prompt and sampling settings, adapters with strengths (merged or toggled), and the shared
base-model switch. API endpoints: ``/generate``, ``/load_base``."""

from __future__ import annotations

import time
import uuid
from functools import partial

import gradio as gr

from dreambooth_dora.adapters.inject import AdapterError
from dreambooth_dora.app.shared import PRIVATE, Shared, error_text
from dreambooth_dora.sd.pipelines import BUILTIN_NAMES, ModelLoadError
from dreambooth_dora.tools.generate import SCHEDULER_NAMES, AdapterChoice, GenerationError, Settings, save_images

NONE_IN_USE = "In use: none (the base model alone)"


def _choose(key, label, on, strength, chosen):
    """One adapter row changed → this browser's choices, and the line that says which adapters are used."""
    chosen = {**chosen, key: {"enabled": bool(on), "strength": float(strength), "label": label}}
    used = [f"{c['label']} ×{c['strength']:g}" for c in chosen.values() if c["enabled"]]
    return chosen, "In use: " + "; ".join(used) if used else NONE_IN_USE


def _adapter_rows(adapters_state, selection, in_use) -> None:
    @gr.render(inputs=adapters_state)
    def adapter_rows(entries):
        if not entries:
            gr.Markdown("No adapters yet: train one, or upload one in the Adapters tab.")
        for key, label in entries:
            with gr.Row(elem_classes="adapter-row"):
                on = gr.Checkbox(False, label=label, key=f"on-{key}", scale=3)
                strength = gr.Slider(-2, 2, 1.0, step=0.05, label="Strength", key=f"st-{key}", scale=2)
            for widget in (on, strength):
                widget.change(partial(_choose, key, label), [on, strength, selection], [selection, in_use],
                              show_progress="hidden", **PRIVATE)  # fmt: skip


def generate_images(ctx: Shared, settings: Settings, how: str, chosen: dict) -> tuple[list, str]:
    """Generate with this browser's adapter choices; (gallery items, message). GenerationError, AdapterError."""
    entries = {e.key: e for e in ctx.adapters()}
    picked = [(entries[k], c["strength"]) for k, c in (chosen or {}).items() if k in entries and c["enabled"]]
    with ctx.engine.lock:
        ctx.engine.studio.use([AdapterChoice(e.path, s) for e, s in picked], how)
        images = ctx.engine.studio.generate(settings)
    folder = ctx.data_dir / "images" / time.strftime("%Y-%m-%d")
    paths = save_images(images, folder, prefix=f"{time.strftime('%H%M%S')}-{uuid.uuid4().hex[:4]}")
    used = ", ".join(f"{e.name} ×{s:g}" for e, s in picked) or "no adapter"
    items = []
    for path, g in zip(paths, images, strict=False):  # save_images adds the grid last
        p = g.params
        caption = f"seed {p['seed']} · {p['mode']} · {used} · {p['steps']} steps · cfg {p['guidance']:g}"
        items.append((str(path), f"{caption} · {p['width']}×{p['height']}"))
    return items, f"{len(items)} image(s) from **{images[0].params['base']}** ({images[0].params['mode']})."


def build(ctx: Shared, train_base: gr.Textbox) -> None:
    native = ctx.engine.studio.native_size
    with gr.Tab("Generate", id="generate") as tab:
        adapters_state = gr.State([])  # [(key, label)] listed in this browser's Generate tab
        selection = gr.State({})  # key -> {"enabled", "strength", "label"}: this browser's adapter choices
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
                in_use = gr.Markdown(NONE_IN_USE, elem_id="adapters-in-use")
                _adapter_rows(adapters_state, selection, in_use)
                with gr.Accordion("Base model (shared by everyone using this server)", open=False):
                    base_pick = gr.Dropdown(list(BUILTIN_NAMES), value=ctx.engine.studio.base, allow_custom_value=True,
                                            label="builtin name, hub id, diffusers folder or .safetensors",
                                            elem_id="base-pick")  # fmt: skip
                    load_base_btn = gr.Button("Load base model", elem_id="load-base")
        gallery = gr.Gallery(label="Images", columns=4, height="auto", fit_columns=False, format="png",
                             elem_id="gen-gallery")  # fmt: skip

    tab.select(lambda: [(e.key, e.label) for e in ctx.adapters()], None, adapters_state, **PRIVATE)

    def generate(text, neg, use_random, seed_value, n_steps, cfg, w, h, n, sched, how, chosen):
        try:
            settings = Settings(
                text, neg or "", int(n_steps), float(cfg), int(w) if w else None, int(h) if h else None,
                None if use_random else int(seed_value or 0), int(n), sched,
            )  # fmt: skip
            return generate_images(ctx, settings, how, chosen)
        except (GenerationError, AdapterError) as e:
            return gr.skip(), error_text("Cannot generate", e)

    inputs = [prompt, negative, random_seed, gen_seed, gen_steps, guidance, width, height, n_images, scheduler, mode]
    gen_btn.click(generate, [*inputs, selection], [gallery, gen_message], api_name="generate", concurrency_limit=1)

    def load_base(name):
        try:
            ctx.engine.switch((name or "").strip())
        except ModelLoadError as e:
            return error_text("Cannot load the base model", e), gr.skip(), gr.skip(), gr.skip()
        size = ctx.engine.studio.native_size
        return ctx.base_line(), size, size, gr.update(value=ctx.engine.studio.base)

    load_base_btn.click(load_base, base_pick, [ctx.base_info, width, height, train_base], api_name="load_base",
                        concurrency_limit=1)  # fmt: skip
