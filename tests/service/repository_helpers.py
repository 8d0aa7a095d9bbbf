"""Model repositories for tests, built from the committed model: same ONNX bytes, cards differing only in version.

    root = flat_repository(tmp_path)                 # models/mnist-cnn.onnx + .json, as shipped
    add_version(root, "mnist-cnn", "7.0.0")          # root/mnist-cnn/7.0.0/mnist-cnn.onnx + card saying 7.0.0

The sha256 in every card still matches (nothing but ``version`` is rewritten), so the service verifies them as it
would a real export.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
MODEL_DIR = ROOT / "models"
MODEL_NAME = "mnist-cnn"


def committed_card() -> dict[str, Any]:
    card: dict[str, Any] = json.loads((MODEL_DIR / f"{MODEL_NAME}.json").read_text())
    return card


def flat_repository(root: Path) -> Path:
    """``root`` holding the committed model and card, unchanged (the default layout)."""
    root.mkdir(parents=True, exist_ok=True)
    for suffix in (".onnx", ".json"):
        shutil.copyfile(MODEL_DIR / f"{MODEL_NAME}{suffix}", root / f"{MODEL_NAME}{suffix}")
    return root


def add_version(root: Path, name: str, version: str, **card_changes: Any) -> Path:
    """``root/<name>/<version>/<name>.onnx`` + card: the committed model under another name/version."""
    target = root / name / version
    target.mkdir(parents=True)
    card = committed_card()
    card.update({"name": name, "version": version, **card_changes})
    card["onnx"] = {**card["onnx"], "file": f"{name}.onnx"}
    shutil.copyfile(MODEL_DIR / f"{MODEL_NAME}.onnx", target / f"{name}.onnx")
    (target / f"{name}.json").write_text(json.dumps(card, indent=2))
    return target
