"""The out-of-distribution suite: images people send that are not one handwritten digit, made deterministically.

    python -m training.ood --split held_out --per-family 200 --preview docs/ood-suite.png
    python -m training.ood --split fit --per-family 1000 --out runs/ood/fit.npz

Nothing is downloaded. Every image is drawn with numpy and Pillow the way a person sends it (dark ink on
white paper, canvases of many sizes, some of them JPEG-compressed) and then turned into model input by the
service's own normalisation, :func:`service.preprocess.to_mnist`. Fonts are the TTFs matplotlib ships, found
through its data path, so every machine draws the same pixels. The result depends only on the split, the
family, the image's index and, for the families made from MNIST digits, the digits given.

Families (each must be answered something other than ``digit``):

- ``letters``: letters, short words and symbols in several fonts (glyphs that look like a digit are excluded);
- ``scribbles``: random pen strokes, zigzags, loops and cross-hatching;
- ``shapes``: rectangles, triangles, pentagons, hexagons, stars, crosses, arrows, hearts, filled discs, crescents;
- ``noise``: uniform, Gaussian, salt-and-pepper and speckle noise;
- ``near_blank``: blank or nearly blank 28×28 pixel arrays, and sheets with a few specks or a faint smudge;
- ``several_digits``: two to four MNIST digits in one image;
- ``cut_off_digits``: an MNIST digit of which 35 to 60 % of the ink lies outside the image (never a ``1``, which
  stays a ``1``);
- ``textures``: stripes, checkerboards, grids, dot lattices, rings, waves, hatching, bricks;
- ``photo_crops``: synthetic photo-like crops: gradients, blobs, blurred noise, shaded objects, vignettes.

``digit_like`` (reported apart, no target, never trained on): glyphs that look like digits in many hands
(O, o, D, Q, I, l, i, J, T, Z, S, s, b, G, B, q, g, A, y, /, |, ...) and outlined circles, ellipses, many-sided
polygons and lines.

Splits: ``train`` (negatives the model is trained on), ``fit`` (threshold fitting; same generators and fonts as
``train``, other seeds) and ``held_out`` (the report only: other seeds, other fonts, MNIST *test* digits).
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import io
import math
import os
import sys
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from service.errors import InvalidInput
from service.preprocess import to_mnist

Split = Literal["train", "fit", "held_out"]
SPLITS: tuple[Split, ...] = ("train", "fit", "held_out")

#: The families with a target (≥ 95 % answered something other than ``digit`` on the held-out split).
FAMILIES: tuple[str, ...] = (
    "letters",
    "scribbles",
    "shapes",
    "noise",
    "near_blank",
    "several_digits",
    "cut_off_digits",
    "textures",
    "photo_crops",
)
#: Reported apart: things a person could fairly read as a digit.
DIGIT_LIKE = "digit_like"
ALL_FAMILIES: tuple[str, ...] = (*FAMILIES, DIGIT_LIKE)

#: How training negatives are shared among the families: more of those nearest to a digit.
TRAIN_SHARES: dict[str, float] = {
    "letters": 0.17,
    "scribbles": 0.11,
    "shapes": 0.13,
    "noise": 0.05,
    "near_blank": 0.06,
    "several_digits": 0.14,
    "cut_off_digits": 0.18,
    "textures": 0.08,
    "photo_crops": 0.08,
}


def train_counts(total: int) -> dict[str, int]:
    """``total`` training negatives shared among the families by :data:`TRAIN_SHARES`."""
    counts = {name: int(total * share) for name, share in TRAIN_SHARES.items()}
    counts["letters"] += total - sum(counts.values())
    return counts


#: Fixed seeds (not Python's salted hash): a split's images never change between runs or machines.
SPLIT_SEEDS: dict[str, int] = {"train": 20_251_101, "fit": 20_251_102, "held_out": 20_251_103}
FAMILY_SEEDS: dict[str, int] = {name: zlib.crc32(name.encode()) for name in ALL_FAMILIES}

#: matplotlib's fonts: DejaVu for the train and fit splits, STIX and Computer Modern for the held-out split.
FONTS: dict[str, tuple[str, ...]] = {
    "train": (
        "DejaVuSans.ttf",
        "DejaVuSans-Bold.ttf",
        "DejaVuSans-Oblique.ttf",
        "DejaVuSans-BoldOblique.ttf",
        "DejaVuSansDisplay.ttf",
        "DejaVuSerif.ttf",
        "DejaVuSerif-Bold.ttf",
        "DejaVuSerif-Italic.ttf",
        "DejaVuSerif-BoldItalic.ttf",
        "DejaVuSerifDisplay.ttf",
        "DejaVuSansMono.ttf",
        "DejaVuSansMono-Bold.ttf",
        "DejaVuSansMono-Oblique.ttf",
        "DejaVuSansMono-BoldOblique.ttf",
    ),
    "held_out": (
        "STIXGeneral.ttf",
        "STIXGeneralBol.ttf",
        "STIXGeneralItalic.ttf",
        "cmr10.ttf",
        "cmss10.ttf",
        "cmtt10.ttf",
        "cmb10.ttf",
        "cmti10.ttf",
    ),
}
FONTS["fit"] = FONTS["train"]

#: Glyphs that read as a digit in some hand or font: never negatives, reported apart.
DIGIT_LIKE_GLYPHS = "OoDQUuIlijJTtZzSsbGBqgAyY/|\\()[]!?$&§"
LETTERS = "".join(c for c in "ABCEFHKLMNPRVWXacdefhkmnprvwx" if c not in DIGIT_LIKE_GLYPHS)
SYMBOLS = "+×÷=%#@*<>~^{}€£¶∞ΣΩπ√∫≈≠±→←↑♥★☺"
TEX_SYMBOLS = "+=%#@*"

#: Share of a cut-off digit's ink that lies beyond the edge of the image.
CUT_INK = (0.35, 0.6)
#: How people send images: canvas sides in pixels, paper and ink tones, how many are JPEG.
CANVAS = (48, 360)
PAPER = (0.85, 1.0)
INK = (0.0, 0.35)
JPEG_FRACTION = 0.3

Image28 = np.ndarray


@dataclass(frozen=True)
class Digits:
    """MNIST digits the composite families are built from (white ink on black, uint8 N×28×28, labels)."""

    x: np.ndarray
    y: np.ndarray


@dataclass
class Context:
    split: Split
    fonts: tuple[str, ...]
    digits: Digits | None
    _font_cache: dict[tuple[str, int], ImageFont.FreeTypeFont] = field(default_factory=dict)

    def font(self, name: str, size: int) -> ImageFont.FreeTypeFont:
        key = (name, size)
        if key not in self._font_cache:
            self._font_cache[key] = ImageFont.truetype(str(font_dir() / name), size)
        return self._font_cache[key]


@dataclass(frozen=True)
class OodSuite:
    """Model inputs (float32 N×28×28, white ink on black, 0..1) and the family of each."""

    split: str
    images: np.ndarray
    family: np.ndarray
    families: tuple[str, ...]

    def of(self, name: str) -> np.ndarray:
        return np.asarray(self.images[self.family == self.families.index(name)])

    def digest(self) -> str:
        """SHA-256 of the images and their families: equal digests, equal suites."""
        h = hashlib.sha256(np.ascontiguousarray(self.images, dtype=np.float32).tobytes())
        h.update(self.family.astype(np.int16).tobytes())
        return h.hexdigest()

    def sizes(self) -> dict[str, int]:
        return {name: int(np.sum(self.family == i)) for i, name in enumerate(self.families)}


@functools.cache
def font_dir() -> Path:
    import matplotlib

    return Path(matplotlib.get_data_path()) / "fonts" / "ttf"


@functools.cache
def _has_glyphs(font: str, text: str) -> bool:
    from matplotlib.ft2font import FT2Font

    ft = FT2Font(str(font_dir() / font))
    return all(ft.get_char_index(ord(c)) != 0 for c in text)


# ---------------------------------------------------------------------------------------------------------------
# Drawing helpers. Ink maps are float32 H×W in 0..1 (1 = full ink); `as_sent` turns them into paper and ink.


def _canvas(rng: np.random.Generator, low: int = CANVAS[0], high: int = CANVAS[1]) -> tuple[int, int]:
    side = int(rng.integers(low, high + 1))
    aspect = float(np.exp(rng.uniform(-0.35, 0.35)))
    return max(16, round(side * aspect)), max(16, round(side / aspect))


def _ink(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.float32) / 255.0


def _pen(size: tuple[int, int], rng: np.random.Generator, rel: tuple[float, float] = (0.015, 0.06)) -> int:
    return max(1, round(min(size) * rng.uniform(*rel)))


def _soften(ink: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A touch of blur: pens and cameras are not pixel-sharp."""
    radius = float(rng.uniform(0.0, 1.2))
    if radius < 0.3:
        return ink
    img = Image.fromarray(np.clip(ink * 255, 0, 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(radius))
    return _ink(img)


def as_sent(ink: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """An ink map → the grayscale page a person sends: light paper, dark ink, a little noise, sometimes JPEG."""
    paper, pen = rng.uniform(*PAPER), rng.uniform(*INK)
    page = paper + (pen - paper) * np.clip(ink, 0.0, 1.0)
    return _finish(page.astype(np.float32), rng)


def _finish(page: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    if rng.random() < 0.5:
        page = page + np.float32(rng.uniform(0.0, 0.03)) * rng.standard_normal(page.shape, dtype=np.float32)
    page = np.clip(page, 0.0, 1.0)
    if rng.random() < JPEG_FRACTION:
        buffer = io.BytesIO()
        Image.fromarray(np.rint(page * 255).astype(np.uint8)).save(
            buffer, format="JPEG", quality=int(rng.integers(60, 96))
        )
        page = np.asarray(Image.open(buffer).convert("L"), dtype=np.float32) / 255.0
    return page


def _rotate(ink: np.ndarray, degrees: float) -> np.ndarray:
    img = Image.fromarray(np.clip(ink * 255, 0, 255).astype(np.uint8))
    return _ink(img.rotate(degrees, resample=Image.Resampling.BILINEAR, expand=True, fillcolor=0))


def rank_filter(ink: np.ndarray, size: int, grow: bool) -> np.ndarray:
    """Grey-level dilation (``grow``) or erosion by a size×size square, done separably: a bolder or thinner pen."""
    if size <= 1:
        return ink
    from numpy.lib.stride_tricks import sliding_window_view

    pick = np.max if grow else np.min
    r = size // 2
    fill = 0.0 if grow else float(ink.max())
    x = np.pad(ink, ((r, r), (0, 0)), constant_values=fill)
    x = pick(sliding_window_view(x, size, axis=0), axis=-1)
    x = np.pad(x, ((0, 0), (r, r)), constant_values=fill)
    return np.asarray(pick(sliding_window_view(x, size, axis=1), axis=-1), dtype=np.float32)


def _thicken(ink: np.ndarray, rng: np.random.Generator, p: float = 0.25) -> np.ndarray:
    if rng.random() >= p:
        return ink
    return rank_filter(ink, int(rng.choice([3, 5])), grow=True)


def _pad(ink: np.ndarray, rng: np.random.Generator, margin: tuple[float, float] = (0.05, 0.6)) -> np.ndarray:
    """Put the ink on a larger sheet, off-centre: people rarely crop to the ink."""
    h, w = ink.shape
    top, bottom, left, right = (int(rng.uniform(*margin) * max(h, w)) for _ in range(4))
    out = np.zeros((h + top + bottom, w + left + right), dtype=np.float32)
    out[top : top + h, left : left + w] = ink
    return out


def _text_ink(ctx: Context, rng: np.random.Generator, text: str, font: str) -> np.ndarray:
    size = int(rng.integers(24, 160))
    f = ctx.font(font, size)
    left, top, right, bottom = f.getbbox(text)
    w, h = max(1, round(right - left)), max(1, round(bottom - top))
    img = Image.new("L", (w + 4, h + 4), 0)
    ImageDraw.Draw(img).text((2 - left, 2 - top), text, font=f, fill=255)
    if rng.random() < 0.5:  # a hand is rarely a font: shear and squash a little
        img = _affine(img, rng)
    ink = _ink(img)
    if rng.random() < 0.6:
        ink = _rotate(ink, float(rng.uniform(-15, 15)))
    return _pad(_thicken(ink, rng), rng)


def _affine(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """A random shear and change of aspect ratio, on a canvas that keeps the whole glyph."""
    shear, sx = float(rng.uniform(-0.35, 0.35)), float(np.exp(rng.uniform(-0.3, 0.3)))
    w, h = img.size
    # Forward: X = sx·x + shear·y + offset; PIL wants the inverse, output (X, Y) → input (a X + b Y + c, Y).
    offset = -shear * h if shear < 0 else 0.0
    out_w = round(w * sx + abs(shear) * h) + 2
    coefficients = (1 / sx, -shear / sx, -offset / sx, 0.0, 1.0, 0.0)
    return img.transform((out_w, h), Image.Transform.AFFINE, coefficients, Image.Resampling.BILINEAR)


def _pick_text(rng: np.random.Generator, pool: str, font: str, word_p: float) -> str:
    for _ in range(20):
        n = int(rng.integers(2, 5)) if rng.random() < word_p else 1
        text = "".join(pool[int(i)] for i in rng.integers(0, len(pool), n))
        if _has_glyphs(font, text):
            return text
    return "x"


def _polygon(cx: float, cy: float, r: float, n: int, phase: float) -> list[tuple[float, float]]:
    return [
        (cx + r * math.cos(phase + 2 * math.pi * k / n), cy + r * math.sin(phase + 2 * math.pi * k / n))
        for k in range(n)
    ]


def _star(cx: float, cy: float, r: float, n: int, phase: float, inner: float) -> list[tuple[float, float]]:
    pts = []
    for k in range(2 * n):
        rr = r if k % 2 == 0 else r * inner
        a = phase + math.pi * k / n
        pts.append((cx + rr * math.cos(a), cy + rr * math.sin(a)))
    return pts


def _transform(points: Sequence[tuple[float, float]], cx: float, cy: float, angle: float) -> list[tuple[float, float]]:
    c, s = math.cos(angle), math.sin(angle)
    return [(cx + (x - cx) * c - (y - cy) * s, cy + (x - cx) * s + (y - cy) * c) for x, y in points]


def _shape_polygon(kind: str, cx: float, cy: float, r: float, rng: np.random.Generator) -> list[tuple[float, float]]:
    angle = float(rng.uniform(0, 2 * math.pi))
    if kind == "rectangle":
        a = float(rng.uniform(0.5, 1.0))
        pts = [(cx - r, cy - r * a), (cx + r, cy - r * a), (cx + r, cy + r * a), (cx - r, cy + r * a)]
    elif kind == "triangle":
        pts = _polygon(cx, cy, r, 3, 0.0)
    elif kind == "polygon":  # outlines of 7 or more sides are circles by another name: those are digit_like
        pts = _polygon(cx, cy, r, int(rng.integers(5, 7)), 0.0)
    elif kind == "star":
        pts = _star(cx, cy, r, int(rng.integers(4, 9)), 0.0, float(rng.uniform(0.35, 0.6)))
    elif kind == "cross":
        t = r * float(rng.uniform(0.2, 0.4))
        pts = [
            (cx - t, cy - r), (cx + t, cy - r), (cx + t, cy - t), (cx + r, cy - t), (cx + r, cy + t), (cx + t, cy + t),
            (cx + t, cy + r), (cx - t, cy + r), (cx - t, cy + t), (cx - r, cy + t), (cx - r, cy - t), (cx - t, cy - t),
        ]  # fmt: skip
    elif kind == "arrow":
        t, head = r * 0.22, r * 0.55
        pts = [
            (cx - r, cy - t), (cx + r - head, cy - t), (cx + r - head, cy - 2.2 * t), (cx + r, cy),
            (cx + r - head, cy + 2.2 * t), (cx + r - head, cy + t), (cx - r, cy + t),
        ]  # fmt: skip
    elif kind == "diamond":
        pts = [(cx, cy - r), (cx + 0.6 * r, cy), (cx, cy + r), (cx - 0.6 * r, cy)]
    else:  # heart
        pts = [
            (
                cx + r * 0.9 * math.sin(t) ** 3,
                cy - r * (0.8 * math.cos(t) - 0.3 * math.cos(2 * t) - 0.1 * math.cos(3 * t)),
            )
            for t in np.linspace(0, 2 * math.pi, 48)
        ]
        angle = float(rng.uniform(-0.4, 0.4))
    return _transform(pts, cx, cy, angle)


# ---------------------------------------------------------------------------------------------------------------
# The families. Each returns a grayscale page (dark ink on light paper) or, for pixel arrays sent as they are,
# a ready 28×28 model input (flagged by returning a tuple).

Generated = np.ndarray | tuple[Literal["model_input"], np.ndarray]


def symbols_for(font: str) -> str:
    """The symbols a font draws as themselves. matplotlib's Computer Modern TTFs keep TeX's OT1 layout, where
    ``<`` is ¡, ``>`` is ¿, ``{`` an en dash and so on: only a few symbols are what they say there."""
    return TEX_SYMBOLS if font.startswith("cm") else SYMBOLS


def letters(rng: np.random.Generator, ctx: Context) -> Generated:
    font = ctx.fonts[int(rng.integers(len(ctx.fonts)))]
    symbols = symbols_for(font)
    pool = LETTERS + symbols if rng.random() < 0.75 else symbols
    text = _pick_text(rng, pool, font, word_p=0.3)
    return as_sent(_text_ink(ctx, rng, text, font), rng)


def digit_like(rng: np.random.Generator, ctx: Context) -> Generated:
    if rng.random() < 0.7:
        font = ctx.fonts[int(rng.integers(len(ctx.fonts)))]
        text = _pick_text(rng, DIGIT_LIKE_GLYPHS, font, word_p=0.0)
        return as_sent(_text_ink(ctx, rng, text, font), rng)
    w, h = _canvas(rng)
    img = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(img)
    pen = _pen((w, h), rng)
    cx, cy = w / 2 + rng.uniform(-0.1, 0.1) * w, h / 2 + rng.uniform(-0.1, 0.1) * h
    r = min(w, h) * rng.uniform(0.2, 0.4)
    kind = rng.random()
    if kind < 0.45:
        a = r * rng.uniform(0.6, 1.0)
        draw.ellipse([cx - a, cy - r, cx + a, cy + r], outline=255, width=pen)
    elif kind < 0.65:
        pts = _polygon(cx, cy, r, int(rng.integers(7, 11)), float(rng.uniform(0, 1)))
        draw.line([*pts, pts[0], pts[1]], fill=255, width=pen, joint="curve")
    else:
        angle = rng.uniform(-0.5, 0.5)
        dx, dy = r * math.sin(angle), r * math.cos(angle)
        draw.line([(cx - dx, cy - dy), (cx + dx, cy + dy)], fill=255, width=pen)
    return as_sent(_soften(_ink(img), rng), rng)


def _walk(rng: np.random.Generator, w: int, h: int, steps: int, turn: float) -> list[tuple[float, float]]:
    x, y = rng.uniform(0.2, 0.8) * w, rng.uniform(0.2, 0.8) * h
    heading, spin = rng.uniform(0, 2 * math.pi), 0.0
    step = min(w, h) * rng.uniform(0.02, 0.05)
    points = [(x, y)]
    for _ in range(steps):
        spin = 0.8 * spin + rng.normal(0.0, turn)
        heading += spin
        x, y = x + step * math.cos(heading), y + step * math.sin(heading)
        if not (0.05 * w < x < 0.95 * w):
            heading = math.pi - heading
        if not (0.05 * h < y < 0.95 * h):
            heading = -heading
        x, y = float(np.clip(x, 0.05 * w, 0.95 * w)), float(np.clip(y, 0.05 * h, 0.95 * h))
        points.append((x, y))
    return points


def scribbles(rng: np.random.Generator, ctx: Context) -> Generated:
    w, h = _canvas(rng, 80, CANVAS[1])
    img = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(img)
    kind = rng.choice(["walk", "zigzag", "loops", "hatch"], p=[0.4, 0.2, 0.2, 0.2])
    pen = _pen((w, h), rng, (0.01, 0.05))
    if kind == "walk":
        for _ in range(int(rng.integers(1, 4))):
            draw.line(
                _walk(rng, w, h, int(rng.integers(60, 160)), rng.uniform(0.1, 0.35)), fill=255, width=pen, joint="curve"
            )
    elif kind == "zigzag":
        n = int(rng.integers(4, 12))
        xs = np.linspace(0.1, 0.9, n) * w + rng.normal(0, 0.03 * w, n)
        ys = np.where(np.arange(n) % 2 == 0, 0.15, 0.85) * h + rng.normal(0, 0.06 * h, n)
        points = list(zip(xs.tolist(), ys.tolist(), strict=True))
        if rng.random() < 0.5:
            points = [(y * w / h, x * h / w) for x, y in points]
        draw.line(points, fill=255, width=pen, joint="curve")
    elif kind == "loops":
        turns = rng.uniform(3, 8)
        t = np.linspace(0, 2 * math.pi * turns, 400)
        r = min(w, h) * rng.uniform(0.1, 0.2)
        drift = np.linspace(-0.35, 0.35, t.size) * w
        xs = w / 2 + drift + r * np.cos(t)
        ys = h / 2 + r * rng.uniform(0.6, 1.4) * np.sin(t) + rng.normal(0, 0.02 * h, t.size).cumsum() * 0.1
        draw.line(list(zip(xs.tolist(), ys.tolist(), strict=True)), fill=255, width=pen, joint="curve")
    else:  # cross-out hatching: many long parallel strokes, then maybe across
        for layer in range(int(rng.integers(1, 3))):
            angle = rng.uniform(0, math.pi) + layer * math.pi / 2
            c, s = math.cos(angle), math.sin(angle)
            for k in np.linspace(-0.4, 0.4, int(rng.integers(5, 12))):
                ox, oy = w / 2 - s * k * w, h / 2 + c * k * h
                L = 0.45 * min(w, h) * rng.uniform(0.7, 1.0)
                draw.line([(ox - c * L, oy - s * L), (ox + c * L, oy + s * L)], fill=255, width=pen)
    return as_sent(_soften(_thicken(_ink(img), rng, 0.15), rng), rng)


def shapes(rng: np.random.Generator, ctx: Context) -> Generated:
    w, h = _canvas(rng)
    img = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(img)
    pen = _pen((w, h), rng)
    for _ in range(1 if rng.random() < 0.8 else int(rng.integers(2, 4))):
        cx, cy = rng.uniform(0.35, 0.65) * w, rng.uniform(0.35, 0.65) * h
        r = min(w, h) * rng.uniform(0.15, 0.4)
        kind = str(
            rng.choice(
                ["rectangle", "triangle", "polygon", "star", "cross", "arrow", "diamond", "heart", "disc", "crescent"]
            )
        )
        filled = rng.random() < 0.5
        if kind == "disc":
            a = r * rng.uniform(0.5, 1.0)
            draw.ellipse([cx - r, cy - a, cx + r, cy + a], fill=255)
        elif kind == "crescent":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
            off = r * rng.uniform(0.3, 0.6)
            ang = rng.uniform(0, 2 * math.pi)
            ox, oy = cx + off * math.cos(ang), cy + off * math.sin(ang)
            draw.ellipse([ox - r, oy - r, ox + r, oy + r], fill=0)
        else:
            pts = _shape_polygon(kind, cx, cy, r, rng)
            if filled or kind in ("cross", "arrow"):
                draw.polygon(pts, fill=255)
            else:
                draw.line([*pts, pts[0], pts[1]], fill=255, width=pen, joint="curve")
    return as_sent(_soften(_ink(img), rng), rng)


def noise(rng: np.random.Generator, ctx: Context) -> Generated:
    w, h = _canvas(rng, 28, CANVAS[1])
    kind = rng.choice(["uniform", "gaussian", "salt", "speckle"])
    if kind == "uniform":
        ink = rng.random((h, w)).astype(np.float32) * rng.uniform(0.3, 1.0)
    elif kind == "gaussian":
        ink = np.abs(rng.normal(0.0, rng.uniform(0.2, 0.6), (h, w))).astype(np.float32)
    elif kind == "salt":
        ink = (rng.random((h, w)) < rng.uniform(0.01, 0.35)).astype(np.float32)
    else:
        small = rng.random((max(2, h // int(rng.integers(2, 6))), max(2, w // int(rng.integers(2, 6)))))
        ink = _ink(Image.fromarray((small * 255).astype(np.uint8)).resize((w, h), Image.Resampling.NEAREST))
        ink = ink * (rng.random((h, w)) < 0.6)
    return as_sent(np.clip(ink, 0, 1), rng)


def near_blank(rng: np.random.Generator, ctx: Context) -> Generated:
    kind = rng.choice(["pixels", "specks", "smudge"], p=[0.5, 0.3, 0.2])
    if kind == "pixels":  # a 28×28 array sent as it is (white ink on black, 0..1), as /v1/predict takes it
        x = np.zeros((28, 28), dtype=np.float32)
        sub = rng.choice(["zeros", "faint", "few"])
        if sub == "faint":
            x = (rng.random((28, 28)) * rng.uniform(0.01, 0.25)).astype(np.float32)
        elif sub == "few":
            n = int(rng.integers(1, 8))
            x[rng.integers(0, 28, n), rng.integers(0, 28, n)] = rng.uniform(0.05, 1.0, n)
        return ("model_input", x)
    w, h = _canvas(rng, 120, CANVAS[1])
    img = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(img)
    if kind == "specks":
        for _ in range(int(rng.integers(1, 7))):
            x0, y0 = rng.uniform(0.05, 0.95) * w, rng.uniform(0.05, 0.95) * h
            r = rng.uniform(0.5, 3.0)
            draw.ellipse([x0 - r, y0 - r, x0 + r, y0 + r], fill=int(rng.integers(60, 256)))
        ink = _ink(img)
    else:
        x0, y0 = rng.uniform(0.2, 0.8) * w, rng.uniform(0.2, 0.8) * h
        r = min(w, h) * rng.uniform(0.05, 0.2)
        draw.ellipse([x0 - r, y0 - r * rng.uniform(0.3, 1.0), x0 + r, y0 + r], fill=255)
        ink = _ink(img.filter(ImageFilter.GaussianBlur(r * rng.uniform(0.3, 0.8)))) * rng.uniform(0.15, 0.5)
    return as_sent(ink, rng)


def _digit_ink(digit: np.ndarray) -> np.ndarray:
    """The inked part of a 28×28 MNIST digit (white on black → ink map), cropped to its bounding box."""
    ink = digit.astype(np.float32) / 255.0
    rows, cols = np.flatnonzero(ink.max(1) > 0.1), np.flatnonzero(ink.max(0) > 0.1)
    return ink[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]


def _resize(ink: np.ndarray, w: int, h: int) -> np.ndarray:
    img = Image.fromarray(np.clip(ink * 255, 0, 255).astype(np.uint8))
    return _ink(img.resize((max(1, w), max(1, h)), Image.Resampling.BICUBIC))


def several_digits(rng: np.random.Generator, ctx: Context) -> Generated:
    assert ctx.digits is not None, "several_digits needs MNIST digits"
    n = int(rng.choice([2, 2, 3, 3, 4]))
    height = int(rng.integers(36, 120))
    parts = []
    for i in rng.integers(0, len(ctx.digits.x), n):
        ink = _digit_ink(ctx.digits.x[int(i)])
        hh = max(8, round(height * rng.uniform(0.85, 1.15)))
        parts.append(_resize(ink, round(ink.shape[1] * hh / ink.shape[0]), hh))
    vertical = rng.random() < 0.15
    gaps = [round(height * rng.uniform(-0.05, 0.5)) for _ in parts]
    if vertical:
        parts = [p.T for p in parts]
    total = sum(p.shape[1] for p in parts) + sum(gaps) + height
    page = np.zeros((int(max(p.shape[0] for p in parts) * 1.4) + 8, total + 8), dtype=np.float32)
    x = height // 2
    for p, gap in zip(parts, gaps, strict=True):
        y = int(
            np.clip(
                page.shape[0] // 2 - p.shape[0] // 2 + round(rng.normal(0, 0.08) * height),
                0,
                page.shape[0] - p.shape[0],
            )
        )
        x = max(0, min(x, page.shape[1] - p.shape[1]))
        page[y : y + p.shape[0], x : x + p.shape[1]] = np.maximum(page[y : y + p.shape[0], x : x + p.shape[1]], p)
        x += p.shape[1] + gap
    if vertical:
        page = page.T
    return as_sent(_pad(_thicken(page, rng, 0.2), rng, (0.05, 0.4)), rng)


def cut_off_digits(rng: np.random.Generator, ctx: Context) -> Generated:
    assert ctx.digits is not None, "cut_off_digits needs MNIST digits"
    candidates = np.flatnonzero(ctx.digits.y != 1)
    ink = _digit_ink(ctx.digits.x[int(candidates[int(rng.integers(len(candidates)))])])
    height = int(rng.integers(60, 240))
    ink = _thicken(_resize(ink, round(ink.shape[1] * height / ink.shape[0]), height), rng, 0.2)
    h, w = ink.shape
    side = rng.choice(["top", "bottom", "left", "right"], p=[0.35, 0.35, 0.15, 0.15])
    if side in ("left", "right") and w < 0.6 * h:
        side = rng.choice(["top", "bottom"])  # a narrow digit cut lengthwise stays a stroke
    # Cut where the given share of the ink is gone (not of the extent: the left 40 % of a 3 holds little of it).
    lost = float(rng.uniform(CUT_INK[0], CUT_INK[1]))
    profile = ink.sum(axis=1 if side in ("top", "bottom") else 0)
    if side in ("bottom", "right"):
        profile = profile[::-1]
    at = int(np.searchsorted(np.cumsum(profile) / max(float(profile.sum()), 1e-6), lost)) + 1
    if side == "top":
        ink = ink[at:]
    elif side == "bottom":
        ink = ink[: h - at]
    elif side == "left":
        ink = ink[:, at:]
    else:
        ink = ink[:, : w - at]
    # The sheet ends where the digit was cut: ink touches that edge, paper surrounds the rest.
    hh, ww = ink.shape
    m = [round(rng.uniform(0.1, 0.6) * max(h, w)) for _ in range(4)]
    top, bottom, left, right = (
        0 if side == s else mm for s, mm in zip(("top", "bottom", "left", "right"), m, strict=True)
    )
    page = np.zeros((hh + top + bottom, ww + left + right), dtype=np.float32)
    page[top : top + hh, left : left + ww] = ink
    return as_sent(page, rng)


def textures(rng: np.random.Generator, ctx: Context) -> Generated:
    w, h = _canvas(rng, 64, CANVAS[1])
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    period = float(rng.uniform(5, max(6.0, min(w, h) / 3)))
    angle = float(rng.uniform(0, math.pi))
    u = xx * math.cos(angle) + yy * math.sin(angle)
    v = -xx * math.sin(angle) + yy * math.cos(angle)
    duty = float(rng.uniform(0.2, 0.6))
    kind = rng.choice(["stripes", "checker", "grid", "dots", "rings", "waves", "hatch", "bricks", "lines"])
    if kind == "stripes":
        ink = ((u / period) % 1.0 < duty).astype(np.float32)
    elif kind == "checker":
        ink = (((u // period) + (v // period)) % 2 == 0).astype(np.float32)
    elif kind == "grid":
        ink = (((u / period) % 1.0 < duty / 2) | ((v / period) % 1.0 < duty / 2)).astype(np.float32)
    elif kind == "dots":
        du, dv = (u / period) % 1.0 - 0.5, (v / period) % 1.0 - 0.5
        ink = (du**2 + dv**2 < (duty / 2) ** 2).astype(np.float32)
    elif kind == "rings":
        r = np.hypot(xx - rng.uniform(0, w), yy - rng.uniform(0, h))
        ink = ((r / period) % 1.0 < duty).astype(np.float32)
    elif kind == "waves":
        ink = (((u + period * 0.5 * np.sin(v / period * rng.uniform(0.5, 2.0))) / period) % 1.0 < duty).astype(
            np.float32
        )
    elif kind == "hatch":
        ink = (
            ((u / period) % 1.0 < duty / 2)
            | (((xx * math.cos(-angle) + yy * math.sin(-angle)) / period) % 1.0 < duty / 2)
        ).astype(np.float32)
    elif kind == "bricks":
        row = (yy // period).astype(np.int64)
        shifted = xx + (row % 2) * period
        ink = (((yy / period) % 1.0 < duty / 2) | (((shifted / (2 * period)) % 1.0) < duty / 4)).astype(np.float32)
    else:
        img = Image.new("L", (w, h), 0)
        draw = ImageDraw.Draw(img)
        pen = _pen((w, h), rng, (0.005, 0.02))
        for _ in range(int(rng.integers(15, 50))):
            draw.line(
                [(rng.uniform(0, w), rng.uniform(0, h)), (rng.uniform(0, w), rng.uniform(0, h))], fill=255, width=pen
            )
        ink = _ink(img)
    if rng.random() < 0.4:  # a patch of texture on plain paper
        mask = np.zeros_like(ink)
        y0, x0 = int(rng.uniform(0, 0.3) * h), int(rng.uniform(0, 0.3) * w)
        y1, x1 = int(rng.uniform(0.7, 1.0) * h), int(rng.uniform(0.7, 1.0) * w)
        mask[y0:y1, x0:x1] = 1.0
        ink = ink * mask
    return as_sent(_soften(ink, rng), rng)


def _smooth_noise(rng: np.random.Generator, w: int, h: int, cells: int) -> np.ndarray:
    small = rng.random((max(2, cells), max(2, round(cells * w / h)))).astype(np.float32)
    img = Image.fromarray((small * 255).astype(np.uint8)).resize((w, h), Image.Resampling.BICUBIC)
    return _ink(img)


def photo_crops(rng: np.random.Generator, ctx: Context) -> Generated:
    w, h = _canvas(rng, 64, CANVAS[1])
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    yy, xx = yy / h, xx / w
    angle = float(rng.uniform(0, 2 * math.pi))
    base = rng.uniform(0.2, 0.9) + rng.uniform(-0.4, 0.4) * (xx * math.cos(angle) + yy * math.sin(angle))
    kind = rng.choice(["blobs", "blurred_noise", "object", "vignette", "mixed"])
    img = base.astype(np.float32)
    if kind in ("blobs", "mixed"):
        for _ in range(int(rng.integers(2, 9))):
            cx, cy, s = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.05, 0.35)
            img += rng.uniform(-0.5, 0.5) * np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * s * s))
    if kind in ("blurred_noise", "mixed"):
        img += rng.uniform(0.2, 0.7) * (_smooth_noise(rng, w, h, int(rng.integers(3, 16))) - 0.5)
    if kind == "object":
        mask = Image.new("L", (w, h), 0)
        d = ImageDraw.Draw(mask)
        r = min(w, h) * rng.uniform(0.2, 0.45)
        cx, cy = rng.uniform(0.3, 0.7) * w, rng.uniform(0.3, 0.7) * h
        if rng.random() < 0.5:
            d.ellipse([cx - r, cy - r * rng.uniform(0.5, 1.0), cx + r, cy + r], fill=255)
        else:
            d.polygon(_polygon(cx, cy, r, int(rng.integers(3, 7)), rng.uniform(0, 6.3)), fill=255)
        m = _ink(mask.filter(ImageFilter.GaussianBlur(rng.uniform(1, 4))))
        shade = rng.uniform(-0.6, 0.6) + 0.3 * (xx - 0.5)
        img = img + m * shade
    if kind in ("vignette", "mixed", "object"):
        img = img * (1 - rng.uniform(0.2, 0.8) * ((xx - 0.5) ** 2 + (yy - 0.5) ** 2) * 2)
    img = img + np.float32(rng.uniform(0.0, 0.04)) * rng.standard_normal(img.shape, dtype=np.float32)
    return _finish(np.clip(img, 0, 1).astype(np.float32), rng)


GENERATORS: dict[str, Callable[[np.random.Generator, Context], Generated]] = {
    "letters": letters,
    "scribbles": scribbles,
    "shapes": shapes,
    "noise": noise,
    "near_blank": near_blank,
    "several_digits": several_digits,
    "cut_off_digits": cut_off_digits,
    "textures": textures,
    "photo_crops": photo_crops,
    DIGIT_LIKE: digit_like,
}


def _rng(split: str, family: str, index: int, attempt: int) -> np.random.Generator:
    return np.random.default_rng([SPLIT_SEEDS[split], FAMILY_SEEDS[family], index, attempt])


def make_image(split: Split, family: str, index: int, ctx: Context) -> Image28:
    """Image ``index`` of ``family`` in ``split``, as model input (float32 28×28). A page the service would refuse
    as blank is drawn again with the next attempt's seed."""
    for attempt in range(20):
        out = GENERATORS[family](_rng(split, family, index, attempt), ctx)
        if isinstance(out, tuple):
            return np.asarray(out[1], dtype=np.float32)
        try:
            return to_mnist(out)
        except InvalidInput:
            continue
    return np.zeros((28, 28), dtype=np.float32)


def context(split: Split, digits: Digits | None) -> Context:
    return Context(split=split, fonts=FONTS[split], digits=digits)


_WORKER: dict[str, Digits | None] = {}


def _init_worker(digits: Digits | None) -> None:
    _WORKER["digits"] = digits


def _make_chunk(split: Split, family: str, start: int, stop: int) -> np.ndarray:
    ctx = context(split, _WORKER.get("digits"))
    return np.stack([make_image(split, family, i, ctx) for i in range(start, stop)])


def _draw_chunk(x: np.ndarray, seed: int, start: int) -> np.ndarray:
    return np.stack([draw_digit(d, np.random.default_rng([seed, start + i])) for i, d in enumerate(x)])


def _pool(workers: int, digits: Digits | None = None) -> Any:
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    # spawn, not fork: the caller may already hold TensorFlow's threads.
    ctx = multiprocessing.get_context("spawn")
    return ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker, initargs=(digits,))


def default_workers() -> int:
    return max(1, min(4, os.cpu_count() or 1))


CHUNK = 250


def generate(
    split: Split,
    per_family: int | dict[str, int],
    digits: Digits | None,
    families: Sequence[str] = ALL_FAMILIES,
    workers: int = 1,
) -> OodSuite:
    """The suite's ``split``: ``per_family`` images of each family (a dict gives each family its own count).
    ``workers`` > 1 draws in that many processes; the images are the same either way."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {SPLITS}")
    counts = [per_family[name] if isinstance(per_family, dict) else per_family for name in families]
    tasks = [
        (split, name, start, min(start + CHUNK, n))
        for name, n in zip(families, counts, strict=True)
        for start in range(0, n, CHUNK)
    ]
    if workers > 1 and len(tasks) > 1:
        with _pool(workers, digits) as pool:
            chunks = list(pool.map(_make_chunk, *zip(*tasks, strict=True)))
    else:
        _init_worker(digits)
        chunks = [_make_chunk(*task) for task in tasks]
    family = (
        np.concatenate([np.full(n, k, dtype=np.int64) for k, n in enumerate(counts)])
        if counts
        else np.zeros(0, np.int64)
    )
    images = np.concatenate(chunks) if chunks else np.zeros((0, 28, 28), np.float32)
    return OodSuite(
        split=split,
        images=images.astype(np.float32),
        family=family,
        families=tuple(families),
    )


def digits_for(split: Split, mnist_train: Digits, mnist_test: Digits) -> Digits:
    """MNIST digits a split's composites are built from: training images for train/fit, test images for held-out."""
    return mnist_test if split == "held_out" else mnist_train


# ---------------------------------------------------------------------------------------------------------------
# Real digits as people draw them (positives): the photo and drawing path the web page uses.

DRAWN_FRAME = (84, 252)
DRAWN_THICKNESS = (-0.4, 1.0)
MNIST_STROKE = 2.2


def draw_digit(digit: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A 28×28 MNIST digit drawn as dark ink on a white page of 200–360 px at a random size, pen thickness,
    paper and ink tone, sometimes JPEG; then the service's normalisation. Returns the model input."""
    canvas = int(rng.integers(200, 361))
    side = int(rng.integers(DRAWN_FRAME[0], min(DRAWN_FRAME[1], canvas) + 1))
    ink = _ink(Image.fromarray(digit).resize((side, side), Image.Resampling.BICUBIC))
    thickness = float(rng.uniform(*DRAWN_THICKNESS))
    ink = rank_filter(ink, 2 * round(abs(thickness) * MNIST_STROKE * side / 28 / 2) + 1, grow=thickness > 0)
    sheet = np.zeros((canvas, canvas), dtype=np.float32)
    top, left = int(rng.integers(0, canvas - side + 1)), int(rng.integers(0, canvas - side + 1))
    sheet[top : top + side, left : left + side] = ink
    page = as_sent(sheet, rng)
    try:
        return to_mnist(page)
    except InvalidInput:
        return digit.astype(np.float32) / 255.0


def draw_digits(x: np.ndarray, seed: int, workers: int = 1) -> np.ndarray:
    """Every digit of ``x`` (uint8 N×28×28) drawn by :func:`draw_digit`, seeded: float32 N×28×28 model inputs."""
    if len(x) == 0:
        return np.zeros((0, 28, 28), np.float32)
    starts = list(range(0, len(x), CHUNK))
    parts = [x[s : s + CHUNK] for s in starts]
    if workers > 1 and len(parts) > 1:
        with _pool(workers) as pool:
            chunks = list(pool.map(_draw_chunk, parts, [seed] * len(parts), starts))
    else:
        chunks = [_draw_chunk(p, seed, s) for p, s in zip(parts, starts, strict=True)]
    return np.concatenate(chunks).astype(np.float32)


# ---------------------------------------------------------------------------------------------------------------


def preview(suite: OodSuite, path: Path, per_family: int = 12) -> Path:
    """A PNG grid: one row per family, the first ``per_family`` images as the model sees them (ink dark)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = len(suite.families)
    fig, axes = plt.subplots(rows, per_family, figsize=(per_family * 0.7, rows * 0.8))
    for r, name in enumerate(suite.families):
        imgs = suite.of(name)[:per_family]
        for c in range(per_family):
            ax = axes[r, c]
            ax.axis("off")
            if c < len(imgs):
                ax.imshow(imgs[c], cmap="gray_r", vmin=0, vmax=1)
        axes[r, 0].text(-4, 14, name, ha="right", va="center", fontsize=7)
    fig.suptitle(f"OOD suite, {suite.split} split, as the model sees it", fontsize=9)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80, bbox_inches="tight")
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--split", choices=SPLITS, default="held_out")
    parser.add_argument("--per-family", type=int, default=200)
    parser.add_argument("--out", type=Path, help="write images and families to this .npz")
    parser.add_argument("--preview", type=Path, help="write a PNG grid of the first images of each family")
    parser.add_argument("--data-dir", type=Path)
    args = parser.parse_args(argv)

    from training.data import load_mnist

    mnist = load_mnist(args.data_dir)
    start = time.perf_counter()
    suite = generate(
        args.split,
        args.per_family,
        digits_for(args.split, Digits(mnist.x_train, mnist.y_train), Digits(mnist.x_test, mnist.y_test)),
    )
    print(f"{suite.split}: {len(suite.images)} images in {time.perf_counter() - start:.1f} s; sha256 {suite.digest()}")
    print(", ".join(f"{k} {v}" for k, v in suite.sizes().items()))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(args.out, images=suite.images, family=suite.family, families=np.array(suite.families))
        print(f"wrote {args.out}")
    if args.preview:
        print(f"wrote {preview(suite, args.preview)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
