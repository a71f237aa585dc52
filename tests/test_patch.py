"""enable(), disable(), is_enabled() and the disabled() scope."""

import asyncio
import threading

import torch
import torch.nn.functional as F

import metal_flash_sdpa
from metal_flash_sdpa import dispatch, rules


def args():
    return [torch.randn(1, 2, 16, 8) for _ in range(3)]


def test_enable_disable_are_idempotent_and_restore_identity(restore_state):
    metal_flash_sdpa.disable()
    original = F.scaled_dot_product_attention
    metal_flash_sdpa.enable()
    metal_flash_sdpa.enable()
    assert F.scaled_dot_product_attention is dispatch.scaled_dot_product_attention
    assert type(F.scaled_dot_product_attention) is type(lambda: None)  # a plain function, no proxy
    assert torch.nn.functional.scaled_dot_product_attention is F.scaled_dot_product_attention
    assert metal_flash_sdpa.is_enabled() and dispatch.original is original
    metal_flash_sdpa.disable()
    metal_flash_sdpa.disable()
    assert F.scaled_dot_product_attention is original
    assert not metal_flash_sdpa.is_enabled()


def test_disable_leaves_a_later_patch_alone(restore_state):
    metal_flash_sdpa.enable()

    def someone_elses(*a, **k):
        return dispatch.scaled_dot_product_attention(*a, **k)

    F.scaled_dot_product_attention = someone_elses
    try:
        metal_flash_sdpa.disable()
        assert F.scaled_dot_product_attention is someone_elses
    finally:
        F.scaled_dot_product_attention = dispatch.original


def test_multihead_attention_reaches_the_patch(reference_cpu):
    mha = torch.nn.MultiheadAttention(16, 2, batch_first=True)
    x = torch.randn(2, 20, 16)
    with torch.no_grad():
        out, _ = mha(x, x, x, need_weights=False)
        with metal_flash_sdpa.disabled():
            expected, _ = mha(x, x, x, need_weights=False)
    torch.testing.assert_close(out, expected, atol=2e-5, rtol=1e-4)
    assert metal_flash_sdpa.get_dispatch_count() == 1


def test_disabled_nests_and_works_as_decorator(reference_cpu):
    q, k, v = args()
    assert metal_flash_sdpa.explain(q, k, v) is None
    with metal_flash_sdpa.disabled():
        with metal_flash_sdpa.disabled():
            assert metal_flash_sdpa.explain(q, k, v) == rules.DISABLED
        assert metal_flash_sdpa.explain(q, k, v) == rules.DISABLED
    assert metal_flash_sdpa.explain(q, k, v) is None

    @metal_flash_sdpa.disabled()
    def inside(depth):
        if depth:
            return inside(depth - 1)
        return F.scaled_dot_product_attention(q, k, v)

    inside(2)
    inside(0)
    assert metal_flash_sdpa.get_dispatch_count() == 0
    assert metal_flash_sdpa.fallback_counts() == {rules.DISABLED: 2}
    F.scaled_dot_product_attention(q, k, v)
    assert metal_flash_sdpa.get_dispatch_count() == 1


def test_disabled_restores_on_exception(reference_cpu):
    q, k, v = args()
    try:
        with metal_flash_sdpa.disabled():
            raise ValueError
    except ValueError:
        pass
    assert metal_flash_sdpa.explain(q, k, v) is None


def test_disabled_is_per_thread(reference_cpu):
    q, k, v = args()
    entered, release = threading.Event(), threading.Event()
    seen = {}

    def hold_disabled():
        with metal_flash_sdpa.disabled():
            entered.set()
            release.wait(5)
            seen["inside"] = metal_flash_sdpa.explain(q, k, v)

    worker = threading.Thread(target=hold_disabled)
    worker.start()
    entered.wait(5)
    seen["main"] = metal_flash_sdpa.explain(q, k, v)
    F.scaled_dot_product_attention(q, k, v)
    release.set()
    worker.join()
    assert seen == {"main": None, "inside": rules.DISABLED}
    assert metal_flash_sdpa.get_dispatch_count() == 1


def test_disabled_is_per_asyncio_task(reference_cpu):
    q, k, v = args()
    order = []

    async def inside():
        with metal_flash_sdpa.disabled():
            await asyncio.sleep(0.02)
            order.append(("inside", metal_flash_sdpa.explain(q, k, v)))

    async def outside():
        await asyncio.sleep(0.01)  # runs while the other task is inside its scope
        order.append(("outside", metal_flash_sdpa.explain(q, k, v)))

    async def main():
        await asyncio.gather(inside(), outside())

    asyncio.run(main())
    assert order == [("outside", None), ("inside", rules.DISABLED)]
