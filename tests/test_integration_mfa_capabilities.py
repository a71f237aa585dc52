"""Real models in float16 and bfloat16 through a kernel that serves exactly what MFA declares.

``MFACapabilityKernel`` computes like the reference kernel (on the CPU) but carries
``MFAKernel``'s capability data and answers ``supports()`` with ``MFAKernel.supports`` itself,
so which SDPA calls of a real model reach the kernel is decided here exactly as it is on a
Mac. The verdicts are ``MFAKernel``'s own, read at run time; since it declares ``is_causal``
and ``attn_mask`` (patches 0007 and 0008, issue #11), every SDPA call of these steps must
dispatch.

Issue requirements covered (also in the test ids):

- #10 item 5: a tiny Llama and a tiny Qwen2, both grouped-query (fewer key/value heads than
  query heads), one training step in bfloat16 and float16 with ``attn_implementation="sdpa"``:
  every unmasked SDPA call dispatches, loss and gradients match the step inside
  ``disabled()``. transformers' unpadded calls are causal (``is_causal=True``), which is #11's;
  the unmasked, non-causal calls #10 is about are those of the same models with bidirectional
  attention (``self_attn.is_causal = False``, as encoders built from decoders do): K/V at the
  key/value head count, ``enable_gqa=True``. Those must all dispatch today.
- #11 item 6: the same models unpadded (``is_causal=True``) and left/right padded (a 4-D bool
  mask ``[B, 1, L, L]`` with rows that attend to nothing), and diffusers' Flux transformer
  forward: every call at or above MIN_SEQ_LEN dispatches, and the step matches PyTorch's.

Numbers: the low-precision step is judged as ``python -m metal_flash_sdpa check`` judges a
single call (``check.compare``): within ``MFAKernel.tolerances[dtype]`` of PyTorch's step in
the same dtype, or no further from a float32 step (same rounded weights, package off) than
twice PyTorch's own distance plus atol. Why the second branch: the attention kernel rounds its
output once from float32, PyTorch's CPU kernels round differently, and every later bfloat16 /
float16 op of the model (projections, norms, the backward through them) re-rounds whatever it
is given, so a one-ulp difference in an attention output becomes a few-ulp difference in a
gradient (measured here: up to 1.6e-2 of a gradient's largest entry in bfloat16, 3.2e-3 in
float16, above the per-call tolerances but the size of PyTorch's own step's distance from
float32). A real fault (a wrong
head mapping, a dropped mask row) is O(1) and fails both branches. Gradients are compared
divided by their largest magnitude (the tolerances are for O(1) values, gradients here are
1e-4 to 1e-1).
"""

import collections
import copy

import pytest
import torch

import metal_flash_sdpa
from metal_flash_sdpa import ReferenceKernel, kernels, rules
from metal_flash_sdpa.check import compare
from metal_flash_sdpa.kernels.mfa import MFAKernel
from helpers import MFA_CAPABILITIES, with_mfa_capabilities

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
LENGTH = 40  # above the block of 32 below: two query blocks per call
LAYERS = 2


@with_mfa_capabilities
class MFACapabilityKernel(ReferenceKernel, MFAKernel):
    """The reference kernel's arithmetic, MFA's declarations and MFA's ``supports()``.

    MFAKernel is a base so that ``MFAKernel.supports`` (whose ``super()`` needs an MFAKernel)
    runs unchanged on this kernel; ReferenceKernel comes first so its forward, backward,
    memory layout and constructor are the ones used, and the capability attributes, which
    ReferenceKernel also sets, are copied from MFAKernel below. Records every ``supports()``
    verdict (one per SDPA call that reached the kernel's own rule) and counts forwards and
    backwards.
    """

    name = "mfa-capabilities"
    # What MFA serves, not how fast: on a Mac calls without grad go to the faster of MFA
    # and PyTorch (trust.py); here the reference kernel would lose every one to PyTorch.
    calibrated = False

    def __init__(self):
        super().__init__(block_size=32)
        self.decisions = []  # (Call, reason or None), in call order
        self.forwards = 0
        self.backwards = 0

    def __repr__(self):
        return "MFACapabilityKernel()"

    def available(self):
        return None

    def supports(self, call):
        reason = MFAKernel.supports(self, call)
        self.decisions.append((call, reason))
        return reason

    def forward(self, q, k, v, scale, causal, mask, dropout=None):
        self.forwards += 1
        return ReferenceKernel.forward(self, q, k, v, scale, causal, mask, dropout=dropout)

    def backward(self, grad_out, q, k, v, out, lse, scale, causal, mask, dropout=None, mask_grad=False):
        self.backwards += 1
        return ReferenceKernel.backward(
            self, grad_out, q, k, v, out, lse, scale, causal, mask, dropout=dropout, mask_grad=mask_grad
        )


def mfa_verdict(call):
    """What the real MFAKernel answers for ``call``, worded with this kernel's name."""
    mirror = MFAKernel()
    mirror.name = MFACapabilityKernel.name
    return mirror.supports(call)


@pytest.fixture
def kernel(restore_state, no_selfcheck):  # counts the calls it serves: no canary runs
    kernel = MFACapabilityKernel()
    kernels.register_kernel("cpu", kernel)
    metal_flash_sdpa.enable()
    metal_flash_sdpa.MIN_SEQ_LEN = 0
    metal_flash_sdpa.reset_dispatch_count()
    return kernel


def test_the_kernel_declares_what_mfa_declares(kernel):
    for attribute in (*MFA_CAPABILITIES, "tolerances"):
        assert getattr(kernel, attribute) == getattr(MFAKernel, attribute), attribute
    assert kernel.available() is None and metal_flash_sdpa.registered_kernels()["cpu"] is kernel
    # MFA's dtypes all have a tolerance (the comparisons below read them)
    assert set(MFAKernel.dtypes) <= set(MFAKernel.tolerances)


def account_for_calls(kernel, calls):
    """The dispatcher sent exactly the calls MFA's ``supports()`` accepts to the kernel, and
    counted every other one under MFA's own reason; -> the verdicts, one per call."""
    assert len(kernel.decisions) == calls  # every SDPA call reached the kernel's own rule
    verdicts = [mfa_verdict(call) for call, _ in kernel.decisions]
    assert [reason for _, reason in kernel.decisions] == verdicts  # answers as MFAKernel does
    served = verdicts.count(None)
    assert metal_flash_sdpa.get_dispatch_count() == served
    assert metal_flash_sdpa.fallback_counts() == dict(collections.Counter(r for r in verdicts if r is not None))
    assert kernel.forwards == served
    assert kernel.backwards == sum(call.needs_grad for call, reason in kernel.decisions if reason is None)
    return verdicts


# ---------------------------------------------------------------- transformers: Llama, Qwen2


@pytest.fixture
def transformers():
    return pytest.importorskip("transformers")


def tiny_llama(transformers):
    """4 query heads, 2 key/value heads (GQA ratio 2), head dim 16."""
    return transformers.LlamaForCausalLM(
        transformers.LlamaConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=LAYERS,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=128,
            attn_implementation="sdpa",
        )
    )


def tiny_qwen2(transformers):
    """6 query heads, 2 key/value heads (GQA ratio 3), head dim 16, q/k/v biases."""
    return transformers.Qwen2ForCausalLM(
        transformers.Qwen2Config(
            hidden_size=96,
            intermediate_size=128,
            num_hidden_layers=LAYERS,
            num_attention_heads=6,
            num_key_value_heads=2,
            vocab_size=128,
            use_sliding_window=False,
            attn_implementation="sdpa",
        )
    )


MODELS = {"llama": tiny_llama, "qwen2": tiny_qwen2}


def batch(padded):
    ids = torch.randint(0, 128, (2, LENGTH))
    if not padded:
        return dict(input_ids=ids, labels=ids)
    mask = torch.ones(2, LENGTH, dtype=torch.long)
    mask[0, :7] = 0  # left-padded: its first rows attend to nothing
    mask[1, -9:] = 0  # right-padded
    return dict(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))


def training_step(model, inputs):
    """-> (loss, {name: grad}) of one forward and backward, in float64 for comparing."""
    model.zero_grad(set_to_none=True)
    loss = model(**inputs).loss
    loss.backward()
    grads = {name: p.grad.detach().double() for name, p in model.named_parameters() if p.requires_grad}
    return loss.detach().double(), grads


def assert_same_step(ours, theirs, gold, dtype, attention_weights=None):
    """The loss and every gradient pass ``check.compare`` (gradients divided by their largest
    magnitude), and the weights ending in each suffix of ``attention_weights`` ({suffix: how
    many}; default: q_proj, k_proj and v_proj of each layer) all got a gradient."""
    atol, rtol = MFAKernel.tolerances[dtype]
    (loss, grads), (their_loss, their_grads), (gold_loss, gold_grads) = ours, theirs, gold
    miss = compare(loss, their_loss, gold_loss, atol, rtol)  # a float32 scalar near 4.8
    assert miss is None, f"loss: {miss}"
    assert grads.keys() == their_grads.keys() == gold_grads.keys()
    for name, grad in grads.items():
        scale = their_grads[name].abs().max().clamp_min(1e-30)
        miss = compare(grad / scale, their_grads[name] / scale, gold_grads[name] / scale, atol, rtol)
        assert miss is None, f"{name} (divided by its largest magnitude {scale.item():.3g}): {miss}"
    # the comparison means something: attention's own weights got a gradient
    default = {"q_proj.weight": LAYERS, "k_proj.weight": LAYERS, "v_proj.weight": LAYERS}
    for suffix, count in (attention_weights or default).items():
        named = [n for n in grads if n.endswith(suffix)]
        assert len(named) == count and all(grads[n].abs().sum() > 0 for n in named), (suffix, named)


SCENARIOS = {
    # id with the issue requirement it covers: (padded batch, attention layers causal)
    "unmasked-bidirectional(#10.5)": (False, False),
    "unpadded-is_causal(#11.6)": (False, True),
    "left+right-padded-bool-mask(#11.6)": (True, True),
}


@pytest.mark.parametrize("scenario", list(SCENARIOS))
@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("model_name", list(MODELS))
def test_training_step_dispatches_as_mfa_declares(kernel, transformers, model_name, dtype_name, scenario):
    padded, causal_layers = SCENARIOS[scenario]
    dtype = DTYPES[dtype_name]
    torch.manual_seed(0)
    model = MODELS[model_name](transformers).train().to(dtype)
    config = model.config
    assert config._attn_implementation == "sdpa"
    assert config.num_key_value_heads < config.num_attention_heads
    for layer in model.model.layers:
        layer.self_attn.is_causal = causal_layers
    inputs = batch(padded)

    ours = training_step(model, inputs)
    verdicts = account_for_calls(kernel, LAYERS)  # one SDPA call per layer, in the forward

    # What the library passed, as the issues describe it.
    head_dim = config.hidden_size // config.num_attention_heads
    for call, _ in kernel.decisions:
        assert (call.dtype, call.batch, call.q_heads, call.q_len, call.kv_len) == (
            dtype, 2, config.num_attention_heads, LENGTH, LENGTH,
        )
        assert call.head_dim == call.value_dim == head_dim and call.needs_grad
        if padded:  # [B, 1, L, L] bool, causal and padding combined; K/V may be repeated
            assert call.mask == "bool" and not call.mask_per_head and not call.causal
            assert call.kv_heads in (config.num_key_value_heads, config.num_attention_heads)
        else:  # no mask, K/V at the key/value head count with enable_gqa=True
            assert call.mask is None and call.causal == causal_layers
            assert call.kv_heads == config.num_key_value_heads

    # #10 item 5 (unmasked GQA) and #11 item 6 (is_causal, padding masks): every call dispatches
    assert verdicts == [None] * LAYERS, verdicts

    with metal_flash_sdpa.disabled():
        theirs = training_step(model, inputs)
        gold = training_step(copy.deepcopy(model).float(), inputs)  # the same rounded weights
    assert metal_flash_sdpa.get_dispatch_count() == verdicts.count(None)  # disabled() dispatched nothing
    assert_same_step(ours, theirs, gold, dtype)


# ---------------------------------------------------------------- diffusers: Flux


def tiny_flux(diffusers):
    """Two joint (double-stream) blocks and two single-stream blocks, 2 heads of dim 16."""
    return diffusers.FluxTransformer2DModel(
        patch_size=1,
        in_channels=4,
        num_layers=2,
        num_single_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        axes_dims_rope=(4, 4, 8),
    )


def flux_inputs(side, text_len, dtype):
    """An image of side x side latent tokens and text_len text tokens: every attention
    (joint and single-stream) runs over side * side + text_len tokens, without a mask."""
    generator = torch.Generator().manual_seed(1)
    img_ids = torch.zeros(side, side, 3)
    img_ids[..., 1] = torch.arange(side)[:, None]
    img_ids[..., 2] = torch.arange(side)[None, :]
    return dict(
        hidden_states=torch.randn(1, side * side, 4, generator=generator).to(dtype),
        encoder_hidden_states=torch.randn(1, text_len, 32, generator=generator).to(dtype),
        pooled_projections=torch.randn(1, 32, generator=generator).to(dtype),
        timestep=torch.tensor([0.5], dtype=dtype),
        img_ids=img_ids.reshape(-1, 3),
        txt_ids=torch.zeros(text_len, 3),
    )


@pytest.mark.parametrize("dtype_name", list(DTYPES))
def test_flux_forward_dispatches_every_call_at_or_above_min_seq_len(kernel, dtype_name):
    """#11 item 6 (diffusers' Flux transformer forward): no mask, no is_causal, as many key as
    query heads, served by MFA today. MIN_SEQ_LEN is set to exactly the long input's length."""
    diffusers = pytest.importorskip("diffusers")
    dtype = DTYPES[dtype_name]
    torch.manual_seed(0)
    model = tiny_flux(diffusers).eval().to(dtype)
    calls = model.config.num_layers + model.config.num_single_layers
    long, short = flux_inputs(16, 8, dtype), flux_inputs(8, 8, dtype)
    metal_flash_sdpa.MIN_SEQ_LEN = 16 * 16 + 8

    with torch.no_grad():
        ours = model(**long).sample
        verdicts = account_for_calls(kernel, calls)
        assert verdicts == [None] * calls, verdicts
        for call, _ in kernel.decisions:
            assert (call.q_len, call.causal, call.mask, call.needs_grad) == (16 * 16 + 8, False, None, False)

        metal_flash_sdpa.reset_dispatch_count()
        model(**short)  # 72 tokens: below MIN_SEQ_LEN, never asks the kernel
        assert metal_flash_sdpa.get_dispatch_count() == 0
        assert metal_flash_sdpa.fallback_counts() == {rules.SHORT: calls}
        assert len(kernel.decisions) == calls

        with metal_flash_sdpa.disabled():
            theirs = model(**long).sample
            gold_inputs = {k: v.float() if v.is_floating_point() else v for k, v in long.items()}
            gold = copy.deepcopy(model).float()(**gold_inputs).sample
    assert metal_flash_sdpa.get_dispatch_count() == 0
    # outputs are O(1) (largest ~1.3): the kernel's tolerances apply as they are
    atol, rtol = MFAKernel.tolerances[dtype]
    miss = compare(ours.double(), theirs.double(), gold.double(), atol, rtol)
    assert miss is None, miss
    assert ours.abs().max() > 0.5  # a real output, not zeros
