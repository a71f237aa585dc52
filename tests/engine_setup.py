"""The MFA engine (tools/engine), for the tests that build or run it."""

import concurrent.futures
import contextlib
import dataclasses
import os
import sys

import pytest

from conftest import REPO

sys.path.insert(0, str(REPO / "tools"))

from engine import build, encode, execute  # noqa: E402
from metal_flash_sdpa import check  # noqa: E402

_CALL_FIELDS = {field.name for field in dataclasses.fields(encode.Call)}


@contextlib.contextmanager
def engine_required(what="the MFA engine"):
    """Skips the test with one line when the engine cannot be built here (no clang, no ccv
    sources, another machine); with MFA_ENGINE_REQUIRED=1 (CI) that fails instead."""
    try:
        yield
    except build.Unavailable as missing:
        if os.environ.get("MFA_ENGINE_REQUIRED") == "1":
            pytest.fail(f"MFA_ENGINE_REQUIRED=1 but {what} cannot be built here: {missing}")
        pytest.skip(f"{what} cannot be built here: {missing}")


def engine_call(case, **fixed) -> encode.Call:
    """The encode.Call of a test matrix case: its fields that name Call fields, plus ``fixed``."""
    fields = {f.name: getattr(case, f.name) for f in dataclasses.fields(case) if f.name in _CALL_FIELDS}
    return encode.Call(**{**fields, **fixed})


@dataclasses.dataclass(frozen=True)
class Case:
    """A case of an engine test matrix: where the kernels run, the lengths, the heads; a test
    file adds the fields of its feature (they must name encode.Call fields too)."""

    gpu: str
    dtype: str
    q_len: int
    kv_len: int
    heads: int = 2
    kv_heads: int = 2
    head_dim: int = 64
    batch: int = 2
    macos: int = 26

    def call(self, **fixed) -> encode.Call:
        """The call with grad, and ``fixed``."""
        return engine_call(self, **{"grad": True, **fixed})

    def __str__(self):
        return call_id(self.call())


def call_id(call: encode.Call) -> str:
    """A test id naming everything that selects a kernel and its edges."""
    text = f"{call.gpu}-{call.dtype}-d{call.head_dim}-h{call.heads}k{call.hk}-r{call.q_len}-c{call.kv_len}"
    text += f"-b{call.batch}-macos{call.macos}" + ("-causal" if call.causal else "")
    text += "" if call.mask == "none" else f"-{call.mask}-{call.mask_pattern or call.mask_shape}"
    return text + ("" if call.grad else "-forward")


def mutated(edits, seen: set):
    """``execute``'s ``edit`` for a wrong variant: each of ``edits`` (kernel names, old text,
    new text) replaces old with new in those kernels' sources, which must hold it; the
    kernels edited are added to ``seen``."""

    def edit(kernel, source):
        for kernels, old, new in edits:
            if kernel in kernels:
                assert old in source, f"{old!r} is not in {kernel}: the mutation would test nothing"
                seen.add(kernel)
                source = source.replace(old, new)
        return source

    return edit


def copies_even(copies: dict) -> bool:
    """A kernel's copies (patch 0014; `run`'s "copies") as even as 8-byte accesses allow:
    within 0.05 of balance_floor, hence within 1.5 of an even split wherever a tile has 8
    bytes for each thread."""
    return copies["balance"] <= copies["balance_floor"] + 0.05


def kernels_of(call: encode.Call):
    """(source, function) of every dispatch ``call`` encodes."""
    record = encode.encode(call)
    for dispatch in record.dispatches:
        pipeline = record.raw["pipelines"][dispatch["pipeline"]]
        yield record.raw["libraries"][pipeline["library"]]["source"], pipeline["function"]


def compile_all(metal, kernels) -> None:
    """Compile (source, function) pairs on every core, so that tests find them compiled; a
    source that does not compile fails its own test, not this."""

    def compile_quietly(kernel):
        try:
            metal.load_kernel(*kernel)
        except metal.MetalSyntaxError:
            pass

    with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        list(pool.map(compile_quietly, kernels))


def precompile(calls) -> None:
    """The engine built and the kernels of ``calls`` compiled on every core, for a test
    module's matrix (its tests then find them compiled); skips or fails as engine_required."""
    with engine_required():
        build.build()
        from engine import metal

        compile_all(metal, dict.fromkeys(kernel for call in calls for kernel in kernels_of(call)))


def misses(call: encode.Call, inputs: dict, edit=None, against_pytorch: bool = False) -> dict:
    """``misses_of`` the execution of ``call`` on ``inputs`` (its kernels' sources edited by
    ``edit``), MFAKernel.supports() not asked."""
    execution, _ = execute.execute_call(call, inputs, edit=edit, check_refusal=False)
    return misses_of(execution, call, inputs, against_pytorch)


def misses_of(execution, call: encode.Call, inputs: dict, against_pytorch: bool = False) -> dict:
    """Output name -> what is wrong, for every output of ``execution`` outside
    MFAKernel.tolerances of float64 PyTorch (the LSE, the kernel's own statistic: outside
    execute.LSE_TOLERANCE of masks.kernel_lse). ``against_pytorch``: an output beyond the
    tolerance still passes when no further from float64 than twice PyTorch's own SDPA in the
    call's dtype (check.compare, the rule of `python -m metal_flash_sdpa check`); only for
    inputs where PyTorch's own result is sound (its float32 backward is not, in rows masked
    whole with finfo(float32).min: its LSE rounds log(l) away)."""
    gold = execute.reference(call, inputs)
    comparison = execute.compare(execution, gold, execute.tolerances(call))
    theirs = execute.pytorch_result(call, inputs) if against_pytorch else {}
    found = {}
    for name, share in comparison.used.items():
        if share <= 1:
            continue
        found[name] = f"{share:.3g} of the tolerance"
        if name in theirs:
            atol, rtol = comparison.tolerance[name]
            miss = check.compare(execution.outputs[name].double(), theirs[name].double(), gold[name], atol, rtol)
            if miss is None:
                del found[name]
    return found
