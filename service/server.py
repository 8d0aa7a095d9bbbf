"""The HTTP server: uvicorn with connection limits, in one process or several sharing the port.

    mnist-serve                       # = service.server:main; MNIST_SERVE_WORKERS=0: one worker per usable CPU
    python -m service                 # the same
    kill -HUP <pid>                   # reload the models in every worker without dropping a request
    kill -TERM <pid>                  # stop accepting, answer what was admitted, exit 0

**Connection limits** (:class:`LimitedHttpToolsProtocol`, uvicorn's httptools protocol with four additions), so
that no client can hold memory, file descriptors or a worker's attention for free:

- a request line and headers larger than ``MNIST_SERVE_MAX_HEADER_BYTES`` are answered 431 and the connection
  closed as soon as the limit is passed (nothing larger is ever buffered);
- a connection must deliver a request's line and headers within ``MNIST_SERVE_HEADER_TIMEOUT_S`` of opening (or of
  its first byte, on a kept-alive connection): else 408 (or a plain close when it sent nothing);
- once its headers are in, a request's body must arrive within ``MNIST_SERVE_BODY_TIMEOUT_S``: else 408;
- at most ``MNIST_SERVE_MAX_CONNECTIONS`` connections per worker: a new one over the limit closes the oldest
  connection that is not running a request (idle, or still trickling its headers), so probes and new clients get
  through while every admitted request finishes. Idle kept-alive connections close after
  ``MNIST_SERVE_KEEP_ALIVE_TIMEOUT_S`` (uvicorn's own timer).

**Workers.** With more than one worker (the default on a machine with several CPUs) this process becomes a small
supervisor: it binds the port once, starts the workers (each a full service: models, batchers, event loop),
forwards SIGHUP to all of them (each reloads its models in place) and SIGTERM/SIGINT (each drains, then exits),
restarts a worker that dies, and keeps the metrics of all of them in one directory so that /metrics in any worker
answers for the whole server (prometheus-client's multiprocess mode).

The supervisor imports the app's modules once (:data:`PRELOAD`: FastAPI, numpy, onnxruntime...) and forks the
workers from itself, so a worker starts with them already loaded and only builds its app and loads its models:
ready in about half the time of workers that import everything again, and the imported pages stay shared. The
supervisor creates no onnxruntime session, gRPC server or thread pool of its own, which is what makes forking it
safe; the workers create theirs after the fork.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import glob
import importlib
import logging
import multiprocessing
import os
import resource
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing.context import ForkProcess
from socket import socket
from types import FrameType
from typing import Any, cast

import uvicorn
from pydantic import ValidationError
from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from service.cpus import usable_cpus
from service.logformat import log_config
from service.settings import SUPERVISOR_ENV, Settings, describe_settings

log = logging.getLogger("service.server")

#: prometheus-client's multiprocess directory variable (service.metrics reads it; not imported here on purpose).
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
#: uvicorn's exit code for a server that could not start (its lifespan failed, its socket could not be used).
STARTUP_FAILURE = 3
#: A worker that dies this many times within RESTART_WINDOW_S seconds is not restarted again: the server stops.
MAX_RESTARTS, RESTART_WINDOW_S = 5, 60.0
#: prctl(2) option: the signal a process gets when its parent dies.
PR_SET_PDEATHSIG = 1
#: What the supervisor imports before it forks the workers (after setting up prometheus-client's multiprocess mode,
#: which prometheus-client reads when it is imported).
PRELOAD = ("service.main",)
#: Signals a worker takes only once its own handlers are in place (blocked from before the fork until then).
WORKER_SIGNALS = {signal.SIGHUP, signal.SIGTERM, signal.SIGINT}


@dataclass(frozen=True)
class ConnectionLimits:
    max_header_bytes: int = 16 * 1024
    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    max_connections: int = 1024
    drain_s: float = 10.0

    @classmethod
    def from_settings(cls, settings: Settings) -> ConnectionLimits:
        return cls(
            settings.max_header_bytes,
            settings.header_timeout_s,
            settings.body_timeout_s,
            settings.max_connections,
            settings.shutdown_timeout_s,
        )


def _response(status: int, reason: str, message: str) -> bytes:
    body = f'{{"error":{{"code":"{reason}","message":"{message}"}}}}'.encode()
    head = (
        f"HTTP/1.1 {status} {reason.replace('_', ' ').title()}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
    ).encode()
    return head + body


class CoalescingTransport:
    """Writes made in one turn of the event loop leave as one.

    uvicorn writes a response's head when the app sends ``http.response.start`` and its body on
    ``http.response.body``: two system calls and two packets for every small answer. Held until the end of the turn
    (``call_soon``), they go out together; closing flushes first. Everything else is the transport's own.
    """

    __slots__ = ("_loop", "_pending", "_transport")

    def __init__(self, transport: Any, loop: Any) -> None:
        self._transport = transport
        self._loop = loop
        self._pending: list[bytes] | None = None

    def write(self, data: bytes) -> None:
        if self._pending is None:
            self._pending = [data]
            self._loop.call_soon(self._flush)
        else:
            self._pending.append(data)

    def _flush(self) -> None:
        pending, self._pending = self._pending, None
        if pending and not self._transport.is_closing():
            self._transport.write(pending[0] if len(pending) == 1 else b"".join(pending))

    def close(self) -> None:
        self._flush()
        self._transport.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class LimitedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a header size cap, header and body deadlines and a connection cap."""

    #: This worker's connections not running a request, least recently active first (dicts keep insertion order):
    #: the one to close when a new connection passes the cap, found without scanning them all.
    idle: dict[LimitedHttpToolsProtocol, None] = {}  # noqa: RUF012 (one event loop per process)
    #: Connections whose request body is still arriving, the one that made progress longest ago first: when no
    #: connection is idle, the most stalled of these is closed (408) so that a newcomer, a probe say, gets in.
    receiving: dict[LimitedHttpToolsProtocol, None] = {}  # noqa: RUF012

    def __init__(self, config: Config, *args: Any, **kwargs: Any) -> None:
        super().__init__(config, *args, **kwargs)
        self.limits: ConnectionLimits = getattr(config, "mnist_limits", None) or ConnectionLimits()
        self.in_headers = True
        self.header_bytes = 0
        self.deadline: Any = None  # the armed deadline's timer handle (asyncio's or uvloop's)

    # --- the connection cap ------------------------------------------------------------------------------------

    def connection_made(self, transport: Any) -> None:
        super().connection_made(cast(asyncio.Transport, CoalescingTransport(transport, self.loop)))
        if len(self.connections) > self.limits.max_connections:
            self._evict_one()
        self.idle[self] = None
        self._arm(self.limits.header_timeout_s, self._header_timeout)

    def _evict_one(self) -> None:
        if not LimitedHttpToolsProtocol.warned:
            self.logger.warning(
                "over %d connections: closing the least recently active idle ones", self.limits.max_connections
            )
            LimitedHttpToolsProtocol.warned = True
        victim = next(iter(self.idle), None)
        if victim is not None:
            self.idle.pop(victim)
            victim.transport.close()
            _closed("evicted")
            return
        stalled = next(iter(self.receiving), None)
        if stalled is not None:  # nobody idle: the body that has made no progress for longest goes, with a 408
            stalled._body_timeout()
            return
        self.transport.close()  # every other connection is running a request the service has read: the newcomer goes
        _closed("over_capacity")

    warned = False

    # --- deadlines ---------------------------------------------------------------------------------------------

    def _arm(self, seconds: float, handler: Any) -> None:
        self._disarm()
        self.deadline = self.loop.call_later(seconds, handler)

    def _disarm(self) -> None:
        if self.deadline is not None:
            self.deadline.cancel()
            self.deadline = None

    def _header_timeout(self) -> None:
        self.deadline = None
        if self.transport.is_closing() or not self.in_headers:
            return
        if self.header_bytes:  # a request was started and never finished its headers
            self.transport.write(_response(408, "request_timeout", "the request headers took too long"))
        self.transport.close()
        _closed("header_timeout" if self.header_bytes else "idle_timeout")

    def _body_timeout(self) -> None:
        self.deadline = None
        self.receiving.pop(self, None)
        cycle = self.cycle
        if self.transport.is_closing() or cycle is None:
            return
        if cycle.response_complete:  # answered early (401, 413, 503…), and still sending a body nobody reads
            self.transport.close()
            _closed("body_timeout")
            return
        self.logger.info("a request body did not arrive within %.0f s: 408", self.limits.body_timeout_s)
        started = cycle.response_started
        # The application sees a disconnect (its receive() returns http.disconnect) and anything it still sends is
        # dropped; the client gets the 408 instead.
        cycle.disconnected = True
        cycle.message_event.set()
        if not started:
            self.transport.write(_response(408, "request_timeout", "the request body took too long"))
        self.transport.close()
        _closed("body_timeout")

    # --- parsing -----------------------------------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self.in_headers:
            self.header_bytes += len(data)
        super().data_received(data)
        if self.in_headers and self.header_bytes > self.limits.max_header_bytes and not self.transport.is_closing():
            message = f"the request line and headers are larger than {self.limits.max_header_bytes} bytes"
            self.transport.write(_response(431, "request_header_fields_too_large", message))
            self.transport.close()
            _closed("headers_too_large")

    def on_message_begin(self) -> None:
        super().on_message_begin()
        # From its first byte, a request's line and headers get the header time (a kept-alive connection's idle
        # time before it is limited apart, in on_response_complete).
        self._arm(self.limits.header_timeout_s, self._header_timeout)

    def on_headers_complete(self) -> None:
        self.in_headers = False
        self.idle.pop(self, None)
        self._disarm()
        size = len(self.url) + sum(len(name) + len(value) + 4 for name, value in self.headers)
        if size > self.limits.max_header_bytes:  # it all came in one read: answer 431 instead of the app
            _closed("headers_too_large")
            app, self.app = self.app, _headers_too_large(self.limits.max_header_bytes)
            try:
                super().on_headers_complete()
            finally:
                self.app = app
            return
        super().on_headers_complete()
        if self.cycle is not None and self.cycle.more_body and _has_body(self.headers):
            self._arm(self.limits.body_timeout_s, self._body_timeout)
            self.receiving[self] = None

    def on_body(self, body: bytes) -> None:
        super().on_body(body)
        if self in self.receiving:  # progress: it goes to the back of the line of stalled bodies
            del self.receiving[self]
            self.receiving[self] = None

    def on_message_complete(self) -> None:
        self._disarm()
        self.receiving.pop(self, None)
        super().on_message_complete()
        self.in_headers = True
        self.header_bytes = 0

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self.transport.is_closing() or (self.cycle is not None and not self.cycle.response_complete):
            return  # closing, or a pipelined request has just started: not idle
        self.idle[self] = None  # kept alive: idle again, the most recently active
        if self.in_headers:
            # uvicorn's keep-alive timer is cancelled by any byte, even a bare CRLF that starts no request: the
            # header time bounds a kept-alive connection's silence too. (A body still arriving after an early answer
            # keeps its body deadline.)
            self._arm(self.limits.header_timeout_s, self._header_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        self.idle.pop(self, None)
        self.receiving.pop(self, None)
        super().connection_lost(exc)

    @classmethod
    def shorten_body_deadlines(cls, seconds: float) -> None:
        """Shutdown: bodies still arriving must be done within ``seconds`` (the drain), or get 408 — not uvicorn's
        cancellation, a 500, when its graceful timeout passes."""
        for connection in list(cls.receiving):
            connection._arm(seconds, connection._body_timeout)


def _headers_too_large(limit: int) -> Any:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        answer = _response(
            431, "request_header_fields_too_large", f"the request line and headers are larger than {limit} bytes"
        )
        head, _, body = answer.partition(b"\r\n\r\n")
        headers = [tuple(line.split(b": ", 1)) for line in head.split(b"\r\n")[1:]]
        await send({"type": "http.response.start", "status": 431, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    return app


def _has_body(headers: Sequence[tuple[bytes, bytes]]) -> bool:
    for name, value in headers:
        if name == b"content-length":
            return value.strip() not in (b"0", b"")
        if name == b"transfer-encoding":
            return True
    return False


# --- configuration -------------------------------------------------------------------------------------------


def raise_file_limit(wanted: int) -> int:
    """Raise the soft open-files limit towards ``wanted`` (never above the hard limit); return the soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if target > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return soft


def uvicorn_config(settings: Settings) -> Config:
    config = Config(
        "service.main:app_from_env",
        factory=True,
        host=settings.host,
        port=settings.port,
        http=LimitedHttpToolsProtocol,
        loop="uvloop",
        lifespan="on",
        log_level=settings.log_level,
        log_config=log_config(settings.log_level, settings.log_format),
        access_log=False,  # the request log (service.logs) replaces uvicorn's
        timeout_keep_alive=max(1, round(settings.keep_alive_timeout_s)),
        # A little longer than the service's own drain, which answers 503 to what is left when its time is up: uvicorn
        # cancelling a request still in the app would answer 500.
        timeout_graceful_shutdown=max(1, round(settings.shutdown_timeout_s + 2)),
        server_header=False,
    )
    config.mnist_limits = ConnectionLimits.from_settings(settings)  # type: ignore[attr-defined]
    return config


def worker_count(settings: Settings) -> int:
    return settings.workers or usable_cpus()


# --- one process ----------------------------------------------------------------------------------------------


def _stop(signum: int, _frame: FrameType | None) -> None:
    raise SystemExit(0)


def _exit_zero_on_stop_signals() -> None:
    """Make SIGTERM/SIGINT end the process with status 0 once uvicorn has shut down gracefully.

    uvicorn installs its own handlers while it serves (stop accepting, finish in-flight requests, run the lifespan
    shutdown that drains the batchers), then restores the previous handlers and re-raises the signal so the
    default action happens. The default for SIGTERM is death by signal, which process managers report as a crash;
    the shutdown was orderly, so the handler found then exits with 0.
    """
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, _stop)


#: Called when the server starts shutting down (SIGTERM), before uvicorn waits for the HTTP requests in flight: the
#: app registers what must start draining at the same moment (gRPC, readiness), so the drains overlap, not add up.
SHUTDOWN_STARTED: list[Callable[[], None]] = []


class _Server(uvicorn.Server):
    async def shutdown(self, sockets: list[socket] | None = None) -> None:
        limits = getattr(self.config, "mnist_limits", None) or ConnectionLimits()
        LimitedHttpToolsProtocol.shorten_body_deadlines(limits.drain_s)
        for hook in SHUTDOWN_STARTED:
            try:
                hook()
            except Exception:
                log.exception("a shutdown hook failed")
        await super().shutdown(sockets)


#: Called with a reason each time the server closes a connection to hold a limit, before (or instead of) the app
#: seeing a request — :data:`CLOSE_REASONS` — so that the app can count them (these never reach its middleware).
CONNECTION_CLOSED: list[Callable[[str], None]] = []
CLOSE_REASONS = ("header_timeout", "idle_timeout", "headers_too_large", "body_timeout", "evicted", "over_capacity")


def _closed(reason: str) -> None:
    for hook in CONNECTION_CLOSED:
        try:
            hook(reason)
        except Exception:
            log.exception("a connection hook failed")


#: SIGHUP arrived before the app could take it (while it imports and loads): it reloads once it serves.
EARLY_RELOAD = threading.Event()


def _hup_before_the_app(signum: int, _frame: FrameType | None) -> None:
    EARLY_RELOAD.set()


def _serve(config: Config, sockets: list[socket] | None = None) -> None:
    """Run one server (in this process, or in a worker the supervisor started) until it is told to stop."""
    _exit_zero_on_stop_signals()
    signal.signal(signal.SIGHUP, _hup_before_the_app)  # SIGHUP's default action would end the process
    signal.pthread_sigmask(signal.SIG_UNBLOCK, WORKER_SIGNALS)  # blocked by the supervisor until now (see there)
    if sockets is not None:
        _stop_with_the_supervisor()
    _Server(config).run(sockets=sockets)


def _worker(config: Config, sock: socket) -> None:
    """A worker's life, in the process forked from the supervisor (multiprocessing turns a SystemExit, such as
    uvicorn's STARTUP_FAILURE, into the exit status)."""
    _serve(config, [sock])


def _stop_with_the_supervisor() -> None:
    """A worker gets SIGTERM (and drains) when its supervisor dies, even by SIGKILL: no orphan keeps the port."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: the supervisor's own shutdown still stops the workers
        return
    supervisor = os.environ.get(SUPERVISOR_ENV)
    if supervisor and os.getppid() != int(supervisor):  # it died before the call above took effect
        os.kill(os.getpid(), signal.SIGTERM)


# --- several processes ---------------------------------------------------------------------------------------


class Supervisor:
    """Starts the workers on one bound socket, forwards signals, restarts the ones that die (see the docstring)."""

    def __init__(self, config: Config, workers: int, drain_s: float) -> None:
        self.config = config
        self.workers = workers
        self.drain_s = drain_s
        self.processes: list[ForkProcess] = []
        self.stopping = False
        self.reload_requested = False

    def _start_worker(self, sock: socket) -> ForkProcess:
        process = multiprocessing.get_context("fork").Process(target=_worker, args=(self.config, sock))
        # The worker starts with SIGHUP, SIGTERM and SIGINT blocked until _serve has its own handlers in place: a
        # reload or a stop asked for meanwhile waits for them, instead of reaching the supervisor's handlers (which
        # the fork copied) or SIGHUP's default action (which would end it).
        signal.pthread_sigmask(signal.SIG_BLOCK, WORKER_SIGNALS)
        try:
            process.start()
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, WORKER_SIGNALS)
        return process

    def _on_stop(self, signum: int, _frame: FrameType | None) -> None:
        self.stopping = True

    def _on_hup(self, signum: int, _frame: FrameType | None) -> None:
        self.reload_requested = True

    def run(self) -> int:
        metrics_dir = tempfile.mkdtemp(prefix="mnist-serve-metrics-")
        os.environ[MULTIPROC_ENV] = metrics_dir
        os.environ[SUPERVISOR_ENV] = str(os.getpid())
        sock = self.config.bind_socket()
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._on_stop)
        signal.signal(signal.SIGHUP, self._on_hup)
        log.info("supervisor %d: starting %d workers on %s:%d", os.getpid(), self.workers, *sock.getsockname()[:2])
        try:
            for module in PRELOAD:
                importlib.import_module(module)
            self.processes = [self._start_worker(sock) for _ in range(self.workers)]
            restarts: list[float] = []
            failed = False
            while not self.stopping:
                if self.reload_requested:
                    self.reload_requested = False
                    self._signal_all(signal.SIGHUP)
                for index, process in enumerate(self.processes):
                    if process.is_alive() or self.stopping:
                        continue
                    _mark_dead(process.pid)
                    now = time.monotonic()
                    restarts = [t for t in restarts if now - t < RESTART_WINDOW_S]
                    if process.exitcode == STARTUP_FAILURE or len(restarts) >= MAX_RESTARTS:
                        # It cannot start (a port taken, settings refused) or keeps dying: restarting only hides it,
                        # and the bound socket would take connections nobody serves.
                        log.error("worker %s exited with %s: giving up", process.pid, process.exitcode)
                        self.stopping = failed = True
                        break
                    log.error("worker %s exited with %s: starting another", process.pid, process.exitcode)
                    restarts.append(now)
                    time.sleep(min(5.0, 0.5 * 2 ** len(restarts)))  # backing off, not spinning
                    if not self.stopping:
                        self.processes[index] = self._start_worker(sock)
                signal.sigtimedwait((signal.SIGCHLD,), 0.2)
            self._signal_all(signal.SIGTERM)
            deadline = time.monotonic() + self.drain_s + 5
            for process in self.processes:
                process.join(max(0.1, deadline - time.monotonic()))
            codes = []
            for process in self.processes:
                if process.is_alive():
                    log.error("worker %s did not stop in time: killing it", process.pid)
                    process.kill()
                    process.join(5)
                codes.append(process.exitcode)
            return 0 if all(code == 0 for code in codes) and not failed else 1
        finally:
            sock.close()
            shutil.rmtree(metrics_dir, ignore_errors=True)

    def _signal_all(self, signum: int) -> None:
        for process in self.processes:
            if process.pid is not None and process.is_alive():
                os.kill(process.pid, signum)


def _mark_dead(pid: int | None) -> None:
    directory = os.environ.get(MULTIPROC_ENV)
    if pid is None or not directory:
        return
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(pid, directory)  # type: ignore[no-untyped-call]


# --- the command ---------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """``mnist-serve``: serve the models over HTTP (settings from MNIST_SERVE_* variables)."""
    parser = argparse.ArgumentParser(
        prog="mnist-serve",
        description="Serve the MNIST digit classifier over HTTP. Configure it with environment variables:",
        epilog=describe_settings(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.parse_args(argv)
    try:
        settings = Settings()
    except ValidationError as exc:
        print(f"mnist-serve: invalid settings:\n{exc}", file=sys.stderr)
        return 2
    model_dir = settings.resolved_model_dir()
    flat = (model_dir / f"{settings.model_name}.onnx", model_dir / f"{settings.model_name}.json")
    versioned = list(model_dir.glob(f"{glob.escape(settings.model_name)}/*/*.onnx"))
    if not versioned and not all(p.is_file() for p in flat):
        wanted = f"{flat[0]} + {flat[1].name}, or {model_dir / settings.model_name}/<version>/"
        print(f"mnist-serve: model files not found: {wanted} (see MNIST_SERVE_MODEL_DIR)", file=sys.stderr)
        return 2

    workers = worker_count(settings)
    files = raise_file_limit(settings.max_connections + 256)
    if files < settings.max_connections + 64:
        print(
            f"mnist-serve: warning: the open-files limit is {files}, too low for MNIST_SERVE_MAX_CONNECTIONS="
            f"{settings.max_connections}: connections past it will be refused by the system, not by the service",
            file=sys.stderr,
        )
    config = uvicorn_config(settings)  # also configures logging
    if workers == 1:
        _serve(config)
        return 0
    return Supervisor(config, workers, settings.shutdown_timeout_s).run()
