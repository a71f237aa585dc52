"""Drop-in parity beyond plain calls: what PyTorch's own SDPA tests exercise. CausalBias
masks and other __torch_function__ overrides, TorchScript, batched gradients (vmap over a
backward) and ``torch.nn.attention.sdpa_kernel`` backend selection, each against the
unpatched builtin on fresh random inputs."""

import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.bias import causal_lower_right, causal_upper_left
from torch.overrides import TorchFunctionMode

import metal_flash_sdpa
from helpers import NoDropoutKernel, RecordingKernel
from metal_flash_sdpa import kernels, patch, rules


@pytest.fixture
def counting(reference_cpu, no_selfcheck):
    kernel = RecordingKernel(block_size=32)
    kernels.register_kernel("cpu", kernel)
    return kernel


def unpatched(fn):
    """``fn()`` with torch.nn.functional.scaled_dot_product_attention the builtin itself."""
    patch.disable()
    try:
        return fn()
    finally:
        patch.enable()


def outcome(fn):
    """(result, None) or (None, (exception type, message))."""
    try:
        return fn(), None
    except Exception as error:  # noqa: BLE001 - parity of any exception is the point
        return None, (type(error), str(error))


def rand_qkv(q_len, kv_len, grad=False, dtype=torch.float32, heads=2, dim=8):
    q = torch.rand(2, heads, q_len, dim, dtype=dtype, requires_grad=grad)
    k = torch.rand(2, heads, kv_len, dim, dtype=dtype, requires_grad=grad)
    v = torch.rand(2, heads, kv_len, dim, dtype=dtype, requires_grad=grad)
    return q, k, v


# --- CausalBias and __torch_function__ -------------------------------------------------

LENGTHS = [(4, 4), (4, 6), (6, 4), (1, 5), (37, 53)]


@pytest.mark.parametrize("make_bias", [causal_upper_left, causal_lower_right])
@pytest.mark.parametrize("lengths", LENGTHS, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("grad", [False, True], ids=["forward", "backward"])
def test_causal_bias_matches_the_builtin(counting, make_bias, lengths, grad):
    q_len, kv_len = lengths
    q, k, v = rand_qkv(q_len, kv_len, grad)
    bias = make_bias(q_len, kv_len)
    grad_out = torch.randn(2, 2, q_len, 8)

    def run():
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return [out, *torch.autograd.grad(out, (q, k, v), grad_out)] if grad else [out]

    ours, theirs = run(), unpatched(run)
    assert type(ours[0]) is torch.Tensor
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    # upper-left is is_causal, lower-right a materialised mask (where it differs): both
    # are served; the backward by the same kernel
    assert len(counting.forwards) == 1 and metal_flash_sdpa.get_dispatch_count() == 1
    assert len(counting.backwards) == (1 if grad else 0)


@pytest.mark.parametrize("make_bias", [causal_upper_left, causal_lower_right])
@pytest.mark.parametrize(
    "kwargs",
    [dict(is_causal=True), dict(dropout_p=0.5), dict(scale=0.3), dict(enable_gqa=True)],
    ids=["is_causal", "dropout", "scale", "gqa"],
)
def test_causal_bias_arguments_match_the_builtin(reference_cpu, make_bias, kwargs):
    kernels.register_kernel("cpu", NoDropoutKernel())  # PyTorch drops: the same bits both ways
    q, k, v = rand_qkv(5, 7, grad=True)
    bias = make_bias(5, 7)

    def run():
        torch.manual_seed(0)  # dropout draws the same keep mask both ways
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, **kwargs)

    (ours, our_error), (theirs, their_error) = outcome(run), outcome(lambda: unpatched(run))
    assert our_error == their_error
    if their_error is None:
        torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-5)
    else:
        assert their_error[0] is ValueError  # is_causal with a CausalBias


@pytest.mark.parametrize("make_bias", [causal_upper_left, causal_lower_right])
def test_causal_bias_compiled(counting, make_bias):
    torch._dynamo.reset()
    q, k, v = rand_qkv(6, 9, grad=True)
    bias = make_bias(6, 9)

    def loss(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias).square().sum()

    try:
        compiled = torch.compile(loss, backend="aot_eager")
        ours = compiled(q, k, v)
        our_grads = torch.autograd.grad(ours, (q, k, v))
    finally:
        torch._dynamo.reset()
    theirs = unpatched(lambda: loss(q, k, v))
    their_grads = torch.autograd.grad(theirs, (q, k, v))
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    for a, b in zip(our_grads, their_grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert len(counting.forwards) == 1 and len(counting.backwards) == 1


class Tagged(torch.Tensor):
    """A subclass with Tensor's own __torch_function__: results come back as Tagged."""


def test_subclass_with_default_torch_function_gets_the_builtin(counting):
    q, k, v = rand_qkv(16, 16)
    tagged = q.as_subclass(Tagged)
    ours = F.scaled_dot_product_attention(tagged, k, v)
    theirs = unpatched(lambda: F.scaled_dot_product_attention(tagged, k, v))
    assert type(ours) is type(theirs) is Tagged
    torch.testing.assert_close(ours.as_subclass(torch.Tensor), theirs.as_subclass(torch.Tensor))
    assert len(counting.forwards) == 0
    assert metal_flash_sdpa.fallback_counts() == {rules.TORCH_FUNCTION: 1}


class Recording(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.seen.append(func)
        return func(*args, **(kwargs or {}))


def test_torch_function_mode_sees_pytorchs_sdpa(counting):
    q, k, v = rand_qkv(16, 16)
    with Recording() as mode:
        ours = F.scaled_dot_product_attention(q, k, v, scale=0.5)
    with Recording() as unpatched_mode:
        theirs = unpatched(lambda: F.scaled_dot_product_attention(q, k, v, scale=0.5))
    assert mode.seen == unpatched_mode.seen == [torch._C._nn.scaled_dot_product_attention]
    torch.testing.assert_close(ours, theirs, atol=0, rtol=0)
    assert len(counting.forwards) == 0 and metal_flash_sdpa.fallback_counts() == {rules.TORCH_FUNCTION: 1}


def test_explain_names_a_causal_bias(reference_cpu):
    q, k, v = rand_qkv(4, 4)
    assert metal_flash_sdpa.explain(q, k, v, attn_mask=causal_upper_left(4, 4)) == rules.CAUSAL_BIAS
    assert metal_flash_sdpa.explain(q, k, v, attn_mask=torch.rand(4, 4) > 0.5) is None


# --- TorchScript ---------------------------------------------------------------------


def user_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.25)


def transformer_modules():
    torch.manual_seed(0)
    kwargs = dict(dim_feedforward=32, dropout=0.0, batch_first=True)
    return {
        "MultiheadAttention": (nn.MultiheadAttention(16, 2, batch_first=True), 2),
        "TransformerEncoderLayer": (nn.TransformerEncoderLayer(16, 2, **kwargs), 1),
        "TransformerDecoderLayer": (nn.TransformerDecoderLayer(16, 2, **kwargs), 2),
        "Transformer": (nn.Transformer(16, 2, 1, 1, **kwargs), 2),
    }


@pytest.mark.parametrize("name", list(transformer_modules()))
def test_torchscript_modules(reference_cpu, name):
    module, inputs = transformer_modules()[name]
    module.eval()
    x = torch.randn(2, 5, 16)
    args = (x,) * inputs if name != "MultiheadAttention" else (x, x, x)
    scripted = torch.jit.script(module)
    with torch.no_grad():
        ours = scripted(*args)
        theirs = unpatched(lambda: module(*args))
    ours, theirs = (r[0] if isinstance(r, tuple) else r for r in (ours, theirs))
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_torchscript_user_function(reference_cpu):
    scripted = torch.jit.script(user_attention)
    q, k, v = rand_qkv(16, 16)
    torch.testing.assert_close(scripted(q, k, v), unpatched(lambda: user_attention(q, k, v)))
    # scripted code runs PyTorch's aten op: TorchScript never reaches the dispatcher
    assert metal_flash_sdpa.get_dispatch_count() == 0
    assert "aten::scaled_dot_product_attention" in str(scripted.graph)


def test_torchscript_scripts_again_after_disable(reference_cpu):
    torch.jit.script(nn.MultiheadAttention(8, 2))
    patch.disable()
    torch.jit.script(nn.MultiheadAttention(8, 2))
    patch.enable()
    torch.jit.script(nn.MultiheadAttention(8, 2))


# --- batched gradients -----------------------------------------------------------------


def batched_grads_pair(counting, compute, **call):
    """``compute(out, inputs)`` on the patched call and on the builtin's."""
    q, k, v = rand_qkv(9, 11, grad=True, dtype=call.pop("dtype", torch.float32))
    ours = F.scaled_dot_product_attention(q, k, v, **call)
    theirs = unpatched(lambda: F.scaled_dot_product_attention(q, k, v, **call))
    assert len(counting.forwards) == 1
    return compute(ours, (q, k, v)), compute(theirs, (q, k, v))


@pytest.mark.parametrize("call", [dict(), dict(is_causal=True), dict(attn_mask=torch.rand(9, 11) > 0.3)],
                         ids=["plain", "causal", "mask"])
@pytest.mark.parametrize("transform", ["is_grads_batched", "vmap"])
def test_batched_gradients(counting, call, transform):
    grad_outs = torch.randn(3, 2, 2, 9, 8)

    def compute(out, inputs):
        if transform == "vmap":
            return torch.func.vmap(lambda g: torch.autograd.grad(out, inputs, g, retain_graph=True))(grad_outs)
        return torch.autograd.grad(out, inputs, grad_outs, is_grads_batched=True)

    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="metal_flash_sdpa")
        ours, theirs = batched_grads_pair(counting, compute, **call)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    # the kernel was not asked to batch, and nothing was blocked
    assert len(counting.backwards) == 0 and not kernels.failed
    assert metal_flash_sdpa.fallback_counts() == {}


def test_gradcheck_with_batched_grad(counting):
    inputs = [torch.randn(1, 2, 6, 4, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    assert torch.autograd.gradcheck(
        lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True), inputs, check_batched_grad=True
    )
    assert len(counting.forwards) > 0 and len(counting.backwards) > 0 and not kernels.failed


# --- sdpa_kernel -----------------------------------------------------------------------

SELECTIONS = {
    "math": ([SDPBackend.MATH], False),
    "cudnn": ([SDPBackend.CUDNN_ATTENTION], False),
    "flash": ([SDPBackend.FLASH_ATTENTION], True),
    "efficient": ([SDPBackend.EFFICIENT_ATTENTION], True),
    "math+flash": ([SDPBackend.MATH, SDPBackend.FLASH_ATTENTION], True),
}


@pytest.mark.parametrize("selection", list(SELECTIONS))
def test_sdpa_kernel_selection(counting, selection):
    backends, served = SELECTIONS[selection]
    q, k, v = rand_qkv(16, 16)
    with sdpa_kernel(backends):
        reason = metal_flash_sdpa.explain(q, k, v, is_causal=True)
        ours, error = outcome(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True))
        theirs, their_error = outcome(lambda: unpatched(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)))
    if served:
        assert reason is None and len(counting.forwards) == 1 and error is None
        torch.testing.assert_close(ours, unpatched(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)))
    else:
        assert reason == rules.BACKENDS and len(counting.forwards) == 0
        assert metal_flash_sdpa.fallback_counts() == {rules.BACKENDS: 1}
        assert error == their_error  # cudnn on CPU: PyTorch's own "no available kernel"
        if error is None:
            torch.testing.assert_close(ours, theirs, atol=0, rtol=0)


def test_sdpa_kernel_selection_compiled(counting):
    """A graph compiled outside a selection honours it when run inside, and the other way
    round; the backward of a forward PyTorch answered is PyTorch's, after the selection ended."""
    torch._dynamo.reset()
    q, k, v = rand_qkv(16, 16, grad=True)

    def loss(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True).square().sum()

    try:
        compiled = torch.compile(loss, backend="aot_eager", fullgraph=True)
        with sdpa_kernel([SDPBackend.MATH]):
            inside = compiled(q, k, v)
        inside_grads = torch.autograd.grad(inside, (q, k, v))
        assert len(counting.forwards) == 0 and len(counting.backwards) == 0
        assert metal_flash_sdpa.fallback_counts() == {rules.BACKENDS: 1}
        outside = compiled(q, k, v)
        outside_grads = torch.autograd.grad(outside, (q, k, v))
        assert len(counting.forwards) == 1 and len(counting.backwards) == 1
    finally:
        torch._dynamo.reset()
    theirs = unpatched(lambda: loss(q, k, v))
    their_grads = torch.autograd.grad(theirs, (q, k, v))
    for ours, grads in ((inside, inside_grads), (outside, outside_grads)):
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
        for a, b in zip(grads, their_grads):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
