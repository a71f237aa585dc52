import atexit
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile

import pytest
import torch

import metal_flash_sdpa
from metal_flash_sdpa import kernels, patch

REPO = pathlib.Path(__file__).resolve().parent.parent

# The suite tests the installed package (its .pth is real), never the source tree.
if pathlib.Path(metal_flash_sdpa.__file__).resolve().parent.parent == REPO and not os.environ.get("MFA_TEST_SOURCE"):
    raise RuntimeError(
        f"tests import metal_flash_sdpa from the source tree ({metal_flash_sdpa.__file__}); "
        "install it (pip install .) and run pytest from outside its import path"
    )

MPS_AVAILABLE = torch.backends.mps.is_available()

# The self-check's verdicts go to a directory of this session (and of the interpreters it
# starts), never to the user's ~/.cache; the package reads it at its first check.
CACHE_DIR = tempfile.mkdtemp(prefix="metal-flash-sdpa-tests-")
os.environ["MFA_CACHE_DIR"] = CACHE_DIR
atexit.register(shutil.rmtree, CACHE_DIR, ignore_errors=True)


def pytest_collection_modifyitems(config, items):
    if MPS_AVAILABLE and "mps" in kernels.registered_kernels():
        return
    reason = kernels.unavailable.get("mps") or "no MPS device"
    skip = pytest.mark.skip(reason=f"needs MPS and the MFA bridge: {reason}")
    for item in items:
        if "mps" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def restore_state():
    """Leave the patch, the registry, MIN_SEQ_LEN and the counters as the test found them;
    the configurations kernels failed on are forgotten (re-registering a kernel does that)."""
    was_enabled = patch.is_enabled()
    registry = kernels.registered_kernels()
    min_seq_len = metal_flash_sdpa.MIN_SEQ_LEN
    yield
    (patch.enable if was_enabled else patch.disable)()
    for device_type in set(kernels.registered_kernels()) | set(registry):
        kernels.register_kernel(device_type, registry.get(device_type))
    metal_flash_sdpa.MIN_SEQ_LEN = min_seq_len
    metal_flash_sdpa.reset_dispatch_count()


@pytest.fixture
def reference_cpu(restore_state):
    """The reference kernel serves cpu, the patch is on, every length dispatches."""
    kernel = metal_flash_sdpa.ReferenceKernel(block_size=32)
    kernels.register_kernel("cpu", kernel)
    patch.enable()
    metal_flash_sdpa.MIN_SEQ_LEN = 0
    metal_flash_sdpa.reset_dispatch_count()
    return kernel


@pytest.fixture
def no_selfcheck(monkeypatch):
    """Kernels are trusted without the self-check (MFA_SELFCHECK=0): for tests of what a
    kernel does on users' calls, which count its runs or make it fail on purpose."""
    from metal_flash_sdpa import trust

    monkeypatch.setattr(trust, "mode", "off")


@pytest.fixture
def recorded_mfa(monkeypatch):
    """An MFAKernel whose native bridge is helpers.RecordingBridge (kernel.bridge)."""
    from helpers import RecordingBridge
    from metal_flash_sdpa.kernels import mfa

    bridge = RecordingBridge()
    monkeypatch.setattr(mfa, "_native", bridge)
    kernel = mfa.MFAKernel()
    kernel.bridge = bridge
    return kernel


def run_python(code, env=None, args=(), timeout=120):
    """Run ``code`` in a fresh interpreter with this environment's site-packages."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("MFA_") or k == "MFA_CACHE_DIR"}
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, *args, "-c", code],
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=str(REPO.parent),
    )


def pytorch_sdpa(*args, math=True, **kwargs):
    """PyTorch's own SDPA (math backend by default), whatever the patch state."""
    from metal_flash_sdpa.check import pytorch_math_sdpa

    if math:
        return pytorch_math_sdpa(*args, **kwargs)
    with metal_flash_sdpa.disabled():
        return torch.nn.functional.scaled_dot_product_attention(*args, **kwargs)
