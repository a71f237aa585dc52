"""Attention dropout: the generator (metal_flash_sdpa.dropout), the seed, the dispatch rule,
and the reference kernel's forward and backward against PyTorch's math SDPA given the same
keep decisions (``aten._scaled_dot_product_attention_math`` takes a ``dropout_mask``)."""

import warnings

import pytest
import torch
import torch.nn.functional as F

import metal_flash_sdpa
from metal_flash_sdpa import dropout, kernels, rules
from helpers import NoDropoutKernel, RecordingKernel, with_mfa_capabilities
from metal_flash_sdpa.check import compare
from metal_flash_sdpa.kernels.mfa import MFAKernel


def math_with_keep(q, k, v, mask, p, causal, keep, scale=None):
    """PyTorch's math SDPA dropping exactly where ``keep`` is False."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Dropout mask should only be used for testing purposes"
        return torch.ops.aten._scaled_dot_product_attention_math(
            q, k, v, mask, p, causal, keep, scale=scale, enable_gqa=k.shape[-3] != q.shape[-3]
        )[0]


class OtherBitsInBackward(RecordingKernel):
    """A mutant: the backward regenerates other decisions than the forward drew."""

    name = "mutant"

    def backward(self, *args, dropout=None):
        self.backwards.append(dropout)
        p, seed = dropout
        return metal_flash_sdpa.ReferenceKernel.backward(self, *args, dropout=(p, seed ^ 1))


@with_mfa_capabilities
class MFACapabilityRecording(RecordingKernel, MFAKernel):
    """RecordingKernel's arithmetic with MFAKernel's declarations and its ``supports()``: which
    calls of a model reach MFA is decided as on a Mac."""

    name = "mfa-capabilities"
    calibrated = False  # what MFA serves, not how fast

    def available(self):
        return None

    def supports(self, call):
        return MFAKernel.supports(self, call)


@pytest.fixture
def recording(reference_cpu, no_selfcheck):
    kernel = RecordingKernel()
    kernels.register_kernel("cpu", kernel)
    return kernel


@pytest.fixture(params=[RecordingKernel, MFACapabilityRecording], ids=["reference", "mfa-capabilities"])
def model_kernel(reference_cpu, no_selfcheck, request):
    kernel = request.param()
    kernels.register_kernel("cpu", kernel)
    return kernel


# --- the generator ---------------------------------------------------------------------


def words(counter, key):
    return [int(w) for w in dropout.philox4x32([torch.tensor(c) for c in counter], key)]


def test_philox_known_answers():
    # Random123's known-answer vectors for philox4x32_10 (kat_vectors)
    assert words((0, 0, 0, 0), (0, 0)) == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]
    assert words((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2) == [0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD]
    assert words((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0)) == [
        0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1,
    ]


def test_threshold():
    assert dropout.threshold(0.5) == 2**31
    assert dropout.threshold(1e-12) == 1 and dropout.threshold(1 - 1e-12) == 2**32 - 1
    for bad in (0.0, 1.0, -0.1, float("nan")):
        with pytest.raises(ValueError):
            dropout.threshold(bad)


SHAPE = (2, 4, 256, 512)  # 2**20 decisions


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_keep_rate_within_four_sigma(p):
    keep = dropout.keep_mask(12345, p, *SHAPE)
    n = keep.numel()
    assert n >= 10**6
    rate = keep.double().mean().item()
    assert abs(rate - (1 - p)) <= 4 * (p * (1 - p) / n) ** 0.5, rate


def correlation(a, b):
    a, b = a.double().flatten(), b.double().flatten()
    a, b = a - a.mean(), b - b.mean()
    return ((a * b).mean() / (a.std() * b.std())).item(), a.numel()


@pytest.mark.parametrize("dim", [-1, -2, -3, -4], ids=["columns", "rows", "heads", "batches"])
def test_no_correlation_between_neighbours(dim):
    keep = dropout.keep_mask(777, 0.3, *SHAPE)
    size = keep.shape[dim]
    r, n = correlation(keep.narrow(dim, 0, size - 1), keep.narrow(dim, 1, size - 1))
    assert abs(r) < 4 / n**0.5, r


def test_another_seed_other_decisions():
    a, b = dropout.keep_mask(1, 0.3, *SHAPE), dropout.keep_mask(2, 0.3, *SHAPE)
    r, n = correlation(a, b)
    assert abs(r) < 4 / n**0.5 and not torch.equal(a, b)
    # the two halves of the 64-bit seed both count
    assert not torch.equal(a, dropout.keep_mask(1 + 2**32, 0.3, *SHAPE))


def test_decisions_independent_of_tiling():
    full = dropout.keep_mask(99, 0.4, 2, 3, 45, 37)
    assert torch.equal(dropout.keep_mask(99, 0.4, 2, 3, range(16, 32), 37), full[:, :, 16:32])
    assert torch.equal(dropout.keep_mask(99, 0.4, 2, 3, 45, 30), full[..., :30])  # fewer columns


# --- the kernel against PyTorch's math with the same decisions ---------------------------

DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
CASES = {
    "plain": dict(),
    "causal": dict(is_causal=True),
    "bool mask": dict(mask="bool"),
    "additive mask per head": dict(mask="additive"),
    "gqa causal": dict(is_causal=True, kv_heads=2),
}


def make_call(dtype, kv_heads=4, mask=None, is_causal=False, q_len=37, kv_len=53):
    torch.manual_seed(0)
    q = torch.randn(2, 4, q_len, 16, dtype=dtype, requires_grad=True)
    k = torch.randn(2, kv_heads, kv_len, 16, dtype=dtype, requires_grad=True)
    v = torch.randn(2, kv_heads, kv_len, 16, dtype=dtype, requires_grad=True)
    kwargs = dict(is_causal=is_causal, enable_gqa=kv_heads != 4)
    if mask == "bool":
        kwargs["attn_mask"] = torch.rand(2, 1, q_len, kv_len) > 0.2
    elif mask == "additive":
        kwargs["attn_mask"] = torch.randn(2, 4, q_len, kv_len, dtype=dtype)
    return (q, k, v), kwargs


def math_mask(kwargs, dtype):
    mask = kwargs.get("attn_mask")
    if mask is None or mask.dtype != torch.bool:
        return None if mask is None else mask.to(dtype)
    return torch.zeros(mask.shape, dtype=dtype).masked_fill(~mask, float("-inf"))


def assert_matches_math(kernel, inputs, kwargs, p, tolerances):
    """The patched call's out, dq, dk, dv against PyTorch's math with the kernel's keep mask:
    in the dtype and in float64 (the gold), judged by check's rule."""
    q, k, v = inputs
    out = F.scaled_dot_product_attention(q, k, v, dropout_p=p, **kwargs)
    grad_out = torch.randn_like(out)
    ours = [out, *torch.autograd.grad(out, inputs, grad_out)]
    (p_used, seed), = kernel.forwards
    assert p_used == p and kernel.backwards == [(p, seed)]
    keep = dropout.keep_mask(seed, p, q.shape[0], q.shape[1], q.shape[2], k.shape[2])
    causal = kwargs.get("is_causal", False)

    def reference(dtype):
        ins = [t.detach().to(dtype).requires_grad_() for t in inputs]
        ref = math_with_keep(*ins, math_mask(kwargs, dtype), p, causal, keep)
        return [ref, *torch.autograd.grad(ref, ins, grad_out.to(dtype))]

    atol, rtol = tolerances[q.dtype]
    for name, a, b, g in zip(("out", "dq", "dk", "dv"), ours, reference(q.dtype), reference(torch.float64)):
        miss = compare(a.double(), b.double(), g, atol, rtol)
        assert miss is None, f"{name}: {miss}"


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_reference_kernel_drops_as_math_does(recording, dtype, case):
    inputs, kwargs = make_call(dtype, **CASES[case])
    assert_matches_math(recording, inputs, kwargs, 0.3, metal_flash_sdpa.ReferenceKernel.tolerances)
    assert metal_flash_sdpa.get_dispatch_count() == 1


def test_a_backward_with_other_decisions_fails(reference_cpu, no_selfcheck):
    kernel = OtherBitsInBackward()
    kernels.register_kernel("cpu", kernel)
    inputs, kwargs = make_call(torch.float64)
    with pytest.raises(AssertionError, match="dq|dk|dv"):
        assert_matches_math(kernel, inputs, kwargs, 0.3, metal_flash_sdpa.ReferenceKernel.tolerances)


def test_dropout_keeps_the_undropped_lse(recording):
    (q, k, v), _ = make_call(torch.float64)
    kernel = recording
    plain = kernel.forward(q, k, v, 0.25, False, None)
    dropped = kernel.forward(q, k, v, 0.25, False, None, dropout=(0.5, 3))
    torch.testing.assert_close(dropped[1], plain[1], atol=0, rtol=0)
    assert not torch.equal(dropped[0], plain[0])


# --- seed --------------------------------------------------------------------------------


def test_seed_reproducible_under_manual_seed_and_fresh_per_call(recording):
    q, k, v = (torch.randn(1, 2, 24, 8) for _ in range(3))
    torch.manual_seed(5)
    first, second = (F.scaled_dot_product_attention(q, k, v, dropout_p=0.5) for _ in range(2))
    torch.manual_seed(5)
    again = F.scaled_dot_product_attention(q, k, v, dropout_p=0.5)
    assert torch.equal(first, again) and not torch.equal(first, second)
    seeds = [seed for _, seed in recording.forwards]
    assert seeds[0] == seeds[2] != seeds[1]


def test_compiled_dropout_draws_when_it_runs(recording):
    torch._dynamo.reset()
    inputs, kwargs = make_call(torch.float32, is_causal=True)

    def attention(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, dropout_p=0.3, **kwargs)

    try:
        compiled = torch.compile(attention, backend="aot_eager", fullgraph=True)
        outs = [compiled(*inputs) for _ in range(2)]
        torch.manual_seed(11)
        first = compiled(*inputs)
        torch.manual_seed(11)
        again = compiled(*inputs)
    finally:
        torch._dynamo.reset()
    assert not torch.equal(outs[0], outs[1])  # never a seed frozen into the graph
    assert torch.equal(first, again)
    assert len({seed for _, seed in recording.forwards}) == 3
    # the backward of a compiled call regenerates its forward's decisions
    recording.forwards.clear()
    recording.backwards.clear()
    torch._dynamo.reset()
    try:
        compiled = torch.compile(attention, backend="aot_eager", fullgraph=True)
        out = compiled(*inputs)
        grads = torch.autograd.grad(out.square().sum(), inputs)
    finally:
        torch._dynamo.reset()
    (p, seed), = recording.forwards
    assert recording.backwards == [(p, seed)]
    q, k, v = inputs
    keep = dropout.keep_mask(seed, p, 2, 4, 37, 53)
    ins = [t.detach().double().requires_grad_() for t in inputs]
    ref = math_with_keep(*ins, None, p, True, keep)
    ref_grads = torch.autograd.grad(ref.square().sum(), ins)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a.double(), b, atol=1e-4, rtol=1e-4)


# --- dispatch ----------------------------------------------------------------------------


def test_dropout_needs_a_kernel_that_declares_it(reference_cpu):
    kernels.register_kernel("cpu", NoDropoutKernel())
    q, k, v = (torch.randn(1, 2, 24, 8) for _ in range(3))
    assert metal_flash_sdpa.explain(q, k, v, dropout_p=0.2) == "dropout not supported by no-dropout"
    torch.manual_seed(3)
    ours = F.scaled_dot_product_attention(q, k, v, dropout_p=0.2)
    assert metal_flash_sdpa.fallback_counts() == {"dropout not supported by no-dropout": 1}
    torch.manual_seed(3)
    with metal_flash_sdpa.disabled():
        theirs = F.scaled_dot_product_attention(q, k, v, dropout_p=0.2)
    torch.testing.assert_close(ours, theirs, atol=0, rtol=0)  # PyTorch's own dropout, same bits


@pytest.mark.parametrize("p", [1.0, -0.5, float("nan"), float("inf"), 2])
def test_dropout_outside_the_open_interval_goes_to_pytorch(recording, p):
    q, k, v = (torch.randn(1, 2, 24, 8) for _ in range(3))
    assert metal_flash_sdpa.explain(q, k, v, dropout_p=p) == rules.DROPOUT

    def run():
        torch.manual_seed(0)
        try:
            return F.scaled_dot_product_attention(q, k, v, dropout_p=p), None
        except Exception as error:  # noqa: BLE001 - PyTorch's own error is the expectation
            return None, (type(error), str(error))

    ours = run()
    with metal_flash_sdpa.disabled():
        theirs = run()
    assert ours[1] == theirs[1]
    if theirs[1] is None:
        torch.testing.assert_close(ours[0], theirs[0], atol=0, rtol=0, equal_nan=True)
    assert recording.forwards == []


# --- real models -------------------------------------------------------------------------


def gpt2(transformers):
    config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=64, n_positions=64)
    config._attn_implementation = "sdpa"
    return transformers.GPT2LMHeadModel(config)


def bert(transformers):
    config = transformers.BertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, vocab_size=64
    )
    config._attn_implementation = "sdpa"
    return transformers.BertForMaskedLM(config)


@pytest.mark.parametrize("build", [gpt2, bert], ids=["gpt2", "bert"])
def test_training_step_with_default_dropout(model_kernel, monkeypatch, build):
    """Every attention call dispatches with the model's default attention dropout (0.1), to
    the reference kernel and to one that serves what MFA declares (patch 0015), and loss and
    gradients equal the same step computed by PyTorch's math with the same keep masks."""
    recording = model_kernel
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = build(transformers).train()
    ids = torch.randint(0, 64, (2, 24))
    inputs = dict(input_ids=ids, labels=ids)

    def step():
        model.zero_grad(set_to_none=True)
        loss = model(**inputs).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    torch.manual_seed(1)  # the models' other dropout layers draw the same in both steps
    ours = step()
    assert metal_flash_sdpa.get_dispatch_count() == 2 and metal_flash_sdpa.fallback_counts() == {}
    decisions = list(recording.forwards)
    assert [p for p, _ in decisions] == [0.1, 0.1]

    def math_sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        p, seed = decisions.pop(0)
        assert dropout_p == p
        dropout.draw_seed()  # the kernel's draw advanced the generator the models' other dropouts use
        if attn_mask is not None and attn_mask.dtype == torch.bool:
            attn_mask = torch.zeros(attn_mask.shape, dtype=q.dtype).masked_fill(~attn_mask, float("-inf"))
        keep = dropout.keep_mask(seed, p, q.shape[0], q.shape[1], q.shape[2], k.shape[2])
        return math_with_keep(q, k, v, attn_mask, p, is_causal, keep, scale)

    metal_flash_sdpa.disable()
    monkeypatch.setattr(F, "scaled_dot_product_attention", math_sdpa)
    torch.manual_seed(1)
    theirs = step()
    assert decisions == []
    torch.testing.assert_close(ours[0], theirs[0], atol=1e-5, rtol=1e-5)
    assert ours[1].keys() == theirs[1].keys()
    for name, grad in ours[1].items():
        torch.testing.assert_close(grad, theirs[1][name], atol=1e-5, rtol=1e-4, msg=name)


def test_mfa_hands_ccv_the_threshold_scale_and_seed(recorded_mfa):
    # patch 0015 takes 2^32 p (the generator's threshold), 1 / (1 - p) as a float32 and the
    # seed as an unsigned 64-bit int, forward and backward, masked or not
    q, k, v = (torch.randn(1, 2, 24, 8) for _ in range(3))
    mask = torch.rand(1, 1, 24, 24) > 0.3
    out, lse = recorded_mfa.forward(q, k, v, 0.3, False, None, dropout=(0.1, -5))
    recorded_mfa.backward(q, q, k, v, out, lse, 0.3, False, mask, dropout=(0.1, -5))
    recorded_mfa.forward(q, k, v, 0.3, False, mask)
    expected = (dropout.threshold(0.1), torch.tensor(1 / 0.9, dtype=torch.float32).item(), 2**64 - 5)
    assert recorded_mfa.bridge.dropouts == [expected, expected, None]
    assert recorded_mfa.bridge.sized == [expected, None]  # each pass sizes its summaries with its own kernels
