"""Settings: environment prefix, documented fields, refusal of unsafe values, model directory resolution."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from service.main import main
from service.settings import Settings

ROOT = Path(__file__).resolve().parents[2]

#: The names (and defaults) that the deployment files are written against.
DOCUMENTED_DEFAULTS = {
    "model_dir": Path("models"),
    "model_name": "mnist-cnn",
    "host": "127.0.0.1",
    "port": 8000,
    "log_level": "info",
    "api_key": None,
    "batching": True,
    "max_batch_size": 64,
    "max_wait_ms": 0.0,
    "queue_size": 1024,
    "max_batch_items": 1024,
    "intra_op_threads": 1,
    "inter_op_threads": 1,
    "workers": 0,
    "max_queue_wait_ms": 500.0,
    "max_queue_images": 4096,
}


def test_defaults_are_the_documented_ones() -> None:
    settings = Settings()
    for name, value in DOCUMENTED_DEFAULTS.items():
        assert getattr(settings, name) == value, name
    assert settings.max_body_bytes > 1024 * 1024
    assert 28 * 28 < settings.max_image_pixels <= 100_000_000


def test_every_field_is_documented() -> None:
    for name, field in Settings.model_fields.items():
        assert field.description, f"{name} has no docstring"


def test_read_from_prefixed_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MNIST_SERVE_PORT", "9123")
    monkeypatch.setenv("MNIST_SERVE_BATCHING", "false")
    monkeypatch.setenv("MNIST_SERVE_MAX_WAIT_MS", "7.5")
    monkeypatch.setenv("MNIST_SERVE_API_KEY", "k" * 32)
    monkeypatch.setenv("PORT", "1")  # unprefixed variables are not ours
    settings = Settings()
    assert (settings.port, settings.batching, settings.max_wait_ms) == (9123, False, 7.5)
    assert settings.api_key is not None and settings.api_key.get_secret_value() == "k" * 32
    assert "k" * 32 not in repr(settings)


def test_empty_api_key_means_no_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MNIST_SERVE_API_KEY", "")
    assert Settings().api_key is None


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("port", 0),
        ("port", 70000),
        ("max_batch_size", 0),
        ("queue_size", 0),
        ("max_wait_ms", -1),
        ("max_body_bytes", 10 * 1024**3),
        ("max_batch_items", 0),
        ("max_image_pixels", 10),
        ("max_image_pixels", 10**10),
        ("api_key", "short"),
        ("model_name", "../../etc/passwd"),
        ("model_name", "a/b"),
        ("log_level", "verbose"),
        ("workers", -1),
        ("max_queue_wait_ms", 0),
        ("max_header_bytes", 10),
        ("intra_op_threads", -1),
    ],
)
def test_unsafe_values_are_refused(field: str, value: object) -> None:
    with pytest.raises(ValidationError):
        Settings(**{field: value})


def test_relative_model_dir_found_from_any_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert Settings().resolved_model_dir() == ROOT / "models"
    (tmp_path / "models").mkdir()
    assert Settings().resolved_model_dir() == tmp_path / "models"  # one in the cwd wins
    assert Settings(model_dir=tmp_path / "x").resolved_model_dir() == tmp_path / "x"


def test_web_dir_hook(tmp_path: Path) -> None:
    assert Settings(web_dir=tmp_path).resolved_web_dir() is None  # no index.html: nothing to serve
    (tmp_path / "index.html").write_text("<!doctype html>")
    assert Settings(web_dir=tmp_path).resolved_web_dir() == tmp_path


def test_help_lists_every_setting(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for name in Settings.model_fields:
        assert f"MNIST_SERVE_{name.upper()}" in out


def test_cli_refuses_bad_settings_and_missing_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("MNIST_SERVE_PORT", "not-a-port")
    assert main([]) == 2
    assert "invalid settings" in capsys.readouterr().err
    monkeypatch.delenv("MNIST_SERVE_PORT")
    monkeypatch.setenv("MNIST_SERVE_MODEL_DIR", str(tmp_path))
    assert main([]) == 2
    assert "model files not found" in capsys.readouterr().err
