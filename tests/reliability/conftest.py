"""Fixtures for the reliability tests: the service tests' own.

tests/service/conftest.py is loaded here under another module name, so that its fixtures (``live_server``,
``make_client``, the autouse MNIST_SERVE_* scrub…) serve these tests too. ``service_helpers`` (tests/service) and
``reliability_helpers`` (this folder) are importable from the test modules.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

HERE = Path(__file__).resolve().parent
SERVICE_TESTS = HERE.parent / "service"
if str(SERVICE_TESTS) not in sys.path:
    sys.path.insert(0, str(SERVICE_TESTS))
# Appended, not prepended: the service tests' `from conftest import ...` must keep finding their own conftest.
if str(HERE) not in sys.path:
    sys.path.append(str(HERE))


def _load(name: str, path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


_service = _load("service_tests_conftest", SERVICE_TESTS / "conftest.py")
# The service tests' fixtures, for these tests as well.
_no_service_env = _service._no_service_env
classifier = _service.classifier
model_card = _service.model_card
make_client = _service.make_client
live_server = _service.live_server
