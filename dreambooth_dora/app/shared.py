"""What the tabs of the browser app share: the loaded base model, the job manager, the data folder, and the
few helpers every tab's events use."""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass, field
from pathlib import Path

import gradio as gr

from dreambooth_dora.app import registry
from dreambooth_dora.app.jobs import JobManager, JobView
from dreambooth_dora.tools.generate import Studio

LIVE = ("queued", "running", "stopping")
PRIVATE = dict(api_visibility="private")  # events that are page plumbing, not API endpoints
JOB_ID = re.compile(r"[\w-]+")


class Engine:
    """The one loaded base model, shared by every browser; generation, checks and base switches take turns."""

    def __init__(self, base: str) -> None:
        self.lock = threading.Lock()
        self.studio = Studio(base)

    def switch(self, base: str) -> None:
        with self.lock:
            if base != self.studio.base:
                self.studio = Studio(base)  # ModelLoadError keeps the current one


@dataclass
class Shared:
    """Built once per server; every tab builder receives it."""

    manager: JobManager
    engine: Engine
    data_dir: Path
    cli_runs: Path | None = None  # run folders of the command-line trainer to list too (--runs-dir)
    base_info: gr.Markdown | None = None  # the header line naming the loaded base (set by the page builder)
    page_loads: list = field(default_factory=list)  # (function, outputs) to run when a page opens
    apis: list = field(default_factory=list)  # (function, gr.api keywords): endpoints without widgets

    def busy(self) -> set[str]:
        """Ids of the jobs that are queued, running or stopping."""
        return {v.id for v in self.manager.jobs() if v.status in LIVE}

    def adapters(self) -> list[registry.AdapterEntry]:
        return registry.list_adapters(self.data_dir, self.cli_runs)

    def adapter(self, key: str | None) -> registry.AdapterEntry | None:
        return registry.find_adapter(self.data_dir, key, self.cli_runs) if key else None

    def base_line(self) -> str:
        size = self.engine.studio.native_size
        return f"Base model: **{self.engine.studio.base}** ({size} px) · data folder: `{self.data_dir}`"

    def known_job(self, job_id: str | None) -> JobView | None:
        """The job ``job_id`` when it names a run of this server (ids may come from API calls), else None."""
        if job_id and JOB_ID.fullmatch(job_id) and (self.manager.runs / job_id / "job.json").is_file():
            return self.manager.view(job_id)
        return None

    def watched(self, job_id: str | None) -> JobView | None:
        """The job ``job_id``, else the running one, else the latest (what a page without a job shows)."""
        return self.known_job(job_id) or self.manager.active() or next(iter(self.manager.jobs()), None)


def error_text(title: str, err: Exception) -> str:
    """``**Title:** first line`` + the other lines as a list; a message that already starts with the title's
    words does not repeat them."""
    first, *rest = str(err).strip().splitlines() or [""]
    if first.lower().startswith(title.lower() + ":"):
        first = first[len(title) + 1 :].strip()
    return f"**{title}:** {first}" + "".join(f"\n- {line.strip()}" for line in rest if line.strip())
