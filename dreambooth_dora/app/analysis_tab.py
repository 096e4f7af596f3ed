"""The Analysis tab: the DoRA paper's ΔM/ΔD plot for chosen runs, with the fitted slopes; for runs on the toy
world, the toy evaluator's subject fidelity, drift and forgetting."""

from __future__ import annotations

import gradio as gr

from dreambooth_dora.app import analysis
from dreambooth_dora.app.shared import PRIVATE, Shared, error_text
from dreambooth_dora.tools.analysis import AnalysisError


def build(ctx: Shared) -> None:
    with gr.Tab("Analysis", id="analysis") as tab:
        gr.Markdown(
            "How training changed each adapted weight: **ΔM** (magnitude) against **ΔD** (direction), per "
            "layer, at the steps a run saved (every quarter of its steps). Choose runs, then Analyze. For runs "
            f"trained on `{analysis.TOY_BASE}`, **Measure on the toy world** scores what they learned and what "
            "they forgot (the exact toy evaluator; about a minute per run on a CPU)."
        )
        runs = gr.CheckboxGroup([], label="Runs", elem_id="analysis-runs")
        with gr.Row():
            analyze_btn = gr.Button("Analyze", variant="primary", elem_id="analyze")
            toy_btn = gr.Button("Measure on the toy world", elem_id="toy-measure")
        plot = gr.Image(type="filepath", label="ΔM vs ΔD", interactive=False, elem_id="analysis-plot")
        slopes = gr.Markdown(elem_id="analysis-slopes")
        toy_scores = gr.Markdown(elem_id="toy-scores")

    tab.select(lambda: gr.update(choices=analysis.analysable_runs(ctx.data_dir, ctx.busy())), None, runs, **PRIVATE)

    def analyze(job_ids):
        try:
            png, text = analysis.run_analysis(ctx.data_dir, job_ids or [], ctx.busy())
        except AnalysisError as e:
            return None, error_text("Cannot analyse", e)
        return str(png), text

    def measure(job_ids):
        try:
            return analysis.toy_scores(ctx.data_dir, job_ids or [], ctx.busy())
        except AnalysisError as e:
            return error_text("Cannot measure", e)

    analyze_btn.click(analyze, runs, [plot, slopes], concurrency_limit=1, **PRIVATE)
    toy_btn.click(measure, runs, toy_scores, concurrency_limit=1, **PRIVATE)
