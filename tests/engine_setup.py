"""The MFA engine (tools/engine), for the tests that build or run it."""

import contextlib
import os
import sys

import pytest

from conftest import REPO

sys.path.insert(0, str(REPO / "tools"))

from engine import build  # noqa: E402


@contextlib.contextmanager
def engine_required(what="the MFA engine"):
    """Skips the test with one line when the engine cannot be built here (no clang, no ccv
    sources, another machine); with MFA_ENGINE_REQUIRED=1 (CI) that fails instead."""
    try:
        yield
    except build.Unavailable as missing:
        if os.environ.get("MFA_ENGINE_REQUIRED") == "1":
            pytest.fail(f"MFA_ENGINE_REQUIRED=1 but {what} cannot be built here: {missing}")
        pytest.skip(f"{what} cannot be built here: {missing}")
