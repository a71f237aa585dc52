"""Rungs 2 and 3 (DESIGN section 10): the Metal source ccv's generator (the pinned sources and
our patch series, subprojects/packagefiles/ccv/) emits for every configuration class
MFAKernel accepts, and how the engine fails.

For every dtype, GPU family, macOS mode and head-dim class, one driver run encodes the forward
and the backward as the bridge does and records what a Mac would compile and launch: the
kernels are the expected ones; on macOS 26 no source declares `__asm` (and the macOS 15
sources do, so that check can fail); every buffer and function constant a kernel declares
is bound by its dispatch or set by its pipeline, with the declared type; the sources pass
the Metal syntax check. A failure inside ccv (a rejected compile, a library without its
function, a nil pipeline, a failed allocation) ends the engine with exit 3 and a message,
never with a signal. MFA_ENGINE_FULL=1 syntax-checks every source, not a covering subset.
"""

import concurrent.futures
import copy
import json
import os
import pathlib
import re
import subprocess
import sys

import pytest

from conftest import REPO
from engine_setup import engine_required  # puts tools/ on sys.path

from engine import build, encode  # noqa: E402  (after engine_setup)

CLI = REPO / "tools" / "mfa_engine.py"
FULL = os.environ.get("MFA_ENGINE_FULL") == "1"

# Largest head dim of each row of ccv's parameter tables (v2/AttentionDescriptor.cpp:
# forward, backwardQuery, backwardKeyValue; the 512 rows are our patch 0016's). The bridge sets upcast, so the *Mixed tables
# (low-precision intermediates) are never used.
TABLE_ROWS = {
    ("apple9", "forward"): (8, 16, 48, 192, 384, 512),
    ("apple7", "forward"): (24, 32, 56, 384, 512),
    ("apple9", "backwardQuery"): (16, 32, 192, 384, 512),
    ("apple7", "backwardQuery"): (16, 32, 56, 384, 512),
    ("apple9", "backwardKeyValue"): (16, 32, 64, 128, 160, 384, 512),
    ("apple7", "backwardKeyValue"): (16, 24, 56, 384, 512),
}


def head_dims() -> list:
    """Each row's largest head dim, and the largest one inside the row that is not a
    multiple of 16 (so the 16- or 32-wide head blocks end in a remainder)."""
    dims = set()
    for rows in TABLE_ROWS.values():
        low = 0
        for high in rows:
            dims.add(high)
            inside = [d for d in range(low + 8, high, 8) if d % 16 == 8]
            dims.update(inside[-1:])
            low = high
    return sorted(dims)


HEAD_DIMS = head_dims()
# The syntax check's covering subset: both ends of the tables and two remainders.
SYNTAX_HEAD_DIMS = HEAD_DIMS if FULL else [8, 40, 152, 504]
CLASSES = [(dtype, gpu, macos) for dtype in ("fp32", "fp16") for gpu in ("apple7", "apple9") for macos in (15, 26)]
ATTENTION = ["attention_forward", "attention_backward_query", "attention_backward_key_value"]

# Metal type names of function constants, as MTLDataType values (the record's "type").
MTL_TYPES = {"float": 3, "half": 16, "int": 29, "uint": 33, "ushort": 41, "bool": 53}
_CONSTANT = re.compile(r"constant\s+(\w+)\s+\w+\s*\[\[function_constant\((\d+)\)\]\]")
_BUFFER = re.compile(r"\[\[buffer\((\d+)\)\]\]")
_THREADGROUP = re.compile(r"\[\[threadgroup\((\d+)\)\]\]")


def call(dtype: str, gpu: str, macos: int, head_dim: int, **changes) -> encode.Call:
    fields = dict(dtype=dtype, batch=2, heads=2, q_len=97, kv_len=130, head_dim=head_dim, grad=True, gpu=gpu, macos=macos)
    fields.update(changes)
    return encode.Call(**fields)


@pytest.fixture(scope="module")
def driver() -> pathlib.Path:
    """The engine; skips with one line when it cannot be built here, unless
    MFA_ENGINE_REQUIRED=1 (CI), where that fails."""
    with engine_required():
        return build.build()


@pytest.fixture(scope="module")
def records(driver) -> dict:
    """Every configuration of the matrix, encoded: (dtype, gpu, macos, head_dim) -> Record."""
    out = {}
    for dtype, gpu, macos in CLASSES:
        for head_dim in HEAD_DIMS:
            the_call = call(dtype, gpu, macos, head_dim)
            assert encode.refusal(the_call) is None, f"MFAKernel refuses {the_call}: the matrix is wrong"
            out[(dtype, gpu, macos, head_dim)] = encode.encode(the_call, check_refusal=False)
    return out


def run_driver(driver, the_call: encode.Call, *extra):
    """The driver's exit code and its JSON, for checks encode.encode() would turn into one
    exception."""
    result = subprocess.run([str(driver), *the_call.driver_args(), *extra], capture_output=True, text=True, timeout=60)
    assert result.returncode >= 0, f"the engine died by signal {-result.returncode}: {result.stderr[-2000:]}"
    return result.returncode, json.loads(result.stdout) if result.stdout.strip() else None


def test_head_dims_reach_every_row_of_every_table():
    for (gpu, kernel), rows in TABLE_ROWS.items():
        low = 0
        for high in rows:
            assert any(low < d <= high for d in HEAD_DIMS), f"no head dim in ({low}, {high}] of {gpu} {kernel}"
            low = high
    assert max(HEAD_DIMS) == 512 and all(d % 8 == 0 for d in HEAD_DIMS)
    assert any(d % 16 for d in HEAD_DIMS)  # a remainder after the head blocks


@pytest.mark.parametrize("dtype,gpu,macos", CLASSES, ids=lambda v: str(v))
def test_sources_of_every_configuration(records, dtype, gpu, macos):
    expected = ATTENTION[:1] + ["cast_float_to_half"] + ATTENTION[1:] if dtype == "fp16" else ATTENTION
    for head_dim in HEAD_DIMS:
        record = records[(dtype, gpu, macos, head_dim)]
        where = f"{dtype} {gpu} macOS {macos} D={head_dim}"
        # (ccv picks one of three cast kernels by the length: a backward may launch two)
        assert list(dict.fromkeys(k.name for k in record.kernels())) == expected, where
        sources = [library["source"] for library in record.raw["libraries"] if not library["precompiled"]]
        if macos >= 26:
            assert not any("__asm" in source for source in sources), f"{where}: __asm in a macOS 26 source"
        else:  # macOS 15 keeps ccv's async copies, so the check above can fail
            assert all("__asm" in k.source for k in record.kernels() if k.name in ATTENTION), where


def binding_problems(raw: dict) -> list:
    """Every buffer, threadgroup allocation and function constant a launched kernel declares
    that its dispatch does not bind or its pipeline does not set (with the declared type)."""
    problems = []
    for number, dispatch in enumerate(raw["dispatches"]):
        pipeline = raw["pipelines"][dispatch["pipeline"]]
        source = raw["libraries"][pipeline["library"]]["source"]
        where = f"dispatch {number} ({pipeline['function']})"
        for index in _BUFFER.findall(source):
            if index not in dispatch["buffers"]:
                problems.append(f"{where}: buffer {index} is not bound")
        for index in _THREADGROUP.findall(source):
            if index not in dispatch["threadgroup_memory"]:
                problems.append(f"{where}: threadgroup memory {index} has no length")
        for type_name, index in _CONSTANT.findall(source):
            value = pipeline["constants"].get(index)
            if value is None:
                problems.append(f"{where}: function constant {index} is not set")
            elif value["type"] != MTL_TYPES[type_name]:
                problems.append(f"{where}: function constant {index} is set as type {value['type']}, not {type_name}")
    return problems


@pytest.mark.parametrize("dtype,gpu,macos", CLASSES, ids=lambda v: str(v))
def test_every_declared_buffer_and_constant_is_bound(records, dtype, gpu, macos):
    for head_dim in HEAD_DIMS:
        raw = records[(dtype, gpu, macos, head_dim)].raw
        assert raw["dispatches"]
        assert binding_problems(raw) == [], f"{dtype} {gpu} macOS {macos} D={head_dim}"


def test_binding_check_finds_what_is_missing(records):
    """binding_problems() on a record with one buffer unbound, one constant unset and one
    constant of the wrong type."""
    raw = copy.deepcopy(records[("fp16", "apple9", 26, 152)].raw)
    dispatch = raw["dispatches"][0]
    pipeline = raw["pipelines"][dispatch["pipeline"]]
    source = raw["libraries"][pipeline["library"]]["source"]
    buffer = _BUFFER.findall(source)[-1]
    (_, unset), (_, retyped) = _CONSTANT.findall(source)[:2]
    del dispatch["buffers"][buffer]
    del pipeline["constants"][unset]
    pipeline["constants"][retyped]["type"] = MTL_TYPES["half"]
    assert binding_problems(raw) == [
        f"dispatch 0 (attention): buffer {buffer} is not bound",
        f"dispatch 0 (attention): function constant {unset} is not set",
        f"dispatch 0 (attention): function constant {retyped} is set as type 16, not uint",
    ]


def _syntax_check():
    """engine.metal.syntax_check, which raises on a source Metal would reject. Skips while
    tools/engine/metal does not provide it yet."""
    try:
        from engine import metal
    except ImportError:
        metal = None
    check = getattr(metal, "syntax_check", None)
    if check is None:
        pytest.skip("engine.metal.syntax_check does not exist yet (tools/engine/metal)")
    return check


def test_syntax_check_passes(records):
    check = _syntax_check()
    sources = {}
    for (dtype, gpu, macos, head_dim), record in records.items():
        if head_dim in SYNTAX_HEAD_DIMS:
            for kernel in record.kernels():
                sources.setdefault(kernel.source, f"{kernel.name} {dtype} {gpu} macOS {macos} D={head_dim}")
    with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        failures = {}
        for where, error in zip(sources.values(), pool.map(_error_of(check), sources)):
            if error is not None:
                failures[where] = error
    assert not failures, "\n".join(f"{where}: {error}" for where, error in failures.items())


def _error_of(check):
    def error_of(source):
        try:
            check(source)
        except Exception as error:  # noqa: BLE001  (any rejection is the finding)
            return f"{type(error).__name__}: {str(error)[:2000]}"
        return None

    return error_of


def test_syntax_check_rejects_a_planted_error(records):
    check = _syntax_check()
    source = next(k.source for k in records[("fp16", "apple9", 26, 152)].kernels() if k.name == "attention_forward")
    planted = source.replace("kernel void attention(", "kernel void attention(undeclared_type x, ", 1)
    assert planted != source
    with pytest.raises(Exception):
        check(planted)


def test_async_copies_are_rejected_on_macos_26_as_an_error(driver):
    """Forcing ccv's async copies on the modelled macOS 26 compiler is an exception that
    ends the engine with exit 3, not the trap ccv had."""
    code, result = run_driver(driver, call("fp16", "apple9", 26, 64), "--async-copies", "on")
    assert code == 3 and "__asm" in result["error"] and "rejected" in result["error"], result


@pytest.mark.parametrize(
    "fault,dtype,q_len,extra,expected",
    [
        # a library that compiled without error but holds no function (reported on macOS 26.5)
        ("empty-library", "fp32", 97, (), "no function and no error"),
        ("empty-library", "fp16", 97, (), "no function and no error"),
        ("nil-pipeline", "fp32", 97, (), "no pipeline and no error"),
        ("nil-pipeline", "fp16", 97, (), "no pipeline and no error"),
        # scratch for the fp16 output beyond ccv's first 64 KiB: allocated in prepare, or,
        # without prepare, inside the encode between startCommand and finishCommand
        ("no-memory", "fp16", 256, (), "buffer != nullptr"),
        ("no-memory", "fp16", 256, ("--no-prepare",), "buffer != nullptr"),
    ],
)
def test_fault_is_an_error_not_a_crash(driver, fault, dtype, q_len, extra, expected):
    # After the error the driver also checks that the batch has no command open and that
    # the same call raises again (no half-built cache entry): either failing changes the
    # message.
    code, result = run_driver(driver, call(dtype, "apple9", 26, 64, q_len=q_len), "--fault", fault, *extra)
    assert code == 3 and result is not None, result
    assert expected in result["error"] and "after ccv raised" not in result["error"], result["error"]


def test_encode_without_prepare_builds_the_same(driver, records):
    """ccv's other callers encode without preparing: the encode still builds what it needs,
    and launches the same kernels with the same bindings."""
    code, result = run_driver(driver, call("fp16", "apple7", 26, 152), "--no-prepare")
    assert code == 0, result
    assert launches(result) == launches(records[("fp16", "apple7", 26, 152)].raw)


def launches(raw: dict) -> list:
    """The dispatches of a record with their pipeline and buffers by content, not by index."""
    out = []
    for dispatch in raw["dispatches"]:
        pipeline = dict(raw["pipelines"][dispatch["pipeline"]])
        pipeline["library"] = raw["libraries"][pipeline["library"]]["source"]
        buffers = {i: (raw["buffers"][b["buffer"]]["name"], b["offset"]) for i, b in dispatch["buffers"].items()}
        out.append(dict(dispatch, pipeline=pipeline, buffers=buffers))
    return out


@pytest.mark.parametrize(
    "macos,os_reports,asm",
    [
        (15, None, True),
        (25, None, True),
        (26, None, False),
        (27, None, False),
        # macOS 26 as a process linked against an older SDK sees it: the version says 16,
        # the probe says no (a version rule would have picked the async copies)
        (26, "16.0.0", False),
        # a version that says 26 decides nothing either: the compiler takes them here
        (15, "26.0.0", True),
    ],
)
def test_copy_mode_is_chosen_by_the_probe(driver, macos, os_reports, asm):
    extra = ("--os-reports", os_reports) if os_reports else ()
    code, result = run_driver(driver, call("fp32", "apple9", macos, 64, grad=False), *extra)
    assert code == 0, result
    sources = [library["source"] for library in result["libraries"] if not library["precompiled"]]
    assert sources and all(("__asm" in source) == asm for source in sources), f"macOS {macos}"
    reported = os_reports or f"{macos}.0.0"
    major = 26 if reported.startswith("16.") else int(reported.split(".")[0])
    platform = {"macos_version": reported, "macos_major": major, "async_copies": asm, "metal_language": "3.1"}
    assert result["platform"] == platform


def test_compile_options_of_every_library(records):
    """Every library ccv compiles (and the probe) is created with explicit options, Metal 3.1
    and fast math (patch 0009), not the process's defaults."""
    for key, record in records.items():
        for library in record.raw["libraries"]:
            if not library["precompiled"]:
                assert library["options"] == {"language": "3.1", "fast_math": True}, key


@pytest.mark.parametrize("language,dtype,compiles", [("3.1", "bf16", True), ("3.0", "bf16", False), ("none", "bf16", False), ("3.0", "fp16", True)])
def test_stand_in_compiler_rejects_bfloat_below_3_1(driver, tmp_path, language, dtype, compiles):
    """The recording compiler's rule, both ways: a bf16 kernel's source (it declares bfloat)
    compiles as Metal 3.1 and fails below it, or with no options (the process's default,
    modelled as 3.0); an fp16 source compiles at 3.0."""
    kernel = encode.encode(call(dtype, "apple9", 26, 64, q_len=9, kv_len=9, grad=False), check_refusal=False).kernels()[0]
    assert ("bfloat" in kernel.source) == (dtype == "bf16")
    path = tmp_path / "kernel.metal"
    path.write_text(kernel.source)
    result = subprocess.run([str(driver), "--compile-source", str(path), "--language", language], capture_output=True, text=True, timeout=60)
    if compiles:
        assert result.returncode == 0 and json.loads(result.stdout) == {"compiled": True}, result
    else:
        assert result.returncode == 3 and "unknown type name 'bfloat'" in json.loads(result.stdout)["error"], result


def test_probe_source_passes_the_syntax_check():
    """The probe declares and calls one of ccv's async copies as its kernels do: a source
    the Metal syntax check takes, so that only a compiler refusing `__asm` refuses it."""
    check = _syntax_check()
    text = (REPO / "native" / "mfa_platform.hpp").read_text()
    source = re.search(r'kAsyncCopyProbeSource = R"\((.*?)\)";', text, flags=re.S).group(1)
    assert "__asm(\"air.simdgroup_async_copy" in source and "kernel void mfa_sdpa_async_copy_probe(" in source
    check(source)


def test_scratch_outlives_the_command_buffer_that_binds_it(driver):
    """fp16 MQA 32:1, 4096 tokens, D=128, forward then backward in one command buffer: the
    backward grows ccv's scratch 64 KiB -> 64 MiB -> 69 MiB (whole MiB: patch 0011) while the forward's dispatches,
    not yet completed, bind the 64 MiB one. Kept as the bridge keeps it (mfa_scratch.hpp),
    nothing they bind is released before the command buffer completes; without the keep
    (the bridge before), the stand-in device catches the release and the run fails."""
    the_call = encode.Call(dtype="fp16", heads=32, kv_heads=1, q_len=4096, kv_len=4096, head_dim=128, grad=True)
    assert "--same-command-buffer" in the_call.driver_args()  # every engine run with grad
    code, result = run_driver(driver, the_call)
    assert code == 0, result
    assert [b["length"] for b in result["buffers"] if b["name"] == "scratch"] == [64 << 10, 64 << 20, 69 << 20]
    code, result = run_driver(driver, the_call, "--no-keep-scratch")
    assert code == 3, result
    assert "scratch, 67108864 bytes) was released while a dispatch" in result["error"], result


def cli(*args, env=None):
    """`python tools/mfa_engine.py ARGS` (its stdout, stderr lines, exit code); PyTorch's
    import-time UserWarnings (no NumPy here) are not the CLI's output."""
    command = [sys.executable, "-W", "ignore::UserWarning", str(CLI), *args]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env={**os.environ, **(env or {})})
    return result.returncode, result.stdout, result.stderr.splitlines()


def test_cli_prints_every_kernel(driver):
    code, out, err = cli("source", "--dtype", "fp16", "--heads", "2", "--q-len", "97", "--kv-len", "130", "--head-dim", "72", "--grad")
    assert code == 0, err
    names = re.findall(r"^// kernel: (\S+)$", out, flags=re.M)
    assert names == ATTENTION[:1] + ["cast_float_to_half"] + ATTENTION[1:]
    options = re.findall(r"^// kernel: \S+\n(.*)$", out, flags=re.M)
    assert options == ["// options: language=3.1 fast_math=on"] * len(names)
    assert "__asm" not in out  # the CLI's default is macOS 26


@pytest.mark.parametrize("macos,os_reports,asm", [("26", "16", False), ("15", None, True)])
def test_cli_copy_mode_follows_the_compiler_not_the_reported_version(driver, capsys, macos, os_reports, asm):
    import mfa_engine  # its main in this process: a fresh one costs seconds

    extra = ("--os-reports", os_reports) if os_reports else ()
    args = ("source", "--dtype", "fp16", "--q-len", "9", "--kv-len", "9", "--head-dim", "64", "--macos", macos, *extra)
    assert mfa_engine.main(list(args)) == 0
    out = capsys.readouterr().out
    assert re.search(r"^// kernel: attention_forward$", out, flags=re.M) and ("__asm" in out) == asm


def test_cli_refuses_with_exit_2_and_one_line(driver):
    # is_causal with attn_mask: PyTorch raises, and MFAKernel.supports() refuses it too
    args = ("--q-len", "97", "--kv-len", "130", "--head-dim", "64", "--mask", "additive", "--causal")
    code, out, err = cli("source", "--dtype", "fp16", *args)
    assert code == 2 and out == ""
    assert len(err) == 1 and err[0].startswith("mfa_engine: refused:") and "attn_mask" in err[0], err


def test_cli_exits_3_when_the_engine_cannot_run(driver, tmp_path):
    missing = tmp_path / "no-ccv-here"
    code, out, err = cli("source", "--dtype", "fp32", "--q-len", "9", "--kv-len", "9", "--head-dim", "64", env={"MFA_CCV_SOURCE": str(missing)})
    assert code == 3 and out == ""
    assert len(err) == 1 and str(missing) in err[0], err
