"""The browser app's non-widget logic (dreambooth_dora.ui_backend), without a browser or a server."""

import io
import pickle
import random

import pytest
from PIL import Image

from dreambooth_dora import add_adapter, save_adapter
from dreambooth_dora.adapters.io import AdapterFileError
from dreambooth_dora.app import backend as ub
from dreambooth_dora.app import registry
from dreambooth_dora.app.jobs import JobView
from dreambooth_dora.training.config import ConfigError
from tests.helpers import SMOKE_SUBJECT

SMOKE = sorted(SMOKE_SUBJECT.glob("*.png"))


def truncated_jpeg() -> bytes:
    """A JPEG cut after its header, inside the image data."""
    buf = io.BytesIO()
    Image.frombytes("RGB", (96, 96), random.Random(1).randbytes(96 * 96 * 3)).save(buf, "JPEG")
    return buf.getvalue()[: len(buf.getvalue()) // 2]


@pytest.mark.parametrize(
    ("sent", "kept"),
    [
        ("photo.PNG", "photo.png"),
        ("../../etc/passwd", "passwd"),
        ("..\\..\\boot.ini", "boot.ini"),
        ("/abs/dir/me.jpg", "me.jpg"),
        (".hidden.png", "hidden.png"),
        ("föto été.jpeg", "foto_ete.jpeg"),
        ("a b;rm -rf $(x).png", "a_b_rm_-rf_x_.png"),
        ("", "file"),
        ("x" * 300 + ".png", "x" * 72 + ".png"),
    ],
)
def test_safe_filename_never_keeps_a_path(sent, kept):
    assert ub.safe_filename(sent) == kept
    assert "/" not in kept and "\\" not in kept and not kept.startswith(".")


def test_check_uploads_lists_each_refused_file_with_its_reason(tmp_path, monkeypatch):
    (tmp_path / "notes.png").write_text("this is text, not a picture")
    (tmp_path / "broken.jpg").write_bytes(truncated_jpeg())
    (tmp_path / "readme.txt").write_text("hi")
    big = tmp_path / "big.png"
    Image.frombytes("RGB", (64, 64), random.Random(0).randbytes(64 * 64 * 3)).save(big)  # noise: ~12 KB
    monkeypatch.setattr(ub, "MAX_FILE_BYTES", big.stat().st_size - 1)
    paths = [*SMOKE[:2], tmp_path / "notes.png", tmp_path / "broken.jpg", tmp_path / "readme.txt", big]
    check = ub.check_uploads(paths)
    assert [name for _, name in check.accepted] == ["heart_0.png", "heart_1.png"]
    reasons = dict(check.rejected)
    assert "not an image" in reasons["notes.png"]
    assert "corrupt or truncated JPEG" in reasons["broken.jpg"]
    assert "a caption file without an image of the same name" in reasons["readme.txt"]
    assert "too large" in reasons["big.png"]
    text = check.describe()
    assert "2 image(s) ready" in text and "`notes.png`" in text and "4 file(s) refused" in text


def test_check_uploads_count_and_total_limits(tmp_path, monkeypatch):
    monkeypatch.setattr(ub, "MAX_UPLOAD_FILES", 2)
    check = ub.check_uploads(SMOKE[:3])
    assert len(check.accepted) == 2 and "more than 2 files" in check.rejected[0][1]
    monkeypatch.setattr(ub, "MAX_UPLOAD_FILES", 50)
    monkeypatch.setattr(ub, "MAX_TOTAL_BYTES", SMOKE[0].stat().st_size + 10)
    check = ub.check_uploads(SMOKE[:2])
    assert len(check.accepted) == 1 and "total" in check.rejected[0][1]


def test_copy_uploads_keeps_same_named_files_apart(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    for d, src in ((a, SMOKE[0]), (b, SMOKE[1])):
        (d / "Photo.PNG").write_bytes(src.read_bytes())
    dest = tmp_path / "job" / "instance_images"
    out = ub.copy_uploads(ub.check_uploads([a / "Photo.PNG", b / "Photo.PNG"]), dest)
    assert [p.name for p in out] == ["Photo.png", "Photo_2.png"]
    assert all(p.parent == dest for p in out)


def test_build_config_from_the_form_and_presets():
    form = {"instance_prompt": "a photo of sks dog", "max_train_steps": 8.0, "rank": 4, "resolution": 64.0}
    cfg = ub.build_config({**form, "base_model": "builtin:tiny-sd15", "validation_prompt": "", "class_prompt": ""})
    assert cfg.max_train_steps == 8 and cfg.save_intermediate_every == 2
    assert cfg.validation_prompt == "a photo of sks dog" and cfg.class_prompt is None
    with pytest.raises(ConfigError, match="multiple of 8"):
        ub.build_config({"instance_prompt": "x", "resolution": 60})
    with pytest.raises(ConfigError, match="class prompt"):
        ub.build_config({"instance_prompt": "x", "with_prior_preservation": True})
    assert "tiny_smoke" in ub.list_presets()
    for name in ub.list_presets():  # every preset's settings make a valid config with the form's prompts
        preset = ub.read_preset(name)
        assert preset.purpose.endswith(".") and set(preset.form) <= set(ub.FORM_FIELDS)  # whole sentences
        prompts = {"instance_prompt": "a photo of sks dog", "class_prompt": "a photo of dog"} | preset.prompts
        cfg = ub.build_config({**preset.form, **prompts}, ub.parse_other_settings(preset.other))
        assert ub.parse_other_settings(preset.other) == {
            k: v for k, v in cfg.model_dump().items() if k in ub.parse_other_settings(preset.other)
        }
    toy = ub.read_preset("toy_subject")  # a preset names prompts, images with captions, and other settings
    assert toy.prompts == {"instance_prompt": "a sks heart", "class_prompt": "a heart",
                           "validation_prompt": "a sks heart on a yellow background"}  # fmt: skip
    assert toy.images is not None and len(ub.check_uploads(sorted(toy.images.iterdir())).captions) == 5
    assert "snr_gamma: 5.0" in toy.other and "instance_data_dir" not in toy.other
    assert toy.purpose.endswith("(188 s measured, class images, validation images and checkpoints included).")
    with pytest.raises(ConfigError, match="Other settings: not valid YAML"):
        ub.parse_other_settings("lr_scheduler: [1")
    with pytest.raises(ConfigError, match="unknown setting"):
        ub.build_config({"instance_prompt": "x"}, ub.parse_other_settings("learning_rat: 1"))
    with pytest.raises(ConfigError, match="not found"):
        ub.read_preset("../secrets")


def test_several_class_prompts_one_per_line(tmp_path):
    form = {"instance_prompt": "a photo of sks dog", "with_prior_preservation": True}
    cfg = ub.build_config({**form, "class_prompt": "a photo of a dog\n\n  a photo of a dog on grass \n"})
    assert cfg.class_prompt == ["a photo of a dog", "a photo of a dog on grass"]  # blank lines and edges dropped
    assert ub.build_config({**form, "class_prompt": "a photo of a dog\n"}).class_prompt == "a photo of a dog"
    # A preset with a list shows it one per line, and the box gives the same list back.
    (tmp_path / "several.yaml").write_text(
        "# Several class prompts.\ninstance_data_dir: x\ninstance_prompt: sks\n"
        "class_prompt: [a photo of a dog, a photo of a dog on grass]\n"
    )
    shown = ub.read_preset("several", tmp_path).prompts["class_prompt"]
    assert shown == "a photo of a dog\na photo of a dog on grass"
    assert ub.build_config({**form, "class_prompt": shown}).class_prompt == cfg.class_prompt


def test_identifier_prompts():
    assert ub.identifier_prompts("ohwx", " cat ") == ("a photo of ohwx cat", "a photo of a cat")
    assert ub.identifier_prompts("sks", "owl")[1] == "a photo of an owl"


def test_progress_text_says_what_is_happening(tmp_path):
    v = JobView("j1", "running", tmp_path, step=3, total=8, steps_per_s=2.0, eta_s=2.5, losses=[(1, 0.5), (2, 0.4)])
    assert "step 3/8" in ub.progress_text(v) and "2.00 it/s" in ub.progress_text(v) and "ETA 2s" in ub.progress_text(v)
    assert list(ub.loss_frame(v).columns) == ["step", "loss"] and len(ub.loss_frame(v)) == 2
    assert "position 2" in ub.progress_text(JobView("j2", "queued", tmp_path, queue_position=2))
    assert "Resume" in ub.progress_text(JobView("j3", "stopped", tmp_path, step=4, total=8))
    assert "boom" in ub.progress_text(JobView("j4", "failed", tmp_path, message="boom"))
    assert ub.loss_frame(None).empty
    preparing = JobView("j5", "running", tmp_path, phase=("class images", 12, 64))
    assert "**Preparing** `j5`: class images 12/64" in ub.progress_text(preparing)  # not "loading the model…"


@pytest.fixture
def data_dir(tmp_path, tiny_sd15):
    """A data dir with one trained run (its adapter files as the trainer writes them)."""
    run = tmp_path / "runs" / "20260101-000000-abcdef"
    add_adapter(tiny_sd15, rank=4, kind="dora")
    meta = {"base_model": "builtin:tiny-sd15", "instance_prompt": "a photo of sks heart", "steps": 5}
    save_adapter(tiny_sd15, run / "adapter.safetensors", metadata=meta)
    save_adapter(tiny_sd15, run / "adapter_kohya.safetensors", format="kohya", metadata=meta)
    return tmp_path


def test_registry_lists_trained_and_uploaded_adapters(data_dir, tiny_sd15, tmp_path_factory):
    (entry,) = registry.list_adapters(data_dir)
    assert entry.key == "run:20260101-000000-abcdef" and entry.kohya_path.is_file()
    assert (entry.base, entry.kind, entry.rank, entry.steps) == ("builtin:tiny-sd15", "dora", 4, 5)
    upload = tmp_path_factory.mktemp("up") / "My Adapter.safetensors"
    upload.write_bytes(entry.path.read_bytes())
    added = registry.add_uploaded_adapter(upload, data_dir, tiny_sd15, "builtin:tiny-sd15")
    assert added.key == "upload:My_Adapter.safetensors" and added.path.parent == data_dir / "adapters"
    table = registry.adapter_table(registry.list_adapters(data_dir))
    assert list(table["source"]) == ["trained", "uploaded"] and list(table["rank"]) == ["4", "4"]
    assert registry.find_adapter(data_dir, "upload:../../x") is None
    registry.delete_adapter(added, set())
    assert not added.path.exists() and len(registry.list_adapters(data_dir)) == 1
    with pytest.raises(ConfigError, match="training or queued"):
        registry.delete_adapter(entry, {"20260101-000000-abcdef"})
    registry.delete_adapter(entry, set())
    assert registry.list_adapters(data_dir) == [] and not (data_dir / "runs" / "20260101-000000-abcdef").exists()


def test_uploaded_adapter_refusals_change_nothing(data_dir, tiny_sd15, tiny_sdxl, tmp_path_factory):
    up = tmp_path_factory.mktemp("up")
    add_adapter(tiny_sdxl, rank=4)
    save_adapter(tiny_sdxl, up / "xl.safetensors")
    with pytest.raises(AdapterFileError, match="trained for SDXL"):
        registry.add_uploaded_adapter(up / "xl.safetensors", data_dir, tiny_sd15, "builtin:tiny-sd15")
    (up / "evil.safetensors").write_bytes(pickle.dumps({"a": 1}, protocol=4))
    with pytest.raises(AdapterFileError, match="pickle"):
        registry.add_uploaded_adapter(up / "evil.safetensors", data_dir, tiny_sd15, "builtin:tiny-sd15")
    (up / "model.ckpt").write_bytes(b"whatever")
    with pytest.raises(AdapterFileError, match="only .safetensors"):
        registry.add_uploaded_adapter(up / "model.ckpt", data_dir, tiny_sd15, "builtin:tiny-sd15")
    assert not (data_dir / "adapters").exists() or not any((data_dir / "adapters").iterdir())


def test_a_caption_uploaded_beside_its_image_travels_with_it(tmp_path):
    (tmp_path / "heart_0.txt").write_text("a sks heart on a blue background")
    (tmp_path / "stray.txt").write_text("no image of this name")
    check = ub.check_uploads([SMOKE[0], tmp_path / "heart_0.txt", tmp_path / "stray.txt"])
    assert [name for _, name in check.captions] == ["heart_0.txt"]
    assert "1 image(s) ready, 1 with a caption" in check.describe()
    assert "stray.txt" in dict(check.rejected)
    out = ub.copy_uploads(check, tmp_path / "job")
    assert sorted(p.name for p in out) == ["heart_0.png", "heart_0.txt"]
    assert (tmp_path / "job" / "heart_0.txt").read_text() == "a sks heart on a blue background"


def test_a_duplicate_image_is_noticed(tmp_path):
    (tmp_path / "again.png").write_bytes(SMOKE[0].read_bytes())
    check = ub.check_uploads([SMOKE[0], SMOKE[1], tmp_path / "again.png"])
    assert [name for _, name in check.accepted] == ["heart_0.png", "heart_1.png"]
    assert dict(check.rejected) == {"again.png": "the same image as heart_0.png (a duplicate adds nothing)"}


def test_runs_of_the_command_line_trainer_are_listed_and_not_deleted(tmp_path):
    from dreambooth_dora.sd.fixtures import build_tiny_sd15

    run = tmp_path / "outputs" / "my_dog"
    run.mkdir(parents=True)
    pipe = build_tiny_sd15()
    add_adapter(pipe, rank=2)
    save_adapter(pipe, run / "adapter.safetensors", metadata={"instance_prompt": "a photo of sks dog"})
    (tmp_path / "outputs" / "app").mkdir()  # the app's own data folder: not a run
    entries = registry.list_adapters(tmp_path / "data", tmp_path / "outputs")
    assert [(e.key, e.source, e.name) for e in entries] == [
        ("cli:my_dog", "command line", "a photo of sks dog · my_dog")
    ]
    assert entries[0].readers == {"adapter.safetensors": ("dreambooth_dora", "diffusers", "peft")}
    with pytest.raises(ConfigError, match="trained from the command line: the app does not delete it"):
        registry.delete_adapter(entries[0], set())
    assert (run / "adapter.safetensors").is_file()
