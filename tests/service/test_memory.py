"""service.memory: glibc malloc tuning for the server process."""

from __future__ import annotations

import platform

import pytest

from service.memory import tune_malloc


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_glibc_accepts_the_settings() -> None:
    assert tune_malloc() is True


def test_the_environment_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "131072")
    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")
    assert tune_malloc() is True  # nothing left to set, nothing refused
