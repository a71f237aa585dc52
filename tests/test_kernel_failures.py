"""A kernel that raises never breaks the user's call (DESIGN section 10, reliability rules).

A forward failure: PyTorch's SDPA answers that call with the user's own arguments, and the
configuration goes to PyTorch from then on (one warning line). A backward failure: PyTorch
recomputes the gradients from the saved inputs. The backward always belongs to the kernel
that ran the forward. The kernels here are reference kernels that raise as the MFA bridge
does when ccv fails (say, a shader that does not compile). They run without the self-check
(tests/test_trust.py has it): a kernel can fail on a user's call after its variant passed.
"""

import math
import threading
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import metal_flash_sdpa
from conftest import pytorch_sdpa
from metal_flash_sdpa import kernels

pytestmark = pytest.mark.usefixtures("no_selfcheck")

ERROR = "ccv could not compile the attention shader\nprogram_source:12:3: error: unknown type name 'bfloat'"
REASON = "kernel flaky failed for this configuration"


class Flaky(metal_flash_sdpa.ReferenceKernel):
    """Raises RuntimeError(ERROR) in ``stage`` ("forward", "backward" or "none": never), on
    every call or only on those with ``head_dim``; counts its calls."""

    name = "flaky"

    def __init__(self, stage="forward", head_dim=None):
        super().__init__(block_size=32)
        self.stage, self.head_dim = stage, head_dim
        self.calls = {"forward": 0, "backward": 0}

    def _run(self, stage, q):
        self.calls[stage] += 1
        if stage == self.stage and self.head_dim in (None, q.shape[-1]):
            raise RuntimeError(ERROR)

    def forward(self, q, k, v, scale, causal, mask):
        self._run("forward", q)
        return super().forward(q, k, v, scale, causal, mask)

    def backward(self, grad_out, q, k, v, out, lse, scale, causal, mask):
        self._run("backward", q)
        return super().backward(grad_out, q, k, v, out, lse, scale, causal, mask)


@pytest.fixture
def serve(reference_cpu):
    """serve(kernel): ``kernel`` serves cpu (patch on, every length dispatching); the
    registry, and with it the record of failed configurations, is restored afterwards."""

    def register(kernel):
        kernels.register_kernel("cpu", kernel)
        return kernel

    return register


def rand(*shape, grad=True):
    return torch.randn(*shape).requires_grad_(grad)


def qkv(q_heads=2, kv_heads=2, length=40, head_dim=16, grad=True):
    return rand(1, q_heads, length, head_dim, grad=grad), *(rand(1, kv_heads, length, head_dim, grad=grad) for _ in "kv")


def run(fn, q, k, v, grad_out=None, **kwargs):
    """fn(q, k, v, **kwargs) and, when the inputs need grad, its gradients for ``grad_out``."""
    out = fn(q, k, v, **kwargs)
    if not out.requires_grad:
        return [out]
    return [out, *torch.autograd.grad(out, (q, k, v), grad_out)]


@pytest.fixture
def warned():
    """warned(): the kernel-failure warnings so far, each as often as it was emitted."""
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        yield lambda: [str(w.message) for w in record if "metal_flash_sdpa: kernel" in str(w.message)]


def test_forward_failure_answers_with_pytorch_then_skips_the_kernel(serve, warned):
    kernel = serve(Flaky("forward"))
    for _ in range(3):
        q, k, v = qkv()
        grad_out = torch.randn(1, 2, 40, 16)
        got = run(F.scaled_dot_product_attention, q, k, v, grad_out, is_causal=True)
        # the user's call went to PyTorch's SDPA with its own arguments: the same numbers
        expected = run(lambda *a, **kw: pytorch_sdpa(*a, math=False, **kw), q, k, v, grad_out, is_causal=True)
        for a, b in zip(got, expected):
            assert torch.equal(a, b)
        math_sdpa = run(pytorch_sdpa, q, k, v, grad_out, is_causal=True)
        for a, b in zip(got, math_sdpa):
            torch.testing.assert_close(a, b)
    assert kernel.calls["forward"] == 1, "a failed configuration was sent to the kernel again"
    assert metal_flash_sdpa.get_dispatch_count() == 0  # the failed call is no dispatch
    assert metal_flash_sdpa.fallback_counts()[REASON] == 3  # the failed call and the two after
    assert metal_flash_sdpa.explain(q, k, v, is_causal=True) == REASON
    (message,) = warned()
    assert message.startswith("metal_flash_sdpa: kernel flaky failed in forward (device=cpu dtype=float32 head_dim=16 ")
    assert "causal=True masked=False" in message
    assert "RuntimeError: ccv could not compile the attention shader [...]" in message  # one line
    assert "\n" not in message


def test_the_scale_is_part_of_a_configuration(serve, warned):
    """A kernel may compile the scale in (MFA does): a failure at one scale blocks that one."""

    class FailsAtHalf(metal_flash_sdpa.ReferenceKernel):
        name = "flaky"

        def forward(self, q, k, v, scale, causal, mask):
            if scale == 0.5:
                raise RuntimeError(ERROR)
            return super().forward(q, k, v, scale, causal, mask)

    serve(FailsAtHalf(block_size=32))
    for _ in range(2):
        for scale in (None, 0.5):
            q, k, v = qkv(grad=False)
            out = F.scaled_dot_product_attention(q, k, v, scale=scale)
            torch.testing.assert_close(out, pytorch_sdpa(q, k, v, scale=scale))
    assert metal_flash_sdpa.get_dispatch_count() == 2  # the default scale, 0.25, twice
    assert metal_flash_sdpa.fallback_counts()[REASON] == 2
    assert metal_flash_sdpa.explain(q, k, v, scale=0.25) is None
    assert metal_flash_sdpa.explain(q, k, v, scale=0.5) == REASON
    (message,) = warned()
    assert " scale=0.5 causal=False " in message


def test_only_the_failing_configuration_is_blocked(serve, warned):
    kernel = serve(Flaky("forward", head_dim=64))
    for _ in range(2):
        for head_dim in (32, 64):
            q, k, v = qkv(head_dim=head_dim, grad=False)
            out = F.scaled_dot_product_attention(q, k, v)
            torch.testing.assert_close(out, pytorch_sdpa(q, k, v))
    assert metal_flash_sdpa.get_dispatch_count() == 2  # head dim 32, twice
    assert kernel.calls["forward"] == 3  # 32, 64 (fails), 32
    assert metal_flash_sdpa.fallback_counts()[REASON] == 2
    assert metal_flash_sdpa.explain(*qkv(head_dim=32)) is None
    assert metal_flash_sdpa.explain(*qkv(head_dim=64)) == REASON
    # batch and lengths are not part of a configuration: blocked too
    assert metal_flash_sdpa.explain(*(torch.randn(3, 2, 72, 64) for _ in "qkv")) == REASON
    # the same head dim with a mask is another configuration: one more try, one more warning
    q, k, v = qkv(head_dim=64, grad=False)
    mask = torch.rand(40, 40) > 0.3
    torch.testing.assert_close(F.scaled_dot_product_attention(q, k, v, attn_mask=mask), pytorch_sdpa(q, k, v, attn_mask=mask))
    assert kernel.calls["forward"] == 4
    assert len(warned()) == 2
    # a bool and an additive mask run the same kernel: the same configuration
    additive = torch.zeros(40, 40).masked_fill(~mask, -math.inf)
    assert metal_flash_sdpa.explain(q, k, v, attn_mask=additive) == REASON


def test_forward_failure_without_grad_blocks_the_grad_calls_too(serve, warned):
    kernel = serve(Flaky("forward"))
    q, k, v = qkv()
    with torch.no_grad():
        F.scaled_dot_product_attention(q, k, v)
    got = run(F.scaled_dot_product_attention, q, k, v, torch.ones(1, 2, 40, 16))
    for a, b in zip(got, run(pytorch_sdpa, q, k, v, torch.ones(1, 2, 40, 16))):
        torch.testing.assert_close(a, b)
    assert kernel.calls["forward"] == 1
    assert len(warned()) == 1


BACKWARD_CASES = {
    "plain": lambda: (qkv(), {}),
    "causal, 3-D": lambda: ([rand(2, 40, 16) for _ in "qkv"], dict(is_causal=True)),
    "gqa": lambda: (qkv(q_heads=6, kv_heads=2), dict(enable_gqa=True)),
    "gqa causal": lambda: (qkv(q_heads=4, kv_heads=2), dict(enable_gqa=True, is_causal=True)),
    "bool mask": lambda: (qkv(), dict(attn_mask=(torch.rand(1, 1, 40, 40) > 0.3) | torch.eye(40, dtype=torch.bool))),
    "additive per-head mask, gqa": lambda: (qkv(q_heads=4, kv_heads=2), dict(attn_mask=torch.randn(1, 4, 40, 40), enable_gqa=True)),
    "scale": lambda: (qkv(), dict(scale=0.3)),
}


@pytest.mark.parametrize("case", list(BACKWARD_CASES))
def test_backward_failure_recomputes_gradients_with_pytorch(serve, warned, case):
    kernel = serve(Flaky("backward"))
    (q, k, v), kwargs = BACKWARD_CASES[case]()
    grad_out = torch.randn(*q.shape[:-1], v.shape[-1])
    got = run(F.scaled_dot_product_attention, q, k, v, grad_out, **kwargs)
    assert kernel.calls == {"forward": 1, "backward": 1}
    assert metal_flash_sdpa.get_dispatch_count() == 1  # the forward ran on the kernel
    for name, a, b in zip(["out", "dq", "dk", "dv"], got, run(pytorch_sdpa, q, k, v, grad_out, **kwargs)):
        assert a.shape == b.shape and a.dtype == b.dtype
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4, msg=name)
    (message,) = warned()
    assert "kernel flaky failed in backward" in message and "with grad from now on" in message

    # from now on: with grad, PyTorch; without grad, still the kernel (its forward works)
    assert metal_flash_sdpa.explain(q, k, v, **kwargs) == REASON
    run(F.scaled_dot_product_attention, q, k, v, grad_out, **kwargs)
    assert kernel.calls == {"forward": 1, "backward": 1}
    assert metal_flash_sdpa.fallback_counts()[REASON] == 1
    with torch.no_grad():
        F.scaled_dot_product_attention(q, k, v, **kwargs)
    assert kernel.calls["forward"] == 2
    assert metal_flash_sdpa.get_dispatch_count() == 2
    assert len(warned()) == 1


class FlakyMaskGrad(Flaky):
    """Serves the mask's gradient, and raises in a backward asked for it: the kernels that
    add it are others (MFA's patch 0017), which can fail alone."""

    supports_mask_grad = True

    def backward(self, grad_out, q, k, v, out, lse, scale, causal, mask, mask_grad=False):
        self.calls["backward"] += 1
        if mask_grad:
            raise RuntimeError(ERROR)
        return metal_flash_sdpa.ReferenceKernel.backward(self, grad_out, q, k, v, out, lse, scale, causal, mask)


def test_a_mask_gradient_failure_blocks_only_the_calls_that_ask_for_it(serve, warned):
    kernel = serve(FlakyMaskGrad("none"))
    q, k, v = qkv()
    bias = torch.randn(1, 2, 40, 40)
    learned = bias.clone().requires_grad_()
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=learned)
    out.sum().backward()  # the kernel raised: PyTorch's gradients, the mask's included
    expected = torch.autograd.grad(pytorch_sdpa(q, k, v, attn_mask=learned).sum(), learned)[0]
    torch.testing.assert_close(learned.grad, expected)
    assert "kernel flaky failed in backward" in warned()[0]
    assert metal_flash_sdpa.explain(q, k, v, attn_mask=learned) == REASON

    # the same mask not learned: its backward is the kernel's still
    assert metal_flash_sdpa.explain(q, k, v, attn_mask=bias) is None
    F.scaled_dot_product_attention(q, k, v, attn_mask=bias).sum().backward()
    assert kernel.calls == {"forward": 2, "backward": 2}
    assert metal_flash_sdpa.get_dispatch_count() == 2


def test_a_forward_failure_blocks_the_learned_mask_calls_too(serve, warned):
    kernel = serve(FlakyMaskGrad("forward"))
    q, k, v = qkv()
    bias = torch.randn(1, 2, 40, 40)
    with torch.no_grad():
        F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    for mask in (bias, bias.clone().requires_grad_()):  # with grad, without and with the mask's
        assert metal_flash_sdpa.explain(q, k, v, attn_mask=mask) == REASON
    assert kernel.calls["forward"] == 1 and len(warned()) == 1


def test_backward_uses_the_kernel_that_ran_the_forward(serve, warned):
    first = serve(Flaky("none"))
    q, k, v = qkv()
    grad_out = torch.randn(1, 2, 40, 16)
    out = F.scaled_dot_product_attention(q, k, v)
    second = serve(Flaky("backward"))  # would fail, and could not read first's lse anyway
    got = [out, *torch.autograd.grad(out, (q, k, v), grad_out)]
    assert first.calls == {"forward": 1, "backward": 1}
    assert second.calls == {"forward": 0, "backward": 0}
    for a, b in zip(got, run(pytorch_sdpa, q, k, v, grad_out)):
        torch.testing.assert_close(a, b)
    assert warned() == []


def test_one_warning_under_threads(serve, warned):
    kernel = serve(Flaky("forward"))
    q, k, v = qkv(grad=False)
    expected = pytorch_sdpa(q, k, v)
    barrier = threading.Barrier(4)
    results = []

    def call():
        barrier.wait()
        results.append(F.scaled_dot_product_attention(q, k, v))

    threads = [threading.Thread(target=call) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 4
    for out in results:
        torch.testing.assert_close(out, expected)
    assert 1 <= kernel.calls["forward"] <= 4  # those that raced past the check before the first failure
    assert len(warned()) == 1
    assert metal_flash_sdpa.fallback_counts()[REASON] == 4


class PassThrough(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


def test_failure_under_a_dispatch_mode(serve, warned):
    # a dispatch mode makes the op layer run the registered op, which answers by itself
    kernel = serve(Flaky("forward"))
    q, k, v = qkv(q_heads=4, kv_heads=2)
    mask = torch.rand(40, 40) > 0.3
    grad_out = torch.randn(1, 4, 40, 16)
    with PassThrough():
        got = run(F.scaled_dot_product_attention, q, k, v, grad_out, attn_mask=mask, enable_gqa=True)
    for a, b in zip(got, run(pytorch_sdpa, q, k, v, grad_out, attn_mask=mask, enable_gqa=True)):
        torch.testing.assert_close(a, b)
    assert kernel.calls == {"forward": 1, "backward": 0}
    assert metal_flash_sdpa.fallback_counts()[REASON] == 1
    assert metal_flash_sdpa.get_dispatch_count() == 0
    assert len(warned()) == 1


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def loss(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True).square().sum()


class FlakyBSHD(Flaky):
    """Fails in every call of its stage; claims the MFA bridge's layout (the op layer's
    PyTorch answers must have the strides the op's fake implementation promises)."""

    layout = "BSHD"


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
@pytest.mark.parametrize("stage", ["forward", "backward"])
def test_compiled_graph_survives_a_failure(serve, warned, fresh_dynamo, backend, stage):
    # Inside a compiled graph the op answers with PyTorch itself; a forward failure blocks
    # the configuration with grad too, so the backward recomputes without the kernel.
    # (a backward-only failure needs a forward that works: the reference kernel's is BHSD)
    kernel = serve(FlakyBSHD(stage) if stage == "forward" else Flaky(stage))
    compiled = torch.compile(loss, fullgraph=True, backend=backend)
    for _ in range(2):
        q, k, v = (rand(1, 40, 2, 16).transpose(1, 2) for _ in "qkv")  # a model's [B, S, H, D] view
        got = run(compiled, q, k, v)
        for a, b in zip(got, run(loss, q, k, v)):  # eager: falls back now
            torch.testing.assert_close(a, b)
    # the op checks for blocked configurations when the graph runs: one failure in all
    assert kernel.calls == ({"forward": 1, "backward": 0} if stage == "forward" else {"forward": 2, "backward": 1})
    assert len(warned()) == 1


def test_compiled_backward_is_the_forward_kernels(serve, warned, fresh_dynamo):
    first = serve(Flaky("none"))
    q, k, v = qkv()
    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    compiled(q, k, v).backward()
    assert first.calls == {"forward": 1, "backward": 1}  # the graph's backward op ran it
    out = compiled(q, k, v)
    second = serve(Flaky("none"))
    second.name = "other"  # another kernel: it cannot read first's lse
    grads = torch.autograd.grad(out, (q, k, v))
    # the op was told the forward's kernel; the registry's differs: PyTorch recomputes
    assert first.calls["backward"] == 1 and second.calls["backward"] == 0
    for a, b in zip(grads, run(loss, q, k, v)[1:]):
        torch.testing.assert_close(a, b)
    assert warned() == []


def test_opcheck_on_the_failure_paths(serve, warned):
    # the ops' PyTorch answers keep the contract their fake implementations state
    serve(FlakyBSHD("forward"))
    q, k, v = (torch.randn(1, 20, 4, 16).transpose(1, 2) for _ in "qkv")
    mask = torch.randn(1, 4, 20, 20)
    torch.library.opcheck(torch.ops.metal_flash_sdpa.attention.default, (q, k, v, mask, 0.25, False))
    out, lse, _ = torch.ops.metal_flash_sdpa.attention.default(q, k, v, None, 0.25, True)
    grad = torch.randn_like(out)
    for kernel_name in ("flaky", "other"):  # blocked configuration; another kernel's forward
        args = (grad, q, k, v, out, lse, None, 0.25, True, kernel_name)
        torch.library.opcheck(torch.ops.metal_flash_sdpa.attention_backward.default, args)
    assert len(warned()) == 2  # one per configuration: the masked one, the causal one


def test_registering_a_kernel_forgets_failures(serve, warned):
    serve(Flaky("forward"))
    q, k, v = qkv(grad=False)
    F.scaled_dot_product_attention(q, k, v)
    assert metal_flash_sdpa.explain(q, k, v) == REASON
    kernel = serve(Flaky("none"))
    assert metal_flash_sdpa.explain(q, k, v) is None
    F.scaled_dot_product_attention(q, k, v)
    assert kernel.calls["forward"] == 1
    assert len(warned()) == 1
