"""Applying and removing the patch: the one module that touches torch.nn.functional.

wrapt resolves the attribute and applies the patch; what it installs is the plain function
``dispatch.scaled_dot_product_attention``. ``disable()`` puts back the very object
``enable()`` found.
"""

import contextlib
import threading

import torch.jit._builtins
import torch.nn.functional
import wrapt

from . import dispatch, rules

_TARGET = "scaled_dot_product_attention"
_lock = threading.Lock()

# TorchScript cannot compile the dispatcher (keyword-only arguments with defaults): scripted
# code that reaches it (F.multi_head_attention_forward, users' functions) compiles it as
# PyTorch's aten op, as it would unpatched. Scripted code therefore never reaches a kernel.
torch.jit._builtins._register_builtin(dispatch.scaled_dot_product_attention, "aten::scaled_dot_product_attention")


def enable() -> None:
    """Patch torch.nn.functional.scaled_dot_product_attention; idempotent."""
    with _lock:
        parent, attribute, current = wrapt.resolve_path(torch.nn.functional, _TARGET)
        if current is dispatch.scaled_dot_product_attention:
            return
        dispatch.original = current
        wrapt.apply_patch(parent, attribute, dispatch.scaled_dot_product_attention)


def disable() -> None:
    """Restore the exact object enable() replaced; idempotent."""
    with _lock:
        parent, attribute, current = wrapt.resolve_path(torch.nn.functional, _TARGET)
        if current is dispatch.scaled_dot_product_attention:
            wrapt.apply_patch(parent, attribute, dispatch.original)


def is_enabled() -> bool:
    return torch.nn.functional.scaled_dot_product_attention is dispatch.scaled_dot_product_attention


@contextlib.contextmanager
def disabled():
    """Send SDPA calls to PyTorch inside this scope (this thread or asyncio task only).

    Nestable; usable as a decorator: ``@metal_flash_sdpa.disabled()``. Governs eager calls;
    code compiled with torch.compile follows enable()/disable().
    """
    token = rules.scoped_off.set(True)
    try:
        yield
    finally:
        rules.scoped_off.reset(token)
