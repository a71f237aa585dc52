"""Never slower than PyTorch (issue #18 item 4, metal_flash_sdpa.trust): the first call
without grad of a configuration in a length bucket times the kernel against PyTorch's own
SDPA on the call's tensors and sends the bucket to the faster; calls with grad always go to
the kernel; PyTorch is not timed where its scores would be large or where it raises.

The kernels are reference kernels marked ``calibrated`` (as MFAKernel is), one slowed down
on purpose; PyTorch is slowed down (or made to raise) by wrapping the builtin the
dispatcher calls.
"""

import time

import pytest
import torch
import torch.nn.functional as F

import metal_flash_sdpa
from helpers import fallbacks
from metal_flash_sdpa import ReferenceKernel, dispatch, kernels, trust

DELAY = 0.1  # seconds: far beyond what either side takes on these shapes


class Calibrated(ReferenceKernel):
    name = "calibrated"
    calibrated = True

    def __init__(self, delay=0.0):
        super().__init__(block_size=32)
        self.delay, self.forwards = delay, 0

    def forward(self, q, k, v, scale, causal, mask):
        self.forwards += 1
        time.sleep(self.delay)
        return super().forward(q, k, v, scale, causal, mask)


@pytest.fixture
def fresh(reference_cpu, monkeypatch, tmp_path):
    """This test's own verdict file, nothing remembered, calibration on, no self-check (its
    canary runs would count as forwards); serve(kernel)."""
    monkeypatch.setenv("MFA_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(trust, "store", trust.Store())
    monkeypatch.setattr(trust, "mode", "off")
    monkeypatch.setattr(trust, "calibrating", True)
    trust.forget()

    def serve(kernel):
        kernels.register_kernel("cpu", kernel)
        return kernel

    yield serve
    trust.forget()


@pytest.fixture
def slow_pytorch(monkeypatch):
    """PyTorch's SDPA as the dispatcher calls it, DELAY slower; counts its calls."""
    builtin, calls = dispatch.original, []

    def slow(*args, **kwargs):
        calls.append(args[0].shape)
        time.sleep(DELAY)
        return builtin(*args, **kwargs)

    monkeypatch.setattr(dispatch, "original", slow)
    return calls


def qkv(length=40, grad=False):
    return [torch.randn(2, 2, length, 16).requires_grad_(grad) for _ in range(3)]


def builtin(*args, **kwargs):
    with metal_flash_sdpa.disabled():
        return F.scaled_dot_product_attention(*args, **kwargs)


def test_a_slow_kernel_loses_its_bucket_and_pytorch_answers_exactly(fresh):
    kernel = fresh(Calibrated(delay=DELAY))
    q, k, v = qkv()
    out = F.scaled_dot_product_attention(q, k, v)
    assert torch.equal(out, builtin(q, k, v))  # PyTorch's own answer, bit for bit
    assert metal_flash_sdpa.get_dispatch_count() == 0  # the timing runs are not dispatches
    assert fallbacks() == {trust.PYTORCH_FASTER: 1}
    assert metal_flash_sdpa.explain(q, k, v) == trust.PYTORCH_FASTER
    timed = kernel.forwards
    assert timed == trust.WARMUP + trust.RUNS
    # the bucket (lengths 33 to 64) is decided: no more timing, PyTorch answers
    q2, k2, v2 = qkv(length=50)
    assert torch.equal(F.scaled_dot_product_attention(q2, k2, v2), builtin(q2, k2, v2))
    assert kernel.forwards == timed and fallbacks() == {trust.PYTORCH_FASTER: 2}


def test_calls_with_grad_always_go_to_the_kernel(fresh):
    kernel = fresh(Calibrated(delay=DELAY))
    F.scaled_dot_product_attention(*qkv())  # the bucket goes to PyTorch
    q, k, v = qkv(grad=True)
    F.scaled_dot_product_attention(q, k, v).sum().backward()
    assert metal_flash_sdpa.get_dispatch_count() == 1
    assert metal_flash_sdpa.explain(q, k, v) is None
    assert kernel.forwards == trust.WARMUP + trust.RUNS + 1


def test_a_faster_kernel_keeps_its_bucket(fresh, slow_pytorch):
    kernel = fresh(Calibrated())
    q, k, v = qkv()
    F.scaled_dot_product_attention(q, k, v)
    assert len(slow_pytorch) == trust.WARMUP + trust.RUNS
    assert metal_flash_sdpa.get_dispatch_count() == 1 and fallbacks() == {}
    assert kernel.forwards == trust.WARMUP + trust.RUNS + 1
    # another length bucket (65 to 128) is measured on its own
    F.scaled_dot_product_attention(*qkv(length=100))
    assert len(slow_pytorch) == 2 * (trust.WARMUP + trust.RUNS)


def test_pytorch_is_not_timed_where_its_scores_would_be_large(fresh, slow_pytorch, monkeypatch):
    monkeypatch.setattr(trust, "MAX_PYTORCH_SCORES", 4 * 2 * 2 * 40 * 40 - 1)  # just below this call's
    kernel = fresh(Calibrated(delay=DELAY))
    F.scaled_dot_product_attention(*qkv())
    assert slow_pytorch == [] and kernel.forwards == 1  # not timed at all: the kernel keeps it
    assert metal_flash_sdpa.get_dispatch_count() == 1


def test_where_pytorch_raises_the_kernel_keeps_the_bucket(fresh, monkeypatch):
    def raising(*args, **kwargs):
        raise RuntimeError("MPS out of memory")

    monkeypatch.setattr(dispatch, "original", raising)
    fresh(Calibrated(delay=DELAY))
    F.scaled_dot_product_attention(*qkv())
    assert metal_flash_sdpa.get_dispatch_count() == 1
    assert "PyTorch raised: RuntimeError: MPS out of memory" in "\n".join(trust.status_lines())


def test_calibration_off_sends_every_call_to_the_kernel(fresh, monkeypatch):
    monkeypatch.setattr(trust, "calibrating", False)
    kernel = fresh(Calibrated(delay=DELAY))
    F.scaled_dot_product_attention(*qkv())
    assert kernel.forwards == 1 and metal_flash_sdpa.get_dispatch_count() == 1


def test_kernels_not_marked_calibrated_are_never_timed(fresh, slow_pytorch):
    fresh(ReferenceKernel(block_size=32))
    F.scaled_dot_product_attention(*qkv())
    assert slow_pytorch == [] and metal_flash_sdpa.get_dispatch_count() == 1


def test_choices_persist_and_status_lists_them(fresh):
    kernel = fresh(Calibrated(delay=DELAY))
    F.scaled_dot_product_attention(*qkv())
    trust.forget()  # a new process: only the file
    F.scaled_dot_product_attention(*qkv())
    assert kernel.forwards == trust.WARMUP + trust.RUNS  # read from disk, not timed again
    assert fallbacks() == {trust.PYTORCH_FASTER: 2}
    line = next(line for line in trust.status_lines() if "L<=64 S<=64" in line)
    assert line.split()[:3] == ["PyTorch", "calibrated", "float32"]
    assert "L<=64 S<=64 D=16 Dv=16 Hq=2 Hk=2 scale=0.25 causal=False mask=none  kernel " in line and " ms, PyTorch " in line


def test_the_environment_turns_it_off(monkeypatch):
    from metal_flash_sdpa import config

    for raw, expected in (("0", False), ("off", False), ("1", True), ("", True)):
        monkeypatch.setenv(config.CALIBRATE_VAR, raw)
        assert config.calibrate() is expected
    monkeypatch.setenv(config.CALIBRATE_VAR, "sometimes")
    with pytest.warns(RuntimeWarning, match="MFA_CALIBRATE"):
        assert config.calibrate() is True
