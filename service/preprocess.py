"""Request content → the model's input: float32 28×28 in 0..1, white ink on black, MNIST-centred.

Images of any size or colour go through the same normalisation MNIST's digits went through: grayscale,
inverted when dark-on-light (judged by the border), background levelled, cropped to the ink, fitted into a
20×20 box keeping the aspect ratio, then placed in 28×28 so that the centre of mass sits where MNIST's does.
Only numpy and Pillow are used (no scipy in the service).
"""

from __future__ import annotations

import base64
import binascii
import io
import logging
import struct
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import numpy.typing as npt
from PIL import Image, ImageOps, UnidentifiedImageError

from service.errors import InvalidInput, PayloadTooLarge, UnsupportedMediaType

log = logging.getLogger(__name__)

Scale = Literal["0-255", "0-1"]
FloatImage = npt.NDArray[np.float32]

SIZE = 28
#: MNIST digits fit a 20×20 box …
BOX = 20
#: … whose centre of mass lies at (14, 14) in pixel-index coordinates (measured on the MNIST test set: 13.99, 14.00).
CENTRE = 14.0
#: Formats Pillow may open for us; anything else (EPS, PDF, ICNS…) is refused before decoding.
FORMATS = ("PNG", "JPEG", "GIF", "BMP", "WEBP", "TIFF")
#: Large photos are reduced to this longest side before the numpy work: plenty for a 20×20 result.
WORKING_SIDE = 512
#: After levelling, a pixel counts as ink at this intensity (photos have sensor noise below it).
INK_THRESHOLD = 0.2
#: An image whose brightest ink, after levelling, is below this is considered empty.
MIN_CONTRAST = 0.1
#: Opaque pixels of a partly transparent image varying at least this much (std of luminance) are a card with
#: something drawn on it, not strokes of one colour.
CARD_CONTRAST = 0.05


def from_pixels(pixels: Sequence[Sequence[float]] | npt.ArrayLike, scale: Scale = "0-255") -> FloatImage:
    """A 28×28 array of numbers on the given scale → float32 28×28 in 0..1, refusing NaN/Inf and out-of-range values."""
    try:
        x = np.asarray(pixels, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise InvalidInput("pixels must be a 28×28 array of numbers") from exc
    if x.shape != (SIZE, SIZE):
        raise InvalidInput(f"pixels must be 28×28, got shape {list(x.shape)}")
    if not np.isfinite(x).all():
        raise InvalidInput("pixels contain NaN or Infinity")
    top = 255.0 if scale == "0-255" else 1.0
    if x.min() < 0.0 or x.max() > top:
        raise InvalidInput(f"pixels must lie in 0..{top:g} for scale {scale!r}, got {x.min():g}..{x.max():g}")
    return (x / top).astype(np.float32)


def decode_base64(data: str) -> bytes:
    """Standard or URL-safe base64, with or without a ``data:image/...;base64,`` prefix (in any letter case)."""
    text = data.strip()
    if text[:5].lower() == "data:":
        header, _, text = text.partition(",")
        if ";base64" not in header.lower():
            raise InvalidInput("image_base64 data URL must be base64-encoded")
    text = "".join(text.split())
    text += "=" * (-len(text) % 4)
    try:
        return base64.b64decode(text.replace("-", "+").replace("_", "/"), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InvalidInput("image_base64 is not valid base64") from exc


@dataclass
class PixelBudget:
    """The image pixels one request may make the service decode, summed over its images (413 past it)."""

    max_pixels: int
    used: int = 0

    def take(self, pixels: int) -> None:
        self.used += pixels
        if self.used > self.max_pixels:
            raise PayloadTooLarge(
                f"the images of this request hold more than the {self.max_pixels} pixels one request may decode",
                code="too_many_pixels",
            )


def decode_image(data: bytes, max_pixels: int, budget: PixelBudget | None = None) -> FloatImage:
    """PNG/JPEG/… bytes of any size or colour → float32 28×28 MNIST-form image.

    Cost is bounded before a pixel is decoded: the declared size against ``max_pixels`` (a decompression bomb is
    refused cheaply) and against the request's ``budget``. JPEGs decode at a reduced scale; other formats are
    reduced right after decoding, without a second full-size copy, so one decode holds at most one raster of at
    most ``max_pixels`` × 4 bytes.
    """
    if not data:
        raise InvalidInput("the image is empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image: Image.Image = Image.open(io.BytesIO(data), formats=FORMATS)
            width, height = image.size
            if width < 1 or height < 1:
                raise InvalidInput("the image has no pixels")
            if width * height > max_pixels:
                raise InvalidInput(
                    f"the image is {width}×{height} = {width * height} pixels, more than the {max_pixels} allowed",
                    code="image_too_large",
                )
            if budget is not None:
                budget.take(width * height)
            image.seek(0)  # first frame of an animation
            if image.format == "JPEG":
                # Let libjpeg decode at a reduced scale: far less work for big photos.
                image.draft("L", (WORKING_SIDE, WORKING_SIDE))
            image.load()
            scale = _wide_scale(image)  # from the samples as sent: a reduced image must be judged the same way
            image = _reduced(image)
            image = _upright(image)
            gray = _to_ink_map(image, scale)
    except (InvalidInput, PayloadTooLarge):
        raise
    except UnidentifiedImageError as exc:
        raise InvalidInput(
            f"the data is not an image in a supported format ({', '.join(FORMATS)})", code="undecodable_image"
        ) from exc
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise InvalidInput(f"the image is too large: {exc}", code="image_too_large") from exc
    except (OSError, SyntaxError, ValueError, EOFError, MemoryError, struct.error) as exc:
        # Pillow reports truncated or corrupt files through these.
        raise InvalidInput(f"the image could not be decoded: {exc}", code="undecodable_image") from exc
    return to_mnist(gray)


#: Modes holding more than 8 bits per sample: their values are scaled to 0..1, never clipped to 8 bits.
WIDE_MODES = frozenset({"I", "I;16", "I;16L", "I;16B", "I;16N", "F"})


def _reduced(image: Image.Image) -> Image.Image:
    """The image reduced by a whole factor to about :data:`WORKING_SIDE` (box filter), when it is larger.

    One band at a time: Pillow's own reduce() of an image with alpha first makes a premultiplied full-size copy
    (64 MB more for a 4096² RGBA), and a converted palette image would be a full-size copy too; a band is a
    quarter of the raster at most.
    """
    factor = max(image.size) // WORKING_SIDE
    if factor < 2:
        return image
    if image.mode in ("I", "F"):
        return image.reduce(factor)
    if image.mode in WIDE_MODES:  # 16-bit: reduce() does not take it; block means in numpy, one copy of 2 bytes/pixel
        samples = np.asarray(image)
        h, w = (samples.shape[0] // factor) * factor, (samples.shape[1] // factor) * factor
        blocks = samples[:h, :w].reshape(h // factor, factor, w // factor, factor)
        return Image.fromarray(blocks.mean(axis=(1, 3), dtype=np.float32), mode="F")
    if image.mode in ("1", "P"):
        image = image.convert("RGBA" if _has_alpha(image) else "L")
    if len(image.getbands()) == 1:
        return image.reduce(factor)
    bands = [image.getchannel(i).reduce(factor) for i in range(len(image.getbands()))]
    return Image.merge(image.mode, bands)


def _upright(image: Image.Image) -> Image.Image:
    """The image turned as its EXIF orientation says; as it came when the EXIF block is broken (Pillow raises
    anything from struct.error to KeyError on one), since the pixels themselves may be fine."""
    try:
        return ImageOps.exif_transpose(image)
    except Exception:
        log.debug("unreadable EXIF block: the image is read unrotated", exc_info=True)
        return image


def _has_alpha(image: Image.Image) -> bool:
    return image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info)


def _wide_scale(image: Image.Image) -> float | None:
    """What 16-bit, 32-bit integer and float samples are divided by to lie in 0..1 (None for 8-bit modes).

    16-bit samples by 65535; others by the range their largest value shows (0..1, 0..255, 0..65535, else itself),
    read from the image as sent, before any reduction."""
    if image.mode not in WIDE_MODES:
        return None
    if image.mode.startswith("I;16"):
        return 65535.0
    extrema = image.getextrema()
    top = float(extrema[1]) if isinstance(extrema, tuple) and not isinstance(extrema[1], tuple) else 1.0
    if top <= 1.0 and image.mode == "F":
        return 1.0
    if top <= 255.0:
        return 255.0
    if top <= 65535.0:
        return 65535.0
    return top


def _wide_to_unit(image: Image.Image, scale: float) -> FloatImage:
    """16-bit, 32-bit integer and float samples → 0..1 by ``scale`` (never clipped to 8 bits)."""
    out: FloatImage = np.clip(np.asarray(image, dtype=np.float32) / np.float32(scale), 0.0, 1.0)
    return out


def _to_ink_map(image: Image.Image, wide_scale: float | None = None) -> FloatImage:
    """Grayscale float 0..1 at a working size; transparency-drawn images become their alpha (ink = opaque).

    ``wide_scale``: for 16-bit, 32-bit and float images, what their samples as sent were divided by."""
    if max(image.size) > WORKING_SIDE:
        image.thumbnail((WORKING_SIDE, WORKING_SIDE), Image.Resampling.BOX)  # already reduced: a small copy
    if image.mode in WIDE_MODES:
        return _wide_to_unit(image, wide_scale if wide_scale is not None else _wide_scale(image) or 1.0)
    if _has_alpha(image):
        rgba = image.convert("RGBA")
        pixels = np.asarray(rgba, dtype=np.float32) / 255.0
        alpha = pixels[..., 3]
        if _border(alpha).mean() < 0.5:
            luminance = pixels[..., :3] @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
            opaque = luminance[alpha > 0.9]
            if opaque.size == 0 or float(opaque.std()) < CARD_CONTRAST:
                # Strokes of one colour on a transparent canvas (what a drawing app exports): the alpha channel is
                # the ink, whatever colour the strokes were painted in.
                return alpha
            # An opaque card with something drawn on it, in a transparent margin: the margin takes the card's own
            # colour, so that the digit on the card is read, not the card's outline.
            background = tuple(round(float(v) * 255) for v in np.median(pixels[alpha > 0.9][:, :3], axis=0))
            canvas = Image.new("RGBA", rgba.size, (*background, 255))
            return np.asarray(Image.alpha_composite(canvas, rgba).convert("L"), dtype=np.float32) / 255.0
        background_white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background_white, rgba)
    return np.asarray(image.convert("L"), dtype=np.float32) / 255.0


def _border(x: FloatImage) -> FloatImage:
    """The outermost ring of pixels (about 4 % of each side, at least one pixel)."""
    h, w = x.shape
    m = max(1, min(h, w) // 25)
    return np.concatenate([x[:m].ravel(), x[-m:].ravel(), x[:, :m].ravel(), x[:, -m:].ravel()])


def to_mnist(gray: FloatImage) -> FloatImage:
    """Any-size grayscale in 0..1 → 28×28 white-on-black, fitted to 20×20 and centred by centre of mass."""
    if gray.ndim != 2 or gray.size == 0:
        raise InvalidInput("the image has no pixels")
    if not np.isfinite(gray).all():
        raise InvalidInput("the image contains NaN or Infinity")
    x = gray.astype(np.float32, copy=True)
    if np.median(_border(x)) > 0.5:
        x = 1.0 - x  # dark ink on light paper
    background = float(np.median(_border(x)))
    peak = float(x.max())
    if peak - background < MIN_CONTRAST:
        raise InvalidInput("the image is blank: no digit found", code="empty_image")
    x = np.clip((x - background) / (peak - background), 0.0, 1.0)
    rows = np.flatnonzero((x >= INK_THRESHOLD).any(axis=1))
    cols = np.flatnonzero((x >= INK_THRESHOLD).any(axis=0))
    x = x[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    h, w = x.shape
    scale = BOX / max(h, w)
    new_h, new_w = max(1, round(h * scale)), max(1, round(w * scale))
    if (new_h, new_w) != (h, w):
        patch = Image.fromarray(x, mode="F").resize((new_w, new_h), Image.Resampling.LANCZOS)
        x = np.clip(np.asarray(patch, dtype=np.float32), 0.0, 1.0)
    return _place_by_centre_of_mass(x)


def _place_by_centre_of_mass(patch: FloatImage) -> FloatImage:
    h, w = patch.shape
    mass = float(patch.sum())
    cy = float((patch.sum(axis=1) * np.arange(h)).sum() / mass)
    cx = float((patch.sum(axis=0) * np.arange(w)).sum() / mass)
    top = int(np.clip(round(CENTRE - cy), 0, SIZE - h))
    left = int(np.clip(round(CENTRE - cx), 0, SIZE - w))
    out = np.zeros((SIZE, SIZE), dtype=np.float32)
    out[top : top + h, left : left + w] = patch
    return out


def check_media_type(content_type: str | None) -> None:
    """Uploaded files must say they are images (or say nothing useful, as some clients do)."""
    kind = (content_type or "").split(";")[0].strip().lower()
    if kind and not (kind.startswith("image/") or kind == "application/octet-stream"):
        raise UnsupportedMediaType(f"the uploaded file must be an image, not {kind!r}")


def to_uint8(image: FloatImage) -> npt.NDArray[np.uint8]:
    """float 0..1 → uint8 0..255 (rounded)."""
    return np.asarray(np.clip(np.rint(image * 255.0), 0, 255), dtype=np.uint8)


def to_png_base64(image: FloatImage) -> str:
    """The 28×28 image the model saw, as a base64 PNG (white ink on black, like MNIST)."""
    buffer = io.BytesIO()
    Image.fromarray(to_uint8(image), mode="L").save(buffer, format="PNG", optimize=True)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def as_model_input(images: Sequence[FloatImage]) -> FloatImage:
    """A list of 28×28 images → float32 [N, 28, 28, 1]."""
    return np.stack(images).astype(np.float32, copy=False)[..., np.newaxis]
