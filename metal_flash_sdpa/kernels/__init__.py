"""Kernel registry: which kernel serves which device type.

The dispatcher looks a kernel up by ``query.device.type`` on every call, so only kernels
that said they are available get in. The MFA kernel registers itself for "mps" when its
native bridge loads; the reference kernel is registered by hand (tests, debugging).
"""

from typing import Optional

from .base import Call, Kernel
from .reference import ReferenceKernel

_registry: dict = {}
# torch.device -> its kernel, or the reason it has none: the dispatcher's per-call lookup
# (cheaper than device.type, and no string built per call)
by_device: dict = {}
# device type -> why the built-in kernel for it is not registered (for the status report)
unavailable: dict = {}
# rules.configuration(...) -> fallback reason: configurations a kernel raised on, which it
# is not sent again (ops.kernel_failed). Mutated in place: the dispatcher holds this object.
failed: dict = {}


def register_kernel(device_type: str, kernel: Optional[Kernel]) -> Optional[Kernel]:
    """Serve SDPA calls on ``device_type`` with ``kernel`` (None removes it); returns the
    kernel it replaces. Raises RuntimeError if the kernel says it cannot run here.

    Also forgets the configurations kernels failed on for ``device_type``: the kernel now
    registered starts with a clean slate (and tests that swap kernels leave none behind).
    """
    if not isinstance(device_type, str) or not device_type:
        raise TypeError(f"device_type must be a device type string such as 'mps', got {device_type!r}")
    by_device.clear()
    if kernel is not None:
        if not isinstance(kernel, Kernel):
            raise TypeError(f"kernel must be a metal_flash_sdpa.Kernel, got {type(kernel).__name__}")
        reason = kernel.available()
        if reason is not None:
            raise RuntimeError(f"kernel {kernel.name!r} is not available: {reason}")
    for configuration in list(failed):  # list(): one C call, safe against a concurrent failure
        if configuration[1] == device_type:
            failed.pop(configuration, None)
    if kernel is None:
        return _registry.pop(device_type, None)
    previous = _registry.get(device_type)
    _registry[device_type] = kernel
    unavailable.pop(device_type, None)
    return previous


def no_kernel_reason(device_type: str) -> str:
    """Why calls on ``device_type`` have no kernel: the built-in kernel's own reason if it
    could not load, else the plain fact."""
    return unavailable.get(device_type) or f"no kernel registered for device type '{device_type}'"


def resolve(device, cache: bool = True):
    """The kernel for ``device``, or the fallback reason; cached in ``by_device``."""
    entry = _registry.get(device.type) or f"no kernel registered for device type '{device.type}'"
    if cache:
        by_device[device] = entry
    return entry


def registered_kernels() -> dict:
    """Mapping device type -> kernel currently registered."""
    return dict(_registry)


def _register_builtin() -> None:
    try:
        from .mfa import MFAKernel
    except ImportError as error:  # the module itself is pure Python; this is a packaging fault
        unavailable["mps"] = f"metal_flash_sdpa.kernels.mfa failed to import: {error}"
        return
    kernel = MFAKernel()
    reason = kernel.available()
    if reason is None:
        _registry["mps"] = kernel
    else:
        unavailable["mps"] = reason


_register_builtin()

__all__ = ["Call", "Kernel", "ReferenceKernel", "no_kernel_reason", "register_kernel", "registered_kernels"]
