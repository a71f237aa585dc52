"""Rung 4 (DESIGN section 10): the MFA kernels as the bridge encodes them, executed on the CPU.

`python tools/mfa_engine.py run` encodes a call through ccv's own encode path (tools/engine),
replays every dispatch (attention kernels, casts, scratch) on guarded host memory through
the executing Metal shim and compares out, LSE, dQ, dK, dV with PyTorch's math SDPA in
float64, within MFAKernel.tolerances. The shim reports a fault on a guard page as an error;
mutants, which may fault anywhere, run in a process of their own.

The matrix is a covering design: each row of ccv's parameter tables (block sizes by head
dim, per GPU family: v2/AttentionDescriptor.cpp) of each kernel runs at least once; each
GPU family and dtype in both macOS modes (async copies, or none); each schedule; lengths
that leave a remainder of 1 and of a block minus 1; batch and heads > 1; tensors at nonzero
offsets. Without async copies every kernel's tile copies are as even as 8-byte accesses
allow and mostly vectors (patch 0014, tests/test_engine_copies.py). MFA_ENGINE_FULL=1 adds
every row in both dtypes and modes, and long sequences.
Mutation tests show that the executor catches what it claims to catch.

Run as a script (`python test_engine_execute.py SPEC-JSON`) this file is the child process
of the mutation tests.
"""

import concurrent.futures
import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO
from engine_setup import call_id, compile_all, copies_even, engine_call, engine_required, kernels_of  # puts tools/ on sys.path

from engine import build, encode, execute  # noqa: E402  (after engine_setup)

FULL = os.environ.get("MFA_ENGINE_FULL") == "1"
CLI = REPO / "tools" / "mfa_engine.py"
RR, RA, RB = "round_robin", "run_ahead", "run_behind"
KERNELS = ("attention_forward", "attention_backward_query", "attention_backward_key_value")


@dataclasses.dataclass(frozen=True)
class Case:
    gpu: str
    dtype: str
    head_dim: int
    q_len: int
    kv_len: int
    batch: int = 1
    heads: int = 1
    schedule: str = RR
    offset: int = 0
    macos: int = 26  # 26: no async copies (our patch 0004); 15: ccv's async copies
    grad: bool = True

    def call(self) -> encode.Call:
        return engine_call(self)

    def flags(self) -> list:
        """The `python tools/mfa_engine.py run` flags of this case."""
        return self.call().driver_args() + ["--schedule", self.schedule, "--offset", str(self.offset)]

    def __str__(self):
        return f"{call_id(self.call())}-{self.schedule}" + (f"-at{self.offset}" if self.offset else "")


# The largest head dim of each row of each family's tables (forward, backward-query and
# backward-key-value rows merged): every code path the generator chooses between.
ROW_DIMS = {"apple9": (8, 16, 32, 48, 64, 128, 160, 192, 384, 512), "apple7": (16, 24, 32, 56, 384, 512)}

# Per case: the table rows it reaches (forward / backward-query / backward-key-value, by the
# largest head dim of the row) and the remainders its lengths leave. Apple9's blocks are 16
# rows wide in parallel and 32 to 128 traversed; Apple7's 32 and 32 to 80.
MATRIX = [
    Case("apple9", "fp32", 8, 33, 31, heads=2),  # 8/16/16; R rem 1, C below one block
    Case("apple9", "fp16", 16, 31, 63, batch=2, schedule=RA, offset=256, macos=15),  # 16/16/16; rems 15, 63
    Case("apple9", "fp32", 24, 17, 33, heads=3, schedule=RA, macos=15),  # 48/32/32; head rem 8 (dQ)
    Case("apple9", "fp16", 48, 97, 130, batch=2, heads=2),  # 48/192/64
    Case("apple9", "fp32", 72, 97, 130, batch=2, heads=3, offset=4096 + 16, macos=15),  # 192/192/128; head rem 8
    Case("apple9", "fp32", 72, 97, 130, batch=2, heads=3, schedule=RA, macos=15),  # the same under run_ahead
    Case("apple9", "fp16", 72, 97, 130, batch=2, heads=3, schedule=RA),
    Case("apple9", "fp16", 152, 47, 127, schedule=RB, macos=15),  # 192/192/160; rems 15, 63
    Case("apple9", "fp32", 384, 17, 129),  # the last rows; C rem 1 of 128
    Case("apple9", "fp32", 64, 1, 1, grad=False),  # one query, one key, the forward alone
    Case("apple7", "fp16", 16, 63, 31, batch=2, heads=2, macos=15),  # 24/16/16; R rem 31
    Case("apple7", "fp32", 24, 33, 65, schedule=RA, offset=256),  # 24/32/24
    Case("apple7", "fp16", 32, 97, 130, heads=2, schedule=RB),  # 32/32/56
    Case("apple7", "fp32", 40, 63, 159, batch=2, macos=15),  # 56/56/56; C rem 79 of 80, head rems
    Case("apple7", "fp16", 72, 97, 130, batch=2, heads=3),  # the last rows; head rem 8
]
if FULL:
    MATRIX += [
        Case(gpu, dtype, head_dim, q_len, kv_len, batch=2, heads=2, schedule=schedule, offset=offset, macos=macos)
        for gpu, dims in ROW_DIMS.items()
        for head_dim in dims
        for dtype in ("fp32", "fp16")
        for macos, schedule, (q_len, kv_len), offset in ((26, RR, (97, 130), 0), (15, RA, (47, 159), 256))
    ]
    MATRIX += [Case(gpu, dtype, 64, 1024, 1024) for gpu in ("apple9", "apple7") for dtype in ("fp32", "fp16")]


@pytest.fixture(scope="module")
def metal():
    """The executing shim, with the matrix's kernels compiled on every core first; skips
    with one line when the engine cannot be built here, unless MFA_ENGINE_REQUIRED=1."""
    with engine_required():
        build.build()
        from engine import metal
    wanted = dict.fromkeys(kernel for case in MATRIX for kernel in kernels_of(case.call()))
    wanted.update(dict.fromkeys(mutant_kernels()))  # the children find them compiled

    compile_all(metal, wanted)
    return metal


def run_cli(*flags):
    """`mfa_engine.py run FLAGS` in a fresh process: (exit code, the JSON line, stderr)."""
    return _json_process([sys.executable, str(CLI), "run", *flags])


def run_child(spec: dict):
    """This file as a script on ``spec`` (see child()): (exit code, its JSON, stderr)."""
    return _json_process([sys.executable, __file__, json.dumps(spec)])


def _json_process(command):
    result = subprocess.run(command, capture_output=True, text=True, timeout=900, cwd=str(REPO.parent))
    lines = result.stdout.strip().splitlines()
    return result.returncode, json.loads(lines[-1]) if lines else None, result.stderr


# -- the matrix ------------------------------------------------------------------------------


@pytest.mark.parametrize("case", MATRIX, ids=str)
def test_kernels_match_float64_pytorch(metal, case):
    # In this process: the shim reports a fault on a guard page as MetalExecutionError.
    result = execute.run(case.call(), seed=1, offset=case.offset, schedule=case.schedule)
    assert result["ok"], result
    # The tolerances were set at 4x the worst error measured: if these calls use more than
    # half of them, the kernels got less accurate and MFAKernel.tolerances needs measuring again.
    assert max(result["used"].values()) <= 0.5, result
    assert set(result["max_abs"]) == ({"out", "lse", "dq", "dk", "dv"} if case.grad else {"out", "lse"})
    expected = set(KERNELS if case.grad else KERNELS[:1])
    if case.dtype == "fp16":  # upcast: fp32 results in scratch, cast into the half outputs
        expected.add("cast_float_to_half")
    assert set(result["mma"]) == expected
    assert all(result["mma"][name] > 0 for name in KERNELS if name in expected)
    # Patch 0014: without async copies every thread copies an even share, by 8- and 16-byte
    # vectors (D is a multiple of 8). Async copies are the copy engine's; casts copy no tiles.
    for name, copies in result["copies"].items():
        if case.macos >= 26 and name in KERNELS:
            assert copies_even(copies) and copies["vector_share"] >= 0.9, (name, copies)
        else:
            assert copies is None, (name, copies)


def test_cli_prints_one_json_line_and_the_forward_mma_count(metal):
    # Apple9 forward, D=72: threadgroups of 16 query rows, two SIMD groups of 8 (the last
    # threadgroup's too, past R). Each SIMD group multiplies S = Q K^T and O += P V over
    # ceil(C/8) key tiles x ceil(D/8) head tiles; the padding of a partial key block or head
    # block costs nothing. This is the work measure tile skipping is judged by.
    case = Case("apple9", "fp32", 72, 97, 130, batch=2, heads=3, grad=False)
    code, result, stderr = run_cli(*case.flags(), "--seed", "3")
    assert code == 0 and result["ok"], f"exit {code}: {result}\n{stderr[-3000:]}"
    assert set(result) == {"ok", "max_abs", "max_rel", "used", "tolerance", "mma", "mask_tile_reads", "copies", "float_exceptions", "seconds"}
    assert result["mask_tile_reads"] == 0
    assert set(result["tolerance"]) == {"out", "lse"} and result["seconds"] > 0
    simd_groups = case.batch * case.heads * -(-case.q_len // 16) * 2
    tiles = -(-case.kv_len // 8) * -(-case.head_dim // 8)
    assert result["mma"]["attention_forward"] == simd_groups * 2 * tiles


def test_schedules_give_the_same_bits(metal):
    # A kernel without races computes the same values whatever order its threads run in.
    call = Case("apple7", "fp16", 40, 63, 159, batch=2, macos=15).call()
    record, inputs = encode.encode(call), execute.random_inputs(call, 0)
    runs = [execute.execute(record, inputs, schedule=schedule).outputs for schedule in (RR, RA, RB)]
    for name, first in runs[0].items():
        assert all(torch.equal(run[name].view(torch.uint8), first.view(torch.uint8)) for run in runs[1:]), name


def test_refused_call_exits_2_with_the_reason_on_one_line():
    code, result, stderr = run_cli("--dtype", "fp32", "--q-len", "8", "--kv-len", "8", "--head-dim", "12")
    assert code == 2 and result is None
    assert stderr.strip().count("\n") == 0 and "head dim 12" in stderr


# -- mutations: each must fail (outside tolerance, or a fault the executor reports) ------------

MUTANT = Case("apple9", "fp32", 72, 97, 130, batch=2, heads=3, macos=15)
MUTATIONS = {
    # The forward's masking of the keys past C in the last, partial block (C % 64 = 2).
    "flipped_edge_mask": ("attention_forward", "morton_offset.x + index >= (C % 64)", "morton_offset.x + index < (C % 64)"),
    # The forward's guard on storing LSE for rows past R (R % 16 = 1): off by one.
    "off_by_one_row_guard": ("attention_forward", "morton_offset.y < R) {", "morton_offset.y <= R) {"),
    # The row maximum of the online softmax, reduced with the lane in the next row.
    "wrong_shuffle_mask_forward": ("attention_forward", "simd_shuffle_xor(m_new, 1)", "simd_shuffle_xor(m_new, 2)"),
    # The backward's D term (rowsum(dO * O)), reduced across the wrong quadrant.
    "wrong_shuffle_mask_backward": ("attention_backward_query", "simd_shuffle_xor(D_sram, 8)", "simd_shuffle_xor(D_sram, 4)"),
    # ccv's lane -> element layout (morton_order) with a quadrant's column pairs swapped: the
    # source's loads and stores agree with each other and not with the shim's 8x8
    # multiply-accumulate, as a shim with a wrong layout would disagree with ccv's code.
    # (The shim has no switch for its own layout; tests/test_engine_metal.py does the same.)
    "wrong_lane_layout": ("attention_forward", "ushort N_in_quadrant = (lane_id % 2) * 2;", "ushort N_in_quadrant = (1 - lane_id % 2) * 2;"),
}
BARRIER = "threadgroup_barrier(mem_flags::mem_threadgroup);"
# A barrier each copy mode needs, removed. Round-robin hides both races. With async copies
# SIMD group 0 copies a whole tile: running ahead, it overwrites the block another SIMD
# group has not read yet (the kernel's first barrier, before a copy). Without (patch 0014)
# each thread copies its part: running ahead, a SIMD group reads the rows of K the others
# have not copied yet (the barrier after K's copy).
REMOVED_BARRIERS = {15: (BARRIER, ""), 26: ("K_block_offset, true);\n      " + BARRIER, "K_block_offset, true);\n")}


def mutants():
    """name -> (case, kernel, old, new, schedule) of every mutant below."""
    out = {name: (MUTANT, *mutation, RR) for name, mutation in MUTATIONS.items()}
    for macos, (old, new) in REMOVED_BARRIERS.items():
        out[f"removed_barrier_{macos}"] = (dataclasses.replace(MUTANT, macos=macos), "attention_forward", old, new, RA)
    return out


@pytest.fixture(scope="module")
def mutant_runs(metal):
    """Every mutant's child process, on every core at once: name -> run_mutant's result."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        futures = {name: pool.submit(run_mutant, *spec) for name, spec in mutants().items()}
        return {name: future.result() for name, future in futures.items()}


@pytest.mark.parametrize("name", MUTATIONS)
def test_mutant_fails(mutant_runs, name):
    assert_failed(*mutant_runs[name])


@pytest.mark.parametrize("macos", (15, 26))
def test_removed_barrier_fails_under_run_ahead(mutant_runs, macos):
    assert_failed(*mutant_runs[f"removed_barrier_{macos}"])


def mutant_kernels():
    """(source, function) of every mutant above, as its child process will compile it."""
    for macos, mutations in ((15, list(MUTATIONS.values())), (26, [])):
        mutations.append(("attention_forward", *REMOVED_BARRIERS[macos]))
        sources = {k.name: k.source for k in encode.encode(dataclasses.replace(MUTANT, macos=macos).call()).kernels()}
        for kernel, old, new in mutations:
            yield sources[kernel].replace(old, new, 1), "attention"


def run_mutant(case, kernel, old, new, schedule=RR):
    """The mutant's child process: (whether the mutation is in the source, exit code, its
    JSON, stderr)."""
    source = next(k.source for k in encode.encode(case.call()).kernels() if k.name == kernel)
    if old not in source:
        return False, None, None, ""
    spec = {"call": dataclasses.asdict(case.call()), "schedule": schedule, "mutation": [kernel, old, new]}
    return (True, *run_child(spec))


def assert_failed(applies, code, result, stderr):
    assert applies, "the mutated text is not in the kernel: the mutation would test nothing"
    if code < 0:  # killed by a fault the shim did not catch: failed, loudly
        return
    assert result is not None, f"the mutant did not run (exit {code}):\n{stderr[-3000:]}"
    assert not result["ok"], f"the mutant passed: {result}"


# -- every construct the generator emits -----------------------------------------------------

def test_every_emitted_construct_is_implemented_by_the_shim(metal):
    # Each table row (which operands are cached, block shapes), dtype, family and macOS mode;
    # the 512 rows (patch 0016) have the 384 rows' blocks and caches, so their constructs.
    sources = {}
    for gpu, dims in ROW_DIMS.items():
        for head_dim in (d for d in dims if d != 512):
            for dtype in ("fp32", "fp16"):
                for macos in (15, 26):
                    call = encode.Call(dtype=dtype, q_len=33, kv_len=31, head_dim=head_dim, grad=True, gpu=gpu, macos=macos)
                    for kernel in encode.encode(call).kernels():
                        sources.setdefault(kernel.source, f"{kernel.name} {gpu} {dtype} D={head_dim} macOS {macos}")
    with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        found = dict(zip(sources.values(), pool.map(metal.unsupported_constructs, sources)))
    missing = {where: constructs for where, constructs in found.items() if constructs}
    assert not missing, f"{len(missing)} of {len(sources)} sources use what the shim lacks: {missing}"


# -- the child process -----------------------------------------------------------------------


def child(spec: dict) -> dict:
    """{"call", "schedule", "mutation": [kernel, old, new]}: run the call with the kernel's
    source so edited, as execute.run() reports it, or {"ok": false, "error"} when the executor
    caught a fault."""
    from engine import metal

    call = encode.Call(**spec["call"])
    kernel, old, new = spec["mutation"]

    def edit(name, source):
        if name != kernel:
            return source
        if old not in source:
            raise LookupError(f"{old!r} is not in {kernel}")  # not a caught fault: no JSON
        return source.replace(old, new, 1)

    try:
        return execute.run(call, schedule=spec["schedule"], edit=edit)
    except (execute.ReplayError, metal.MetalBindingError, metal.MetalExecutionError) as fault:
        return {"ok": False, "error": f"{type(fault).__name__}: {fault}"}


if __name__ == "__main__":
    print(json.dumps(child(json.loads(sys.argv[1]))))
