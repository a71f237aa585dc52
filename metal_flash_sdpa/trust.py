"""What this machine decides before a kernel is trusted (DESIGN section 11): the self-check.

Before a kernel variant answers a user's call for the first time, it runs on a small canary
problem, synchronously, and is compared with PyTorch's math SDPA by ``check``'s rule (the
kernel's tolerances, or no further from float64 than twice PyTorch's own error). A variant is
what makes a distinct compiled kernel: the kernel, the device, dtype, head dims, head counts,
scale, causal, mask kind (none, or additive or bool, each broadcast over heads or per head:
a kernel that reads bool masks compiles another kernel for them) and the stage: "forward",
or "backward" (the forward it reads, then the backward), checked when a backward is first
asked for.

Verdicts are kept in memory (``verify`` is one dict lookup for a known variant) and on disk,
in one JSON file under ``$MFA_CACHE_DIR``, keyed by the variant and by everything that can
change its result: the kernel's ``machine()`` (for MFA the GPU, macOS version and build, copy
mode and Metal language the bridge reports), the package version, the build id (ccv's pin, our
patch series and the bridge sources: tools/build_id.py) and torch's version. A later process
does not re-check; an OS or package update does. A corrupt or unwritable file degrades to
memory for the process, with one warning.

A variant that failed raises ``SelfCheckFailed`` from ``verify``; the op layer then sends its
configuration to PyTorch for good (``ops.kernel_failed``: one warning line, counted in
``fallback_counts()``). MFA_SELFCHECK: "on" (default); "off" trusts without checking; "always"
checks in every process, ignoring the verdicts on disk (it still writes them).

The calibration (MFA_CALIBRATE, default on; kernels with ``calibrated``): the first call
without grad of a configuration in a length bucket (query and key lengths rounded up to
powers of two) is timed on the kernel and on PyTorch's own SDPA with the call's tensors,
and the bucket goes to the faster; the choice is kept with the verdicts. PyTorch is not
timed where its SDPA would materialise a score matrix above MAX_PYTORCH_SCORES bytes, or
when it raises: the kernel keeps the bucket. Calls with grad always go to the kernel
(PyTorch has no fused MPS backward).
"""

import contextlib
import json
import math
import os
import tempfile
import threading
import time
from typing import NamedTuple

import torch

from . import config
from . import dropout as _dropout

STORE_NAME = "verdicts.json"
FORMAT = 1
# The canary's largest lengths (query, key): past a few 32-row blocks and a 128-column block,
# ragged in both. A call's own shorter lengths are kept, and equal lengths stay equal.
CANARY_LENGTHS = (67, 149)
SEED = 16
CANARY_DROPOUT = 0.25  # a dropout variant's canary drops with this p (and the seed SEED)
# The last two: an additive mask whose gradient the backward returns (a learned bias).
MASK_KINDS = ("none", "broadcast", "per-head", "bool broadcast", "bool per-head", "broadcast, grad", "per-head, grad")

mode = config.selfcheck_mode()  # "on", "off" or "always"; tests set it directly

_known: dict = {}  # variant key -> None (passed) or the failed Verdict
_locks: dict = {}  # variant key -> the lock its first check runs under
_locks_lock = threading.Lock()
_contexts: dict = {}  # (kernel, device) -> what keys its verdicts besides the variant
_UNKNOWN = object()


class Verdict(NamedTuple):
    passed: bool
    detail: str  # what missed or raised; "" when passed
    max_error: float  # max |kernel - PyTorch| over out (and dq, dk, dv)
    worst: str  # which of out, dq, dk, dv it was
    seconds: float  # what the check cost
    checked: str  # when (UTC, ISO 8601)
    stored: str = ""  # the file it was read from, if not checked in this process


class SelfCheckFailed(RuntimeError):
    """A kernel variant failed its self-check on this machine: PyTorch serves its calls."""

    def __init__(self, kernel, stage, described, verdict):
        self.reason = f"kernel {kernel.name} failed its self-check for this variant"
        measured = f"max error {verdict.max_error:.3g} in {verdict.worst}; " if verdict.worst else ""
        where = f" (verdict of {verdict.checked}, {verdict.stored})" if verdict.stored else ""
        self.warning = (
            f"metal_flash_sdpa: kernel {kernel.name} failed its self-check in {stage} ({described}): "
            f"{measured}{verdict.detail}{where}; PyTorch's SDPA serves this variant"
            f"{' with grad' if stage == 'backward' else ''} from now on"
        )
        super().__init__(self.warning)


def verify(kernel, stage, q, k, v, mask, scale, causal, dropout=False, mask_grad=False) -> None:
    """Return when the variant of this op-level call (4-D tensors, 4-D mask, scale
    resolved; ``dropout``: whether it drops; ``mask_grad``: whether its backward returns the
    mask's gradient) may run on ``kernel`` in ``stage``; raise SelfCheckFailed when it failed
    its self-check. The first call of a variant checks it (one thread; the others wait)."""
    if mode == "off":
        return
    shape = q.shape
    mask_kind = 0 if mask is None else _mask_kind(mask.dtype == torch.bool, mask.shape[1] != 1, mask_grad)
    key = (kernel, q.device, stage, q.dtype, shape[1], k.shape[1], shape[3], v.shape[3], scale, causal, mask_kind, dropout)
    failed = _known.get(key, _UNKNOWN)
    if failed is None:
        return
    if failed is _UNKNOWN:
        failed = _first_use(key, shape[2], k.shape[2])
        if failed is None:
            return
    raise SelfCheckFailed(kernel, stage, describe(key), failed)


def _mask_kind(is_bool, per_head, grad=False) -> int:
    """The index in MASK_KINDS of a mask."""
    return 5 + per_head if grad else 1 + per_head + 2 * is_bool


def describe(key) -> str:
    _, device, _, dtype, q_heads, kv_heads, head_dim, value_dim, scale, causal, mask_kind, dropout = key
    return (
        f"device={device.type} dtype={str(dtype).replace('torch.', '')} head_dim={head_dim} value_dim={value_dim} "
        f"q_heads={q_heads} kv_heads={kv_heads} scale={scale:.6g} causal={causal} mask={MASK_KINDS[mask_kind]}"
        + (" dropout" if dropout else "")
    )


def _first_use(key, q_len, kv_len):
    with _locks_lock:
        lock = _locks.setdefault(key, threading.RLock())
    with lock:
        known = _known.get(key, _UNKNOWN)
        if known is not _UNKNOWN:  # another thread checked it while this one waited
            return known
        stored_as = store_key(key)
        verdict = None if mode == "always" else store.get(stored_as)
        if verdict is None:
            verdict = run_check(key, q_len, kv_len)
            store.put(stored_as, verdict)
        _known[key] = None if verdict.passed else verdict
        return _known[key]


def forget() -> None:
    """Drop the verdicts and calibration choices held in memory (not those on disk): the
    next call of each variant looks it up again."""
    _known.clear()
    _contexts.clear()
    _choices.clear()


# ----------------------------------------------------------------------------- keys


def context(kernel, device) -> dict:
    """Everything besides the variant that can change a kernel's result on this machine."""
    found = _contexts.get((kernel, device))
    if found is None:
        import metal_flash_sdpa

        found = {
            "machine": kernel.machine(device),
            "package": metal_flash_sdpa.__version__,
            "build": build_id(),
            "torch": torch.__version__,
        }
        _contexts[(kernel, device)] = found
    return found


def build_id() -> str:
    try:
        from ._build import BUILD_ID
    except ImportError:  # run from a source tree, not built by meson
        return "unknown"
    return BUILD_ID


def store_key(key, **extra) -> str:
    """The verdict's key on disk: the variant (with ``extra`` fields) and its context, as
    canonical JSON."""
    kernel, device, stage, dtype, q_heads, kv_heads, head_dim, value_dim, scale, causal, mask_kind, dropout = key
    variant = {
        "kernel": kernel.name,
        "class": f"{type(kernel).__module__}.{type(kernel).__qualname__}",
        "device": device.type,
        "stage": stage,
        "dtype": str(dtype).replace("torch.", ""),
        "head_dim": head_dim,
        "value_dim": value_dim,
        "q_heads": q_heads,
        "kv_heads": kv_heads,
        "scale": scale,
        "causal": causal,
        "mask": MASK_KINDS[mask_kind],
        "dropout": dropout,
        **extra,
    }
    return json.dumps({"variant": variant, "context": context(kernel, device)}, sort_keys=True, default=str)


# ----------------------------------------------------------------------------- the check


def run_check(key, q_len, kv_len) -> Verdict:
    """Run the variant ``key`` on its canary and judge it by ``check``'s rule."""
    from . import check

    kernel, _, stage, dtype = key[:4]
    start = time.perf_counter()
    try:
        with torch.inference_mode(False):  # a user's inference mode would make the canary's tensors unusable
            ours, theirs, gold = _canary(key, q_len, kv_len)
        tolerance = kernel.tolerances.get(dtype, (0.0, 0.0))  # none promised: the twice-PyTorch rule alone
        result = check._judge(tolerance, dtype, "self-check", stage, ours, theirs, gold)
        verdict = (result.status == "ok", result.detail, result.max_abs, result.worst)
    except Exception as error:  # a compile error, a command-buffer error, a fault: a failed check
        verdict = (False, error_line(error), math.nan, "")
    checked = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    return Verdict(*verdict, time.perf_counter() - start, checked)


def canary_lengths(q_len, kv_len):
    top_q, top_kv = CANARY_LENGTHS
    if q_len == kv_len:  # a kernel may serve causal calls only when they are square
        return (min(q_len, top_kv),) * 2
    return min(q_len, top_q), min(kv_len, top_kv)


def canary_inputs(key, q_len, kv_len):
    """The canary of variant ``key`` for a call of these lengths, on the CPU in the variant's
    dtype: (q, k, v, mask or None, grad_out or None), [1, H, L, D] (mask [1, 1 or H, L, S])."""
    _, _, stage, dtype, q_heads, kv_heads, head_dim, value_dim, _, _, mask_kind, _ = key
    q_len, kv_len = canary_lengths(q_len, kv_len)
    generator = torch.Generator().manual_seed(SEED)  # not the user's random stream

    def randn(*shape):  # rounded to the dtype on the CPU, so float64 sees the same numbers
        return torch.randn(*shape, generator=generator, dtype=torch.float64).to(dtype)

    q, k, v = randn(1, q_heads, q_len, head_dim), randn(1, kv_heads, kv_len, head_dim), randn(1, kv_heads, kv_len, value_dim)
    mask = None
    if mask_kind:
        mask = randn(1, q_heads if mask_kind % 2 == 0 else 1, q_len, kv_len)
        blocked = torch.rand(mask.shape, generator=generator) < 0.25
        rows = torch.arange(q_len)
        blocked[..., rows, rows % kv_len] = False  # every row attends to some key
        if kv_len > 128:
            # Tiles of every class a kernel may tell apart (MFA's tile summaries, ccv patch
            # 0013): keys 32 to 127 masked in every row (tiles skipped whole, key blocks no
            # query attends), keys from 128 on attended with 0 added (no mask read).
            blocked[..., 32:128] = True
            blocked[..., 128:] = False
            mask[..., 128:] = 0
        mask = ~blocked if mask_kind in (3, 4) else mask.masked_fill_(blocked, -math.inf)
    grad_out = randn(1, q_heads, q_len, value_dim) if stage == "backward" else None
    return q, k, v, mask, grad_out


def _canary(key, q_len, kv_len):
    """-> (kernel's, PyTorch's in the dtype, float64's) out (and dq, dk, dv) on the canary."""
    from . import ops

    kernel, device, *_, scale, causal, mask_kind, dropped = key
    cpu = canary_inputs(key, q_len, kv_len)
    mask_grad = MASK_KINDS[mask_kind].endswith("grad")  # a backward's variant only
    q, k, v, mask, grad_out = (None if t is None else t.to(device) for t in cpu)
    layout = kernel.layout
    # A dropout variant drops with a fixed p and seed; PyTorch takes the same decisions.
    options, dropout = {}, None
    if dropped:
        options["dropout"] = (CANARY_DROPOUT, SEED)
        keep = _dropout.keep_mask(SEED, CANARY_DROPOUT, 1, q.shape[1], q.shape[2], k.shape[2])
        dropout = (CANARY_DROPOUT, keep)
    with torch.no_grad():
        tensors = [ops.to_layout(t, layout) for t in (q, k, v)]
        out, lse = kernel.forward(*tensors, scale, causal, mask, **options)
        ours = [out]
        if grad_out is not None:
            backward = dict(options, mask_grad=True) if mask_grad else options
            ours += kernel.backward(ops.to_layout(grad_out, layout), *tensors, out, lse, scale, causal, mask, **backward)
        ours = [t.cpu() for t in ours]  # waits for the device: its errors surface here
        on_device = dropout and (dropout[0], dropout[1].to(device))
        theirs = _math_sdpa(q, k, v, mask, scale, causal, grad_out, on_device, mask_grad)
    q, k, v, mask, grad_out = (t if t is None or t.dtype == torch.bool else t.double() for t in cpu)
    return ours, theirs, _math_sdpa(q, k, v, mask, scale, causal, grad_out, dropout, mask_grad)


def _math_sdpa(q, k, v, mask, scale, causal, grad_out, dropout=None, mask_grad=False):
    """PyTorch's math SDPA: [out] or [out, dq, dk, dv] for ``grad_out`` (and dmask with
    ``mask_grad``); ``dropout``: (p, the keep mask). Its aten op itself, not
    sdpa_kernel(MATH): that flips process-wide backend flags, and calls in other threads
    would then fall back (rules.BACKENDS) while a self-check runs."""
    from . import ops

    p, keep = dropout or (0.0, None)
    if grad_out is None:
        with torch.no_grad():
            return [ops.math_sdpa(q, k, v, mask, causal, scale, p, keep)]
    inputs = [t.detach().requires_grad_() for t in ((q, k, v, mask) if mask_grad else (q, k, v))]
    with ops._with_autograd(), torch.enable_grad():
        out = ops.math_sdpa(*inputs[:3], inputs[3] if mask_grad else mask, causal, scale, p, keep)
        # grad of sum(out * grad_out), the same numbers: autograd.grad given grad_outputs
        # first imports torch's symbolic shapes (sympy), a second on a cold start
        return [out.detach(), *torch.autograd.grad((out * grad_out).sum(), inputs)]


# ----------------------------------------------------------------------------- calibration

PYTORCH_FASTER = "PyTorch measured faster for this variant"
PENDING = object()  # rules.evaluate: the call's bucket is not calibrated yet
calibrating = config.calibrate()  # tests set it directly
# PyTorch's SDPA is not timed where it would materialise scores (B x H x L x S x 4 bytes)
# beyond this: on MPS its non-fused path can take many GiB.
MAX_PYTORCH_SCORES = 256 << 20
WARMUP, RUNS = 1, 3
# PyTorch takes the bucket only when its median is below this share of the kernel's, so
# that timing noise does not hand a bucket back and forth between processes.
MARGIN = 0.9

_choices: dict = {}  # (rules.configuration, query bucket, key bucket) -> None or PYTORCH_FASTER


def bucket(length: int) -> int:
    """The power of two at or above ``length``."""
    return 1 << (length - 1).bit_length()


def choice(configuration, q_len, kv_len):
    """The bucket's choice: None (the kernel), PYTORCH_FASTER, or PENDING; a dict lookup."""
    return _choices.get((configuration, bucket(q_len), bucket(kv_len)), PENDING)


def calibrate(kernel, q, k, v, mask, causal, scale, gqa, pytorch):
    """Time the call (without grad, without dropout) on ``kernel`` and on ``pytorch`` (the
    builtin SDPA) unless its bucket is known, here or on disk; -> its choice."""
    from . import rules

    call = rules.describe(q.shape, k.shape, v.shape, q.dtype, mask, causal, False, scale, 0.0)
    configuration = rules.configuration(kernel.name, q.device.type, call)
    found = (configuration, bucket(call.q_len), bucket(call.kv_len))
    with _locks_lock:
        lock = _locks.setdefault(found, threading.RLock())
    with lock:
        if found in _choices:  # another thread calibrated it while this one waited
            return _choices[found]
        mask_kind = 0 if mask is None else _mask_kind(mask.dtype == torch.bool, call.mask_per_head)
        variant = (kernel, q.device, "calibration", q.dtype, call.q_heads, call.kv_heads, call.head_dim,
                   call.value_dim, call.softmax_scale, causal, mask_kind, False)
        stored_as = store_key(variant, q_bucket=found[1], kv_bucket=found[2])
        record = None if mode == "always" else store.get_record(stored_as)
        if record is None or record.get("choice") not in ("kernel", "pytorch"):
            record = _measure(kernel, q, k, v, mask, causal, scale, gqa, pytorch)
            store.put_record(stored_as, record)
        _choices[found] = PYTORCH_FASTER if record["choice"] == "pytorch" else None
        return _choices[found]


def _measure(kernel, q, k, v, mask, causal, scale, gqa, pytorch) -> dict:
    from . import counters, ops

    record = {"checked": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "kernel_ms": None, "pytorch_ms": None}
    scores = 4 * math.prod(q.shape[:-1]) * k.shape[-2]
    if scores > MAX_PYTORCH_SCORES:
        return {**record, "choice": "kernel", "detail": f"PyTorch not timed: its scores would take {scores >> 20} MiB"}
    keywords = {"scale": scale, **({"enable_gqa": True} if gqa else {})}
    sync = torch.mps.synchronize if q.device.type == "mps" else (lambda: None)
    try:
        with torch.no_grad(), counters.uncounted():
            ours = _median_seconds(lambda: ops.attention(kernel, q, k, v, mask, causal, scale, False, 0.0), sync)
    except Exception as error:  # the call itself will meet it again, and handle it
        return {**record, "choice": "kernel", "detail": f"kernel not timed: {error_line(error)}"}
    try:
        with torch.no_grad():
            theirs = _median_seconds(lambda: pytorch(q, k, v, mask, 0.0, causal, **keywords), sync)
    except Exception as error:
        return {**record, "choice": "kernel", "kernel_ms": ours * 1e3, "detail": f"PyTorch raised: {error_line(error)}"}
    faster = "pytorch" if theirs < MARGIN * ours else "kernel"
    return {**record, "choice": faster, "kernel_ms": ours * 1e3, "pytorch_ms": theirs * 1e3, "detail": ""}


def _median_seconds(run, sync) -> float:
    for _ in range(WARMUP):
        run()
        sync()
    times = []
    for _ in range(RUNS):
        start = time.perf_counter()
        run()
        sync()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def error_line(error) -> str:
    """An exception in one line: its type and first line ([...] if it had more)."""
    lines = str(error).strip().splitlines() or [""]
    return f"{type(error).__name__}: {lines[0]}{' [...]' if len(lines) > 1 else ''}"


# ----------------------------------------------------------------------------- the store


class _Unusable(Exception):
    pass


class Store:
    """``verdicts.json`` under the cache directory: read on a variant's first use, merged and
    replaced atomically (temporary file, os.replace; under a file lock where there is one) on
    a write. Once it proves corrupt or unwritable: memory only for the process, one warning."""

    def __init__(self):
        self.memory_only = False
        self.problem = ""

    @staticmethod
    def path() -> str:
        return os.path.join(config.cache_dir(), STORE_NAME)

    @staticmethod
    def read(path) -> dict:
        """-> {key: record}; {} when there is no file; raises _Unusable."""
        try:
            with open(path, encoding="utf-8") as file:
                data = json.load(file)
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as error:
            raise _Unusable(f"{type(error).__name__}: {error}")
        if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("verdicts"), dict):
            raise _Unusable(f"not a verdict file of format {FORMAT}")
        return data["verdicts"]

    def get(self, key):
        record = self.get_record(key)
        try:
            return None if record is None else Verdict(**{**record, "stored": self.path()})
        except TypeError:  # a record this version cannot read: checked again
            return None

    def put(self, key, verdict: Verdict) -> None:
        record = verdict._asdict()
        del record["stored"]
        self.put_record(key, record)

    def get_record(self, key):
        """The record stored under ``key`` (a dict), or None."""
        if self.memory_only:
            return None
        path = self.path()
        try:
            record = self.read(path).get(key)
        except _Unusable as error:
            self._degrade(path, error)
            return None
        return record if isinstance(record, dict) else None

    def put_record(self, key, record: dict) -> None:
        if self.memory_only:
            return
        path = self.path()
        directory = os.path.dirname(path)
        try:
            os.makedirs(directory, exist_ok=True)
            with _file_lock(path + ".lock"):
                verdicts = self.read(path)
                verdicts[key] = record
                descriptor, temporary = tempfile.mkstemp(dir=directory, prefix=".verdicts-", suffix=".tmp")
                try:
                    with os.fdopen(descriptor, "w", encoding="utf-8") as file:
                        json.dump({"format": FORMAT, "verdicts": verdicts}, file, indent=1, sort_keys=True)
                    os.replace(temporary, path)
                except BaseException:
                    with contextlib.suppress(OSError):
                        os.unlink(temporary)
                    raise
        except (OSError, _Unusable) as error:
            self._degrade(path, error)

    def _degrade(self, path, error) -> None:
        self.memory_only = True
        self.problem = f"{path}: {error}"
        config._warn(
            f"metal_flash_sdpa: the self-check's verdict file is not usable ({self.problem}); "
            f"verdicts are kept in memory for this process (set {config.CACHE_DIR_VAR} or remove the file)"
        )


@contextlib.contextmanager
def _file_lock(path):
    try:
        import fcntl
    except ImportError:  # no advisory locks here: os.replace still keeps the file whole
        yield
        return
    with open(path, "a") as file:
        fcntl.flock(file, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(file, fcntl.LOCK_UN)


store = Store()


# ----------------------------------------------------------------------------- status


def status_lines() -> list:
    """The verdicts on disk, for ``python -m metal_flash_sdpa status``."""
    import metal_flash_sdpa

    path = store.path()
    lines = [f"Self-check (MFA_SELFCHECK -> {mode}): verdicts in {path}"]
    if store.memory_only:
        lines.append(f"  NOT USED in this process: {store.problem}")
    try:
        verdicts = store.read(path)
    except _Unusable as error:
        return lines + [f"  unreadable: {error}"]
    if not verdicts:
        return lines + ["  none yet (each kernel variant is checked on its first call)"]
    groups: dict = {}
    unreadable = 0
    for key, record in verdicts.items():
        try:
            entry = json.loads(key)
            groups.setdefault(json.dumps(entry["context"], sort_keys=True), []).append((entry["variant"], record))
        except (ValueError, KeyError, TypeError):  # not written by this version
            unreadable += 1
    current = {"package": metal_flash_sdpa.__version__, "build": build_id(), "torch": torch.__version__}
    for group, entries in sorted(groups.items()):
        found = json.loads(group)
        machine = " ".join(f"{name}={value}" for name, value in found["machine"].items())
        stale = any(found.get(name) != value for name, value in current.items())
        lines.append(
            f"  {machine}; metal-flash-sdpa {found['package']} build {found['build']}, torch {found['torch']}"
            + (" (another version: not used)" if stale else "")
        )
        for variant, record in sorted(entries, key=lambda item: _order(item[0])):
            lines.append("    " + _verdict_line(variant, record))
    if unreadable:
        lines.append(f"  ({unreadable} entries this version cannot read)")
    return lines


def _order(variant) -> tuple:
    fields = ("kernel", "device", "dtype", "head_dim", "value_dim", "q_heads", "kv_heads", "scale", "causal", "mask", "dropout")
    return (*(str(variant.get(name)) for name in fields), variant.get("stage") == "backward")


def _variant_fields(variant) -> str:
    """What a status line says of a variant besides its kernel, dtype and stage."""
    return (
        f"D={variant['head_dim']} Dv={variant['value_dim']} Hq={variant['q_heads']} Hk={variant['kv_heads']} "
        f"scale={variant['scale']:.6g} causal={variant['causal']} mask={variant['mask']}"
        + (" dropout" if variant.get("dropout") else "")
    )


def _verdict_line(variant, record) -> str:
    if variant.get("stage") == "calibration":
        return _calibration_line(variant, record)
    described = f"{variant['kernel']:10} {variant['dtype']:8} {variant['stage']:8} {_variant_fields(variant)}"
    measured = f"max error {record.get('max_error', math.nan):.2g}"
    line = f"{'passed' if record.get('passed') else 'FAILED'}  {described}  {measured}  {record.get('seconds', 0):.3f} s  {record.get('checked', '')}"
    return line if record.get("passed") else f"{line}\n      {record.get('detail', '')}"


def _calibration_line(variant, record) -> str:
    described = (
        f"{variant['kernel']:10} {variant['dtype']:8} L<={variant.get('q_bucket')} S<={variant.get('kv_bucket')} "
        f"{_variant_fields(variant)}"
    )
    times = lambda ms: "-" if ms is None else f"{ms:.3g} ms"  # noqa: E731
    measured = f"kernel {times(record.get('kernel_ms'))}, PyTorch {times(record.get('pytorch_ms'))}"
    line = f"{'kernel ' if record.get('choice') == 'kernel' else 'PyTorch'} {described}  {measured}  {record.get('checked', '')}"
    return line + (f"\n      {record['detail']}" if record.get("detail") else "")
