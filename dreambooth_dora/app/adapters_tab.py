"""The Adapters tab: every trained and uploaded adapter with the readers each of its files is exact in, the
files' downloads, uploads checked against the loaded base, and deletion."""

from __future__ import annotations

from pathlib import Path

import gradio as gr

from dreambooth_dora.adapters.inject import AdapterError
from dreambooth_dora.adapters.readers import readers_text
from dreambooth_dora.app import registry
from dreambooth_dora.app.form import DESTINATION_CHOICES
from dreambooth_dora.app.shared import PRIVATE, Shared, error_text
from dreambooth_dora.sd.pipelines import ModelLoadError
from dreambooth_dora.tools.convert import ConvertError
from dreambooth_dora.training.config import ConfigError

ABOUT = (
    "Each file is written for the programs named with it (**files: exact in**): they apply it exactly. For "
    "another program, **Convert** it (or `python -m dreambooth_dora.convert FILE OUT --to comfyui --base BASE`): "
    "exact when only the layout changes; across DoRA axes a re-fit whose error is shown; a merged checkpoint "
    "(`python -m dreambooth_dora.export merged`) is exact everywhere. Deleting a trained adapter deletes its run."
)


def _download(path: Path | None, readers: tuple[str, ...], what: str):
    """A download button's update: the file and, in its label, who reads it exactly."""
    if path is None:
        return gr.update(value=None, interactive=False, label=f"Download {what}")
    shown = f" ({readers_text(readers)})" if readers else ""
    return gr.update(value=str(path), interactive=True, label=f"Download {path.name}{shown}")


def build(ctx: Shared) -> None:
    with gr.Tab("Adapters", id="adapters") as tab:
        table = gr.Dataframe(registry.adapter_table([]), interactive=False, wrap=True, elem_id="adapter-table",
                             column_widths=list(registry.TABLE_WIDTHS))  # fmt: skip
        with gr.Row():
            pick = gr.Dropdown([], label="Adapter", elem_id="adapter-pick", scale=2)
            dl_native = gr.DownloadButton("Download adapter", interactive=False, elem_id="download-native")
            dl_kohya = gr.DownloadButton("Download kohya file", interactive=False, elem_id="download-kohya")
            delete_btn = gr.Button("Delete", variant="stop", elem_id="delete-adapter")
        with gr.Row():
            convert_to = gr.Dropdown(list(DESTINATION_CHOICES), value="comfyui", label="Convert the adapter for",
                                     elem_id="convert-to", scale=2)  # fmt: skip
            convert_btn = gr.Button("Convert", elem_id="convert")
        gr.Markdown(ABOUT)
        upload = gr.File(label="Add an adapter: a .safetensors file, checked against the loaded base",
                         file_types=[".safetensors"], type="filepath", elem_id="adapter-upload")  # fmt: skip
        message = gr.Markdown(elem_id="adapter-message")

    def refresh(text=None):
        entries = ctx.adapters()
        choices = [(e.label, e.key) for e in entries]
        return (
            registry.adapter_table(entries),
            gr.update(choices=choices, value=None),
            gr.skip() if text is None else text,
        )

    tab.select(refresh, None, [table, pick, message], **PRIVATE)

    def on_pick(key):
        entry = ctx.adapter(key)
        if entry is None:
            return _download(None, (), "adapter"), _download(None, (), "kohya file")
        native, kohya = entry.native_path, entry.kohya_path
        return (
            _download(native, entry.readers.get(native.name, ()) if native else (), "adapter"),
            _download(kohya, entry.readers.get(kohya.name, ()) if kohya else (), "kohya file"),
        )

    pick.change(on_pick, pick, [dl_native, dl_kohya], **PRIVATE)

    def on_upload(path):
        if not path:
            return gr.skip(), gr.skip(), gr.skip(), gr.skip()
        try:
            with ctx.engine.lock:
                entry = registry.add_uploaded_adapter(
                    Path(path), ctx.data_dir, ctx.engine.studio.pipe, ctx.engine.studio.base
                )
        except AdapterError as e:
            return *refresh(error_text("Adapter refused", e)), None
        return *refresh(f"**Added** {entry.name} ({entry.kind}, rank {entry.rank})."), None

    upload.upload(on_upload, upload, [table, pick, message, upload], **PRIVATE)

    def on_convert(key, to):
        entry = ctx.adapter(key)
        if entry is None:
            return refresh("Choose an adapter first.")
        try:
            _, text = registry.convert_for(entry, to, ctx.data_dir, ctx.engine.studio.base)
        except (ConvertError, AdapterError, ModelLoadError) as e:
            return refresh(error_text("Cannot convert", e))
        return refresh(text)

    convert_btn.click(on_convert, [pick, convert_to], [table, pick, message], concurrency_limit=1, **PRIVATE)

    def on_delete(key):
        entry = ctx.adapter(key)
        if entry is None:
            return refresh("Choose an adapter first." if key is None else None)
        try:
            return refresh(registry.delete_adapter(entry, ctx.busy()))
        except ConfigError as e:
            return refresh(error_text("Cannot delete", e))

    confirm = "(k) => (k && confirm('Delete this adapter? A trained one is deleted with its run folder.')) ? k : ''"
    delete_btn.click(on_delete, pick, [table, pick, message], js=confirm, **PRIVATE)
