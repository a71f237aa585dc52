"""Dispatch and fallback counters.

Each count is an ``itertools.count``: ``next()`` on it is one C call, atomic under the GIL,
so increments are never lost under threads and cost no lock on the hot path.
"""

import contextlib
import itertools
import logging
import threading

from . import config

_lock = threading.Lock()  # guards creating counters, not incrementing them
_dispatched = itertools.count()
_fallbacks: dict = {}  # reason -> itertools.count
_log = logging.getLogger("metal_flash_sdpa")
_log_enabled = config.log_fallbacks()


def _value(counter) -> int:
    return int(repr(counter)[6:-1])  # "count(N)": the next value, i.e. how many were taken


_quiet = threading.local()  # .on: this thread's kernel runs are the calibration's, not calls


def count_dispatch() -> None:
    if not getattr(_quiet, "on", False):
        next(_dispatched)


@contextlib.contextmanager
def uncounted():
    """Kernel runs in this thread are not dispatches (trust.calibrate's timing runs)."""
    _quiet.on = True
    try:
        yield
    finally:
        _quiet.on = False


def count_fallback(reason: str) -> None:
    counter = _fallbacks.get(reason)
    if counter is None:
        with _lock:
            counter = _fallbacks.setdefault(reason, itertools.count())
        if _log_enabled:
            _log.warning("scaled_dot_product_attention falls back to PyTorch: %s", reason)
    next(counter)


def get_dispatch_count() -> int:
    """Calls a kernel served since start or the last reset: counted once its forward
    returned. A call whose kernel raised went to PyTorch: it counts as a fallback."""
    return _value(_dispatched)


def fallback_counts() -> dict:
    """Mapping reason -> number of calls that fell back to PyTorch for it."""
    with _lock:
        items = list(_fallbacks.items())
    return {reason: _value(counter) for reason, counter in items}


def reset_dispatch_count() -> None:
    """Reset the dispatch count and the fallback counts."""
    global _dispatched
    with _lock:
        _dispatched = itertools.count()
        _fallbacks.clear()
