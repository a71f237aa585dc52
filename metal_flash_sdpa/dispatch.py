"""The function installed as torch.nn.functional.scaled_dot_product_attention.

A plain Python function (not a wrapt proxy) so that TorchDynamo inlines it: a proxy that
compares equal to the builtin can be taken for the builtin and silently bypassed.
"""

import torch

from . import counters, ops, rules, trust

# The object found on torch.nn.functional when the patch was applied; set by patch.enable().
original = None

_is_compiling = torch.compiler.is_compiling
_evaluate = rules.evaluate
_AUTOCAST = rules.AUTOCAST
_PENDING = trust.PENDING
_Tensor = torch.Tensor
_is_causal_bias = rules.is_causal_bias
_handle_torch_function = torch.overrides.handle_torch_function


def scaled_dot_product_attention(
    query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, *, scale=None, enable_gqa=False
):
    if attn_mask is not None and type(attn_mask) is not _Tensor and _is_causal_bias(attn_mask):
        # CausalBias recognises SDPA by identity with F.scaled_dot_product_attention, which is
        # this function now: hand it the call as PyTorch's SDPA would (it calls SDPA again,
        # with is_causal or the mask materialised). Other __torch_function__ overrides get
        # PyTorch's builtin itself (rules.TORCH_FUNCTION), as unpatched.
        return _handle_torch_function(
            scaled_dot_product_attention,
            (query, key, value, attn_mask),
            query, key, value, attn_mask, dropout_p, is_causal,
            **_keywords(scale, enable_gqa),
        )
    reason, kernel, needs_grad = _evaluate(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
    if reason is _PENDING:  # the first call without grad of its bucket: time kernel and PyTorch
        reason = trust.calibrate(kernel, query, key, value, attn_mask, is_causal, scale, enable_gqa, original)
    if reason is None:
        try:
            return ops.attention(kernel, query, key, value, attn_mask, is_causal, scale, needs_grad, dropout_p)
        except Exception as error:  # a kernel failure never breaks the call: PyTorch answers it
            reason = ops.kernel_failed(
                kernel, error, "forward", query, key, value, attn_mask, is_causal, needs_grad, scale, dropout_p
            )
    elif reason is _AUTOCAST:
        return _under_autocast(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
    if not _is_compiling():
        counters.count_fallback(reason)
    # The user's call, passing defaults only where needed: each extra argument costs the
    # builtin's parser time, and torch 2.4 has no enable_gqa keyword (see also _keywords).
    if enable_gqa is not False:
        return original(query, key, value, attn_mask, dropout_p, is_causal, scale=scale, enable_gqa=enable_gqa)
    if scale is not None:
        return original(query, key, value, attn_mask, dropout_p, is_causal, scale=scale)
    if attn_mask is None and is_causal is False and type(dropout_p) is float and dropout_p == 0.0:
        return original(query, key, value)
    return original(query, key, value, attn_mask, dropout_p, is_causal)


def _keywords(scale, enable_gqa) -> dict:
    """The keyword arguments a caller gave, defaults left out (torch 2.4 has no enable_gqa)."""
    keywords = {} if scale is None else {"scale": scale}
    if enable_gqa is not False:
        keywords["enable_gqa"] = enable_gqa
    return keywords


def _under_autocast(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa):
    # What autocast does for PyTorch's SDPA: cast the inputs, then run with autocast off.
    query, key, value, attn_mask = rules.autocast_inputs(query, key, value, attn_mask)
    with torch.autocast(query.device.type, enabled=False):
        return scaled_dot_product_attention(
            query, key, value, attn_mask, dropout_p, is_causal, scale=scale, enable_gqa=enable_gqa
        )


scaled_dot_product_attention.__doc__ = torch.nn.functional.scaled_dot_product_attention.__doc__
