"""Real models on the accelerated path (reference kernel on CPU) against PyTorch's SDPA.

One training step of a tiny, randomly initialised transformers Llama (no downloads), and of
a module around torch.nn.MultiheadAttention: the loss and every parameter's gradient must
match the same step with the package scoped off, and the calls must have reached the kernel.

What the libraries pass to SDPA (transformers 5.x, torch 2.13): a Llama batch without
padding (no attention_mask, or an all-ones one) gives ``attn_mask=None, is_causal=True,
enable_gqa=True`` with key/value at num_key_value_heads; a padded batch gives a 4-D bool mask
``[B, 1, L, L]`` (causal and padding combined; left-padded rows attend to nothing),
``is_causal=False``, key/value already repeated to num_attention_heads. MultiheadAttention
(training, need_weights=False) gives no mask, or with key_padding_mask a float mask
``[B, H, 1, S]``; need_weights=True never calls SDPA, nor does its eval fast path.
"""

import pytest
import torch

import metal_flash_sdpa
from metal_flash_sdpa import ReferenceKernel, kernels

transformers = pytest.importorskip("transformers")

ATOL, RTOL = ReferenceKernel.tolerances[torch.float32]
LENGTH = 40  # above the reference kernel's block of 32 (conftest): two blocks per call


class RecordingKernel(ReferenceKernel):
    """The reference kernel, noting what each forward was given."""

    def __init__(self):
        super().__init__(block_size=32)
        self.calls = []

    def forward(self, q, k, v, scale, causal, mask):
        self.calls.append((tuple(q.shape), tuple(k.shape), causal, None if mask is None else tuple(mask.shape)))
        return super().forward(q, k, v, scale, causal, mask)


@pytest.fixture
def kernel(restore_state, no_selfcheck):  # counts the calls it serves: no canary runs
    kernel = RecordingKernel()
    kernels.register_kernel("cpu", kernel)
    metal_flash_sdpa.enable()
    metal_flash_sdpa.MIN_SEQ_LEN = 0
    metal_flash_sdpa.reset_dispatch_count()
    return kernel


def training_step(model, **inputs):
    """-> (loss, {name: grad}) of one forward and backward."""
    model.zero_grad(set_to_none=True)
    loss = model(**inputs)
    loss = loss.loss if hasattr(loss, "loss") else loss
    loss.backward()
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads


def assert_same_step(ours, theirs):
    (loss, grads), (their_loss, their_grads) = ours, theirs
    torch.testing.assert_close(loss, their_loss, atol=ATOL, rtol=RTOL)
    assert grads.keys() == their_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, their_grads[name], atol=ATOL, rtol=RTOL, msg=lambda m: f"{name}: {m}")
    # the comparison means something: attention's own weights got a gradient
    assert any(name.endswith("q_proj.weight") or "in_proj" in name for name in grads)
    assert all(grads[n].abs().sum() > 0 for n in grads if n.endswith(("q_proj.weight", "k_proj.weight", "in_proj_weight")))


def tiny_llama():
    config = transformers.LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
        attn_implementation="sdpa",
    )
    model = transformers.LlamaForCausalLM(config).train()
    assert model.config._attn_implementation == "sdpa"
    return model


def padded_batch():
    """Sequence 0 left-padded by 7, sequence 1 right-padded by 9; padding not in the loss."""
    ids = torch.randint(0, 128, (2, LENGTH))
    mask = torch.ones(2, LENGTH, dtype=torch.long)
    mask[0, :7] = 0
    mask[1, -9:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    return dict(input_ids=ids, attention_mask=mask, labels=labels)


def unpadded_batch(with_ones_mask):
    ids = torch.randint(0, 128, (2, LENGTH))
    batch = dict(input_ids=ids, labels=ids)
    if with_ones_mask:
        batch["attention_mask"] = torch.ones(2, LENGTH, dtype=torch.long)
    return batch


@pytest.mark.parametrize("with_ones_mask", [False, True], ids=["no attention_mask", "all-ones attention_mask"])
def test_llama_training_step_without_padding(kernel, with_ones_mask):
    model, batch = tiny_llama(), unpadded_batch(with_ones_mask)
    ours = training_step(model, **batch)
    assert metal_flash_sdpa.get_dispatch_count() == 2  # one per layer
    assert metal_flash_sdpa.fallback_counts() == {}
    # causal, no mask, grouped-query attention passed through (4 query heads, 2 key heads)
    assert kernel.calls == [((2, 4, LENGTH, 16), (2, 2, LENGTH, 16), True, None)] * 2
    with metal_flash_sdpa.disabled():
        theirs = training_step(model, **batch)
    assert metal_flash_sdpa.get_dispatch_count() == 2
    assert_same_step(ours, theirs)


def test_llama_training_step_with_left_and_right_padding(kernel):
    model, batch = tiny_llama(), padded_batch()
    ours = training_step(model, **batch)
    assert metal_flash_sdpa.get_dispatch_count() == 2
    assert metal_flash_sdpa.fallback_counts() == {}
    for q_shape, k_shape, causal, mask_shape in kernel.calls:
        assert q_shape[-2] == k_shape[-2] == LENGTH and not causal
        assert mask_shape == (2, 1, LENGTH, LENGTH)  # [B, 1, L, L], as the op layer hands it on
    with metal_flash_sdpa.disabled():
        theirs = training_step(model, **batch)
    assert_same_step(ours, theirs)


def test_llama_padding_changes_the_result(kernel):
    """The mask reaches the kernel: the left-padded sequence's logits at its real tokens
    change when the padding is masked (same ids, same positions)."""
    model, batch = tiny_llama(), padded_batch()
    positions = torch.arange(LENGTH).expand(2, LENGTH)
    with torch.no_grad():
        masked = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], position_ids=positions)
        unmasked = model(input_ids=batch["input_ids"], position_ids=positions)
    assert metal_flash_sdpa.get_dispatch_count() == 4
    assert (masked.logits[0, 7:] - unmasked.logits[0, 7:]).abs().max() > 0.05


class MHABlock(torch.nn.Module):
    def __init__(self, need_weights):
        super().__init__()
        self.attention = torch.nn.MultiheadAttention(32, 4, batch_first=True)
        self.head = torch.nn.Linear(32, 1)
        self.need_weights = need_weights

    def forward(self, x, key_padding_mask=None):
        out, _ = self.attention(x, x, x, key_padding_mask=key_padding_mask, need_weights=self.need_weights)
        return self.head(out).square().mean()


@pytest.mark.parametrize("padding", [False, True], ids=["no key_padding_mask", "key_padding_mask"])
def test_multihead_attention_training_step(kernel, padding):
    model = MHABlock(need_weights=False).train()
    x = torch.randn(2, LENGTH, 32)
    key_padding_mask = None
    if padding:
        key_padding_mask = torch.zeros(2, LENGTH, dtype=torch.bool)
        key_padding_mask[1, -11:] = True  # True = ignore
    ours = training_step(model, x=x, key_padding_mask=key_padding_mask)
    assert metal_flash_sdpa.get_dispatch_count() == 1
    assert metal_flash_sdpa.fallback_counts() == {}
    ((q_shape, k_shape, causal, mask_shape),) = kernel.calls
    assert q_shape == k_shape == (2, 4, LENGTH, 8) and not causal
    assert mask_shape == ((2, 4, LENGTH, LENGTH) if padding else None)
    with metal_flash_sdpa.disabled():
        theirs = training_step(model, x=x, key_padding_mask=key_padding_mask)
    assert_same_step(ours, theirs)


def test_multihead_attention_with_weights_never_calls_sdpa(kernel):
    model = MHABlock(need_weights=True).train()
    training_step(model, x=torch.randn(2, LENGTH, 32))
    assert metal_flash_sdpa.get_dispatch_count() == 0 and metal_flash_sdpa.fallback_counts() == {}
