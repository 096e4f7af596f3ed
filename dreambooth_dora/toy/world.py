"""The toy world ``builtin:toy`` is trained on: procedural 64x64 scenes, their captions, an exact evaluator.

A scene is one object on a plain coloured background. The object has a shape, a body colour, an optional
pattern in a second colour (``"striped"``: a horizontal band across the middle; ``"two-tone"``: top half one
colour, bottom half the other), a size (small / large) and a position in a 3x3 grid, with a little jitter.
Patterned objects are in the world so that the small VAE and UNet learn to represent two-colour objects at
all: the DreamBooth subject (a green heart with a blue stripe) is one, and the base model must be able to
draw such a thing before an adapter can teach it *which* one.

Because the world is procedural, generated images are graded exactly: :func:`evaluate` reads background,
object colours, pattern, shape, size and position back from pixels, :func:`score` compares with a scene,
:func:`check_caption` with a prompt's requested attributes, and :func:`is_subject` recognises the subject.

Pretraining never sees :data:`HELD_OUT` colour x shape pairs (a composition test) nor anything like the
subject (any heart coloured green and blue), and its captions never contain the identifier ``sks``.
Everything random takes a ``numpy.random.Generator``; the same generator state gives the same scenes,
captions and pixels.

Write the shipped subject images again with ``python -m dreambooth_dora.toy.world --subject-dir
sample_data/toy_subject``; ``--grid PATH`` draws 16 random scenes (and prints their full captions).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from dreambooth_dora.shipped import TOY_SUBJECT_DIR

# --- the world's vocabulary ------------------------------------------------------------------------------

# Far apart in RGB (closest pair: orange/yellow, ~100) so that mixtures and blur never flip a colour.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (215, 25, 25),
    "orange": (250, 130, 0),
    "yellow": (250, 230, 30),
    "green": (30, 170, 50),
    "blue": (30, 60, 230),
    "purple": (150, 40, 200),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
}
COLOURS: tuple[str, ...] = tuple(PALETTE)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "ring", "cross", "heart", "diamond")
PATTERNS: tuple[str, ...] = ("plain", "striped", "two-tone")
SIZES: tuple[str, ...] = ("small", "large")
POSITIONS: tuple[str, ...] = (
    "top left", "top", "top right",
    "left", "center", "right",
    "bottom left", "bottom", "bottom right",
)  # fmt: skip
PATTERN_PHRASES = {"striped": "striped", "two-tone": "two tone"}  # caption words (each one token)
PATTERN_WEIGHTS = (0.5, 0.25, 0.25)  # plain, striped, two-tone

# Colour x shape pairs pretraining never draws, as the body or the second colour (composition test):
# every colour and every shape once.
HELD_OUT: tuple[tuple[str, str], ...] = (
    ("red", "triangle"),
    ("orange", "ring"),
    ("yellow", "star"),
    ("green", "circle"),
    ("blue", "square"),
    ("purple", "cross"),
    ("white", "heart"),
    ("black", "diamond"),
)

# --- geometry (in units of a 64-pixel canvas; scaled for other sizes) -------------------------------------

CANVAS = 64
OBJECT_PX = {"small": 20.0, "large": 36.0}  # nominal bounding-box side
SIZE_THRESHOLD_PX = 28.0  # evaluator: extent below this is "small"
SCALE_JITTER = 0.08  # side scaled by 1 +- this
MARGIN_PX = 2.0  # an object never comes closer than this to the border
GRID_U = 0.75  # region centres at u = -0.75, 0, 0.75 of the free span (see _centre)
POSITION_JITTER = 0.2  # u offset, so |u| <= 0.95 and regions stay >= 0.35 apart
STRIPE_BAND = (0.36, 0.64)  # the stripe's rows, as fractions of the object's height
RENDER_SCALE = 4  # draw at 4x and downscale with LANCZOS for clean edges
_PATCH_PAD = 6  # output pixels of background around the drawn patch (see render)

# --- captions --------------------------------------------------------------------------------------------

P_EMPTY = 0.10  # unconditional caption, for classifier-free guidance
P_NO_SIZE = 0.30
P_NO_COLOUR = 0.10  # "a large heart": class prompts like "a heart" stay in distribution
P_NO_POSITION = 0.50
P_NO_BACKGROUND = 0.20

# --- scenes ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Scene:
    """One object on a plain background. ``dx``/``dy`` shift the object within its grid region (in units of
    the free span, +-POSITION_JITTER) and ``scale`` multiplies its nominal side (1 +- SCALE_JITTER)."""

    shape: str
    colour: str
    background: str
    colour2: str | None = None  # the stripe colour, or the bottom half's for "two-tone"
    pattern: str = "plain"
    size: str = "large"
    position: str = "center"
    dx: float = 0.0
    dy: float = 0.0
    scale: float = 1.0

    def __post_init__(self) -> None:
        if self.shape not in SHAPES:
            raise ValueError(f"unknown shape {self.shape!r}; expected one of {SHAPES}")
        if self.pattern not in PATTERNS:
            raise ValueError(f"unknown pattern {self.pattern!r}; expected one of {PATTERNS}")
        if self.size not in SIZES or self.position not in POSITIONS:
            raise ValueError(f"unknown size/position {self.size!r}/{self.position!r}")
        if (self.pattern == "plain") != (self.colour2 is None):
            raise ValueError("colour2 is set exactly when the pattern is not 'plain'")
        colours = [self.colour, self.background] + ([self.colour2] if self.pattern != "plain" else [])
        if any(c not in PALETTE for c in colours):
            raise ValueError(f"unknown colour in {colours}; expected {COLOURS}")
        if len(set(colours)) != len(colours):
            raise ValueError(f"object and background colours must all differ: {colours}")

    @property
    def colours(self) -> tuple[str, ...]:
        return (self.colour,) if self.colour2 is None else (self.colour, self.colour2)


# --- the DreamBooth subject ------------------------------------------------------------------------------

SUBJECT_SCENE = Scene(shape="heart", colour="green", colour2="blue", pattern="striped", background="white")
SUBJECT_TOKEN = "sks"  # one token in the shipped tokenizer; never in a pretraining caption
SUBJECT_INSTANCE_PROMPT = f"a {SUBJECT_TOKEN} heart"  # the toy grammar with the identifier as the description
SUBJECT_CLASS_PROMPT = "a heart"
SUBJECT_DIR = TOY_SUBJECT_DIR
# The five shipped views: varied backgrounds, positions and sizes (see write_subject_images).
SUBJECT_VIEWS: tuple[dict, ...] = (
    {"background": "white", "size": "large", "position": "center", "dx": 0.05, "dy": -0.1},
    {"background": "yellow", "size": "large", "position": "top left", "dx": 0.1, "dy": 0.05, "scale": 0.95},
    {"background": "black", "size": "large", "position": "bottom right", "dx": -0.05, "dy": -0.1, "scale": 1.05},
    {"background": "orange", "size": "small", "position": "top right", "dx": -0.1, "dy": 0.1},
    {"background": "purple", "size": "large", "position": "left", "dx": 0.15, "dy": 0.1, "scale": 1.02},
)


# A harder subject for the quality study: a pointed shape with a thin stripe, in a colour pair pretraining never put
# on a star (yellow x star is held out), so the adapter must learn a new composition, not recall one.
HARD_SUBJECT_SCENE = Scene(shape="star", colour="purple", colour2="yellow", pattern="striped", background="white")
SUBJECTS: dict[str, Scene] = {"heart": SUBJECT_SCENE, "star": HARD_SUBJECT_SCENE}


def is_subject_like(scene: Scene) -> bool:
    """Whether a scene shows the subject or a near copy (a heart in the subject's colours, any pattern)."""
    return scene.shape == SUBJECT_SCENE.shape and set(scene.colours) == set(SUBJECT_SCENE.colours)


def is_excluded(scene: Scene, exclude: Iterable[tuple[str, str]] = HELD_OUT) -> bool:
    """Pretraining never draws this scene: a held-out colour x shape pair (either colour) or the subject."""
    pairs = set(exclude)
    return is_subject_like(scene) or any((c, scene.shape) in pairs for c in scene.colours)


def _blends_into_background(scene: Scene) -> bool:
    """Whether a blend of the two object colours looks like the background (red/yellow edges are orange):
    the inner edge of the pattern would cut the object apart, for the evaluator and for a small VAE."""
    if scene.colour2 is None:
        return False
    a, b, bg = (np.asarray(PALETTE[c], dtype=np.float32) for c in (scene.colour, scene.colour2, scene.background))
    blends = [a + t * (b - a) for t in (0.3, 0.5, 0.7)]
    return min(float(np.linalg.norm(m - bg)) for m in blends) < OBJECT_DISTANCE


def sample_scene(rng: np.random.Generator, *, exclude: Iterable[tuple[str, str]] = HELD_OUT, **fixed) -> Scene:
    """A random scene that is not excluded (held-out pairs and the subject-like hearts never appear), and
    whose background is no blend of its two object colours (never an orange background behind red+yellow).

    ``fixed`` pins attributes (``shape="heart"``, ``pattern="plain"``, ...); the rest are drawn. The same
    generator state gives the same scene.
    """
    unknown = set(fixed) - {f.name for f in dataclasses.fields(Scene)}
    if unknown:
        raise TypeError(f"unknown scene attributes {sorted(unknown)}")
    exclude = tuple(exclude)
    for _ in range(1000):
        pattern = fixed.get("pattern", PATTERNS[rng.choice(len(PATTERNS), p=PATTERN_WEIGHTS)])
        colours = [str(c) for c in rng.permutation(COLOURS)[:3]]  # body, second, background: all distinct
        draw = {
            "shape": str(rng.choice(SHAPES)),
            "colour": colours[0],
            "colour2": None if pattern == "plain" else colours[1],
            "background": colours[2],
            "size": str(rng.choice(SIZES)),
            "position": str(rng.choice(POSITIONS)),
            "dx": float(rng.uniform(-POSITION_JITTER, POSITION_JITTER)),
            "dy": float(rng.uniform(-POSITION_JITTER, POSITION_JITTER)),
            "scale": float(rng.uniform(1 - SCALE_JITTER, 1 + SCALE_JITTER)),
        }
        draw.update(fixed, pattern=pattern)
        try:
            scene = Scene(**draw)
        except ValueError:
            if not fixed:
                raise
            continue  # a pinned colour clashed with a drawn one: draw again
        if not is_excluded(scene, exclude) and not _blends_into_background(scene):
            return scene
    raise ValueError(f"no allowed scene with {fixed} (excluded: subject-like hearts and {exclude})")


# --- rendering -------------------------------------------------------------------------------------------


@functools.cache
def _unit_polygon(shape: str) -> tuple[tuple[float, float], ...]:
    """The shape's outline in the unit box, touching all four sides (so its bounding box is the box)."""
    if shape == "triangle":
        points = [(0.5, 0.0), (1.0, 1.0), (0.0, 1.0)]
    elif shape == "diamond":
        points = [(0.5, 0.0), (1.0, 0.5), (0.5, 1.0), (0.0, 0.5)]
    elif shape == "star":
        points = []
        for k in range(10):
            radius = 1.0 if k % 2 == 0 else 0.48
            angle = -math.pi / 2 + k * math.pi / 5
            points.append((radius * math.cos(angle), radius * math.sin(angle)))
    elif shape == "heart":
        ts = np.linspace(0, 2 * math.pi, 120, endpoint=False)
        xs = 16 * np.sin(ts) ** 3
        ys = -(13 * np.cos(ts) - 5 * np.cos(2 * ts) - 2 * np.cos(3 * ts) - np.cos(4 * ts))
        points = list(zip(xs.tolist(), ys.tolist(), strict=True))
    else:
        raise ValueError(f"{shape!r} is not drawn as a polygon")
    xs, ys = np.array(points).T
    xs = (xs - xs.min()) / (xs.max() - xs.min())
    ys = (ys - ys.min()) / (ys.max() - ys.min())
    return tuple(zip(xs.tolist(), ys.tolist(), strict=True))


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: tuple[float, float, float, float]) -> None:
    """Fill ``shape`` (value 255) into an "L" image so that it spans ``box`` = (x0, y0, x1, y1)."""
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    if shape in ("circle", "ring"):
        draw.ellipse(box, fill=255)
        if shape == "ring":
            inset = 0.225  # ring width as a fraction of the diameter; the hole is 55% of it
            draw.ellipse((x0 + inset * w, y0 + inset * h, x1 - inset * w, y1 - inset * h), fill=0)
    elif shape == "square":
        draw.rectangle(box, fill=255)
    elif shape == "cross":
        arm = 0.32  # arms are the middle 36% of the box
        draw.rectangle((x0, y0 + arm * h, x1, y1 - arm * h), fill=255)
        draw.rectangle((x0 + arm * w, y0, x1 - arm * w, y1), fill=255)
    else:
        draw.polygon([(x0 + u * w, y0 + v * h) for u, v in _unit_polygon(shape)], fill=255)


def _side_px(scene: Scene) -> float:
    return OBJECT_PX[scene.size] * scene.scale


def _centre(extent: float, u: float) -> float:
    """Pixel coordinate (64-canvas) of an object centre at grid coordinate ``u`` in [-1, 1]: u = +-1 puts the
    object's edge MARGIN_PX from the border, whatever its size."""
    return CANVAS / 2 + u * (CANVAS / 2 - MARGIN_PX - extent / 2)


def _grid_u(position: str) -> tuple[float, float]:
    row, col = divmod(POSITIONS.index(position), 3)
    return (col - 1) * GRID_U, (row - 1) * GRID_U


def object_box(scene: Scene, size: int = CANVAS) -> tuple[float, float, float, float]:
    """The object's bounding box (x0, y0, x1, y1) in pixels of a ``size`` canvas."""
    side = _side_px(scene)
    ux, uy = _grid_u(scene.position)
    cx, cy = _centre(side, ux + scene.dx), _centre(side, uy + scene.dy)
    k = size / CANVAS
    return ((cx - side / 2) * k, (cy - side / 2) * k, (cx + side / 2) * k, (cy + side / 2) * k)


def render(scene: Scene, size: int = CANVAS) -> Image.Image:
    """Draw ``scene`` as a ``size`` x ``size`` RGB image (drawn at 4x, downscaled with LANCZOS).

    Only a patch around the object is drawn at 4x: LANCZOS reads 3 output pixels to each side, so with a
    6-pixel pad of plain background every output pixel equals a whole-canvas render's, at a third the cost.
    """
    x0, y0, x1, y1 = object_box(scene, size)
    px0, py0 = max(math.floor(x0) - _PATCH_PAD, 0), max(math.floor(y0) - _PATCH_PAD, 0)
    px1, py1 = min(math.ceil(x1) + _PATCH_PAD, size), min(math.ceil(y1) + _PATCH_PAD, size)
    k = RENDER_SCALE
    w, h = (px1 - px0) * k, (py1 - py0) * k
    patch = Image.new("RGB", (w, h), PALETTE[scene.background])
    mask = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(mask)
    x0, y0, x1, y1 = (x0 - px0) * k, (y0 - py0) * k, (x1 - px0) * k, (y1 - py0) * k
    _draw_shape(draw, scene.shape, (x0, y0, x1, y1))
    patch.paste(PALETTE[scene.colour], mask=mask)
    if scene.pattern != "plain":
        # Keep only the second colour's rows of the shape, then paint them over the body.
        if scene.pattern == "striped":
            top, bottom = (y0 + f * (y1 - y0) for f in STRIPE_BAND)
        else:  # two-tone: the bottom half
            top, bottom = (y0 + y1) / 2, h
        draw.rectangle((0, 0, w, top), fill=0)
        draw.rectangle((0, bottom, w, h), fill=0)
        patch.paste(PALETTE[scene.colour2], mask=mask)
    image = Image.new("RGB", (size, size), PALETTE[scene.background])
    image.paste(patch.resize((px1 - px0, py1 - py0), Image.Resampling.LANCZOS), (px0, py0))
    return image


def make_dataset(
    rng: np.random.Generator, n: int, *, size: int = CANVAS, exclude: Iterable[tuple[str, str]] = HELD_OUT
) -> tuple[np.ndarray, list[Scene]]:
    """``n`` random scenes and their pixels (uint8, ``n x size x size x 3``). Caption them per epoch with
    :func:`caption` so that the optional words vary."""
    exclude = tuple(exclude)
    scenes = [sample_scene(rng, exclude=exclude) for _ in range(n)]
    images = np.empty((n, size, size, 3), dtype=np.uint8)
    for i, scene in enumerate(scenes):
        images[i] = np.asarray(render(scene, size))
    return images, scenes


# --- captions --------------------------------------------------------------------------------------------


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def describe(
    scene: Scene,
    *,
    size: bool = True,
    colour: bool = True,
    position: bool = True,
    background: bool = True,
) -> str:
    """The scene in the caption grammar, with the chosen optional parts::

        caption    := ARTICLE [size] [description] shape ["in the" position] ["on" ARTICLE colour "background"]
        description:= colour | colour "and" colour2 ("striped" | "two tone")

    e.g. "a large green and blue striped heart in the top left on a white background". Every word is one
    token of the shipped tokenizer.
    """
    words = []
    if size:
        words.append(scene.size)
    if colour:
        words.append(scene.colour)
        if scene.pattern != "plain":
            words += ["and", scene.colour2, PATTERN_PHRASES[scene.pattern]]
    words.append(scene.shape)
    text = " ".join([_article(words[0]), *words])
    if position:
        text += f" in the {scene.position}"
    if background:
        text += f" on {_article(scene.background)} {scene.background} background"
    return text


def caption(scene: Scene, rng: np.random.Generator) -> str:
    """A training caption: empty with probability P_EMPTY, else :func:`describe` with size, colour, position
    and background each left out at random. Always draws the same number of random values."""
    empty, no_size, no_colour, no_position, no_background = rng.random(5)
    if empty < P_EMPTY:
        return ""
    return describe(
        scene,
        size=no_size >= P_NO_SIZE,
        colour=no_colour >= P_NO_COLOUR,
        position=no_position >= P_NO_POSITION,
        background=no_background >= P_NO_BACKGROUND,
    )


def caption_words() -> set[str]:
    """Every word a training caption can contain."""
    words = {"a", "an", "and", "in", "the", "on", "background", *COLOURS, *SHAPES, *SIZES}
    for phrase in [*POSITIONS, *PATTERN_PHRASES.values()]:
        words.update(phrase.split())
    return words


def parse_caption(text: str) -> dict[str, str | None]:
    """The attributes a prompt asks for, in :class:`Scene` field names (``"subject"`` when it names the
    identifier). Words outside the grammar are ignored; a colour without a pattern word asks for "plain"."""
    words = text.lower().replace("-", " ").replace(",", " ").split()
    found: dict[str, str | None] = {}
    if SUBJECT_TOKEN in words:
        found["subject"] = SUBJECT_TOKEN
    if "background" in words:
        i = words.index("background")
        if i > 0 and words[i - 1] in PALETTE:
            found["background"] = words[i - 1]
            words = words[: i - 1] + words[i + 1 :]
    object_colours = [w for w in words if w in PALETTE]
    if object_colours:
        found["colour"] = object_colours[0]
        found["colour2"] = object_colours[1] if len(object_colours) > 1 else None
        found["pattern"] = "plain"
    text_ = " ".join(words)
    for pattern, phrase in PATTERN_PHRASES.items():
        if f" {phrase} " in f" {text_} ":
            found["pattern"] = pattern
    for attribute, values in (("shape", SHAPES), ("size", SIZES)):
        hits = [w for w in words if w in values]
        if hits:
            found[attribute] = hits[0]
    # Longest match first, so "top left" wins over "top" and "left".
    for position in sorted(POSITIONS, key=len, reverse=True):
        if f" {position} " in f" {text_} ":
            found["position"] = position
            break
    return found


# --- the evaluator ---------------------------------------------------------------------------------------

_PALETTE_RGB = np.array(list(PALETTE.values()), dtype=np.float32)
OBJECT_DISTANCE = 60.0  # a pixel belongs to the object when this far (RGB) from the background
PURE_DISTANCE = 50.0  # a pixel votes for a palette colour only when this close to it (mixtures don't vote)
MIN_OBJECT_PIXELS = 12
TEMPLATE_PX = 32


@dataclass(frozen=True)
class Prediction:
    """What :func:`evaluate` read from an image; object fields are None when no object was found."""

    background: str
    shape: str | None = None
    colour: str | None = None
    colour2: str | None = None
    pattern: str | None = None
    size: str | None = None
    position: str | None = None
    shape_iou: float = 0.0  # best template IoU (confidence of the shape call)
    pixels: int = 0  # object area in pixels of the 64 canvas


def _nearest_colour(rgb: np.ndarray, exclude: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Index into PALETTE of the nearest colour (never ``exclude``) for each row of an N x 3 array, and the
    distance to it."""
    d = np.linalg.norm(rgb[:, None, :] - _PALETTE_RGB[None], axis=-1)
    if exclude is not None:
        d[:, exclude] = np.inf
    return d.argmin(axis=1), d.min(axis=1)


def _shift(a: np.ndarray, dy: int, dx: int, fill) -> np.ndarray:
    out = np.full_like(a, fill)
    h, w = a.shape
    out[max(dy, 0) : h + min(dy, 0), max(dx, 0) : w + min(dx, 0)] = a[
        max(-dy, 0) : h + min(-dy, 0), max(-dx, 0) : w + min(-dx, 0)
    ]
    return out


_NEIGHBOURS = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0)]


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 8-connected component of a boolean mask (label propagation with pointer jumping)."""
    flat_index = np.arange(mask.size).reshape(mask.shape)
    labels = np.where(mask, flat_index, -1)
    while True:
        grown = labels.copy()
        for dy, dx in _NEIGHBOURS:
            np.maximum(grown, _shift(labels, dy, dx, -1), out=grown)
        grown = np.where(mask, grown, -1)
        flat = grown.ravel()
        grown = np.where(mask, flat[np.maximum(grown, 0)], -1)  # jump: take the label's own label
        if np.array_equal(grown, labels):
            break
        labels = grown
    ids, counts = np.unique(labels[mask], return_counts=True)
    return labels == ids[counts.argmax()]


@functools.cache
def _templates() -> tuple[np.ndarray, np.ndarray]:
    """Every shape filling a TEMPLATE_PX box, as an S x T x T boolean stack, and its flattened float copy."""
    stack = []
    big = TEMPLATE_PX * RENDER_SCALE
    for shape in SHAPES:
        mask = Image.new("L", (big, big), 0)
        _draw_shape(ImageDraw.Draw(mask), shape, (0, 0, big, big))
        small = mask.resize((TEMPLATE_PX, TEMPLATE_PX), Image.Resampling.BOX)
        stack.append(np.asarray(small) >= 128)
    stack = np.stack(stack)
    return stack, stack.reshape(len(SHAPES), -1).astype(np.float32)


def _bbox(mask: np.ndarray) -> tuple[int, int, int, int]:
    rows, cols = np.nonzero(mask)
    return int(rows.min()), int(rows.max()) + 1, int(cols.min()), int(cols.max()) + 1


def _coverage(rgb: np.ndarray, bg_rgb: np.ndarray, colours: Sequence[str]) -> np.ndarray:
    """Per pixel, the share (0..1) of object colour: each pixel is read as the blend background +
    sum_i a_i (colour_i - background) (least squares) and its coverage is sum_i a_i, so blends of the two
    object colours (a pattern's inner edges) count as fully covered."""
    directions = np.stack([np.asarray(PALETTE[name], dtype=np.float32) - bg_rgb for name in colours], axis=1)
    shares = (rgb - bg_rgb) @ np.linalg.pinv(directions).T
    return np.clip(shares.sum(axis=-1), 0.0, 1.0)


def _classify_shape(coverage: np.ndarray) -> tuple[str, float]:
    """Best template IoU of an object's coverage crop (its bounding box), resized to TEMPLATE_PX."""
    crop = Image.fromarray(coverage.astype(np.float32), mode="F")
    crop = crop.resize((TEMPLATE_PX, TEMPLATE_PX), Image.Resampling.BILINEAR)
    observed = (np.asarray(crop) >= 0.5).reshape(-1).astype(np.float32)
    _, flat = _templates()
    inter = flat @ observed
    union = flat.sum(1) + observed.sum() - inter
    iou = inter / np.maximum(union, 1)
    best = int(iou.argmax())
    return SHAPES[best], float(iou[best])


def _erode(mask: np.ndarray) -> np.ndarray:
    out = mask.copy()
    for dy, dx in ((-1, 0), (1, 0), (0, -1), (0, 1)):
        out &= _shift(mask, dy, dx, False)
    return out


def _read_colours(rgb: np.ndarray, mask: np.ndarray, background: int) -> tuple[str, str | None, str]:
    """Body colour, second colour and pattern of the object under ``mask`` (cropped to its bounding box).

    The interior pixels (the mask eroded once, so edge blends with the background don't vote) that are close
    to a palette colour vote; the two most voted colours A, B are then fitted, pixel by pixel, by five
    explanations: plain A, A striped with B, B striped with A, A over B, B over A. The best fit wins, so a
    thin rim of blended colour around a plain object never passes for a pattern.
    """
    interior = _erode(mask)
    if interior.sum() < 8:
        interior = mask
    ys = (np.nonzero(interior)[0] + 0.5) / mask.shape[0]  # row centres as fractions of the object's height
    # The object is never the background colour, so that colour is not a candidate.
    index, distance = _nearest_colour(rgb[interior], exclude=background)
    votes = distance <= PURE_DISTANCE
    if votes.sum() < 0.3 * len(index):  # off-palette image (e.g. a soft generation): let every pixel vote
        votes[:] = True
    counts = np.bincount(index[votes], minlength=len(COLOURS))
    order = np.argsort(-counts, kind="stable")
    a, b = int(order[0]), int(order[1])
    if counts[b] == 0:
        return COLOURS[a], None, "plain"
    keep = votes & ((index == a) | (index == b))
    is_b, y = index[keep] == b, ys[keep]
    in_band = (y >= STRIPE_BAND[0]) & (y < STRIPE_BAND[1])
    bottom = y >= 0.5
    fits = {
        (a, None, "plain"): np.mean(~is_b),
        (a, b, "striped"): np.mean(is_b == in_band),
        (b, a, "striped"): np.mean(is_b != in_band),
        (a, b, "two-tone"): np.mean(is_b == bottom),
        (b, a, "two-tone"): np.mean(is_b != bottom),
    }
    body, second, pattern = max(fits, key=fits.get)
    return COLOURS[body], None if second is None else COLOURS[second], pattern


def _region(centre: float, extent: float) -> int:
    """0, 1, 2 for the first / middle / last column (or row) of the grid, from the object's centre
    coordinate: the inverse of :func:`_centre`, split halfway between region centres."""
    u = (centre - CANVAS / 2) / max(CANVAS / 2 - MARGIN_PX - extent / 2, 1.0)
    return 0 if u < -GRID_U / 2 else 2 if u > GRID_U / 2 else 1


def evaluate(image: Image.Image | np.ndarray) -> Prediction:
    """Read a scene back from pixels (any size; judged on a 64x64 copy). Exact on clean renders.

    Background: median of the border pixels -> nearest palette colour. Object: the largest 8-connected
    region more than OBJECT_DISTANCE from the measured background. Colours and pattern: see
    :func:`_read_colours`. The outline is then redrawn where a pixel is at least half object colour (see
    :func:`_coverage`), and the shape is the best IoU of that outline's bounding-box crop (resized to 32x32)
    against every shape's template.
    Size: bounding-box extent against SIZE_THRESHOLD_PX. Position: bounding-box centre in the 3x3 grid of
    the renderer (whose region centres depend on the object's extent).
    """
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    image = image.convert("RGB")
    if image.size != (CANVAS, CANVAS):
        image = image.resize((CANVAS, CANVAS), Image.Resampling.LANCZOS)
    rgb = np.asarray(image).astype(np.float32)
    border = np.concatenate([rgb[0], rgb[-1], rgb[1:-1, 0], rgb[1:-1, -1]])
    bg_rgb = np.median(border, axis=0)
    background = int(_nearest_colour(bg_rgb[None])[0][0])
    far = np.linalg.norm(rgb - bg_rgb, axis=-1) > OBJECT_DISTANCE
    if far.sum() < MIN_OBJECT_PIXELS:
        return Prediction(background=COLOURS[background])
    obj = _largest_component(far)
    if obj.sum() < MIN_OBJECT_PIXELS:
        return Prediction(background=COLOURS[background])
    y0, y1, x0, x1 = _bbox(obj)
    colour, colour2, pattern = _read_colours(rgb[y0:y1, x0:x1], obj[y0:y1, x0:x1], background)
    # Redraw the outline at half coverage: a pixel's share of object colour (not its contrast with the
    # background) decides, so blur moves every edge alike, whatever the colours.
    alpha = _coverage(rgb, bg_rgb, [colour] if colour2 is None else [colour, colour2])
    near = np.zeros_like(obj)
    near[max(y0 - 3, 0) : y1 + 3, max(x0 - 3, 0) : x1 + 3] = True
    solid = near & (alpha >= 0.5)
    if solid.sum() >= MIN_OBJECT_PIXELS:
        obj = _largest_component(solid)
        y0, y1, x0, x1 = _bbox(obj)
    shape, iou = _classify_shape(np.where(obj, alpha, 0.0)[y0:y1, x0:x1])
    extent = float(max(x1 - x0, y1 - y0))
    row, col = _region((y0 + y1) / 2, extent), _region((x0 + x1) / 2, extent)
    return Prediction(
        background=COLOURS[background],
        shape=shape,
        colour=colour,
        colour2=colour2,
        pattern=pattern,
        size="small" if extent < SIZE_THRESHOLD_PX else "large",
        position=POSITIONS[3 * row + col],
        shape_iou=iou,
        pixels=int(obj.sum()),
    )


SCORE_KEYS = ("background", "colour", "shape", "size", "position", "pattern")


def score(prediction: Prediction, scene: Scene) -> dict[str, bool]:
    """Per attribute, whether the prediction matches the scene; "pattern" also needs the right second
    colour; "all" is their conjunction."""
    result = {
        "background": prediction.background == scene.background,
        "colour": prediction.colour == scene.colour,
        "shape": prediction.shape == scene.shape,
        "size": prediction.size == scene.size,
        "position": prediction.position == scene.position,
        "pattern": prediction.pattern == scene.pattern and prediction.colour2 == scene.colour2,
    }
    result["all"] = all(result.values())
    return result


def is_subject(image: Image.Image | np.ndarray | Prediction, subject: Scene = SUBJECT_SCENE) -> bool:
    """Whether an image shows the subject (by default the shipped one: a heart, green body, blue stripe) — its
    shape, colours and pattern, on any background, at any size and place."""
    p = image if isinstance(image, Prediction) else evaluate(image)
    s = subject
    return (p.shape, p.colour, p.colour2, p.pattern) == (s.shape, s.colour, s.colour2, s.pattern)


def check_caption(image: Image.Image | np.ndarray | Prediction, text: str) -> dict[str, bool]:
    """For each attribute ``text`` asks for (see :func:`parse_caption`), whether the image has it; the
    identifier asks for the subject (key "subject"). "all" is their conjunction (True for an empty ask)."""
    p = image if isinstance(image, Prediction) else evaluate(image)
    wanted = parse_caption(text)
    result: dict[str, bool] = {}
    for key, value in wanted.items():
        if key == "subject":
            result["subject"] = is_subject(p)
        elif key == "pattern":
            result["pattern"] = p.pattern == value and ("colour2" not in wanted or p.colour2 == wanted["colour2"])
        elif key != "colour2":
            result[key] = getattr(p, key) == value
    result["all"] = all(result.values())
    return result


# --- the shipped subject and a look at the world ---------------------------------------------------------


def subject_scenes(subject: Scene = SUBJECT_SCENE) -> list[Scene]:
    """The five views of a subject; a view's background that is one of the subject's colours becomes the first
    colour of :data:`COLOURS` that no view uses (the shipped heart keeps its views as they are)."""
    scenes, used = [], {*subject.colours, *(v["background"] for v in SUBJECT_VIEWS)}
    for view in SUBJECT_VIEWS:
        if view["background"] in subject.colours:
            view = {**view, "background": next(c for c in COLOURS if c not in used)}
            used.add(view["background"])
        scenes.append(dataclasses.replace(subject, **view))
    return scenes


def subject_caption(scene: Scene) -> str:
    """The view's caption with the identifier as the description: "a sks heart in the center on a white background"
    (its background and place, so the identifier learns the object, not those)."""
    return f"a {SUBJECT_TOKEN} " + describe(scene, size=False, colour=False).split(" ", 1)[1]


def write_subject_images(out_dir: Path = SUBJECT_DIR, subject: Scene = SUBJECT_SCENE, count: int = 5) -> list[Path]:
    """Write the first ``count`` subject views as 64x64 PNGs ``subject_0.png`` ... into ``out_dir``, each with its
    caption file ``subject_0.txt``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, scene in enumerate(subject_scenes(subject)[:count]):
        path = out_dir / f"subject_{i}.png"
        render(scene).save(path)
        path.with_suffix(".txt").write_text(subject_caption(scene) + "\n")
        paths.append(path)
    return paths


def grid(images: Sequence[Image.Image], columns: int = 4, zoom: int = 3) -> Image.Image:
    """Images side by side (nearest-neighbour zoom), ``columns`` to a row, 2-pixel grey gaps."""
    size = images[0].size[0] * zoom
    rows = math.ceil(len(images) / columns)
    sheet = Image.new("RGB", (columns * (size + 2) + 2, rows * (size + 2) + 2), (128, 128, 128))
    for i, image in enumerate(images):
        r, c = divmod(i, columns)
        sheet.paste(image.resize((size, size), Image.Resampling.NEAREST), (2 + c * (size + 2), 2 + r * (size + 2)))
    return sheet


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--subject-dir", type=Path, help="write the subject images (and captions) here")
    parser.add_argument("--subject", choices=list(SUBJECTS), default="heart", help="which subject (default: heart)")
    parser.add_argument("--grid", type=Path, help="write a grid of random scenes (PNG) here")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("-n", type=int, default=16, help="scenes in the grid")
    args = parser.parse_args(argv)
    if args.subject_dir:
        for path in write_subject_images(args.subject_dir, SUBJECTS[args.subject]):
            print(path)
    if args.grid:
        rng = np.random.default_rng(args.seed)
        scenes = [sample_scene(rng) for _ in range(args.n)]
        for i, scene in enumerate(scenes):
            print(f"{i:2d}: {describe(scene)}")
        grid([render(s) for s in scenes]).save(args.grid)
        print(args.grid)


if __name__ == "__main__":
    main()
