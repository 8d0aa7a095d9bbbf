"""Fixtures shared by every test package: the real MNIST test set."""

from __future__ import annotations

import numpy as np
import pytest


@pytest.fixture(scope="session")
def mnist_test() -> tuple[np.ndarray, np.ndarray]:
    """The 10k real MNIST test images (uint8 N×28×28) and labels, fetched and verified once."""
    from training.data import load_test_set

    return load_test_set()
