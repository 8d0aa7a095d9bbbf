"""Make examples/digit-7.png: the first MNIST test digit (a 7) as a person would photograph or scan it, dark ink on
white paper, 140×140 pixels, for the README and the examples to send to the service.

    .venv/bin/python examples/make_digit.py                 # rewrites examples/digit-7.png
    curl -s -F file=@examples/digit-7.png localhost:8000/v1/predict     # {"digit":7,...} from a running service

The 28×28 MNIST image (white on black) is inverted and scaled up 5× with bicubic interpolation, so MNIST's own
margin (about 4 of 28 pixels) becomes a white border of about 20. The service turns it back into MNIST form
(grayscale, inverted, cropped, centred) before the model sees it. Needs the MNIST test set (fetched and verified by
training.data) and Pillow.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from training.data import load_test_set

OUT = Path(__file__).resolve().parent / "digit-7.png"
INDEX = 0  # the first test digit, labelled 7
SCALE = 5


def render(image: np.ndarray, scale: int = SCALE) -> Image.Image:
    """A 28×28 MNIST digit (uint8, white ink on black) as dark ink on white paper, `scale` times larger."""
    paper = Image.fromarray(255 - image, mode="L")
    return paper.resize((image.shape[1] * scale, image.shape[0] * scale), Image.Resampling.BICUBIC)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    x, y = load_test_set()
    picture = render(x[INDEX])
    picture.save(args.out, optimize=True)
    print(f"{args.out}: MNIST test digit #{INDEX} (label {int(y[INDEX])}), {picture.width}×{picture.height}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
