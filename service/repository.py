"""The served model set: every model version in the repository, each with its own batcher, swapped whole on reload.

A :class:`ModelSet` is immutable once started. Requests take a *lease* on the set they resolve their model in and
hold it until they are answered; :meth:`ModelRepository.reload` loads and starts a complete new set beside the
old one, swaps it in with one assignment (requests arriving after that see only the new set), then waits for the
old set's leases to end before draining and stopping its batchers. No admitted request is dropped, and a reload that
fails (a corrupt file, a sha256 mismatch, the default model gone) leaves the old set serving and says why.

Nothing here knows about HTTP: the routes resolve and lease, ``service.main`` wires SIGHUP and the admin call in.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from service.batching import InferenceRunner
from service.errors import ModelNotFound, ModelNotReady
from service.metrics import ModelMetrics, ServiceMetrics
from service.model import LoadedModels, ModelLoadError, OnnxClassifier, Problem, version_key
from service.settings import Settings

log = logging.getLogger(__name__)

#: Builds the batcher (or unbatched runner) for one classifier, recording into that model's metrics.
RunnerFactory = Callable[[OnnxClassifier, ModelMetrics], InferenceRunner]
#: Loads the classifiers to serve (blocking: runs in a worker thread), with the versions it had to leave out.
ModelLoader = Callable[[Settings], OnnxClassifier | Sequence[OnnxClassifier] | LoadedModels]


@dataclass(eq=False)
class ServedModel:
    """One model version, the runner that feeds it, and its metrics."""

    classifier: OnnxClassifier
    runner: InferenceRunner
    metrics: ModelMetrics

    @property
    def name(self) -> str:
        return self.classifier.name

    @property
    def version(self) -> str:
        return self.classifier.version


class ModelSet:
    """The model versions served together, the default among them, and the requests currently using them."""

    def __init__(
        self,
        models: Sequence[ServedModel],
        default_name: str,
        default_version: str | None = None,
        problems: Sequence[Problem] = (),
    ) -> None:
        self.problems = list(problems)
        by_name: dict[str, dict[str, ServedModel]] = {}
        for model in models:
            versions = by_name.setdefault(model.name, {})
            if model.version in versions:
                raise ModelLoadError(f"{model.name} {model.version} is loaded twice")
            versions[model.version] = model
        # Highest version last: that is the one a request naming no version gets.
        self._by_name = {
            name: dict(sorted(versions.items(), key=lambda item: version_key(item[0])))
            for name, versions in sorted(by_name.items())
        }
        if default_name not in self._by_name:
            found = ", ".join(self._by_name) or "none"
            why = [str(p) for p in self.problems if p.name == default_name]
            because = f"; it could not be loaded: {'; '.join(why)}" if why else ""
            raise ModelLoadError(f"the default model {default_name!r} is not servable (found: {found}){because}")
        self._pinned = {default_name: default_version} if default_version else {}
        if default_version and default_version not in self._by_name[default_name]:
            why = [str(p) for p in self.problems if (p.name, p.version) == (default_name, default_version)]
            because = f"; it could not be loaded: {'; '.join(why)}" if why else ""
            raise ModelLoadError(
                f"the default model {default_name!r} has no servable version {default_version!r} "
                f"(found: {', '.join(self._by_name[default_name])}){because}"
            )
        self.default = self.resolve(default_name, None)
        self._leases = 0
        self._idle = asyncio.Event()
        self._idle.set()

    def __iter__(self) -> Iterator[ServedModel]:
        for versions in self._by_name.values():
            yield from versions.values()

    def __len__(self) -> int:
        return sum(len(v) for v in self._by_name.values())

    @property
    def names(self) -> list[str]:
        return list(self._by_name)

    def versions(self, name: str) -> list[str]:
        """The versions of ``name``, lowest first (:class:`ModelNotFound` when it is not served)."""
        if name not in self._by_name:
            raise ModelNotFound(f"no model named {name!r} (serving: {', '.join(self._by_name)})")
        return list(self._by_name[name])

    def resolve(self, name: str | None, version: str | None) -> ServedModel:
        """The model a request names: none → the default model; no version → that model's default version."""
        if name is None or name == "":
            if not version:
                return self.default
            name = self.default.name
        versions = self._by_name.get(name)
        if versions is None:
            raise ModelNotFound(f"no model named {name!r} (serving: {', '.join(self._by_name)})")
        if not version:
            version = self._pinned.get(name) or next(reversed(versions))
        model = versions.get(version)
        if model is None:
            raise ModelNotFound(f"model {name!r} has no version {version!r} (versions: {', '.join(versions)})")
        return model

    @contextlib.contextmanager
    def lease(self) -> Iterator[None]:
        """Hold the set while a request uses it: it is not drained before every lease has ended."""
        self._leases += 1
        self._idle.clear()
        try:
            yield
        finally:
            self._leases -= 1
            if self._leases == 0:
                self._idle.set()

    @property
    def leases(self) -> int:
        return self._leases

    @property
    def queue_depth(self) -> int:
        return sum(m.runner.queue_depth for m in self)

    async def start(self) -> None:
        """Start every runner; when one fails, stop those already started and re-raise."""
        started: list[InferenceRunner] = []
        try:
            for model in self:
                await model.runner.start()
                started.append(model.runner)
        except BaseException:
            for runner in started:
                await runner.stop(1.0)
            raise

    async def stop(self, timeout_s: float) -> None:
        """Wait (up to ``timeout_s``) for the requests holding a lease, then drain and stop every runner."""
        deadline = time.monotonic() + timeout_s
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
        except TimeoutError:
            log.warning("%d requests still hold the old models after %.1f s; stopping anyway", self._leases, timeout_s)
        remaining = max(0.1, deadline - time.monotonic())
        await asyncio.gather(*(m.runner.stop(remaining) for m in self))

    def describe(self) -> str:
        return ", ".join(f"{m.name} {m.version}" for m in self)


@dataclass(frozen=True)
class ReloadResult:
    """What a reload did."""

    models: ModelSet
    seconds: float


class ModelRepository:
    """Owns the current :class:`ModelSet`: the first load, reloads (one at a time), and the final drain."""

    def __init__(
        self, settings: Settings, metrics: ServiceMetrics, loader: ModelLoader, make_runner: RunnerFactory
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.loader = loader
        self.make_runner = make_runner
        self.current: ModelSet | None = None
        #: Why the service cannot serve: the first load failed and no reload has succeeded since.
        self.load_error: str | None = None
        #: The message of the last failed reload (None after a successful one).
        self.last_reload_error: str | None = None
        self._lock: asyncio.Lock | None = None
        self._background: set[asyncio.Task[None]] = set()
        self._closing = False
        #: Reloads finished (successful or not), and asked for; a caller can wait for the one after its request.
        self.reloads_done = 0
        self._reload_done: asyncio.Condition | None = None

    @property
    def lock(self) -> asyncio.Lock:
        # Created on first use, inside the loop that serves the app.
        if self._lock is None:
            self._lock = asyncio.Lock()
        return self._lock

    async def _build(self, injected: Sequence[OnnxClassifier] | None) -> ModelSet:
        problems: list[Problem] = []
        if injected is None:
            loaded = await asyncio.to_thread(self.loader, self.settings)
            if isinstance(loaded, LoadedModels):
                classifiers, problems = list(loaded.classifiers), list(loaded.problems)
            else:
                classifiers = [loaded] if isinstance(loaded, OnnxClassifier) else list(loaded)
        else:
            classifiers = list(injected)
        if not classifiers:
            raise ModelLoadError("the loader found no models")
        for classifier in classifiers:
            if not classifier.warmed_up:
                await asyncio.to_thread(classifier.warm_up)
        served = []
        for c in classifiers:
            metrics = self.metrics.for_model(c.name, c.version)
            served.append(ServedModel(c, self.make_runner(c, metrics), metrics))
        default, version = self.settings.model_name, self.settings.model_version
        if injected is not None and len(served) == 1:
            default, version = served[0].name, None  # a model handed in by the caller is the default, named as it is
        models = ModelSet(served, default, version, problems)
        await models.start()
        return models

    def _publish(self, models: ModelSet, old: ModelSet | None = None) -> None:
        keys = {(m.name, m.version) for m in models}
        for m in old or ():
            if (m.name, m.version) not in keys:
                m.metrics.ready.set(0)
        for m in models:
            m.metrics.ready.set(1)
        self.metrics.set_models(
            ((m.name, m.version, m.classifier.sha256, m is models.default) for m in models), len(models.problems)
        )

    async def start(self, classifiers: Sequence[OnnxClassifier] | None = None) -> None:
        """The first load: ``classifiers`` when given (already loaded), else the loader's. Failures are recorded."""
        async with self.lock:
            try:
                models = await self._build(classifiers)
            except ModelLoadError as exc:
                self.load_error = str(exc)
                log.error("cannot serve: %s", exc)
                return
            except Exception as exc:
                self.load_error = f"{type(exc).__name__}: {exc}"
                log.exception("cannot serve: model start-up failed")
                return
            self.current = models
            self._publish(models)

    @property
    def reload_done(self) -> asyncio.Condition:
        if self._reload_done is None:
            self._reload_done = asyncio.Condition()
        return self._reload_done

    async def wait_for_reload(self, after: int, timeout_s: float) -> None:
        """Wait (up to ``timeout_s``) until more than ``after`` reloads have finished."""
        async with self.reload_done:
            await asyncio.wait_for(self.reload_done.wait_for(lambda: self.reloads_done > after), timeout_s)

    async def _finished_one(self) -> None:
        self.reloads_done += 1
        async with self.reload_done:
            self.reload_done.notify_all()

    async def reload(self) -> ReloadResult:
        """Load the repository again, swap the new set in, drain the old one. Raises on failure (old set kept)."""
        try:
            return await self._reload()
        finally:
            await self._finished_one()

    async def _reload(self) -> ReloadResult:
        async with self.lock:
            if self._closing:
                raise ModelNotReady("shutting down: no reload")
            started = time.perf_counter()
            try:
                models = await self._build(None)
                if self._closing:  # shutdown began while the new set loaded: it must not outlive the process
                    await models.stop(0.1)
                    raise ModelNotReady("shutting down: the reloaded models were not swapped in")
                if models.problems:  # a reload is all or nothing: what serves now must not silently shrink
                    await models.stop(0.1)
                    raise ModelLoadError("; ".join(map(str, models.problems)))
            except Exception as exc:
                message = str(exc) if isinstance(exc, ModelLoadError) else f"{type(exc).__name__}: {exc}"
                self.last_reload_error = message
                self.metrics.reloads.labels(result="failed").inc()
                serving = self.current.describe() if self.current is not None else "nothing"
                log.error("reload failed, still serving %s: %s", serving, message)
                raise
            old, self.current = self.current, models
            self.load_error = self.last_reload_error = None
            self._publish(models, old)
            self.metrics.reloads.labels(result="ok").inc()
            log.info(
                "reloaded: now serving %s (default %s %s)",
                models.describe(),
                models.default.name,
                models.default.version,
            )
            for problem in models.problems:
                log.warning("reload left out %s", problem)
            if old is not None:
                await old.stop(self.settings.shutdown_timeout_s)
                log.info("drained the previous model set")
            return ReloadResult(models, time.perf_counter() - started)

    def reload_in_background(self) -> None:
        """For the SIGHUP handler: reload without anyone waiting; the outcome goes to the log and the metrics."""

        async def run() -> None:
            with contextlib.suppress(Exception):  # already logged and counted by reload()
                await self.reload()

        task = asyncio.get_running_loop().create_task(run(), name="mnist-model-reload")
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def stop(self, timeout_s: float) -> None:
        """Shutdown: no more reloads; a reload in progress gets ``timeout_s`` to finish (then it is cancelled and
        whatever it started is stopped), then the current set's runners drain in what is left of ``timeout_s``."""
        self._closing = True
        deadline = time.monotonic() + timeout_s
        if self._background:
            _, pending = await asyncio.wait(set(self._background), timeout=timeout_s)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=1.0)
        if self.current is not None:
            remaining = max(0.1, deadline - time.monotonic())
            await asyncio.gather(*(m.runner.stop(remaining) for m in self.current))
            for m in self.current:
                m.metrics.ready.set(0)
