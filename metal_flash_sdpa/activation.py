"""What happens when torch finishes importing: patch, or not, as MFA_ENABLE says.

Called from the start-up hook; imports torch-dependent modules only when it runs.
"""

from . import config


def activate_from_environment() -> None:
    import metal_flash_sdpa

    config.check_environment()  # bad values reported now, in one line, not at first use
    mode = config.enable_mode()
    metal_flash_sdpa.MIN_SEQ_LEN  # the initial value, from MFA_MIN_SEQ_LEN
    if mode == "off":
        return
    from . import kernels, patch

    # auto: patch only where a kernel can run (on a Mac, when the MFA bridge loads)
    if mode == "auto" and not kernels.registered_kernels():
        return
    patch.enable()
