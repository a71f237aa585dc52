"""Rung 4 (DESIGN section 10) for SDPA's ``scale``: our patch 0010 (issue #16 item 4).

ccv bakes the scale into each kernel's source. At the pin an unmasked kernel excludes keys
(the edge block beyond the keys, the causal triangle) with a score whose product with
scale * log2(e) overflows to -inf above a scale of about 1.14: the CPU turns that into
weight 0, a GPU compiling with fast math need not. So besides matching float64 PyTorch,
every kernel here must raise no float overflow and no division by zero (the executing shim
reports MXCSR's flags per launch): no float operation makes, and so none sees, an
infinity. Scales 0.01, 1/sqrt(D), 1.0 and 4.0, unmasked with an edge block, causal, and with
bool and additive masks, forward and backward, on small shapes; the pin's exclusion at
scale 4 overflows and fails. Scales outside what MFAKernel serves are refused by it and by
the bridge's check_scale (the driver), with exit 2 from the CLI.
"""

import dataclasses
import json
import subprocess
import sys

import pytest

import engine_setup
from engine_setup import engine_required  # puts tools/ on sys.path

from engine import build, encode, execute  # noqa: E402  (after engine_setup)

CLI = engine_setup.REPO / "tools" / "mfa_engine.py"
# What makes an infinity from finite operands (the inputs and every constant are finite;
# a mask's -inf is compared as bits, never converted).
INFINITY_MAKERS = {"overflow", "divide_by_zero"}


@dataclasses.dataclass(frozen=True)
class Case(engine_setup.Case):
    scale: float = None
    causal: bool = False
    mask: str = "none"

    def __str__(self):
        return f"{super().__str__()}-scale{self.scale}"


MATRIX = [
    Case("apple9", "fp32", 33, 31, 1, 1, head_dim=8, batch=1, scale=4.0),  # the edge block beyond C
    Case("apple9", "fp16", 17, 33, 1, 1, head_dim=16, batch=1, scale=4.0, causal=True),
    Case("apple9", "fp32", 17, 33, 1, 1, head_dim=16, batch=1, scale=1.0, causal=True),
    Case("apple9", "fp16", 33, 31, 1, 1, head_dim=16, batch=1, scale=0.01, causal=True),
    Case("apple7", "fp32", 33, 31, 1, 1, head_dim=16, batch=2, scale=4.0, mask="bool"),
    Case("apple9", "bf16", 17, 33, 1, 1, head_dim=16, batch=2, scale=0.01, mask="additive"),
    # 1/sqrt(D) (scale None), as test_engine_execute.py's first case: its kernels, compiled once
    Case("apple9", "fp32", 33, 31, 2, 2, head_dim=8, batch=1),
]
PIN = Case("apple9", "fp32", 33, 31, 1, 1, head_dim=8, batch=1, scale=4.0)  # MATRIX[0]


def pin(kernel, source):
    """The pin's exclusion divisor back in a scale-4 kernel's source."""
    return source.replace("(0.875 / 5.770780)", "(0.875 / 1.442695)")


@pytest.fixture(scope="module")
def engine():
    """The engine built and the matrix's kernels compiled on every core first."""
    with engine_required():
        build.build()
        from engine import metal
    kernels = {}
    for case in MATRIX + [PIN]:
        for source, function in engine_setup.kernels_of(case.call()):
            kernels[(source, function)] = None
            if case is PIN:
                kernels[(pin(None, source), function)] = None
    engine_setup.compile_all(metal, kernels)


def run(call, edit=None):
    """-> (the execution, its outputs beyond MFAKernel.tolerances of float64 PyTorch and
    further from it than twice PyTorch's own SDPA in the dtype: check's rule, as a sharper
    softmax, scale 4, makes both less exact; the LSE within execute.LSE_TOLERANCE)."""
    inputs = execute.random_inputs(call, seed=3)
    execution, _ = execute.execute_call(call, inputs, edit=edit)
    return execution, engine_setup.misses_of(execution, call, inputs, against_pytorch=True)


@pytest.mark.parametrize("case", MATRIX, ids=str)
def test_scale_matches_float64_pytorch_without_infinities(engine, case):
    call = case.call()
    execution, found = run(call)
    assert found == {}
    made = {kernel: sorted(INFINITY_MAKERS & set(raised)) for kernel, raised in execution.float_exceptions.items()}
    assert not any(made.values()), made


def test_default_scale_kernels_are_the_pins(engine):
    """At scale <= 1 the exclusion's divisor is the pin's text, so every kernel at a default
    scale is byte-identical to before the patch; above 1 it grows with the scale."""
    sources = {}
    for scale in (None, 1.0, 4.0):
        call = encode.Call(dtype="fp32", q_len=17, kv_len=33, head_dim=16, causal=True, grad=True, scale=scale)
        sources[scale] = "".join(k.source for k in encode.encode(call).kernels())
    assert "(0.875 / 1.442695)" in sources[None] and "(0.875 / 1.442695)" in sources[1.0]
    assert "(0.875 / 5.770780)" in sources[4.0] and "(0.875 / 1.442695)" not in sources[4.0]


def test_the_pins_exclusion_overflows_at_scale_4(engine):
    """The forward of the edge-block case with the pin's divisor multiplies its excluded
    scores into -inf (an overflow), which the test above would fail. (Causal kernels do so in
    all three kernels; measured, not run here: each edited source costs a compile.)"""
    execution, _ = run(PIN.call(), edit=lambda kernel, source: pin(kernel, source))
    assert "(0.875 / 5.770780)" in encode.encode(PIN.call()).kernels()[0].source
    assert {k for k, raised in execution.float_exceptions.items() if "overflow" in raised} == {"attention_forward"}


SERVED = (2.0**-32, 0.01, 1.0, 4.0, 2.0**32)
NOT_SERVED = (0.0, -0.125, -4.0, float("nan"), float("inf"), float("-inf"), 2.0**-33, 2.0**33)


@pytest.mark.parametrize("scale", SERVED + NOT_SERVED, ids=repr)
def test_bridge_refuses_what_mfakernel_refuses(engine, scale):
    """supports() and the driver's check_scale (the bridge's) agree on every scale; no
    default is substituted for 0."""
    call = encode.Call(dtype="fp32", q_len=9, kv_len=9, head_dim=64, scale=scale)
    reason = encode.refusal(call)
    assert (reason is None) == (scale in SERVED), reason
    if scale in SERVED:
        assert encode.encode(call, check_refusal=False).dispatches
    else:
        assert "scale" in reason and "2**-32 to 2**32" in reason
        with pytest.raises(encode.Refused, match="outside the scales MFA serves"):
            encode.encode(call, check_refusal=False)


def test_cli_refuses_scale_0_with_exit_2(engine):
    args = ["source", "--dtype", "fp32", "--q-len", "9", "--kv-len", "9", "--head-dim", "64", "--scale", "0"]
    result = subprocess.run([sys.executable, "-W", "ignore::UserWarning", str(CLI), *args], capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.startswith("mfa_engine: refused: scale 0.0 outside"), result.stderr


def test_cli_run_and_source_take_scale(engine, capsys, monkeypatch):
    """In this process (the CLI's main; a fresh one costs seconds): run at scale 4 on
    MATRIX[0]'s kernels, and source at 4 emits them."""
    import mfa_engine

    monkeypatch.setattr(mfa_engine.faulthandler, "enable", lambda: None)  # captured stderr has no fd

    args = ["--dtype", "fp32", "--q-len", "33", "--kv-len", "31", "--head-dim", "8", "--scale", "4", "--grad"]
    assert mfa_engine.main(["run", *args]) == 0
    line = json.loads(capsys.readouterr().out)
    assert line["ok"], line
    assert mfa_engine.main(["source", *args]) == 0
    assert "(0.875 / 5.770780)" in capsys.readouterr().out
