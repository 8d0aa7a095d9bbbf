"""The ONNX digit classifier: load, verify against the model card, warm up, predict. No web framework here.

    python -m service.model models/mnist-cnn.onnx    # load, verify, time one prediction, print the card summary

The model card (``<name>.json`` next to ``<name>.onnx``) is the source of truth for the model's name, version and
measured accuracy; the ONNX file must hash to the card's ``onnx.sha256`` or it is refused.

A model directory is a repository: :func:`find_models` finds every card in it, in two layouts that may be mixed,

    models/<stem>.onnx + models/<stem>.json                  # what `mnist-export --out models` writes
    models/<name>/<version>/<stem>.onnx + .../<stem>.json    # side by side: `--out models/<name>/<version>`

and :func:`load_repository` loads them all. Entries whose names start with a dot are skipped (stage a new version
in ``models/.incoming`` and rename it into place).
"""

from __future__ import annotations

import hashlib
import json
import logging
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnxruntime as ort

log = logging.getLogger(__name__)

IMAGE_SHAPE = (28, 28, 1)
NUM_CLASSES = 10

#: Largest array handed to one ORT run; bigger inputs are split. onnxruntime's arena keeps the activations of
#: the largest run it has seen (about 0.4 MB per image for the shipped CNN), and on this model images per second
#: do not grow past a few images per run, so small runs bound the memory at no cost in speed.
MAX_RUN_BATCH = 32

FloatArray = npt.NDArray[np.float32]


class ModelLoadError(RuntimeError):
    """The model files are missing, inconsistent with their card, or not the expected classifier."""


@dataclass(frozen=True)
class TensorSpec:
    """Name, shape (None or a name for dynamic dimensions) and element type of a graph input or output."""

    name: str
    shape: tuple[int | str | None, ...]
    dtype: str

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}


@dataclass(frozen=True)
class ModelCard:
    """The parts of ``<name>.json`` the service relies on, plus the whole document for /v1/models."""

    name: str
    version: str
    sha256: str
    created: str | None = None
    metrics: Mapping[str, Any] = field(default_factory=dict)
    raw: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def from_file(cls, path: Path) -> ModelCard:
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError as exc:
            raise ModelLoadError(f"model card not found: {path}") from exc
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"model card {path} is not readable JSON: {exc}") from exc
        if not isinstance(doc, dict):
            raise ModelLoadError(f"model card {path} is not a JSON object")
        onnx_part = doc.get("onnx") if isinstance(doc.get("onnx"), dict) else {}
        sha = onnx_part.get("sha256") if isinstance(onnx_part, dict) else None
        required = (("name", doc.get("name")), ("version", doc.get("version")), ("onnx.sha256", sha))
        missing = [key for key, value in required if not value]
        if missing:
            raise ModelLoadError(f"model card {path} lacks {', '.join(missing)}")
        metrics = doc.get("metrics") if isinstance(doc.get("metrics"), dict) else {}
        return cls(
            name=str(doc["name"]),
            version=str(doc["version"]),
            sha256=str(sha).lower(),
            created=str(doc["created"]) if doc.get("created") else None,
            metrics=metrics or {},
            raw=doc,
        )

    @property
    def test_accuracy(self) -> float | None:
        value = self.metrics.get("test_accuracy")
        return float(value) if isinstance(value, int | float) else None


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def session_options(intra_op_threads: int = 1, inter_op_threads: int = 1) -> ort.SessionOptions:
    """Options for a latency-oriented CPU service sharing its cores with the web server."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.intra_op_num_threads = intra_op_threads
    options.inter_op_num_threads = inter_op_threads
    # Spinning threads burn a core waiting for work; between requests that core belongs to the event loop.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    options.log_severity_level = 3
    return options


#: onnxruntime's type names → the numpy names the model card uses.
_DTYPES = {"tensor(float)": "float32", "tensor(double)": "float64", "tensor(float16)": "float16"}


def _spec(node: Any) -> TensorSpec:
    shape = tuple(d if isinstance(d, int | str) else None for d in node.shape)
    return TensorSpec(name=str(node.name), shape=shape, dtype=_DTYPES.get(str(node.type), str(node.type)))


class OnnxClassifier:
    """A verified onnxruntime session for the digit CNN: float32 [N, 28, 28, 1] in 0..1 → probabilities [N, 10].

    ``predict`` is thread-safe (onnxruntime sessions are) and blocking: call it off the event loop.
    """

    def __init__(
        self,
        onnx_path: Path,
        card: ModelCard,
        *,
        intra_op_threads: int = 1,
        inter_op_threads: int = 1,
        verify_sha256: bool = True,
    ) -> None:
        if not onnx_path.is_file():
            raise ModelLoadError(f"model file not found: {onnx_path}")
        self.path = onnx_path
        self.card = card
        self.sha256 = sha256_file(onnx_path)
        if verify_sha256 and self.sha256 != card.sha256:
            raise ModelLoadError(
                f"{onnx_path.name} has sha256 {self.sha256} but its model card says {card.sha256}: refusing to serve it"
            )
        try:
            self._session = ort.InferenceSession(
                str(onnx_path),
                sess_options=session_options(intra_op_threads, inter_op_threads),
                providers=["CPUExecutionProvider"],
            )
        except Exception as exc:  # onnxruntime raises its own untyped errors for corrupt graphs
            raise ModelLoadError(f"onnxruntime cannot load {onnx_path}: {exc}") from exc
        inputs, outputs = self._session.get_inputs(), self._session.get_outputs()
        if len(inputs) != 1 or len(outputs) < 1:
            raise ModelLoadError(f"expected one input and an output, got {len(inputs)} inputs, {len(outputs)} outputs")
        self.input = _spec(inputs[0])
        self.output = _spec(outputs[0])
        if tuple(self.input.shape[1:]) != IMAGE_SHAPE or self.input.dtype != "float32":
            raise ModelLoadError(f"input {self.input} is not float32 [batch, 28, 28, 1]")
        if len(self.output.shape) != 2 or self.output.shape[1] != NUM_CLASSES:
            raise ModelLoadError(f"output {self.output} is not [batch, {NUM_CLASSES}]")
        self.warmed_up = False

    @property
    def name(self) -> str:
        return self.card.name

    @property
    def version(self) -> str:
        return self.card.version

    def predict(self, images: FloatArray) -> FloatArray:
        """Class probabilities float32 [N, 10] for images float32 [N, 28, 28, 1] (0 = background, 1 = ink)."""
        if images.ndim != 4 or images.shape[1:] != IMAGE_SHAPE or images.shape[0] < 1:
            raise ValueError(f"expected float32 [N, 28, 28, 1] with N >= 1, got {images.dtype} {images.shape}")
        x = np.ascontiguousarray(images, dtype=np.float32)
        outputs = [self._run(x[i : i + MAX_RUN_BATCH]) for i in range(0, len(x), MAX_RUN_BATCH)]
        return outputs[0] if len(outputs) == 1 else np.concatenate(outputs)

    def _run(self, x: FloatArray) -> FloatArray:
        (probs,) = self._session.run([self.output.name], {self.input.name: x})
        return np.asarray(probs, dtype=np.float32)

    def warm_up(self, batch_sizes: Sequence[int] = (1, 8, 64)) -> float:
        """Run a few dummy batches so the first real request does not pay for allocations; returns seconds taken."""
        start = time.perf_counter()
        for n in batch_sizes:
            self.predict(np.zeros((n, *IMAGE_SHAPE), dtype=np.float32))
        self.warmed_up = True
        return time.perf_counter() - start

    def describe(self) -> dict[str, Any]:
        """Name, version, tensors and headline metrics: what /v1/models shows."""
        metrics = {k: v for k, v in self.card.metrics.items() if k in ("test_accuracy", "test_errors")}
        return {
            "name": self.name,
            "version": self.version,
            "created": self.card.created,
            "sha256": self.sha256,
            "opset": self.card.raw.get("onnx", {}).get("opset"),
            "input": self.input.as_dict(),
            "output": self.output.as_dict(),
            "metrics": metrics,
            "parameters": self.card.raw.get("parameters"),
        }


def model_paths(model_dir: Path, name: str) -> tuple[Path, Path]:
    """``(<dir>/<name>.onnx, <dir>/<name>.json)``."""
    return model_dir / f"{name}.onnx", model_dir / f"{name}.json"


def version_key(version: str) -> tuple[int, tuple[int, ...], int, str]:
    """Sort key for model versions: the highest sorts last.

    Dotted numbers compare numerically (``2.10.0`` > ``2.9.0``; Triton-style ``1``, ``2`` too), a pre-release
    (``1.0.0-rc1``) sorts below its release, and versions that are not dotted numbers sort below all that are.
    """
    release, dash, pre = version.partition("-")
    fields = release.split(".")
    if all(f.isdigit() for f in fields):
        return (1, tuple(int(f) for f in fields), 0 if dash else 1, pre)
    return (0, (), 0, version)


@dataclass(frozen=True)
class ModelFiles:
    """One model version found in a repository: its ONNX file, its card file and the card itself."""

    onnx_path: Path
    card_path: Path
    card: ModelCard

    @property
    def key(self) -> tuple[str, str]:
        return self.card.name, self.card.version


def _visible(path: Path, root: Path) -> bool:
    return not any(part.startswith(".") for part in path.relative_to(root).parts)


def find_models(model_dir: Path) -> list[ModelFiles]:
    """Every model version in ``model_dir`` (both layouts in the module docstring), sorted by name and version.

    A card is a ``<stem>.json`` beside a ``<stem>.onnx``; other JSON files are not cards. Raises
    :class:`ModelLoadError` when a card is unreadable, when a versioned card's name or version disagrees with its
    directories, or when two cards claim the same name and version (which one to serve would be a guess).
    """
    if not model_dir.is_dir():
        raise ModelLoadError(f"model directory not found: {model_dir}")
    found: dict[tuple[str, str], ModelFiles] = {}
    for pattern, versioned in (("*.json", False), ("*/*/*.json", True)):
        for card_path in sorted(model_dir.glob(pattern)):
            onnx_path = card_path.with_suffix(".onnx")
            if not _visible(card_path, model_dir) or not card_path.is_file() or not onnx_path.is_file():
                continue
            card = ModelCard.from_file(card_path)
            if versioned and (card.name, card.version) != (card_path.parent.parent.name, card_path.parent.name):
                raise ModelLoadError(
                    f"{card_path} says {card.name} {card.version} but lies in "
                    f"{card_path.parent.parent.name}/{card_path.parent.name}/: directories must be <name>/<version>/"
                )
            entry = ModelFiles(onnx_path, card_path, card)
            if entry.key in found:
                raise ModelLoadError(
                    f"{card.name} {card.version} is claimed by both {found[entry.key].card_path} and {card_path}"
                )
            found[entry.key] = entry
    return sorted(found.values(), key=lambda m: (m.card.name, version_key(m.card.version)))


def load_files(
    onnx_path: Path,
    card_path: Path,
    *,
    card: ModelCard | None = None,
    intra_op_threads: int = 1,
    inter_op_threads: int = 1,
    warm_up: bool = True,
) -> OnnxClassifier:
    """Load ``onnx_path`` with its card, verify it, and (by default) warm it up."""
    card = card if card is not None else ModelCard.from_file(card_path)
    classifier = OnnxClassifier(onnx_path, card, intra_op_threads=intra_op_threads, inter_op_threads=inter_op_threads)
    if warm_up:
        seconds = classifier.warm_up()
        log.info("loaded %s %s from %s (warm-up %.0f ms)", card.name, card.version, onnx_path, seconds * 1e3)
    return classifier


def load_model(
    model_dir: Path,
    name: str,
    *,
    intra_op_threads: int = 1,
    inter_op_threads: int = 1,
    warm_up: bool = True,
) -> OnnxClassifier:
    """Load ``<model_dir>/<name>.onnx`` with its card, verify it, and (by default) warm it up."""
    onnx_path, card_path = model_paths(model_dir, name)
    return load_files(
        onnx_path, card_path, intra_op_threads=intra_op_threads, inter_op_threads=inter_op_threads, warm_up=warm_up
    )


def load_repository(
    model_dir: Path,
    *,
    intra_op_threads: int = 1,
    inter_op_threads: int = 1,
    warm_up: bool = True,
) -> list[OnnxClassifier]:
    """Load, verify and warm up every model version in ``model_dir``; any failure fails the whole load."""
    found = find_models(model_dir)
    if not found:
        raise ModelLoadError(
            f"no models in {model_dir}: expected <name>.onnx + <name>.json, or <name>/<version>/<name>.onnx + .json"
        )
    return [
        load_files(
            m.onnx_path,
            m.card_path,
            card=m.card,
            intra_op_threads=intra_op_threads,
            inter_op_threads=inter_op_threads,
            warm_up=warm_up,
        )
        for m in found
    ]


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1 or not args[0].endswith(".onnx"):
        print("usage: python -m service.model path/to/<name>.onnx", file=sys.stderr)
        return 2
    path = Path(args[0])
    try:
        classifier = load_model(path.parent, path.stem)
    except ModelLoadError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    x = np.zeros((1, *IMAGE_SHAPE), dtype=np.float32)
    start = time.perf_counter()
    for _ in range(100):
        classifier.predict(x)
    per_call_ms = (time.perf_counter() - start) * 10
    print(json.dumps(classifier.describe(), indent=2))
    print(f"single-image predict: {per_call_ms:.3f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
