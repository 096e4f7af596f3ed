"""The Analysis tab: the DoRA paper's ΔM/ΔD plot for chosen runs, with the fitted slopes."""

from __future__ import annotations

import gradio as gr

from dreambooth_dora.app import backend as ub
from dreambooth_dora.app.shared import PRIVATE, Shared, error_text
from dreambooth_dora.tools.analysis import AnalysisError


def build(ctx: Shared) -> None:
    with gr.Tab("Analysis", id="analysis") as tab:
        gr.Markdown(
            "How training changed each adapted weight: **ΔM** (magnitude) against **ΔD** (direction), per "
            "layer, at the steps a run saved (every quarter of its steps). Choose runs, then Analyze."
        )
        runs = gr.CheckboxGroup([], label="Runs", elem_id="analysis-runs")
        analyze_btn = gr.Button("Analyze", variant="primary", elem_id="analyze")
        plot = gr.Image(type="filepath", label="ΔM vs ΔD", interactive=False, elem_id="analysis-plot")
        slopes = gr.Markdown(elem_id="analysis-slopes")

    tab.select(lambda: gr.update(choices=ub.analysable_runs(ctx.data_dir, ctx.busy())), None, runs, **PRIVATE)

    def analyze(job_ids):
        try:
            png, text = ub.run_analysis(ctx.data_dir, job_ids or [], ctx.busy())
        except AnalysisError as e:
            return None, error_text("Cannot analyse", e)
        return str(png), text

    analyze_btn.click(analyze, runs, [plot, slopes], concurrency_limit=1, **PRIVATE)
