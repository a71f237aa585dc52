"""Gemma 4, DeepSeek-V3 (MLA) and T5 training steps, and diffusers' VAE decoder attention,
through a kernel that serves exactly what MFA declares (issue #20 item 4).

These models make the calls #20 is about: head dim 512 (Gemma 4's global layers, the VAE's
one head of 512 channels), a value head dim other than the query/key head dim (multi-head
latent attention: 192 and 128, unpadded), and the gradient of an additive mask (T5's
relative position bias, learned through the mask SDPA is given). ``MFACapabilityKernel``
computes like the reference kernel and answers ``supports()`` as ``MFAKernel`` does, with
MFA's declarations read at run time (test_integration_mfa_capabilities.py). MIN_SEQ_LEN is
set to the shortest query length of each step, so every call is at or above it and must
dispatch; each step must match the same step inside ``disabled()`` by ``check``'s rule
(``assert_same_step``).
"""

import copy

import pytest
import torch

import metal_flash_sdpa
from metal_flash_sdpa import config
from metal_flash_sdpa.check import compare
from metal_flash_sdpa.kernels.mfa import MFAKernel
from test_integration_mfa_capabilities import LAYERS, LENGTH, account_for_calls, assert_same_step, batch, training_step
from test_integration_mfa_capabilities import kernel  # noqa: F401 (the fixture)

PADDING = {"unpadded": False, "left+right-padded": True}


def step_as_pytorch_steps(kernel, model, inputs, calls):
    """One training step under the kernel, which must serve all its ``calls`` SDPA calls, then
    the same step inside ``disabled()`` and a float32 one (the same rounded weights, package
    off); -> the three (loss, grads)."""
    ours = training_step(model, inputs)
    verdicts = account_for_calls(kernel, calls)
    assert verdicts == [None] * calls, verdicts
    with metal_flash_sdpa.disabled():
        theirs = training_step(model, inputs)
        gold = training_step(copy.deepcopy(model).float(), inputs)
    assert metal_flash_sdpa.get_dispatch_count() == calls  # disabled() dispatched nothing
    return ours, theirs, gold


@pytest.fixture
def transformers():
    return pytest.importorskip("transformers")


# ---------------------------------------------------------------- Gemma 4: head dim 512


@pytest.mark.parametrize("padding", list(PADDING))
def test_gemma4_local_and_global_layers_step(kernel, transformers, monkeypatch, padding):
    """A sliding-window (local) layer at head dim 256 and a global layer at Gemma 4's
    ``global_head_dim`` 512, grouped-query (4 query, 2 key/value heads), bfloat16. The window
    (16) is shorter than the sequence, so the local layer passes a banded bool mask; the
    global layer ``is_causal`` unpadded, a bool mask padded. On MPS with torch >= 2.13
    transformers passes ``enable_gqa`` with masks and head dims above 256 too
    (``use_gqa_in_sdpa``); elsewhere it repeats K/V for those: TRANSFORMERS_SDPA_FORCE_GQA
    makes this run's calls the Mac's."""
    monkeypatch.setenv("TRANSFORMERS_SDPA_FORCE_GQA", "1")
    padded, dtype = PADDING[padding], torch.bfloat16
    torch.manual_seed(0)
    model_config = transformers.Gemma4TextConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=LAYERS,
        layer_types=["sliding_attention", "full_attention"],
        sliding_window=16,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=256,
        global_head_dim=512,
        vocab_size=128,
        vocab_size_per_layer_input=128,
        hidden_size_per_layer_input=16,
        attn_implementation="sdpa",
    )
    model = transformers.Gemma4ForCausalLM(model_config).train().to(dtype)
    metal_flash_sdpa.MIN_SEQ_LEN = LENGTH

    ours, theirs, gold = step_as_pytorch_steps(kernel, model, batch(padded), LAYERS)

    (local, _), (full, _) = kernel.decisions
    for call, head_dim in ((local, 256), (full, 512)):
        assert (call.dtype, call.batch, call.q_heads, call.kv_heads, call.q_len, call.kv_len) == (
            dtype, 2, 4, 2, LENGTH, LENGTH,
        )
        assert call.head_dim == call.value_dim == head_dim and call.needs_grad and call.scale == 1.0
    assert (local.mask, local.mask_per_head, local.causal) == ("bool", False, False)
    assert (full.mask, full.causal) == (("bool", False) if padded else (None, True))
    attention = {"q_proj.weight": LAYERS, "k_proj.weight": LAYERS, "v_proj.weight": LAYERS}
    assert_same_step(ours, theirs, gold, dtype, attention)


# ---------------------------------------------------------------- DeepSeek-V3: value head dim 128


@pytest.mark.parametrize("padding", list(PADDING))
def test_deepseek_v3_mla_step(kernel, transformers, padding):
    """Multi-head latent attention at DeepSeek-V3's head dims: queries and keys 192
    (qk_nope_head_dim 128 + qk_rope_head_dim 64), values 128, passed unpadded; the latent
    expanded to as many key/value heads as query heads; bfloat16. Dense layers only
    (first_k_dense_replace): MoE routing would turn rounding differences into different
    experts."""
    padded, dtype = PADDING[padding], torch.bfloat16
    torch.manual_seed(0)
    model_config = transformers.DeepseekV3Config(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=LAYERS,
        first_k_dense_replace=LAYERS,
        num_attention_heads=2,
        num_key_value_heads=2,
        q_lora_rank=48,
        kv_lora_rank=32,
        qk_nope_head_dim=128,
        qk_rope_head_dim=64,
        v_head_dim=128,
        vocab_size=128,
        attn_implementation="sdpa",
    )
    model = transformers.DeepseekV3ForCausalLM(model_config).train().to(dtype)
    metal_flash_sdpa.MIN_SEQ_LEN = LENGTH

    ours, theirs, gold = step_as_pytorch_steps(kernel, model, batch(padded), LAYERS)

    for call, _ in kernel.decisions:
        assert (call.dtype, call.batch, call.q_heads, call.kv_heads, call.q_len, call.kv_len) == (
            dtype, 2, 2, 2, LENGTH, LENGTH,
        )
        assert (call.head_dim, call.value_dim, call.needs_grad) == (192, 128, True)
        assert call.softmax_scale == pytest.approx(192**-0.5)
        assert (call.mask, call.causal) == (("bool", False) if padded else (None, True))
    # q_b_proj: the queries; kv_a_proj_with_mqa: the latent and the keys' shared rope part;
    # kv_b_proj: the rest of the keys and the values, from the latent
    attention = {"q_b_proj.weight": LAYERS, "kv_a_proj_with_mqa.weight": LAYERS, "kv_b_proj.weight": LAYERS}
    assert_same_step(ours, theirs, gold, dtype, attention)


# ---------------------------------------------------------------- T5: the mask's gradient

DECODER_LENGTH = 36  # the decoder's queries: cross-attention is 36 x 40


@pytest.mark.parametrize("padding", list(PADDING))
def test_t5_relative_position_bias_step(kernel, transformers, padding):
    """T5 with dropout_rate 0, float16: transformers' SDPA path adds each stack's relative
    position bias (``[1, heads, L, S]``, learned) into an additive ``attn_mask`` (the causal
    and padding masks folded in), so its self-attention calls need the mask's gradient
    (``mask_grad``); cross-attention's mask is a constant (zeros, padding folded in). Two
    encoder and two decoder blocks: 6 calls. The feed-forward is T5 v1.1's gated GELU (flan-t5,
    umt5): with the first T5's ReLU, a unit that one rounding moves across 0 changes a
    half-precision step's gradients by ~15% of their largest entry, PyTorch's math and CPU
    backends' as much as the kernel's, so which of them lands nearer float32 is luck."""
    padded, dtype = PADDING[padding], torch.float16
    torch.manual_seed(0)
    model_config = transformers.T5Config(
        vocab_size=128,
        d_model=64,
        d_kv=16,
        d_ff=128,
        num_layers=LAYERS,
        num_decoder_layers=LAYERS,
        num_heads=4,
        dropout_rate=0.0,
        feed_forward_proj="gated-gelu",
        decoder_start_token_id=0,
        attn_implementation="sdpa",
    )
    model = transformers.T5ForConditionalGeneration(model_config).train().to(dtype)
    inputs = batch(padded)
    inputs["labels"] = torch.randint(0, 128, (2, DECODER_LENGTH))
    metal_flash_sdpa.MIN_SEQ_LEN = DECODER_LENGTH

    ours, theirs, gold = step_as_pytorch_steps(kernel, model, inputs, 3 * LAYERS)

    calls = [call for call, _ in kernel.decisions]  # encoder blocks, then decoder self, cross, self, cross
    decoder = [(DECODER_LENGTH, DECODER_LENGTH, True), (DECODER_LENGTH, LENGTH, False)]
    for call, (q_len, kv_len, mask_grad) in zip(calls, [(LENGTH, LENGTH, True)] * LAYERS + decoder * LAYERS):
        assert (call.q_len, call.kv_len, call.mask_grad) == (q_len, kv_len, mask_grad)
        assert (call.dtype, call.batch, call.q_heads, call.kv_heads, call.head_dim, call.value_dim) == (
            dtype, 2, 4, 4, 16, 16,
        )
        assert (call.mask, call.mask_per_head, call.causal, call.dropout_p, call.needs_grad) == (
            "additive", True, False, 0.0, True,
        )
    # the biases' gradients come only through the masks' gradients
    attention = {".q.weight": 3 * LAYERS, ".k.weight": 3 * LAYERS, ".v.weight": 3 * LAYERS}
    attention["relative_attention_bias.weight"] = 2  # the encoder's and the decoder's
    assert_same_step(ours, theirs, gold, dtype, attention)


# ---------------------------------------------------------------- diffusers: the VAE decoder


def test_vae_decoder_attention_at_4096_tokens_dispatches(kernel):
    """AutoencoderKL's decoder mid-block attention over a 64 x 64 latent (its 512-channel
    features at the latent's size): one head of 512 channels, 4096 tokens, no mask, no grad
    (decoding), above the default MIN_SEQ_LEN (256). Float32,
    as pipelines decode an AutoencoderKL with ``force_upcast`` (its default). Only the
    attention module runs: the resnets around it make no SDPA call and cost the CPU ~150
    GFLOP."""
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(block_out_channels=(512,)).eval()
    assert vae.config.force_upcast
    attention = vae.decoder.mid_block.attentions[0]
    features = torch.randn(1, 512, 64, 64, generator=torch.Generator().manual_seed(1))
    metal_flash_sdpa.MIN_SEQ_LEN = config.DEFAULT_MIN_SEQ_LEN

    with torch.no_grad():
        ours = attention(features)
        assert account_for_calls(kernel, 1) == [None]
        ((call, _),) = kernel.decisions
        assert (call.dtype, call.q_heads, call.kv_heads, call.q_len, call.kv_len) == (torch.float32, 1, 1, 4096, 4096)
        assert (call.head_dim, call.value_dim, call.mask, call.causal) == (512, 512, None, False)
        assert not call.needs_grad
        with metal_flash_sdpa.disabled():
            theirs = attention(features)
            gold = copy.deepcopy(attention).double()(features.double())
    assert metal_flash_sdpa.get_dispatch_count() == 1
    # the module adds its input back: compared is what attention added (largest ~0.1)
    ours, theirs, gold = (out.double() - features.double() for out in (ours, theirs, gold))
    miss = compare(ours, theirs, gold, *MFAKernel.tolerances[torch.float32])
    assert miss is None, miss
    assert ours.abs().max() > 0.05  # a real contribution, not zeros
