"""Error parity: for bad input the patched function raises what PyTorch's own raises."""

import pytest
import torch
import torch.nn.functional as F

import metal_flash_sdpa
from conftest import pytorch_sdpa


def t(*shape, **kwargs):
    return torch.randn(*shape, **kwargs)


Q = (1, 2, 16, 8)
BAD_CALLS = {
    "1-D tensors": lambda: ((t(8), t(8), t(8)), {}),
    "2-D tensors": lambda: ((t(16, 8), t(16, 8), t(16, 8)), {}),
    "ranks differ": lambda: ((t(*Q), t(2, 16, 8), t(2, 16, 8)), {}),
    "heads differ without enable_gqa": lambda: ((t(1, 4, 16, 8), t(*Q), t(*Q)), {}),
    "heads not a multiple with enable_gqa": lambda: ((t(1, 3, 16, 8), t(*Q), t(*Q)), dict(enable_gqa=True)),
    "head dims differ": lambda: ((t(*Q), t(1, 2, 16, 4), t(*Q)), {}),
    "key/value lengths differ": lambda: ((t(*Q), t(1, 2, 16, 8), t(1, 2, 12, 8)), {}),
    "dtypes differ": lambda: ((t(*Q), t(*Q, dtype=torch.float16), t(*Q)), {}),
    "devices differ": lambda: ((t(*Q), t(*Q, device="meta"), t(*Q)), {}),
    "mask wrong shape": lambda: ((t(*Q), t(*Q), t(*Q)), dict(attn_mask=t(3, 16, 16))),
    "mask wrong last dim": lambda: ((t(*Q), t(*Q), t(*Q)), dict(attn_mask=t(16, 15))),
    "mask int dtype": lambda: ((t(*Q), t(*Q), t(*Q)), dict(attn_mask=torch.ones(16, 16, dtype=torch.int64))),
    "mask other float dtype": lambda: ((t(*Q), t(*Q), t(*Q)), dict(attn_mask=t(16, 16, dtype=torch.float64))),
    "is_causal with mask": lambda: ((t(*Q), t(*Q), t(*Q)), dict(is_causal=True, attn_mask=t(16, 16))),
    "negative dropout": lambda: ((t(*Q), t(*Q), t(*Q)), dict(dropout_p=-0.5)),
    "dropout above 1": lambda: ((t(*Q), t(*Q), t(*Q)), dict(dropout_p=1.5)),
    "empty batch": lambda: ((t(0, 2, 16, 8), t(0, 2, 16, 8), t(0, 2, 16, 8)), {}),
    "empty keys": lambda: ((t(*Q), t(1, 2, 0, 8), t(1, 2, 0, 8)), {}),
    "empty head dim": lambda: ((t(1, 2, 16, 0), t(1, 2, 16, 0), t(1, 2, 16, 0)), {}),
    "scale is a string": lambda: ((t(*Q), t(*Q), t(*Q)), dict(scale="0.5")),
    "is_causal is a string": lambda: ((t(*Q), t(*Q), t(*Q)), dict(is_causal="yes")),
    "enable_gqa is None": lambda: ((t(1, 4, 16, 8), t(*Q), t(*Q)), dict(enable_gqa=None)),
    "query is a list": lambda: (([[1.0]], t(*Q), t(*Q)), {}),
    "integer tensors": lambda: ((torch.ones(*Q, dtype=torch.int64),) * 3, {}),
    "unknown keyword": lambda: ((t(*Q), t(*Q), t(*Q)), dict(causal=True)),
    "mask is a number": lambda: ((t(*Q), t(*Q), t(*Q)), dict(attn_mask=1.0)),
}


def outcome(fn, args, kwargs):
    try:
        return "ok", fn(*args, **kwargs)
    except Exception as error:
        return "raised", error


@pytest.mark.parametrize("case", list(BAD_CALLS))
def test_same_exception_as_pytorch(reference_cpu, case):
    args, kwargs = BAD_CALLS[case]()
    kind, theirs = outcome(lambda *a, **k: pytorch_sdpa(*a, math=False, **k), args, kwargs)
    ours_kind, ours = outcome(F.scaled_dot_product_attention, args, kwargs)
    assert metal_flash_sdpa.get_dispatch_count() == 0, "an invalid call reached the kernel"
    assert ours_kind == kind, f"PyTorch: {theirs!r}; patched: {ours!r}"
    if kind == "raised":
        assert type(ours) is type(theirs), f"PyTorch raised {theirs!r}; patched raised {ours!r}"
    else:
        assert ours.shape == theirs.shape and ours.dtype == theirs.dtype
        torch.testing.assert_close(ours, theirs, equal_nan=True)


def test_positional_scale_is_rejected_like_pytorch(reference_cpu):
    q = t(*Q)
    with pytest.raises(TypeError):
        pytorch_sdpa(q, q, q, None, 0.0, False, 0.5, math=False)
    with pytest.raises(TypeError):
        F.scaled_dot_product_attention(q, q, q, None, 0.0, False, 0.5)


def test_signature_matches_pytorch():
    import inspect

    from metal_flash_sdpa import dispatch

    params = inspect.signature(dispatch.scaled_dot_product_attention).parameters
    assert list(params) == ["query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa"]
    assert [p.default for p in params.values()][3:] == [None, 0.0, False, None, False]
    assert params["scale"].kind is inspect.Parameter.KEYWORD_ONLY
    assert params["enable_gqa"].kind is inspect.Parameter.KEYWORD_ONLY
    assert dispatch.scaled_dot_product_attention.__doc__ == dispatch.original.__doc__ or dispatch.original is None
