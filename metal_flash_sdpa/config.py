"""Environment variables (DESIGN section 3): the one place that reads and validates them.

Standard library only: the start-up bootstrap imports this module at interpreter start.
An invalid value is warned about once, naming the variable, the value and what is used
instead; it never stops the program.
"""

import os

ENABLE_VAR = "MFA_ENABLE"
MIN_SEQ_LEN_VAR = "MFA_MIN_SEQ_LEN"
LOG_VAR = "MFA_LOG"
SELFCHECK_VAR = "MFA_SELFCHECK"
CALIBRATE_VAR = "MFA_CALIBRATE"
CACHE_DIR_VAR = "MFA_CACHE_DIR"

DEFAULT_MIN_SEQ_LEN = 256

_ON = frozenset({"1", "true", "on", "yes"})
_OFF = frozenset({"0", "false", "off", "no"})
_AUTO = frozenset({"", "auto"})

_warned = set()
_collecting = None  # a list while check_environment() gathers problems into one warning


def _warn(message: str) -> None:
    import warnings  # only on the rare invalid value

    # warn_explicit with no source line: one line on stderr, still filterable as a warning
    warnings.warn_explicit(message, RuntimeWarning, filename="metal_flash_sdpa", lineno=0)


def _warn_invalid(variable: str, value: str, using: str) -> None:
    if variable in _warned:
        return
    _warned.add(variable)
    problem = f"invalid {variable}={value!r}, using {using}"
    if _collecting is not None:
        _collecting.append(problem)
    else:
        _warn(f"metal_flash_sdpa: {problem}")


def check_environment() -> None:
    """Read every variable once, with all invalid values reported in one warning."""
    global _collecting
    _collecting = []
    try:
        enable_mode()
        min_seq_len()
        log_fallbacks()
        selfcheck_mode()
        calibrate()
        problems = _collecting
    finally:
        _collecting = None
    if problems:
        _warn("metal_flash_sdpa: " + "; ".join(problems))


def enable_mode(warn: bool = True) -> str:
    """'on', 'off' or 'auto' from MFA_ENABLE."""
    raw = os.environ.get(ENABLE_VAR, "")
    value = raw.strip().lower()
    if value in _AUTO:
        return "auto"
    if value in _ON:
        return "on"
    if value in _OFF:
        return "off"
    if warn:
        _warn_invalid(ENABLE_VAR, raw, "auto (expected 0, 1 or auto)")
    return "auto"


def min_seq_len() -> int:
    """Initial MIN_SEQ_LEN from MFA_MIN_SEQ_LEN: an integer >= 0, default 256."""
    raw = os.environ.get(MIN_SEQ_LEN_VAR)
    if raw is None or not raw.strip():
        return DEFAULT_MIN_SEQ_LEN
    try:
        value = int(raw.strip())
    except ValueError:
        value = -1
    if value < 0:
        _warn_invalid(MIN_SEQ_LEN_VAR, raw, f"{DEFAULT_MIN_SEQ_LEN} (expected an integer >= 0)")
        return DEFAULT_MIN_SEQ_LEN
    return value


def log_fallbacks() -> bool:
    """MFA_LOG=1: log the first occurrence of each distinct fallback reason."""
    raw = os.environ.get(LOG_VAR, "")
    value = raw.strip().lower()
    if value in _ON:
        return True
    if value in _OFF or not value:
        return False
    _warn_invalid(LOG_VAR, raw, "0 (expected 0 or 1)")
    return False


def selfcheck_mode() -> str:
    """'on', 'off' or 'always' from MFA_SELFCHECK (default on): check each kernel variant
    before its first use and keep the verdict on disk; trust without checking; check in every
    process, ignoring the verdicts on disk."""
    raw = os.environ.get(SELFCHECK_VAR, "")
    value = raw.strip().lower()
    if value in _ON or not value:
        return "on"
    if value in _OFF:
        return "off"
    if value == "always":
        return "always"
    _warn_invalid(SELFCHECK_VAR, raw, "1 (expected 1, 0 or always)")
    return "on"


def calibrate() -> bool:
    """MFA_CALIBRATE (default on): time a kernel against PyTorch's SDPA on the first call
    without grad of each variant and length bucket, and send the bucket to the faster; off,
    calls go to the kernel."""
    raw = os.environ.get(CALIBRATE_VAR, "")
    value = raw.strip().lower()
    if value in _ON or not value:
        return True
    if value in _OFF:
        return False
    _warn_invalid(CALIBRATE_VAR, raw, "1 (expected 1 or 0)")
    return True


def cache_dir() -> str:
    """MFA_CACHE_DIR, or ~/.cache/metal-flash-sdpa: where this machine's verdicts are kept."""
    raw = os.environ.get(CACHE_DIR_VAR, "").strip()
    return os.path.expanduser(raw) if raw else os.path.join(os.path.expanduser("~"), ".cache", "metal-flash-sdpa")


def settings() -> dict:
    """Every variable with its raw and effective value, for the status report."""
    return {
        ENABLE_VAR: (os.environ.get(ENABLE_VAR), enable_mode()),
        MIN_SEQ_LEN_VAR: (os.environ.get(MIN_SEQ_LEN_VAR), min_seq_len()),
        LOG_VAR: (os.environ.get(LOG_VAR), log_fallbacks()),
        SELFCHECK_VAR: (os.environ.get(SELFCHECK_VAR), selfcheck_mode()),
        CALIBRATE_VAR: (os.environ.get(CALIBRATE_VAR), "on" if calibrate() else "off"),
        CACHE_DIR_VAR: (os.environ.get(CACHE_DIR_VAR), cache_dir()),
    }
