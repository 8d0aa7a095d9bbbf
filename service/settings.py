"""Service settings, read from ``MNIST_SERVE_*`` environment variables.

    MNIST_SERVE_PORT=9000 MNIST_SERVE_API_KEY=... mnist-serve
    mnist-serve --help                    # every setting with its default and meaning

Every field refuses values that would make the service unsafe or useless (a zero-sized queue, a body limit
of gigabytes, a model name that walks out of the model directory, a short API key).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

ENV_PREFIX = "MNIST_SERVE_"
#: Set by the supervisor in each worker it starts (several workers): the supervisor's pid, which SIGHUP reaches.
SUPERVISOR_ENV = "MNIST_SERVE_SUPERVISOR_PID"

#: The repository (or installed package parent) root: where ``models/`` lives in a checkout.
PROJECT_ROOT = Path(__file__).resolve().parent.parent

LogLevel = Literal["critical", "error", "warning", "info", "debug", "trace"]
LogFormat = Literal["json", "text"]

#: Shortest accepted API key: anything shorter is guessable.
MIN_API_KEY_LENGTH = 16


class Settings(BaseSettings):
    """Everything the service can be told; each field maps to ``MNIST_SERVE_<FIELD>``."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        extra="ignore",
        use_attribute_docstrings=True,
        protected_namespaces=(),
        frozen=True,
    )

    model_dir: Path = Path("models")
    """Model repository: <name>.onnx + card <name>.json, and <name>/<version>/ side by side (relative: cwd, project)."""

    model_name: str = Field(default="mnist-cnn", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
    """The default model (its card's name): it answers requests that name no model, e.g. /v1/predict."""

    model_version: str | None = Field(default=None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,127}$")
    """Version of model_name that answers requests naming no version (unset: its highest version)."""

    host: str = Field(default="127.0.0.1", min_length=1)
    """Interface to listen on; 0.0.0.0 only inside a container or behind a proxy."""

    port: int = Field(default=8000, ge=1, le=65535)
    """TCP port to listen on."""

    grpc_port: int = Field(default=8081, ge=0, le=65535)
    """TCP port of the Open Inference Protocol over gRPC (on host, shared by every worker); 0 turns gRPC off."""

    grpc_max_concurrent_rpcs: int = Field(default=256, ge=1, le=100_000)
    """RPCs one worker runs at once over gRPC; past it new RPCs get RESOURCE_EXHAUSTED at once."""

    log_level: LogLevel = "info"
    """Log level for the service and uvicorn."""

    access_log: bool = True
    """Log one structured line per request (the request log, service.logs; uvicorn's own access log is off)."""

    log_format: LogFormat = "json"
    """Log lines as json (one object per line: the product) or text (readable lines, for development)."""

    log_probes: bool = False
    """Also log the probes' requests (/healthz, /readyz, /metrics, /v2/health/*), left out by default."""

    otlp_endpoint: str | None = Field(default=None, pattern=r"^https?://[^\s]+$")
    """Send traces over OTLP/HTTP to this URL (e.g. http://collector:4318); unset: no tracing (needs the otel extra)."""

    otel_service_name: str = Field(default="mnist-serve", min_length=1, max_length=128)
    """The service.name of the traces sent to otlp_endpoint."""

    trace_sample_ratio: float = Field(default=1.0, ge=0.0, le=1.0)
    """Share of requests traced when the caller sent no sampled traceparent (a caller's decision is followed)."""

    api_key: SecretStr | None = None
    """When set (16+ characters), inference and admin calls require it in X-API-Key or Authorization: Bearer."""

    batching: bool = True
    """Gather concurrent requests into one model run; false runs each request on its own."""

    max_batch_size: int = Field(default=64, ge=1, le=4096)
    """Most images one micro-batch gathers before it runs."""

    max_wait_ms: float = Field(default=0.0, ge=0.0, le=1000.0)
    """Extra wait for more requests to join a batch, in ms; 0: run as soon as the model is free (see batching)."""

    queue_size: int = Field(default=1024, ge=1, le=1_000_000)
    """Most requests waiting for one model; beyond it the service answers 503 with Retry-After."""

    max_queue_images: int = Field(default=4096, ge=1, le=1_000_000)
    """Most images waiting for one model (per worker); a request that would pass it gets 503 with Retry-After."""

    max_queue_wait_ms: float = Field(default=500.0, gt=0.0, le=600_000.0)
    """Longest estimated wait for the model a request is admitted to, in ms; a longer one is refused with 503."""

    max_body_bytes: int = Field(default=16 * 1024 * 1024, ge=1024, le=256 * 1024 * 1024)
    """Largest request body accepted, in bytes; larger bodies get 413 before they are read."""

    max_inflight_body_bytes: int = Field(default=64 * 1024 * 1024, ge=1024, le=4 * 1024 * 1024 * 1024)
    """Request-body bytes one worker holds at once, across requests; past it new requests get 503."""

    max_batch_items: int = Field(default=1024, ge=1, le=65536)
    """Most items (images) one /v1/predict/batch or /v2 inference request may carry."""

    max_image_pixels: int = Field(default=4096 * 4096, ge=28 * 28, le=100_000_000)
    """Largest image (width × height) decoded; guards against decompression bombs."""

    max_request_pixels: int = Field(default=4 * 4096 * 4096, ge=28 * 28, le=1_000_000_000)
    """Most image pixels one request may make the service decode, summed over its images."""

    decode_threads: int = Field(default=0, ge=0, le=64)
    """Threads decoding images in each worker (0: the usable CPUs divided among the workers, at least 1)."""

    intra_op_threads: int = Field(default=1, ge=0, le=256)
    """onnxruntime threads inside one operator for single requests and micro-batches (0: one per core)."""

    large_request_threads: int = Field(default=0, ge=0, le=256)
    """onnxruntime threads for requests of 64 images or more (0: one per usable CPU)."""

    inter_op_threads: int = Field(default=1, ge=0, le=256)
    """onnxruntime threads across operators (0: one per core)."""

    workers: int = Field(default=0, ge=0, le=64)
    """Worker processes sharing the port, each with its own models and batchers (0: one per usable CPU)."""

    max_connections: int = Field(default=1024, ge=8, le=100_000)
    """Open connections per worker; past it the oldest idle one is closed, so probes still get through."""

    max_header_bytes: int = Field(default=16 * 1024, ge=1024, le=1024 * 1024)
    """Largest request line plus headers, in bytes; larger gets 431."""

    header_timeout_s: float = Field(default=10.0, gt=0.0, le=600.0)
    """Time a client has to send a request's line and headers once it starts one (or connects); then 408."""

    body_timeout_s: float = Field(default=30.0, gt=0.0, le=3600.0)
    """Time a client has to send a request's whole body once its headers are in; then 408."""

    keep_alive_timeout_s: float = Field(default=5.0, gt=0.0, le=600.0)
    """An idle keep-alive connection is closed after this long."""

    shutdown_timeout_s: float = Field(default=10.0, gt=0.0, le=600.0)
    """On SIGTERM, how long admitted requests get to finish, in seconds; those still waiting then get 503."""

    web_dir: Path | None = None
    """Static web page served at / (default: service/web when it holds an index.html)."""

    @field_validator("api_key", "otlp_endpoint", mode="before")
    @classmethod
    def _empty_key_is_unset(cls, value: object) -> object:
        # An empty variable (e.g. `MNIST_SERVE_API_KEY=${KEY:-}` in compose) means unset, not "the empty value".
        if isinstance(value, str) and not value.strip():
            return None
        return value

    @field_validator("api_key")
    @classmethod
    def _key_long_enough(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and len(value.get_secret_value()) < MIN_API_KEY_LENGTH:
            raise ValueError(f"api_key must be at least {MIN_API_KEY_LENGTH} characters")
        return value

    def resolved_model_dir(self) -> Path:
        """model_dir as an absolute path: as given when absolute or present in cwd, else under the project root."""
        if self.model_dir.is_absolute() or self.model_dir.exists():
            return self.model_dir.resolve()
        candidate = PROJECT_ROOT / self.model_dir
        return candidate if candidate.exists() else self.model_dir.resolve()

    def resolved_web_dir(self) -> Path | None:
        """The directory to serve at /, or None when there is no page to serve."""
        web = self.web_dir if self.web_dir is not None else Path(__file__).resolve().parent / "web"
        return web if (web / "index.html").is_file() else None


def describe_settings() -> str:
    """A plain-text table of every setting: environment variable, default, meaning (for --help and the docs)."""
    lines = []
    for name, field in Settings.model_fields.items():
        default = field.default
        shown = "unset" if default is None else str(default).lower() if isinstance(default, bool) else str(default)
        lines.append(f"  {ENV_PREFIX}{name.upper():<25} {shown:<12} {field.description or ''}")
    return "\n".join(lines)
