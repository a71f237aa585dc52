"""metal-flash-sdpa: Metal Flash Attention behind torch.nn.functional.scaled_dot_product_attention.

Installing the package is enough: metal_flash_sdpa.pth patches SDPA as soon as torch is
imported (see ``_bootstrap``). This module is imported at interpreter start by that hook,
so it imports nothing but the standard library; the API below loads on first use.
"""

__version__ = "0.1.0"

# name -> submodule that defines it
_API = {
    "enable": "patch",
    "disable": "patch",
    "is_enabled": "patch",
    "disabled": "patch",
    "get_dispatch_count": "counters",
    "reset_dispatch_count": "counters",
    "fallback_counts": "counters",
    "explain": "rules",
    "register_kernel": "kernels",
    "registered_kernels": "kernels",
    "Kernel": "kernels",
    "ReferenceKernel": "kernels",
}

__all__ = sorted([*_API, "MIN_SEQ_LEN"])


def __getattr__(name):
    if name == "MIN_SEQ_LEN":
        # Read MFA_MIN_SEQ_LEN once; afterwards this is a plain module attribute that
        # users may assign and that the dispatcher reads on every call.
        from . import config

        value = config.min_seq_len()
    elif name in _API:
        import importlib

        # torch first: if this is its first import, the start-up hook activates the package
        # now, while no module of ours is half-initialised.
        import torch  # noqa: F401

        value = getattr(importlib.import_module(f".{_API[name]}", __name__), name)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
