"""Every dispatch rule both ways: the call that passes goes to the kernel, the one that
fails falls back with the rule's reason and PyTorch's exact result."""

import asyncio
import threading

import pytest
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode

import metal_flash_sdpa
from conftest import pytorch_sdpa
from metal_flash_sdpa import kernels, rules
from metal_flash_sdpa.kernels.base import Call, Kernel


def qkv(*shape, dtype=torch.float32, grad=False):
    return [torch.randn(*shape, dtype=dtype, requires_grad=grad) for _ in range(3)]


class NarrowKernel(metal_flash_sdpa.ReferenceKernel):
    """A kernel with MFA-like limits, to test that the dispatcher consults supports()."""

    name = "narrow"
    dtypes = frozenset({torch.float32})
    max_head_dim = 64
    head_dim_multiple = 8
    supports_value_dim_differs = False
    causal_forward = "square"
    causal_backward = None
    mask_backward = False
    mask_per_head = False


def base_call():
    q, k, v = qkv(1, 2, 16, 8)
    return dict(query=q, key=k, value=v)


def with_(**changes):
    def build():
        call = base_call()
        call.update(changes)
        return call

    return build


def shaped(q, k=None, v=None, **extra):
    def build():
        call = dict(
            query=torch.randn(*q),
            key=torch.randn(*(k or q)),
            value=torch.randn(*(v or k or q)),
        )
        call.update({name: (value() if callable(value) else value) for name, value in extra.items()})
        return call

    return build


# (reason that the failing call reports, passing call, failing call)
RULES = [
    (rules.SHORT, shaped((1, 2, 16, 8)), shaped((1, 2, 15, 8))),
    (rules.FEW_DIMS, shaped((2, 16, 8)), shaped((16, 8))),
    (rules.DTYPES, base_call, lambda: dict(base_call(), key=torch.randn(1, 2, 16, 8, dtype=torch.float64))),
    (rules.ARGUMENT_TYPES, with_(dropout_p=0), with_(dropout_p=torch.tensor(0.0))),
    (rules.ARGUMENT_TYPES, with_(scale=2), with_(scale="2")),
    (rules.ARGUMENT_TYPES, with_(is_causal=True), with_(is_causal=1)),
    (rules.DROPOUT, with_(dropout_p=0.0), with_(dropout_p=1.0)),
    (rules.DROPOUT, with_(dropout_p=0.0), with_(dropout_p=-0.1)),
    (rules.DROPOUT, with_(dropout_p=0.0), with_(dropout_p=float("nan"))),
    ("query, key and value have different ranks", shaped((1, 2, 16, 8)), shaped((1, 2, 16, 8), (2, 16, 8))),
    (rules.BATCH_DIMS, shaped((2, 2, 16, 8)), shaped((2, 2, 16, 8), (1, 2, 16, 8))),
    ("query and key head dims differ", shaped((1, 2, 16, 8), (1, 2, 16, 8), (1, 2, 16, 4)), shaped((1, 2, 16, 8), (1, 2, 16, 4))),
    ("key and value lengths differ", shaped((1, 2, 16, 8), (1, 2, 20, 8)), shaped((1, 2, 16, 8), (1, 2, 20, 8), (1, 2, 21, 8))),
    ("key and value head counts differ", shaped((1, 2, 16, 8)), shaped((1, 2, 16, 8), (1, 2, 16, 8), (1, 1, 16, 8))),
    (
        "query and key head counts differ without enable_gqa",
        shaped((1, 4, 16, 8), (1, 2, 16, 8), enable_gqa=True),
        shaped((1, 4, 16, 8), (1, 2, 16, 8)),
    ),
    ("query heads not a multiple of key heads", shaped((1, 4, 16, 8), (1, 2, 16, 8), enable_gqa=True), shaped((1, 3, 16, 8), (1, 2, 16, 8), enable_gqa=True)),
    (rules.EMPTY, shaped((1, 2, 16, 8)), shaped((0, 2, 16, 8))),
    (rules.CAUSAL_WITH_MASK, with_(is_causal=True), with_(is_causal=True, attn_mask=torch.ones(16, 16, dtype=torch.bool))),
    (
        "attn_mask dtype is neither bool nor the query dtype",
        with_(attn_mask=torch.zeros(16, 16)),
        with_(attn_mask=torch.zeros(16, 16, dtype=torch.float64)),
    ),
    ("attn_mask has more dims than query", with_(attn_mask=torch.zeros(1, 1, 16, 16)), with_(attn_mask=torch.zeros(1, 1, 1, 16, 16))),
    ("attn_mask does not broadcast to (..., L, S)", with_(attn_mask=torch.zeros(2, 1, 16)), with_(attn_mask=torch.zeros(3, 16, 16))),
    (rules.NOT_TENSORS, with_(attn_mask=None), with_(attn_mask=[[0.0]])),
]


# Failing calls PyTorch's CPU SDPA answers without checking them, with values that depend on
# memory outside the inputs (keys shorter than values: its flash kernel reads past the
# keys), so two calls of the builtin itself can differ.
UNDEFINED_BY_PYTORCH = {"key and value lengths differ"}


@pytest.mark.parametrize("reason, passing, failing", RULES, ids=[r[0] + f"#{i}" for i, r in enumerate(RULES)])
def test_rule_both_ways(reference_cpu, reason, passing, failing):
    metal_flash_sdpa.MIN_SEQ_LEN = 16
    ok = passing()
    assert metal_flash_sdpa.explain(**ok) is None
    torch.testing.assert_close(F.scaled_dot_product_attention(**ok), pytorch_sdpa(**ok), atol=2e-5, rtol=1e-4)
    assert metal_flash_sdpa.get_dispatch_count() == 1

    bad = failing()
    assert metal_flash_sdpa.explain(**bad) == reason
    metal_flash_sdpa.reset_dispatch_count()
    try:
        expected = pytorch_sdpa(**bad, math=False)
    except Exception as error:  # invalid calls: the patched function raises the same
        with pytest.raises(type(error)):
            F.scaled_dot_product_attention(**bad)
    else:
        torch.manual_seed(0)
        got = F.scaled_dot_product_attention(**bad)
        if bad.get("dropout_p", 0) == 0 and reason not in UNDEFINED_BY_PYTORCH:
            torch.testing.assert_close(got, expected, atol=0, rtol=0)
        assert got.shape == expected.shape
    assert metal_flash_sdpa.get_dispatch_count() == 0
    assert metal_flash_sdpa.fallback_counts().get(reason) == 1


def test_no_kernel_for_device(restore_state):
    kernels.register_kernel("cpu", None)
    metal_flash_sdpa.enable()
    q, k, v = qkv(1, 2, 300, 8)
    assert metal_flash_sdpa.explain(q, k, v) == "no kernel registered for device type 'cpu'"
    expected = pytorch_sdpa(q, k, v, math=False)
    metal_flash_sdpa.reset_dispatch_count()
    torch.testing.assert_close(F.scaled_dot_product_attention(q, k, v), expected, atol=0, rtol=0)
    assert metal_flash_sdpa.fallback_counts() == {"no kernel registered for device type 'cpu'": 1}
    assert metal_flash_sdpa.get_dispatch_count() == 0


def test_not_enabled_and_disabled_scope(reference_cpu):
    q, k, v = qkv(1, 2, 16, 8)
    with metal_flash_sdpa.disabled():
        assert metal_flash_sdpa.explain(q, k, v) == rules.DISABLED
    metal_flash_sdpa.disable()
    assert metal_flash_sdpa.explain(q, k, v) == "metal_flash_sdpa is not enabled"


def test_min_seq_len_is_read_at_call_time(reference_cpu):
    q, k, v = qkv(1, 2, 300, 8)
    metal_flash_sdpa.MIN_SEQ_LEN = 512
    assert metal_flash_sdpa.explain(q, k, v) == rules.SHORT
    metal_flash_sdpa.MIN_SEQ_LEN = 300
    assert metal_flash_sdpa.explain(q, k, v) is None


@pytest.mark.parametrize("layout", [torch.strided, torch.jagged])
def test_nested_tensors_fall_back(reference_cpu, layout):
    nt = torch.nested.nested_tensor([torch.randn(2, 16, 8), torch.randn(2, 20, 8)], layout=layout)
    assert metal_flash_sdpa.explain(nt, nt, nt) in (rules.NESTED, rules.TORCH_FUNCTION)
    try:
        expected = pytorch_sdpa(nt, nt, nt, math=False)
    except Exception as error:
        with pytest.raises(type(error)):
            F.scaled_dot_product_attention(nt, nt, nt)
    else:
        got = F.scaled_dot_product_attention(nt, nt, nt)
        for a, b in zip(got.unbind(), expected.unbind()):
            torch.testing.assert_close(a, b)
    assert metal_flash_sdpa.get_dispatch_count() == 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_casts_like_pytorch_then_dispatches(reference_cpu, dtype):
    q, k, v = qkv(1, 2, 32, 16, grad=True)
    mask = torch.randn(32, 32)
    with torch.autocast("cpu", dtype=dtype):
        assert metal_flash_sdpa.explain(q, k, v, attn_mask=mask) is None
        ours = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        theirs = pytorch_sdpa(q, k, v, attn_mask=mask, math=False)
        double = pytorch_sdpa(q.double(), k.double(), v.double(), attn_mask=mask.double())
    assert ours.dtype == theirs.dtype == dtype
    assert metal_flash_sdpa.get_dispatch_count() == 1
    assert rules.AUTOCAST not in metal_flash_sdpa.fallback_counts()
    grad = torch.randn_like(ours)
    ours_grads = torch.autograd.grad(ours, (q, k, v), grad)
    their_grads = torch.autograd.grad(theirs, (q, k, v), grad)
    atol, rtol = metal_flash_sdpa.ReferenceKernel.tolerances[dtype]
    assert (ours.double() - double).abs().max() <= 2 * (theirs.double() - double).abs().max() + atol
    for a, b in zip(ours_grads, their_grads):
        assert a.dtype == b.dtype == torch.float32  # autograd casts back through the autocast cast
        torch.testing.assert_close(a, b, atol=4 * atol, rtol=4 * rtol)


def test_functorch_transforms_fall_back(reference_cpu):
    q, k, v = qkv(1, 2, 16, 8)
    grad = torch.func.grad(lambda q: F.scaled_dot_product_attention(q, k, v).sum())(q)
    expected = torch.func.grad(lambda q: pytorch_sdpa(q, k, v, math=False).sum())(q)
    torch.testing.assert_close(grad, expected)
    assert metal_flash_sdpa.fallback_counts().get(rules.FUNCTORCH) == 1


def test_kernel_supports_is_consulted(reference_cpu):
    kernels.register_kernel("cpu", NarrowKernel())
    cases = [
        (qkv(1, 2, 16, 8), {}, None),
        (qkv(1, 2, 16, 8, dtype=torch.float64), {}, "dtype float64 not supported by narrow"),
        (qkv(1, 2, 16, 72), {}, "head dim 72 not supported by narrow"),
        (qkv(1, 2, 16, 12), {}, "head dim 12 not supported by narrow"),
        (qkv(1, 2, 16, 8), dict(is_causal=True), None),
        (qkv(1, 2, 16, 8, grad=True), dict(is_causal=True), "is_causal not supported by narrow with grad"),
        (
            [torch.randn(1, 2, 16, 8), torch.randn(1, 2, 24, 8), torch.randn(1, 2, 24, 8)],
            dict(is_causal=True),
            "is_causal with q_len != kv_len not supported by narrow",
        ),
        (qkv(1, 2, 16, 8), dict(attn_mask=torch.zeros(1, 2, 16, 16)), "per-head attn_mask not supported by narrow"),
        (qkv(1, 2, 16, 8), dict(attn_mask=torch.zeros(1, 1, 16, 16)), None),
        (qkv(1, 2, 16, 8, grad=True), dict(attn_mask=torch.zeros(16, 16)), "attn_mask not supported by narrow with grad"),
    ]
    for (q, k, v), kwargs, reason in cases:
        assert metal_flash_sdpa.explain(q, k, v, **kwargs) == reason, (q.shape, kwargs)
    with torch.no_grad():  # grad not needed: the forward-only limits apply
        q, k, v = qkv(1, 2, 16, 8, grad=True)
        assert metal_flash_sdpa.explain(q, k, v, is_causal=True) is None


def test_rules_never_read_tensor_values():
    """Under FakeTensorMode any .item(), .all() or .cpu() of a value would raise: the rules
    must decide every pattern from metadata alone."""
    kernel = metal_flash_sdpa.ReferenceKernel()
    with FakeTensorMode():
        q, k, v = (torch.empty(2, 4, 300, 64) for _ in range(3))
        masks = [None, torch.empty(2, 1, 300, 300, dtype=torch.bool), torch.empty(300, 300), torch.empty(1, 4, 300, 300)]
        for mask in masks:
            args = (q, k, v, mask, 0.0, False, None, False)
            reason = rules.evaluate(*args)[0]
            assert reason in (None, "no kernel registered for device type 'cpu'")
            assert rules.check_mask(mask, q.dtype, q.shape, k.shape) is None if mask is not None else True
            assert kernel.supports(rules.describe(q.shape, k.shape, v.shape, q.dtype, mask, False, False)) is None


def test_dispatch_count_is_exact_under_threads(reference_cpu):
    q, k, v = qkv(1, 1, 4, 4)

    def work():
        for _ in range(200):
            F.scaled_dot_product_attention(q, k, v)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert metal_flash_sdpa.get_dispatch_count() == 800, metal_flash_sdpa.fallback_counts()


def test_log_first_occurrence_of_each_reason(tmp_path):
    from conftest import run_python

    code = (
        "import logging, torch, metal_flash_sdpa as m\n"
        "logging.basicConfig(level=logging.INFO, format='LOG %(name)s %(message)s')\n"
        "m.register_kernel('cpu', m.ReferenceKernel()); m.enable(); m.MIN_SEQ_LEN = 16\n"
        "short, full = torch.randn(1, 2, 8, 4), torch.randn(1, 2, 16, 4)\n"
        "for _ in range(3): torch.nn.functional.scaled_dot_product_attention(short, short, short)\n"
        "for _ in range(2): torch.nn.functional.scaled_dot_product_attention(full, full, full, dropout_p=1.0)\n"
        "print(sorted(m.fallback_counts().values()))\n"
    )
    result = run_python(code, env={"MFA_LOG": "1"})
    assert result.returncode == 0, result.stderr
    logged = [line for line in result.stderr.splitlines() if line.startswith("LOG metal_flash_sdpa")]
    assert len(logged) == 2, result.stderr
    assert rules.SHORT in logged[0] and rules.DROPOUT in logged[1]
    assert result.stdout.strip() == "[2, 3]"
    quiet = run_python(code)
    assert "LOG metal_flash_sdpa" not in quiet.stderr


def test_call_describes_the_flattened_view():
    q = torch.empty(2, 3, 4, 40, 16)
    k = torch.empty(2, 3, 2, 50, 16)
    v = torch.empty(2, 3, 2, 50, 24)
    call = rules.describe(q.shape, k.shape, v.shape, q.dtype, torch.empty(4, 1, 50, dtype=torch.bool), True, False)
    assert call == Call(torch.float32, 6, 4, 2, 40, 50, 16, 24, True, "bool", True, False, mask_lines=True)  # one row
    full = rules.describe(q.shape, k.shape, v.shape, q.dtype, torch.empty(40, 50), False, True)
    assert not full.mask_lines
    assert isinstance(metal_flash_sdpa.ReferenceKernel(), Kernel)


