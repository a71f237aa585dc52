"""python -m metal_flash_sdpa: the status report, check and bench, run as a user runs them.

The subcommands run in fresh interpreters on the CPU; what needs a wrong kernel (check's
exit 1, its dispatch verification) runs in-process against the same functions.
"""

import json
import os
import re
import subprocess
import sys

import pytest
import torch

import metal_flash_sdpa
from conftest import REPO
from metal_flash_sdpa import ReferenceKernel, check, cli, kernels, rules
from metal_flash_sdpa.patterns import PATTERNS

NO_MFA = "mps" not in kernels.registered_kernels()
needs_no_mfa = pytest.mark.skipif(not NO_MFA, reason="asserts what happens on a machine without the MFA kernel")


def run_cli(*args, env=None, timeout=120):
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("MFA_") or k == "MFA_CACHE_DIR"}
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "metal_flash_sdpa", *args],
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=str(REPO.parent),
    )


# ----------------------------------------------------------------------------- status


@needs_no_mfa
def test_status_says_there_is_no_mfa_kernel_and_why():
    result = run_cli()
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert f"metal-flash-sdpa {metal_flash_sdpa.__version__}" in out
    assert f"torch {torch.__version__}" in out and "wrapt " in out and "Python " in out
    assert "MPS: built into torch: " in out
    assert f"MFA kernel: NOT AVAILABLE on this machine: {kernels.unavailable['mps']}" in out
    for name in ("MFA_ENABLE", "MFA_MIN_SEQ_LEN", "MFA_LOG"):
        assert re.search(rf"^  {name} +unset +-> ", out, re.M), name
    assert "Patch active: no (MFA_ENABLE=auto and no kernel on this machine)" in out
    assert "Registered kernels: none" in out
    # every sample call falls back, for the one reason, and the counters say so
    calls = len(PATTERNS) + 1
    assert out.count("PyTorch: no kernel registered for device type 'cpu'") == calls
    assert "get_dispatch_count() = 0" in out
    assert f"  {calls:3} x no kernel registered for device type 'cpu'" in out
    assert result.stderr == ""


def test_status_shows_raw_and_effective_settings():
    result = run_cli(env={"MFA_ENABLE": "1", "MFA_MIN_SEQ_LEN": "banana", "MFA_LOG": "0"})
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert re.search(r"^  MFA_ENABLE +'1' +-> on$", out, re.M)
    assert re.search(r"^  MFA_MIN_SEQ_LEN +'banana' +-> 256$", out, re.M)
    assert re.search(r"^  MFA_LOG +'0' +-> False$", out, re.M)
    assert "Patch active: yes" in out
    assert "MFA_MIN_SEQ_LEN='banana'" in result.stderr  # the one warning, at start-up


def test_status_sample_reaches_a_registered_kernel_and_restores_state(restore_state, capsys):
    """In-process, with the reference kernel serving cpu: the sample's long calls reach it,
    the decode step falls back for MIN_SEQ_LEN, and the patch is off again afterwards."""
    kernels.register_kernel("cpu", ReferenceKernel())
    metal_flash_sdpa.disable()
    metal_flash_sdpa.MIN_SEQ_LEN = 128
    assert cli.status() == 0
    out = capsys.readouterr().out
    assert "Registered kernels: cpu -> ReferenceKernel(block_size=256)" in out
    assert "Patch active: no" in out and "patch enabled for the sample" in out
    sample = out.split("Sample workload", 1)[1]
    assert sample.count(" kernel\n") == len(PATTERNS)
    assert f"decode step (query length 1)           PyTorch: {rules.SHORT}" in sample
    assert f"get_dispatch_count() = {len(PATTERNS)}" in sample
    assert f"    1 x {rules.SHORT}" in sample
    assert not metal_flash_sdpa.is_enabled()
    assert metal_flash_sdpa.MIN_SEQ_LEN == 128
    # the sample's variants were self-checked first, and the verdicts are listed
    verdicts = out.split("Self-check (MFA_SELFCHECK -> on): verdicts in ", 1)[1]
    assert "    passed  reference  float32  forward  D=" in verdicts and "FAILED" not in verdicts


# ----------------------------------------------------------------------------- check


def test_check_cpu_is_within_tolerance():
    result = run_cli("check", "--device", "cpu", "--dtypes", "fp32,bf16,fp16", "--seed", str(torch.seed() % 10000))
    assert result.returncode == 0, result.stdout + result.stderr
    lines = [line for line in result.stdout.splitlines() if line.startswith("  float") or line.startswith("  bfloat")]
    assert len(lines) == 3 * len(PATTERNS)
    for line in lines:
        match = re.search(r" ok +max abs (\S+) .* tolerance atol (\S+) rtol", line)
        assert match, line
        assert float(match.group(1)) <= 2 * float(match.group(2)) + 0.1, line  # a sane size, and a number
    assert f"{3 * len(PATTERNS)} within tolerance, 0 fall back to PyTorch, 0 missed" in result.stdout
    assert "ReferenceKernel (pure PyTorch), registered for cpu for this run" in result.stdout
    assert result.stderr == ""


@needs_no_mfa
def test_check_mps_without_a_kernel_says_why_and_exits_2():
    result = run_cli("check", "--device", "mps")
    assert result.returncode == 2
    assert kernels.unavailable["mps"] in result.stdout
    assert "nothing was checked" in result.stdout


def test_check_rejects_an_unknown_dtype():
    result = run_cli("check", "--dtypes", "fp8")
    assert result.returncode == 2
    assert "unknown dtype 'fp8'" in result.stderr


class OffByOneThousandth(ReferenceKernel):
    """Forward output off by 1e-3 everywhere: outside fp32's tolerance."""

    def forward(self, q, k, v, scale, causal, mask):
        out, lse = super().forward(q, k, v, scale, causal, mask)
        return out + 1e-3, lse


class WrongKeyGradient(ReferenceKernel):
    """Right forward, wrong dk: only a backward check catches it."""

    def backward(self, grad_out, q, k, v, out, lse, scale, causal, mask):
        dq, dk, dv = super().backward(grad_out, q, k, v, out, lse, scale, causal, mask)
        return dq, dk * 1.01, dv


def _report(kernel, capsys, dtypes=(torch.float32,)):
    code = check.report(kernel, "cpu", dtypes, seed=torch.seed() % 10000)
    return code, capsys.readouterr().out


def test_check_exits_1_on_a_wrong_forward(restore_state, capsys):
    code, out = _report(OffByOneThousandth(), capsys)
    assert code == 1
    assert out.count(" MISS ") == len(PATTERNS)
    assert out.count("out: max |ours - float64|") == len(PATTERNS)
    assert f"0 within tolerance, 0 fall back to PyTorch, {len(PATTERNS)} missed" in out


def test_check_exits_1_on_a_wrong_key_gradient(restore_state, capsys):
    code, out = _report(WrongKeyGradient(), capsys)
    assert code == 1
    assert out.count(" MISS ") == len(PATTERNS)
    assert out.count("dk: max |ours - float64|") == len(PATTERNS)
    assert "out:" not in out and "dq:" not in out and "dv:" not in out


def test_check_lists_what_the_kernel_refuses_as_falling_back(restore_state, capsys):
    class NoMasksNoCausalBackward(ReferenceKernel):
        mask_forward = False
        mask_backward = False
        causal_backward = None

    code, out = _report(NoMasksNoCausalBackward(), capsys)
    assert code == 0, out
    masked = [p.name for p in PATTERNS if "mask [" in p.name]
    causal = [p.name for p in PATTERNS if "causal" in p.name and "mask" not in p.name]
    for name in masked:
        assert re.search(rf"{re.escape(name)} +falls back: attn_mask not supported by reference$", out, re.M), name
    for name in causal:  # the forward is still checked, on its own
        assert re.search(rf"{re.escape(name)} +ok .*\[forward \(with grad falls back: is_causal", out, re.M), name
    checked = len(PATTERNS) - len(masked)
    assert f"{checked} within tolerance, {len(masked)} fall back to PyTorch, 0 missed" in out


def test_check_counts_a_call_that_did_not_reach_the_kernel_as_a_miss(restore_state, capsys, monkeypatch):
    """If explain() and the dispatcher disagreed, the dispatch counter catches it."""

    class NoFloat32(ReferenceKernel):
        dtypes = frozenset({torch.float16})

    monkeypatch.setattr(metal_flash_sdpa, "explain", lambda *args, **kwargs: None)
    code, out = _report(NoFloat32(), capsys)
    assert code == 1
    assert out.count("0 calls reached the kernel, not 1") == len(PATTERNS)
    assert "dtype float32 not supported by reference" in out  # the fallback it counted


def test_check_flags_a_fallback_that_is_not_the_kernels_refusal(restore_state, capsys, monkeypatch):
    monkeypatch.setattr(metal_flash_sdpa, "explain", lambda *args, **kwargs: "some rule of the dispatcher")
    code, out = _report(ReferenceKernel(), capsys)
    assert code == 1
    assert out.count("MISS: falls back for a reason not the kernel's: some rule of the dispatcher") == len(PATTERNS)


def test_check_restores_the_registry_the_patch_and_min_seq_len(restore_state, capsys):
    metal_flash_sdpa.disable()
    metal_flash_sdpa.MIN_SEQ_LEN = 77
    before = kernels.registered_kernels()
    _report(ReferenceKernel(), capsys)
    assert not metal_flash_sdpa.is_enabled()
    assert metal_flash_sdpa.MIN_SEQ_LEN == 77
    assert kernels.registered_kernels() == before


# ----------------------------------------------------------------------------- bench


def test_bench_cpu_json_is_a_labelled_smoke_run():
    result = run_cli("bench", "--device", "cpu", "--json", "--seq-lens", "16,32", "--dtypes", "fp32,bf16", "--iters", "1")
    assert result.returncode == 0, result.stdout + result.stderr
    data = json.loads(result.stdout)
    assert data["device"] == "cpu" and data["kernel"] == "reference"
    assert data["smoke_run_not_a_speed_claim"] is True
    rows = data["results"]
    # every length and dtype, plus one causal row per dtype
    assert [(r["dtype"], r["seq_len"], r["causal"]) for r in rows] == [
        ("float32", 16, False), ("float32", 32, False), ("bfloat16", 16, False), ("bfloat16", 32, False),
        ("float32", 32, True), ("bfloat16", 32, True),
    ]
    for row in rows:
        for part in ("forward", "forward_backward"):
            result_part = row[part]
            assert result_part["kernel_falls_back"] is None
            assert result_part["kernel"]["ms"] > 0 and result_part["pytorch"]["ms"] > 0
            assert result_part["kernel"]["peak_bytes"] is None  # no fake number on cpu
            assert result_part["speedup"] == pytest.approx(result_part["pytorch"]["ms"] / result_part["kernel"]["ms"])
    assert "bench [6/6]" in result.stderr  # progress goes to stderr, not into the JSON


def test_bench_cpu_table_says_it_is_not_a_speed_claim():
    result = run_cli("bench", "--device", "cpu", "--seq-lens", "16", "--iters", "1")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SMOKE RUN" in result.stdout and "NOT a speed claim" in result.stdout
    assert re.search(r"^float32 +16 no +\|", result.stdout, re.M)
    assert re.search(r"^float32 +16 yes +\|", result.stdout, re.M)


@needs_no_mfa
def test_bench_without_a_kernel_says_so_and_exits_0():
    result = run_cli("bench")
    assert result.returncode == 0
    assert f"no kernel for mps on this machine ({kernels.unavailable['mps']})" in result.stdout
    result = run_cli("bench", "--json")
    assert json.loads(result.stdout) == dict(device="mps", kernel=None, reason=kernels.unavailable["mps"], results=[])


def test_bench_does_not_time_a_fallback_as_the_kernel(restore_state):
    from metal_flash_sdpa import bench

    class NoCausal(ReferenceKernel):
        causal_forward = None
        causal_backward = None

    with check.serving("cpu", NoCausal()):
        row = bench.bench_case(torch.device("cpu"), torch.float32, 16, True, (1, 2, 16), iters=1)
    for part in ("forward", "forward_backward"):
        assert row[part]["kernel_falls_back"].startswith("is_causal not supported by reference")
        assert "kernel" not in row[part] and row[part]["speedup"] is None
        assert row[part]["pytorch"]["ms"] > 0
    assert "falls back" in bench.format_table([row])
