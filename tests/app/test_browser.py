"""The browser app end to end: ``python app.py`` on a free port, driven through Debian's headless
Chromium with Playwright (shared/notes/gradio6-browser-tests.md). One server and one browser for the module, a
fresh browser context per test. Trainings are tiny: builtin:tiny-sd15, 64 px, rank 4. Screenshots of every tab
are written to tests/artifacts/ (git-ignored).
See docs/ARCHITECTURE.md (The browser app).
"""

import io
import json
import os
import pickle
import random
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml
from PIL import Image
from playwright.sync_api import expect, sync_playwright

from dreambooth_dora import add_adapter, load_pipeline, save_adapter
from dreambooth_dora.adapters.io import read_adapter_file
from dreambooth_dora.sd.fixtures import build_tiny_sd15, build_tiny_sdxl
from tests.helpers import ROOT

ARTIFACTS = ROOT / "tests" / "artifacts"
SMOKE = sorted((ROOT / "sample_data" / "smoke_subject").glob("*.png"))
CHROMIUM = "/usr/bin/chromium"  # Debian's package (CI: apt-get install chromium); never `playwright install`
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
    "--no-first-run", "--disable-sync",
]  # fmt: skip
LONG = 5000  # steps of a training that is stopped long before it ends
expect.set_options(timeout=15_000)  # the machine is shared: be patient, never sleep


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class AppServer:
    """``python app.py`` in a subprocess with its own data and Gradio temp folders; ready when the API answers."""

    def __init__(self, tmp: Path, *extra: str) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.data = tmp / "data"
        self.log = tmp / "server.log"
        env = {
            **os.environ,
            "GRADIO_ANALYTICS_ENABLED": "False",
            "GRADIO_TEMP_DIR": str(tmp / "gradio"),
            "HF_HUB_OFFLINE": "1",
            "PYTHONUNBUFFERED": "1",
        }
        self.cli_runs = tmp / "cli_runs"  # where the command-line trainer's runs are listed from (--runs-dir)
        args = ["--port", str(self.port), "--base", "builtin:tiny-sd15", "--data-dir", str(self.data)]
        args += ["--runs-dir", str(self.cli_runs), *extra]
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen([sys.executable, "app.py", *args], cwd=ROOT, stdout=log, stderr=log, env=env)
        self._client = None
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"app.py exited with {self.proc.returncode}:\n{self.log.read_text()}")
            try:
                urllib.request.urlopen(self.url + "/gradio_api/info", timeout=2)
                return
            except urllib.error.HTTPError as e:
                if e.code == 401:  # up, behind --auth
                    return
                raise
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"app.py not ready after 90 s:\n{self.log.read_text()}")

    def status(self, job_id: str = "", auth: tuple[str, str] | None = None) -> dict:
        """The app's status API, through gradio_client like any script would."""
        self._connect(auth)
        return self.api("/status", job_id)

    def _connect(self, auth=None) -> None:
        if self._client is None:
            from gradio_client import Client

            self._client = Client(self.url, auth=auth, verbose=False, download_files=False)

    def api(self, name: str, *args):
        """Call an endpoint of the app's API through gradio_client, as a script would."""
        self._connect()
        return self._client.predict(*args, api_name=name)

    def stop(self) -> int:
        """SIGTERM, as a service manager would send; the app stops its trainings, then exits."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = AppServer(tmp_path_factory.mktemp("app"))
    yield srv
    assert srv.stop() == 0, srv.log.read_text()
    assert "Traceback" not in srv.log.read_text(), srv.log.read_text()


@pytest.fixture(autouse=True)
def no_training_outlives_its_test(request):
    """A test that fails midway must not leave its training running (later tests would wait in the queue)."""
    yield
    if "server" not in request.fixturenames:
        return
    srv = request.getfixturevalue("server")
    for _ in range(20):
        status = srv.status()
        if status.get("status") not in ("queued", "running", "stopping"):
            return
        if status["status"] != "stopping":
            srv.api("/stop", status["id"])
        time.sleep(0.5)


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).is_file():
        pytest.fail(f"the browser tests need Chromium at {CHROMIUM}: apt-get install chromium (Debian/Ubuntu)")
    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def new_page(browser):
    """A page in a fresh browser context (its own cookies and session), as many as a test needs."""
    contexts = []

    def make():
        context = browser.new_context(accept_downloads=True, viewport={"width": 1280, "height": 900})
        contexts.append(context)
        page = context.new_page()
        page.set_default_timeout(15_000)
        return page

    yield make
    for context in contexts:
        context.close()


# -- helpers ------------------------------------------------------------------------------------------------------


def open_app(page, url: str) -> None:
    page.goto(url)
    expect(page.locator("#progress")).to_be_visible()


def snap(page, name: str) -> None:
    """Full-page screenshot once every visible image has loaded (a hidden tab's lazy images never load)."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    loaded = "i => i.offsetParent === null || (i.complete && i.naturalWidth > 0)"
    page.wait_for_function(f"() => [...document.images].every({loaded})")
    settled = "a => a.playState !== 'running' || a.effect.getTiming().iterations === Infinity"
    page.wait_for_function(f"() => document.getAnimations().every({settled})")  # fades done; spinners never end
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def upload(page, paths: list[Path]) -> None:
    page.locator("#train-images input[type=file]").set_input_files([str(p) for p in paths])
    expect(page.locator("#train-images [data-testid=download-link]")).to_have_count(len(paths))


def tiny_settings(page, steps: int, every: int = 4) -> None:
    """Rank 4 at 64 px; validation images (2 denoising steps) and checkpoints every ``every`` steps."""
    page.get_by_text("More settings").click()
    expect(page.locator("#ckpt-steps input")).to_be_visible()
    values = {"steps": steps, "rank": 4, "alpha": 4, "lr": 0.001, "resolution": 64}
    values |= {"val-steps": every, "val-inf": 2, "ckpt-steps": every}
    for elem_id, value in values.items():
        page.locator(f"#{elem_id} input").fill(str(value))
    for elem_id, value in values.items():
        expect(page.locator(f"#{elem_id} input")).to_have_value(str(value))


def start(page) -> str:
    page.locator("#start").click()
    message = page.locator("#train-message")
    expect(message).to_contain_text("Started")
    return re.search(r"Started (\S+) with", message.inner_text()).group(1)


def progress_step(page) -> int:
    found = re.search(r"step (\d+)/", page.locator("#progress").inner_text())
    return int(found.group(1)) if found else -1


def wait_past_step(page, step: int) -> None:
    page.wait_for_function(
        f"() => +(document.querySelector('#progress').innerText.match(/step (\\d+)\\//) || [0, -1])[1] > {step}",
        timeout=90_000,  # a resumed worker loads the model first: slow on a busy machine
    )


def truncated_jpeg() -> bytes:
    buf = io.BytesIO()
    Image.frombytes("RGB", (96, 96), random.Random(1).randbytes(96 * 96 * 3)).save(buf, "JPEG")
    return buf.getvalue()[: len(buf.getvalue()) // 2]


def choose(page, dropdown_id: str, option: re.Pattern) -> None:
    page.locator(f"#{dropdown_id} input").click()
    page.get_by_role("option", name=option).click()


# -- tests --------------------------------------------------------------------------------------------------------


def test_journey_upload_train_generate_download_analyse(server, new_page, tmp_path):
    page = new_page()
    open_app(page, server.url)
    expect(page.locator("#base-info")).to_contain_text("builtin:tiny-sd15")
    upload(page, SMOKE)
    expect(page.locator("#upload-report")).to_contain_text("4 image(s) ready")
    expect(page.locator("#upload-preview img")).to_have_count(4)
    page.locator("#class-word textarea").fill("heart")  # the identifier helper writes both prompts
    expect(page.locator("#instance-prompt textarea")).to_have_value("a photo of sks heart")
    expect(page.locator("#class-prompt textarea")).to_have_value("a photo of a heart")
    choose(page, "preset", re.compile("tiny_smoke"))  # a preset fills the settings…
    expect(page.locator("#steps input")).to_have_value("20")
    expect(page.locator("#preset-info")).to_contain_text("Smoke test")  # …and says what it is for
    expect(page.locator("#use-in").get_by_label("diffusers", exact=True)).to_be_checked()  # its destination
    expect(page.locator("#use-in").get_by_label("ComfyUI", exact=True)).not_to_be_checked()
    tiny_settings(page, steps=16, every=4)
    expect(page.locator("#other-settings textarea")).to_have_value(re.compile(r"num_validation_images: 1"))
    # Record every progress text and loss-curve shape the page shows, to see them change while training runs.
    page.evaluate("""() => {
        window.seenText = []; window.seenCurve = [];
        const record = () => {
            window.seenText.push(document.querySelector('#progress').innerText);
            const path = document.querySelector('#loss-plot svg .mark-line path');
            if (path) window.seenCurve.push(path.getAttribute('d'));
        };
        new MutationObserver(record).observe(document.body, {subtree: true, childList: true, characterData: true});
    }""")
    job = start(page)
    expect(page.locator("#progress")).to_contain_text(f"Finished {job}: step 16/16", timeout=90_000)
    config = yaml.safe_load((server.data / "runs" / job / "train_config.yaml").read_text())
    assert (config["max_train_steps"], config["validation_steps"], config["validation_inference_steps"]) == (16, 4, 2)
    assert (config["rank"], config["train_text_encoder"], config["num_validation_images"]) == (4, True, 1)  # preset
    assert config["instance_prompt"] == "a photo of sks heart" and config["save_intermediate_every"] == 4
    seen = page.evaluate("window.seenText")
    during = [int(m.group(1)) for t in seen if (m := re.search(rf"Training {job}: step (\d+)/16", t))]
    assert any(k < 16 for k in during), seen
    assert all(re.search(r"\d+\.\d\d it/s · ETA", t) for t in seen if f"Training {job}: step" in t)
    assert len(set(page.evaluate("window.seenCurve"))) >= 2  # the loss curve grew while training ran
    expect(page.locator("#loss-plot svg .mark-line path")).to_have_count(1)
    expect(page.locator("#samples img")).not_to_have_count(0)
    snap(page, "train")

    # Generate: the new adapter is listed; merged, then toggled
    page.get_by_role("tab", name="Generate").click()
    page.get_by_role("checkbox", name=re.compile(job)).check()
    expect(page.locator("#adapters-in-use")).to_contain_text(f"{job} (dora, builtin:tiny-sd15) ×1")
    page.locator("#random-seed input").uncheck()
    page.locator("#gen-seed input").fill("5")
    page.locator("#gen-steps input[type=number]").fill("2")
    gallery = page.locator("#gen-gallery")
    for mode in ("merged", "toggled"):
        page.locator("#mode").get_by_label(mode).check()
        page.locator("#generate").click()
        expect(page.locator("#gen-message")).to_contain_text(f"({mode})", timeout=60_000)
        expect(gallery.locator("img")).to_have_count(2)
        expect(gallery).to_contain_text(re.compile(rf"seed 5 · {mode} · .*{job} ×1 · 2 steps"))
        expect(gallery).to_contain_text(f"seed 6 · {mode}")
    snap(page, "generate")

    # Adapters: listed with the readers each file is exact in; the preset's destination (diffusers) gets the native
    # file only, which downloads and validates against the base it was trained on
    page.get_by_role("tab", name="Adapters").click()
    expect(page.locator("#adapter-table")).to_contain_text(job)
    expect(page.locator("#adapter-table")).to_contain_text("adapter.safetensors: this project, diffusers, peft")
    choose(page, "adapter-pick", re.compile(job))
    expect(page.locator("#download-native")).to_be_enabled()
    expect(page.locator("#download-native")).to_contain_text("adapter.safetensors (this project, diffusers, peft)")
    expect(page.locator("#download-kohya")).to_be_disabled()
    tiny = load_pipeline("builtin:tiny-sd15")
    with page.expect_download() as download:
        page.locator("#download-native").click()
    path = tmp_path / "native.safetensors"
    download.value.save_as(path)
    parsed = read_adapter_file(path, tiny)
    assert (parsed.format, parsed.kind, parsed.metadata["base_model"]) == ("native", "dora", "builtin:tiny-sd15")
    assert parsed.metadata["instance_prompt"] == "a photo of sks heart"
    # …and converts it for ComfyUI, which needs the other DoRA axis: a re-fit whose cost is shown
    choose(page, "convert-to", re.compile("ComfyUI"))
    page.locator("#convert").click()
    converted = re.compile(r"Converted .* for ComfyUI: .*_for_comfyui\.safetensors, re-fitted to the in axis: .*% of")
    expect(page.locator("#adapter-message")).to_contain_text(converted, timeout=60_000)
    expect(page.locator("#adapter-table")).to_contain_text(
        "_for_comfyui.safetensors: this project, ComfyUI, A1111, Forge"
    )
    snap(page, "adapters")

    # Analysis: the run saved intermediate adapters every 4 steps
    page.get_by_role("tab", name="Analysis").click()
    page.locator("#analysis-runs").get_by_role("checkbox", name=re.compile(job)).check()
    page.locator("#analyze").click()
    expect(page.locator("#analysis-slopes")).to_contain_text(re.compile(rf"{job}\s+dora\s+-?\d"), timeout=60_000)
    expect(page.locator("#analysis-plot img")).to_have_count(1)
    page.locator("#toy-measure").click()  # the toy evaluator measures runs on builtin:toy only
    expect(page.locator("#toy-scores")).to_contain_text(
        re.compile(rf"Cannot measure[\s\S]*{job}: not trained on builtin:toy")
    )
    snap(page, "analysis")


def test_stop_within_seconds_and_resume_continues_from_the_checkpoint(server, new_page):
    page = new_page()
    open_app(page, server.url)
    upload(page, SMOKE[:2])
    tiny_settings(page, steps=LONG, every=LONG)  # the only checkpoint is the one Stop writes
    job = start(page)
    progress = page.locator("#progress")
    expect(progress).to_contain_text(re.compile(rf"Training {job}: step ([3-9]|\d\d+)/{LONG}"), timeout=60_000)
    status = server.status(job)
    assert status["status"] == "running" and status["pid"]
    os.kill(status["pid"], 0)  # the worker process is alive

    t0 = time.monotonic()
    page.locator("#stop").click()
    expect(progress).to_contain_text(f"Stopped {job} at step", timeout=15_000)
    assert time.monotonic() - t0 < 10
    with pytest.raises(ProcessLookupError):
        os.kill(status["pid"], 0)  # gone (and reaped), not a zombie
    stopped_at = progress_step(page)
    run_dir = Path(status["run_dir"])
    assert (run_dir / "checkpoints" / f"step-{stopped_at:06d}").is_dir()
    expect(progress).to_contain_text("Resume continues from the last checkpoint")

    page.reload()  # a reload reattaches to the same job and can resume it
    expect(progress).to_contain_text(f"Stopped {job} at step {stopped_at}/{LONG}")
    page.locator("#resume").click()
    expect(progress).to_contain_text(re.compile(rf"Training {job}: step \d+/{LONG}"), timeout=60_000)
    wait_past_step(page, stopped_at)  # the shown step moves past the stop: it continued
    events = [json.loads(line) for line in (run_dir / "progress.jsonl").read_text().splitlines()]
    after = events[[e["event"] for e in events].index("resumed") + 1 :]
    assert next(e["step"] for e in after if e["event"] == "step") == stopped_at + 1
    page.locator("#stop").click()
    expect(progress).to_contain_text(f"Stopped {job}", timeout=15_000)
    expect(page.locator("#train-message")).not_to_contain_text("Stopping")  # no stale action line


def test_bad_uploads_are_named_and_training_uses_the_good_files(server, new_page, tmp_path):
    notes, broken = tmp_path / "notes.png", tmp_path / "broken.jpg"
    notes.write_text("shopping list: milk, eggs")
    broken.write_bytes(truncated_jpeg())
    page = new_page()
    open_app(page, server.url)
    upload(page, SMOKE[2:])
    expect(page.locator("#upload-report")).to_contain_text("2 image(s) ready")
    upload(page, [notes, broken, *SMOKE[:2]])  # a second selection replaces the first (the widget would add it)
    expect(page.locator("#train-message")).to_contain_text("Replaced the previous 2 file(s) with the 4 just added")
    expect(page.locator("#train-images")).not_to_contain_text("heart_2.png")
    report = page.locator("#upload-report")
    expect(report).to_contain_text("2 image(s) ready")
    expect(report).to_contain_text(re.compile(r"notes\.png: not an image"))
    expect(report).to_contain_text(re.compile(r"broken\.jpg: corrupt or truncated JPEG"))
    expect(page.locator("#upload-preview img")).to_have_count(2)

    tiny_settings(page, steps=8)
    page.locator("#resolution input").fill("60")  # a config error is a message, not a traceback
    page.locator("#start").click()
    refusal = re.compile(r"Cannot start[\s\S]*resolution: must be a multiple of 8")
    expect(page.locator("#train-message")).to_contain_text(refusal)
    snap(page, "train_refused")
    page.locator("#resolution input").fill("64")
    job = start(page)
    expect(page.locator("#train-message")).to_contain_text("2 file(s) refused")
    expect(page.locator("#progress")).to_contain_text(f"Finished {job}: step 8/8", timeout=90_000)
    images = server.data / "runs" / job / "instance_images"
    assert sorted(p.name for p in images.iterdir()) == ["heart_0.png", "heart_1.png"]


def test_adapter_uploads_are_checked_against_the_loaded_base(server, new_page, tmp_path):
    xl = build_tiny_sdxl()
    add_adapter(xl, rank=4)
    save_adapter(xl, tmp_path / "xl_subject.safetensors")
    sd = build_tiny_sd15()
    add_adapter(sd, rank=4)
    save_adapter(sd, tmp_path / "friend.safetensors", metadata={"base_model": "builtin:tiny-sd15"})
    (tmp_path / "evil.safetensors").write_bytes(pickle.dumps({"weights": 1}))

    page = new_page()
    open_app(page, server.url)
    page.get_by_role("tab", name="Adapters").click()
    message, table = page.locator("#adapter-message"), page.locator("#adapter-table")
    file_input = page.locator("#adapter-upload input[type=file]")
    file_input.set_input_files(str(tmp_path / "xl_subject.safetensors"))
    expect(message).to_contain_text(re.compile(r"Adapter refused[\s\S]*xl_subject\.safetensors[\s\S]*trained for SDXL"))
    snap(page, "adapters_refused")
    file_input.set_input_files(str(tmp_path / "evil.safetensors"))
    expect(message).to_contain_text(re.compile(r"Adapter refused[\s\S]*pickle"))
    expect(table).not_to_contain_text("xl_subject")
    file_input.set_input_files(str(tmp_path / "friend.safetensors"))
    expect(message).to_contain_text("Added friend (dora, rank 4)")
    expect(table).to_contain_text("friend")

    choose(page, "adapter-pick", re.compile("friend"))
    page.once("dialog", lambda dialog: dialog.accept())  # "Delete this adapter?"
    page.locator("#delete-adapter").click()
    expect(message).to_contain_text("deleted friend")
    expect(table).not_to_contain_text("friend")

    def load_base(name: str) -> None:  # in Generate; the base is the server's, shared by every browser
        page.get_by_role("tab", name="Generate").click()
        if not page.locator("#load-base").is_visible():
            page.get_by_text("Base model (shared").click()
        choose(page, "base-pick", re.compile(name))
        page.locator("#load-base").click()
        expect(page.locator("#base-info")).to_contain_text(f"Base model: {name}")
        page.get_by_role("tab", name="Adapters").click()

    load_base("builtin:tiny-sdxl")  # the SDXL adapter fits this base
    file_input.set_input_files(str(tmp_path / "xl_subject.safetensors"))
    expect(message).to_contain_text("Added xl_subject (dora, rank 4)")
    load_base("builtin:tiny-sd15")


def test_two_browsers_train_and_generate_at_once_with_their_own_state(server, new_page):
    a, b = new_page(), new_page()
    open_app(a, server.url)
    open_app(b, server.url)
    upload(a, SMOKE[:2])
    tiny_settings(a, steps=LONG, every=LONG)
    job = start(a)
    expect(a.locator("#progress")).to_contain_text(f"Training {job}: step", timeout=60_000)
    a.reload()  # a reload reattaches to the running job, and its progress keeps moving
    expect(a.locator("#progress")).to_contain_text(f"Training {job}: step")
    expect(a.locator("#steps input")).to_have_value(str(LONG))  # and shows that job's settings, not the defaults
    before = progress_step(a)
    wait_past_step(a, before)

    def generate(page, seed: int) -> None:
        page.get_by_role("tab", name="Generate").click()
        page.locator("#random-seed input").uncheck()
        page.locator("#gen-seed input").fill(str(seed))
        page.locator("#gen-steps input[type=number]").fill("2")
        page.locator("#n-images input[type=number]").fill("1")
        page.locator("#generate").click()
        expect(page.locator("#gen-gallery")).to_contain_text(f"seed {seed} · base", timeout=60_000)

    generate(b, 7)  # while a trains
    assert server.status(job)["status"] == "running"
    a.get_by_role("tab", name="Generate").click()
    expect(a.locator("#gen-gallery img")).to_have_count(0)  # b's images are b's
    generate(a, 3)
    expect(a.locator("#gen-gallery img")).to_have_count(1)
    expect(a.locator("#gen-gallery")).not_to_contain_text("seed 7")
    expect(b.locator("#gen-gallery img")).to_have_count(1)
    expect(b.locator("#gen-gallery")).not_to_contain_text("seed 3")

    b.get_by_role("tab", name="Train").click()  # the job is the server's (b follows it), the uploads are a's
    expect(b.locator("#progress")).to_contain_text(f"Training {job}")
    expect(b.locator("#upload-preview img")).to_have_count(0)
    upload(b, SMOKE[2:])  # one training at a time: b's waits in the queue
    tiny_settings(b, steps=8)
    queued = start(b)
    expect(b.locator("#progress")).to_contain_text(f"Queued {queued}: position 1")
    assert server.status(queued)["queue_position"] == 1
    b.locator("#stop").click()  # leaves the queue
    expect(b.locator("#progress")).to_contain_text(f"Stopped {queued} at step 0")
    a.get_by_role("tab", name="Train").click()
    a.locator("#stop").click()
    expect(a.locator("#progress")).to_contain_text(f"Stopped {job}")


def test_auth_refuses_strangers_and_sigterm_stops_the_training(tmp_path, new_page):
    srv = AppServer(tmp_path, "--auth", "user:pass")
    try:
        for route in ("/config", "/gradio_api/info"):
            with pytest.raises(urllib.error.HTTPError) as refused:
                urllib.request.urlopen(srv.url + route, timeout=5)
            assert refused.value.code == 401
        page = new_page()
        page.goto(srv.url)
        expect(page.get_by_label("username")).to_be_visible()
        expect(page.locator("#progress")).to_have_count(0)
        page.get_by_label("username").fill("user")
        page.get_by_label("password").fill("wrong")
        page.get_by_role("button", name="Login").click()
        expect(page.get_by_text("Incorrect Credentials")).to_be_visible()
        snap(page, "login")
        page.get_by_label("username").fill("user")  # the form is cleared after a failed login
        page.get_by_label("password").fill("pass")
        page.get_by_role("button", name="Login").click()
        expect(page.locator("#progress")).to_be_visible()

        upload(page, SMOKE[:2])
        tiny_settings(page, steps=LONG, every=LONG)
        job = start(page)
        expect(page.locator("#progress")).to_contain_text(f"Training {job}: step", timeout=60_000)
        pid = srv.status(job, auth=("user", "pass"))["pid"]
        assert srv.stop() == 0  # SIGTERM: the app stops its training (checkpoint first), then exits
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
        events = (srv.data / "runs" / job / "progress.jsonl").read_text().splitlines()
        assert json.loads(events[-1])["status"] == "stopped"
        assert any((srv.data / "runs" / job / "checkpoints").iterdir())
    finally:
        srv.stop()


def test_the_api_names_its_job_and_refuses_what_it_cannot_do(server):
    """Scripts drive /start with named parameters, act on a job by its id, and get one-line refusals."""
    from gradio_client import Client, handle_file

    client = Client(server.url, verbose=False, download_files=False)
    settings = dict(
        images=[handle_file(str(p)) for p in SMOKE[:2]], preset="(app defaults)", base_model="builtin:tiny-sd15",
        instance_prompt="a photo of sks heart", class_prompt="", validation_prompt="", other_settings="",
        max_train_steps=LONG, rank=4, alpha=4, learning_rate=1e-3, kind="dora", resolution=64,
        train_text_encoder=False, use_in=["diffusers"], quantize_base="none", with_prior_preservation=False,
        num_class_images=10, validation_steps=LONG, validation_inference_steps=2, checkpointing_steps=LONG,
        seed=2**70, train_batch_size=1,
    )  # fmt: skip
    message = client.predict(**settings, api_name="/start")[0]
    assert "Cannot start" in message and "seed: Input should be less than 4294967296" in message, message
    message = client.predict(**settings | {"other_settings": "lr_scheduler: [1"}, api_name="/start")[0]
    assert "Other settings: not valid YAML" in message, message

    first = re.search(r"Started `(\S+)`", client.predict(**settings | {"seed": 1}, api_name="/start")[0]).group(1)
    second = re.search(r"Started `(\S+)`", client.predict(**settings | {"seed": 2}, api_name="/start")[0]).group(1)
    assert server.status(second)["status"] == "queued"  # one training at a time
    assert client.predict("no-such-job", api_name="/stop") == "Nothing to stop: no such job."
    assert "no such job" in client.predict("../../etc", api_name="/resume")
    assert client.predict(second, api_name="/stop").startswith(f"Stopping `{second}`")  # the queued one, by id
    assert client.predict(first, api_name="/stop").startswith(f"Stopping `{first}`")
    deadline = time.monotonic() + 60
    while {server.status(j)["status"] for j in (first, second)} != {"stopped"}:
        assert time.monotonic() < deadline, [server.status(j) for j in (first, second)]
        time.sleep(0.2)
    # Resume addresses the job named, not the latest one
    assert client.predict(first, api_name="/resume") == f"Resuming `{first}` from its last checkpoint."
    assert server.status(first)["status"] in ("queued", "running")
    assert server.status(second)["status"] == "stopped"
    assert client.predict(first, api_name="/stop").startswith(f"Stopping `{first}`")
    while server.status(first)["status"] != "stopped":
        assert time.monotonic() < deadline + 60, server.status(first)
        time.sleep(0.2)


def test_a_preset_fills_every_field_it_names(server, new_page):
    page = new_page()
    open_app(page, server.url)
    choose(page, "preset", re.compile("toy_subject"))
    expect(page.locator("#instance-prompt textarea")).to_have_value("a sks heart")
    expect(page.locator("#class-prompt textarea")).to_have_value("a heart")
    expect(page.locator("#steps input")).to_have_value("600")
    info = page.locator("#preset-info")
    expect(info).to_contain_text('64 class images of "a heart" drawn by the base model (made once, then reused)')
    expect(info).to_contain_text("the preset's 5 images")
    page.get_by_text("More settings").click()
    expect(page.locator("#n-class input")).to_have_value("64")
    expect(page.locator("#val-prompt textarea")).to_have_value("a sks heart on a yellow background")
    expect(page.locator("#other-settings textarea")).to_have_value(re.compile(r"snr_gamma: 5\.0"))
    snap(page, "train_toy_preset")
