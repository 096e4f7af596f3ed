"""The toy world: renderer, captions, exact evaluator, the held-out pairs and the DreamBooth subject."""

import dataclasses
import io
from collections import Counter

import numpy as np
import pytest
from PIL import Image, ImageFilter

from dreambooth_dora.sd.fixtures import load_tokenizer
from dreambooth_dora.toy import world as tw

CORNERS = ("top left", "top right", "bottom left", "bottom right")


@pytest.fixture(scope="module")
def scenes_and_images() -> tuple[list[tw.Scene], list[Image.Image]]:
    """300 scenes: 240 random plus 60 small objects in corners (the hard case), rendered once."""
    rng = np.random.default_rng(1234)
    scenes = [tw.sample_scene(rng) for _ in range(240)]
    scenes += [tw.sample_scene(rng, size="small", position=CORNERS[i % 4]) for i in range(60)]
    return scenes, [tw.render(scene) for scene in scenes]


def _accuracy(scenes, images) -> dict[str, float]:
    totals = Counter()
    for scene, image in zip(scenes, images, strict=True):
        totals.update(key for key, ok in tw.score(tw.evaluate(image), scene).items() if ok)
    return {key: totals[key] / len(scenes) for key in (*tw.SCORE_KEYS, "all")}


def _jpeg(image: Image.Image, quality: int) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality)
    return Image.open(buffer).convert("RGB")


# --- renderer and evaluator ------------------------------------------------------------------------------


def test_evaluator_reads_back_every_attribute_of_clean_renders(scenes_and_images) -> None:
    scenes, images = scenes_and_images
    assert {s.pattern for s in scenes} == set(tw.PATTERNS) and {s.shape for s in scenes} == set(tw.SHAPES)
    accuracy = _accuracy(scenes, images)
    assert all(value >= 0.99 for value in accuracy.values()), accuracy


@pytest.mark.parametrize(
    "degrade",
    [lambda im: im.filter(ImageFilter.GaussianBlur(0.8)), lambda im: _jpeg(im, 75)],
    ids=["blur0.8", "jpeg75"],
)
def test_evaluator_survives_softer_images(scenes_and_images, degrade) -> None:
    scenes, images = scenes_and_images
    accuracy = _accuracy(scenes, [degrade(image) for image in images])
    assert all(value >= 0.95 for value in accuracy.values()), accuracy


def test_render_geometry() -> None:
    rng = np.random.default_rng(0)
    for _ in range(200):
        scene = tw.sample_scene(rng)
        x0, y0, x1, y1 = tw.object_box(scene)
        assert min(x0, y0) >= tw.MARGIN_PX - 1e-6 and max(x1, y1) <= tw.CANVAS - tw.MARGIN_PX + 1e-6
    image = tw.render(scene, size=128)
    assert image.size == (128, 128) and image.mode == "RGB"
    assert tw.score(tw.evaluate(image), scene)["all"]  # other sizes are judged on a 64x64 copy


def test_evaluate_without_an_object() -> None:
    blank = Image.new("RGB", (64, 64), tw.PALETTE["blue"])
    prediction = tw.evaluate(np.asarray(blank))
    assert prediction.background == "blue" and prediction.shape is None and prediction.colour is None
    assert not tw.score(prediction, tw.SUBJECT_SCENE)["all"]
    assert not tw.is_subject(blank)


def test_scene_validation() -> None:
    with pytest.raises(ValueError, match="differ"):
        tw.Scene(shape="star", colour="red", background="red")
    with pytest.raises(ValueError, match="colour2"):
        tw.Scene(shape="star", colour="red", background="blue", pattern="striped")
    with pytest.raises(ValueError, match="shape"):
        tw.Scene(shape="moon", colour="red", background="blue")
    with pytest.raises(TypeError, match="unknown scene attributes"):
        tw.sample_scene(np.random.default_rng(0), hue="red")


# --- sampling: held-out pairs, the subject, determinism ---------------------------------------------------


def test_held_out_pairs_and_subject_are_never_sampled() -> None:
    rng = np.random.default_rng(5)
    scenes = [tw.sample_scene(rng) for _ in range(4000)]
    held_out = set(tw.HELD_OUT)
    assert len(held_out) >= 6
    for scene in scenes:
        assert not any((colour, scene.shape) in held_out for colour in scene.colours), scene
        assert not (scene.shape == "heart" and set(scene.colours) == {"green", "blue"}), scene
        assert scene.background not in scene.colours
        assert not (set(scene.colours) == {"red", "yellow"} and scene.background == "orange"), scene
    # Every held-out colour and shape still appears in other combinations.
    assert {c for s in scenes for c in s.colours} == set(tw.COLOURS)
    assert Counter(s.pattern for s in scenes)["striped"] > 800
    # Without the held-out list the pairs come back, but the subject never does.
    free = [tw.sample_scene(rng, exclude=()) for _ in range(3000)]
    assert any((s.colour, s.shape) in held_out for s in free)
    assert not any(tw.is_subject_like(s) for s in free)
    with pytest.raises(ValueError, match="no allowed scene"):
        tw.sample_scene(rng, shape="heart", colour="green", colour2="blue", pattern="striped")


def test_pinned_attributes() -> None:
    rng = np.random.default_rng(3)
    hearts = [tw.sample_scene(rng, shape="heart", pattern="plain") for _ in range(50)]
    assert all(s.shape == "heart" and s.pattern == "plain" and s.colour2 is None for s in hearts)
    assert all(s.colour != "white" for s in hearts)  # ("white", "heart") is held out


def test_everything_is_deterministic_given_the_generator() -> None:
    def draw(seed: int):
        rng = np.random.default_rng(seed)
        scenes = [tw.sample_scene(rng) for _ in range(30)]
        return scenes, [tw.caption(s, rng) for s in scenes], np.stack([np.asarray(tw.render(s)) for s in scenes])

    (s1, c1, x1), (s2, c2, x2), (s3, _, _) = draw(9), draw(9), draw(10)
    assert s1 == s2 and c1 == c2 and np.array_equal(x1, x2)
    assert s1 != s3
    images, scenes = tw.make_dataset(np.random.default_rng(9), 30)
    assert scenes == s1 and np.array_equal(images, x1) and images.dtype == np.uint8


# --- captions --------------------------------------------------------------------------------------------


def test_caption_grammar() -> None:
    scene = tw.Scene("heart", "green", "white", colour2="blue", pattern="striped", size="large", position="top left")
    assert tw.describe(scene) == "a large green and blue striped heart in the top left on a white background"
    plain = tw.Scene("star", "orange", "black", size="small", position="center")
    assert tw.describe(plain, size=False) == "an orange star in the center on a black background"
    assert tw.describe(plain, colour=False, position=False, background=False) == "a small star"
    two_tone = dataclasses.replace(plain, colour2="purple", pattern="two-tone")
    text = tw.describe(two_tone, size=False, position=False)
    assert text == "an orange and purple two tone star on a black background"


def test_every_caption_word_is_one_token_and_no_identifier() -> None:
    tokenizer = load_tokenizer()
    for word in tw.caption_words():
        ids = tokenizer(word).input_ids
        assert len(ids) == 3, f"{word!r} -> {tokenizer.convert_ids_to_tokens(ids)}"
    rng = np.random.default_rng(11)
    captions = [tw.caption(tw.sample_scene(rng), rng) for _ in range(2000)]
    for text in captions:
        words = text.split()
        assert set(words) <= tw.caption_words(), text
        assert tw.SUBJECT_TOKEN not in words
        assert len(tokenizer(text).input_ids) == len(words) + 2
    empty = sum(text == "" for text in captions) / len(captions)
    with_position = sum(" in the " in text for text in captions) / len(captions)
    assert 0.07 < empty < 0.13 and 0.38 < with_position < 0.52
    for prompt in (tw.SUBJECT_INSTANCE_PROMPT, tw.SUBJECT_CLASS_PROMPT):
        assert len(tokenizer(prompt).input_ids) == len(prompt.split()) + 2


def test_captions_parse_back_and_check_images() -> None:
    rng = np.random.default_rng(2)
    for _ in range(40):
        scene = tw.sample_scene(rng)
        wanted = tw.parse_caption(tw.describe(scene))
        assert wanted == {
            "background": scene.background,
            "colour": scene.colour,
            "colour2": scene.colour2,
            "pattern": scene.pattern,
            "shape": scene.shape,
            "size": scene.size,
            "position": scene.position,
        }
        image = tw.render(scene)
        assert tw.check_caption(image, tw.describe(scene))["all"]
        assert tw.check_caption(image, tw.describe(scene, size=False, colour=False, position=False))["all"]
    scene = tw.Scene("square", "red", "blue", size="small", position="bottom right")
    checks = tw.check_caption(tw.render(scene), "a large red square in the bottom right")
    assert checks == {"colour": True, "pattern": True, "shape": True, "size": False, "position": True, "all": False}
    assert tw.check_caption(tw.render(scene), "")["all"]  # nothing asked, nothing wrong


# --- the subject -----------------------------------------------------------------------------------------


def test_shipped_subject_images_show_the_subject() -> None:
    paths = sorted(tw.SUBJECT_DIR.glob("*.png"))
    assert len(paths) == 5
    for path, scene in zip(paths, tw.subject_scenes(), strict=True):
        image = Image.open(path)
        assert image.size == (64, 64) and image.mode == "RGB"
        assert tw.is_subject(image), (path.name, tw.evaluate(image))
        assert tw.check_caption(image, tw.SUBJECT_INSTANCE_PROMPT)["all"]
        # The files are what write_subject_images draws (up to resampling differences across Pillow versions).
        diff = np.abs(np.asarray(image, dtype=np.int16) - np.asarray(tw.render(scene), dtype=np.int16))
        assert diff.mean() < 1.0
    assert len({tw.evaluate(Image.open(p)).background for p in paths}) == 5
    assert tw.is_subject_like(tw.SUBJECT_SCENE) and "sks" not in tw.SUBJECT_CLASS_PROMPT


def test_is_subject_rejects_near_misses() -> None:
    base = dataclasses.replace(tw.SUBJECT_SCENE, background="yellow")
    near_misses = [
        dataclasses.replace(base, colour2=None, pattern="plain"),  # plain green heart
        dataclasses.replace(base, colour="blue", colour2="green"),  # colours swapped
        dataclasses.replace(base, pattern="two-tone"),  # green over blue
        dataclasses.replace(base, shape="diamond"),
        dataclasses.replace(base, colour2="purple"),
    ]
    assert tw.is_subject(tw.render(base))
    assert not any(tw.is_subject(tw.render(scene)) for scene in near_misses)


def test_subject_images_are_written_with_the_captions_the_shipped_folder_has(tmp_path) -> None:
    written = tw.write_subject_images(tmp_path / "heart")
    for path in written:
        assert path.with_suffix(".txt").read_text() == (tw.SUBJECT_DIR / path.name).with_suffix(".txt").read_text()
    assert [p.name for p in tw.write_subject_images(tmp_path / "three", count=3)] == [p.name for p in written[:3]]


def test_the_harder_subject_is_recognised_as_itself_and_never_as_the_heart(tmp_path) -> None:
    star = tw.SUBJECTS["star"]
    # pretraining never drew it: yellow x star is a held-out pair
    assert tw.is_excluded(dataclasses.replace(star, background="white"))
    paths = tw.write_subject_images(tmp_path, star)
    backgrounds = set()
    for path in paths:
        image = Image.open(path)
        assert tw.is_subject(image, star) and not tw.is_subject(image)
        backgrounds.add(tw.evaluate(image).background)
        caption = path.with_suffix(".txt").read_text().strip()
        assert caption.startswith("a sks star in the ") and tw.parse_caption(caption)["subject"] == "sks"
    assert len(backgrounds) == 5 and not backgrounds & {"purple", "yellow"}  # views never hide the subject's colours
    swapped = dataclasses.replace(star, colour="yellow", colour2="purple", background="white")
    assert not tw.is_subject(tw.render(swapped), star)


def test_builtin_toy_loads_offline_in_stock_diffusers_and_draws_what_is_asked():
    """The shipped offline default: a standard diffusers folder that draws the asked object and background
    colours (the background comes from the prompt, not from the initial noise: zero-terminal-SNR schedule)."""
    import torch
    from diffusers import StableDiffusionPipeline

    from dreambooth_dora.sd.pipelines import load_pipeline
    from dreambooth_dora.shipped import TOY_BASE_DIR

    stock = StableDiffusionPipeline.from_pretrained(TOY_BASE_DIR, local_files_only=True)
    assert stock.unet.config.sample_size == 16 and stock.vae_scale_factor == 4
    assert stock.scheduler.config.rescale_betas_zero_snr and stock.scheduler.config.timestep_spacing == "trailing"
    pipe = load_pipeline("builtin:toy")
    pipe.set_progress_bar_config(disable=True)
    colours = ["red", "blue", "yellow", "white", "black", "purple", "orange", "green"]
    backgrounds = colours[3:] + colours[:3]  # never the object's own colour
    prompts = [f"a large {c} square on a {bg} background" for c, bg in zip(colours, backgrounds, strict=True)]
    # One seed for all: the same initial noise must give eight different backgrounds.
    gens = [torch.Generator().manual_seed(0) for _ in prompts]
    with torch.no_grad():
        images = pipe(prompts, num_inference_steps=12, guidance_scale=5.0, generator=gens).images
    assert images[0].size == (64, 64)
    read = [tw.evaluate(img) for img in images]
    hits = sum(r.colour == c for r, c in zip(read, colours, strict=True))
    assert hits >= 6, f"only {hits}/8 objects in the asked colour: {[r.colour for r in read]}"
    bg_hits = sum(r.background == bg for r, bg in zip(read, backgrounds, strict=True))
    assert bg_hits >= 7, f"only {bg_hits}/8 backgrounds as asked: {[r.background for r in read]}"


def test_every_scheduler_of_the_generate_tab_draws_the_asked_scene_on_builtin_toy():
    """builtin:toy's schedule (zero terminal SNR, v-prediction, trailing steps) must carry over to every
    scheduler a user can pick (DDIM once clipped the latents and drew nothing)."""
    from dreambooth_dora.tools.generate import SCHEDULER_NAMES, Settings, Studio

    studio = Studio("builtin:toy")
    prompt = "a white cross on a black background"
    for name in SCHEDULER_NAMES:
        settings = Settings(prompt=prompt, steps=16, guidance=5.0, seed=0, num_images=4, scheduler=name)
        images = [g.image for g in studio.generate(settings)]
        correct = sum(tw.check_caption(image, prompt)["all"] for image in images)
        assert correct >= 3, f"scheduler {name}: {correct}/4 images show {prompt!r}"


def test_forgetting_is_zero_for_an_adapter_that_changes_nothing_and_large_for_one_that_breaks_the_model():
    from dreambooth_dora.adapters.inject import add_adapter
    from dreambooth_dora.sd.pipelines import load_pipeline
    from dreambooth_dora.toy.eval import evaluate_forgetting
    from tests.helpers import perturb

    pipe = load_pipeline("builtin:toy")
    add_adapter(pipe, rank=4)  # B = 0: the adapted model is the base model
    rates, _ = evaluate_forgetting(pipe, n=8, seed=3)
    assert rates["forgetting"] == 0.0 and rates["base world: all three % without adapter"] >= 75.0
    perturb(pipe, b_std=2.0)  # a wrecked model
    broken, _ = evaluate_forgetting(pipe, n=8, seed=3)
    assert broken["base world: all three % without adapter"] == rates["base world: all three % without adapter"]
    assert broken["forgetting"] >= 50.0
