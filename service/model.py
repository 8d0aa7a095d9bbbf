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
import threading
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
#: The graph output holding the ten digit probabilities (the first output when none has this name).
PROBABILITIES = "probabilities"

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
class VerdictRule:
    """How an answer becomes ``digit``, ``unsure`` or ``not_a_digit`` (the card's ``trust.verdict``).

    ``not_a_digit`` when the model has an out-of-distribution output and its score reaches
    ``not_a_digit_at_or_above``; else ``unsure`` when the top probability is below ``unsure_below_confidence``;
    else ``digit``. A card without the section gives a rule that always says ``digit``.
    """

    ood_output: str | None = None
    not_a_digit_at_or_above: float | None = None
    unsure_below_confidence: float = 0.0

    @classmethod
    def from_card(cls, doc: Mapping[str, Any], path: Path) -> VerdictRule:
        trust = doc.get("trust")
        verdict = trust.get("verdict") if isinstance(trust, dict) else None
        if verdict is None:
            return cls()
        if not isinstance(verdict, dict):
            raise ModelLoadError(f"model card {path.name}: trust.verdict is not an object")
        ood, at_or_above = verdict.get("ood_output"), verdict.get("not_a_digit_at_or_above")
        unsure = verdict.get("unsure_below_confidence", 0.0)
        if ood is not None and not isinstance(ood, str):
            raise ModelLoadError(f"model card {path.name}: trust.verdict.ood_output must be an output name or null")
        if (ood is None) != (at_or_above is None):
            raise ModelLoadError(f"model card {path.name}: trust.verdict needs both ood_output and its threshold")
        for name, value in (("not_a_digit_at_or_above", at_or_above), ("unsure_below_confidence", unsure)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)):
                raise ModelLoadError(f"model card {path.name}: trust.verdict.{name} must be a number")
        return cls(ood, None if at_or_above is None else float(at_or_above), float(unsure))

    def codes(self, confidence: FloatArray, ood: FloatArray | None) -> npt.NDArray[np.int8]:
        """Each image's verdict as 0 ``digit``, 1 ``unsure`` or 2 ``not_a_digit`` (the order of
        :data:`service.metrics.VERDICTS`), from its top probability and its OOD score (None: the model has none)."""
        codes = (confidence < self.unsure_below_confidence).astype(np.int8)
        if self.not_a_digit_at_or_above is not None and ood is not None:
            codes[ood >= self.not_a_digit_at_or_above] = 2
        return codes


@dataclass(frozen=True)
class ModelCard:
    """The parts of ``<name>.json`` the service relies on, plus the whole document for /v1/models."""

    name: str
    version: str
    sha256: str
    created: str | None = None
    metrics: Mapping[str, Any] = field(default_factory=dict)
    raw: Mapping[str, Any] = field(default_factory=dict)
    verdict: VerdictRule = field(default_factory=VerdictRule)

    @classmethod
    def from_file(cls, path: Path) -> ModelCard:
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError as exc:
            raise ModelLoadError(f"model card not found: {path.name}") from exc
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"model card {path.name} is not readable JSON: {exc}") from exc
        if not isinstance(doc, dict):
            raise ModelLoadError(f"model card {path.name} is not a JSON object")
        onnx_part = doc.get("onnx") if isinstance(doc.get("onnx"), dict) else {}
        sha = onnx_part.get("sha256") if isinstance(onnx_part, dict) else None
        required = (("name", doc.get("name")), ("version", doc.get("version")), ("onnx.sha256", sha))
        missing = [key for key, value in required if not value]
        if missing:
            raise ModelLoadError(f"model card {path.name} lacks {', '.join(missing)}")
        metrics = doc.get("metrics") if isinstance(doc.get("metrics"), dict) else {}
        return cls(
            name=str(doc["name"]),
            version=str(doc["version"]),
            sha256=str(sha).lower(),
            created=str(doc["created"]) if doc.get("created") else None,
            metrics=metrics or {},
            raw=doc,
            verdict=VerdictRule.from_card(doc, path),
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


_shared_arena = threading.Lock()
_shared_arena_ready = False


def _share_one_arena() -> None:
    """Register one CPU arena for the whole process, once: every session (each model, each thread count) allocates
    its activations from it instead of keeping an arena of its own the size of its largest run (about 15 MB saved
    for the two shipped models with their two sessions each)."""
    global _shared_arena_ready
    with _shared_arena:
        if _shared_arena_ready:
            return
        memory = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
        ort.create_and_register_allocator(memory, ort.OrtArenaCfg(0, -1, -1, -1))
        _shared_arena_ready = True


def session_options(intra_op_threads: int = 1, inter_op_threads: int = 1) -> ort.SessionOptions:
    """Options for a latency-oriented CPU service sharing its cores with the web server."""
    _share_one_arena()
    options = ort.SessionOptions()
    options.add_session_config_entry("session.use_env_allocators", "1")
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

    Two sessions share the graph: one with ``intra_op_threads`` for small runs (single requests, micro-batches:
    the other cores serve HTTP meanwhile) and, when ``wide_threads`` is more, one with that many threads for the
    runs of large requests (a 1,000-image batch should use every core). ``scores`` answers one row per image:
    the ten probabilities, then the out-of-distribution score when the card's verdict rule names one
    (:attr:`score_columns`). Everything here is thread-safe (onnxruntime sessions are) and blocking: call it off
    the event loop.
    """

    def __init__(
        self,
        onnx_path: Path,
        card: ModelCard,
        *,
        intra_op_threads: int = 1,
        inter_op_threads: int = 1,
        wide_threads: int = 0,
        verify_sha256: bool = True,
    ) -> None:
        if not onnx_path.is_file():
            raise ModelLoadError(f"model file not found: {onnx_path.name}")
        self.path = onnx_path
        self.card = card
        self.sha256 = sha256_file(onnx_path)
        if verify_sha256 and self.sha256 != card.sha256:
            raise ModelLoadError(
                f"{onnx_path.name} has sha256 {self.sha256} but its model card says {card.sha256}: refusing to serve it"
            )
        self._session = self._open(intra_op_threads, inter_op_threads)
        self._wide = self._open(wide_threads, inter_op_threads) if wide_threads > intra_op_threads else self._session
        self.intra_op_threads, self.wide_threads = intra_op_threads, max(wide_threads, intra_op_threads)
        inputs, outputs = self._session.get_inputs(), self._session.get_outputs()
        if len(inputs) != 1 or len(outputs) < 1:
            raise ModelLoadError(f"expected one input and an output, got {len(inputs)} inputs, {len(outputs)} outputs")
        self.input = _spec(inputs[0])
        by_name = {spec.name: spec for spec in map(_spec, outputs)}
        self.output = by_name.get(PROBABILITIES, _spec(outputs[0]))
        if tuple(self.input.shape[1:]) != IMAGE_SHAPE or self.input.dtype != "float32":
            raise ModelLoadError(f"input {self.input} is not float32 [batch, 28, 28, 1]")
        if len(self.output.shape) != 2 or self.output.shape[1] != NUM_CLASSES:
            raise ModelLoadError(f"output {self.output} is not [batch, {NUM_CLASSES}]")
        self.verdict = card.verdict
        self.ood_output: TensorSpec | None = None
        if self.verdict.ood_output is not None:
            self.ood_output = by_name.get(self.verdict.ood_output)
            if self.ood_output is None or len(self.ood_output.shape) != 1:
                raise ModelLoadError(
                    f"the card's verdict reads output {self.verdict.ood_output!r}, which the graph does not have "
                    f"as a [batch] tensor (outputs: {', '.join(by_name)})"
                )
        self._fetch = [self.output.name] + ([self.ood_output.name] if self.ood_output is not None else [])
        #: Columns of a :meth:`scores` row: the ten probabilities, then the OOD score when there is one.
        self.score_columns = NUM_CLASSES + (self.ood_output is not None)
        self.warmed_up = False

    def _open(self, intra_op_threads: int, inter_op_threads: int) -> ort.InferenceSession:
        try:
            return ort.InferenceSession(
                str(self.path),
                sess_options=session_options(intra_op_threads, inter_op_threads),
                providers=["CPUExecutionProvider"],
            )
        except Exception as exc:  # onnxruntime raises its own untyped errors for corrupt graphs
            raise ModelLoadError(f"onnxruntime cannot load {self.path.name}: {exc}") from exc

    @property
    def name(self) -> str:
        return self.card.name

    @property
    def version(self) -> str:
        return self.card.version

    def predict(self, images: FloatArray) -> FloatArray:
        """Class probabilities float32 [N, 10] for images float32 [N, 28, 28, 1] (0 = background, 1 = ink)."""
        return self.scores(images)[:, :NUM_CLASSES]

    def scores(self, images: FloatArray, wide: bool = False) -> FloatArray:
        """float32 [N, :attr:`score_columns`] for images float32 [N, 28, 28, 1], in runs of :data:`MAX_RUN_BATCH`.

        ``wide``: use the session with ``wide_threads`` threads (for large requests)."""
        if images.ndim != 4 or images.shape[1:] != IMAGE_SHAPE or images.shape[0] < 1:
            raise ValueError(f"expected float32 [N, 28, 28, 1] with N >= 1, got {images.dtype} {images.shape}")
        x = np.ascontiguousarray(images, dtype=np.float32)
        outputs = [self.run(x[i : i + MAX_RUN_BATCH], wide) for i in range(0, len(x), MAX_RUN_BATCH)]
        return outputs[0] if len(outputs) == 1 else np.concatenate(outputs)

    def run(self, x: FloatArray, wide: bool = False) -> FloatArray:
        """One onnxruntime run over a contiguous float32 [n, 28, 28, 1] (the caller keeps n small)."""
        session = self._wide if wide else self._session
        outputs = session.run(self._fetch, {self.input.name: x})
        probs = np.asarray(outputs[0], dtype=np.float32)
        if len(outputs) == 1:
            return probs
        return np.concatenate([probs, np.asarray(outputs[1], dtype=np.float32).reshape(-1, 1)], axis=1)

    def warm_up(self, batch_sizes: Sequence[int] = (1,)) -> float:
        """Run each session once on dummy images, so the first real request does not pay for first-run set-up;
        returns seconds taken.

        One image is enough: what a first run costs beyond its compute is the same at any batch size (about 1 ms
        on the shipped CNN), and larger runs would only spend start-up time computing (a run of 64 on both
        sessions took 170 ms of a worker's 300 ms start)."""
        start = time.perf_counter()
        for n in batch_sizes:
            self.scores(np.zeros((n, *IMAGE_SHAPE), dtype=np.float32))
            if self._wide is not self._session:
                self.scores(np.zeros((n, *IMAGE_SHAPE), dtype=np.float32), wide=True)
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
            "trust": _trust_summary(self.card.raw.get("trust")),
        }


def _trust_summary(trust: Any) -> dict[str, Any] | None:
    """The card's calibration, out-of-distribution and selective-answer figures, for /v1/models."""
    if not isinstance(trust, dict):
        return None
    return {key: trust[key] for key in ("verdict", "calibration", "ood", "selective", "cost") if key in trust}


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


@dataclass(frozen=True)
class Problem:
    """A model version, or a file that claims to be one, that the repository could not serve, and why.

    ``where`` is relative to the model directory: problems are shown to clients, and absolute paths are not theirs.
    """

    where: str
    reason: str
    name: str | None = None
    version: str | None = None

    def __str__(self) -> str:
        return f"{self.where}: {self.reason}"


@dataclass
class Scan:
    """What a repository scan found: model versions to load, and what had to be left out."""

    models: list[ModelFiles] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)


@dataclass
class LoadedModels:
    """The classifiers a repository load produced, and the model versions it had to leave out."""

    classifiers: list[OnnxClassifier] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)


def _looks_like_a_card(path: Path) -> bool:
    """A JSON file with a name, a version and an onnx section: a card, even when its model file is missing."""
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(doc, dict) and all(key in doc for key in ("name", "version", "onnx"))


def scan_models(model_dir: Path) -> Scan:
    """Every model version in ``model_dir`` (both layouts in the module docstring), sorted by name and version.

    A card is a ``<stem>.json`` beside a ``<stem>.onnx``; other JSON files are not cards, except that a card
    whose model file is missing is reported, not ignored. An unreadable card, a versioned card whose name or
    version disagrees with its directories, and two cards claiming the same name and version (which one to serve
    would be a guess) are reported as problems and left out; the rest of the repository stays servable.
    """
    if not model_dir.is_dir():
        raise ModelLoadError(f"model directory not found: {model_dir.name}/")
    scan = Scan()
    found: dict[tuple[str, str], ModelFiles] = {}
    duplicates: set[tuple[str, str]] = set()
    for pattern, versioned in (("*.json", False), ("*/*/*.json", True)):
        for card_path in sorted(model_dir.glob(pattern)):
            onnx_path = card_path.with_suffix(".onnx")
            where = str(card_path.relative_to(model_dir))
            if not _visible(card_path, model_dir) or not card_path.is_file():
                continue
            if not onnx_path.is_file():
                if _looks_like_a_card(card_path):
                    scan.problems.append(Problem(where, f"its model file {onnx_path.name} is missing"))
                continue
            try:
                card = ModelCard.from_file(card_path)
            except ModelLoadError as exc:
                scan.problems.append(Problem(where, str(exc).replace(str(card_path), where)))
                continue
            if versioned and (card.name, card.version) != (card_path.parent.parent.name, card_path.parent.name):
                scan.problems.append(
                    Problem(
                        where,
                        f"the card says {card.name} {card.version} but lies in {card_path.parent.parent.name}/"
                        f"{card_path.parent.name}/: directories must be <name>/<version>/",
                        card.name,
                        card.version,
                    )
                )
                continue
            entry = ModelFiles(onnx_path, card_path, card)
            if entry.key in found:
                duplicates.add(entry.key)
                first = found[entry.key].card_path.relative_to(model_dir)
                scan.problems.append(
                    Problem(where, f"{card.name} {card.version} is also claimed by {first}", card.name, card.version)
                )
                continue
            found[entry.key] = entry
    for key in duplicates:  # neither claimant is served
        del found[key]
    scan.models = sorted(found.values(), key=lambda m: (m.card.name, version_key(m.card.version)))
    return scan


def find_models(model_dir: Path) -> list[ModelFiles]:
    """The model versions :func:`scan_models` finds; raises :class:`ModelLoadError` on its first problem."""
    scan = scan_models(model_dir)
    if scan.problems:
        raise ModelLoadError(str(scan.problems[0]))
    return scan.models


def load_files(
    onnx_path: Path,
    card_path: Path,
    *,
    card: ModelCard | None = None,
    intra_op_threads: int = 1,
    inter_op_threads: int = 1,
    wide_threads: int = 0,
    warm_up: bool = True,
) -> OnnxClassifier:
    """Load ``onnx_path`` with its card, verify it, and (by default) warm it up."""
    card = card if card is not None else ModelCard.from_file(card_path)
    classifier = OnnxClassifier(
        onnx_path,
        card,
        intra_op_threads=intra_op_threads,
        inter_op_threads=inter_op_threads,
        wide_threads=wide_threads,
    )
    if warm_up:
        seconds = classifier.warm_up()
        log.info("loaded %s %s from %s (warm-up %.0f ms)", card.name, card.version, onnx_path.name, seconds * 1e3)
    return classifier


def load_model(
    model_dir: Path,
    name: str,
    *,
    intra_op_threads: int = 1,
    inter_op_threads: int = 1,
    wide_threads: int = 0,
    warm_up: bool = True,
) -> OnnxClassifier:
    """Load ``<model_dir>/<name>.onnx`` with its card, verify it, and (by default) warm it up."""
    onnx_path, card_path = model_paths(model_dir, name)
    return load_files(
        onnx_path,
        card_path,
        intra_op_threads=intra_op_threads,
        inter_op_threads=inter_op_threads,
        wide_threads=wide_threads,
        warm_up=warm_up,
    )


def load_repository(
    model_dir: Path,
    *,
    intra_op_threads: int = 1,
    inter_op_threads: int = 1,
    wide_threads: int = 0,
    warm_up: bool = True,
) -> LoadedModels:
    """Load, verify and warm up every model version in ``model_dir``.

    A version that cannot be loaded (a corrupt file, a sha256 that is not its card's, a broken card) is left out
    and reported in :attr:`LoadedModels.problems`; whether the rest can serve is the caller's decision (the
    default model must be among them). No model at all is a :class:`ModelLoadError`.
    """
    scan = scan_models(model_dir)
    loaded = LoadedModels(problems=list(scan.problems))
    for m in scan.models:
        try:
            loaded.classifiers.append(
                load_files(
                    m.onnx_path,
                    m.card_path,
                    card=m.card,
                    intra_op_threads=intra_op_threads,
                    inter_op_threads=inter_op_threads,
                    wide_threads=wide_threads,
                    warm_up=warm_up,
                )
            )
        except ModelLoadError as exc:
            where = str(m.card_path.relative_to(model_dir))
            loaded.problems.append(Problem(where, str(exc), m.card.name, m.card.version))
    for problem in loaded.problems:
        log.warning("model repository: left out %s", problem)
    if not loaded.classifiers:
        detail = f" ({'; '.join(map(str, loaded.problems))})" if loaded.problems else ""
        raise ModelLoadError(
            f"no servable models in {model_dir.name}/: expected <name>.onnx + <name>.json, "
            f"or <name>/<version>/<name>.onnx + .json{detail}"
        )
    return loaded


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
