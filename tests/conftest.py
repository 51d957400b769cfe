"""Shared fixtures: the real SmolLM2 checkpoint (imported once per machine), CPU and GPU backends."""
import os
import tempfile

import pytest

# The tests' own cache folder: the default model is imported there once per machine, and no tuned
# profile a user saved for it (python -m packkv.eval tune) changes the defaults the tests expect.
os.environ["PACKKV_CACHE"] = os.path.join(tempfile.gettempdir(), "packkv-tests")

from packkv.backend import get_backend, gpu_problem


@pytest.fixture(scope="session")
def smollm2_folder():
    from packkv.weights.default import default_weights_folder
    return default_weights_folder()


@pytest.fixture(scope="session")
def cpu():
    return get_backend("cpu")


@pytest.fixture(scope="session")
def gpu():
    problem = gpu_problem()
    if problem:
        pytest.skip(f"no usable GPU: {problem}")
    return get_backend("gpu")
