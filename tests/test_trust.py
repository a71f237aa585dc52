"""The first-use self-check (DESIGN section 11, metal_flash_sdpa.trust): a kernel variant is
run on a canary problem against PyTorch's math SDPA before it answers a user's call; a
failed variant goes to PyTorch for good; verdicts persist under MFA_CACHE_DIR.

The kernels here are reference kernels that are wrong in one variant only. Users' calls have
batch 2 and the canaries batch 1, so each kernel tells the runs apart.
"""

import importlib.util
import json
import re
import shutil
import threading
import time
import warnings

import pytest
import torch
import torch.nn.functional as F

import metal_flash_sdpa
from conftest import REPO, pytorch_sdpa, run_python
from helpers import fallbacks
from metal_flash_sdpa import ReferenceKernel, kernels, trust

ATOL, RTOL = 3e-2, 2e-2  # bfloat16's tolerance of the reference kernel, enough for all here
SELF_CHECK = "failed its self-check"


class Recording(ReferenceKernel):
    """The reference kernel, noting each run as (stage, "user" or "canary", dtype, head dim)."""

    name = "recording"

    def __init__(self):
        super().__init__(block_size=32)
        self.runs = []

    def _note(self, stage, q):
        self.runs.append((stage, "user" if q.shape[0] == 2 else "canary", q.dtype, q.shape[-1]))

    def forward(self, q, k, v, scale, causal, mask):
        self._note("forward", q)
        return super().forward(q, k, v, scale, causal, mask)

    def backward(self, grad_out, q, k, v, out, lse, scale, causal, mask):
        self._note("backward", q)
        return super().backward(grad_out, q, k, v, out, lse, scale, causal, mask)

    def count(self, stage, who):
        return sum(run[:2] == (stage, who) for run in self.runs)


class Wrong(Recording):
    """Wrong outputs in bfloat16 causal forwards, wrong dK at head dim 32: right elsewhere."""

    name = "wrong"

    def forward(self, q, k, v, scale, causal, mask):
        out, lse = super().forward(q, k, v, scale, causal, mask)
        return (out + 0.25 if q.dtype == torch.bfloat16 and causal else out), lse

    def backward(self, grad_out, q, k, v, out, lse, scale, causal, mask):
        dq, dk, dv = super().backward(grad_out, q, k, v, out, lse, scale, causal, mask)
        return dq, (dk * 1.5 if q.shape[-1] == 32 else dk), dv


@pytest.fixture
def fresh(reference_cpu, monkeypatch, tmp_path):
    """A verdict file of this test's own (tmp_path), nothing remembered, MFA_SELFCHECK=1;
    serve(kernel) registers a kernel for cpu (patch on, every length dispatching)."""
    monkeypatch.setenv("MFA_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(trust, "store", trust.Store())
    monkeypatch.setattr(trust, "mode", "on")
    new_process()

    def serve(kernel):
        kernels.register_kernel("cpu", kernel)
        return kernel

    return serve


def new_process():
    """What a new process remembers: nothing but the file."""
    trust.forget()


@pytest.fixture
def warned():
    """warned(): the package's warnings so far, each as often as it was emitted."""
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        yield lambda: [str(w.message) for w in record if str(w.message).startswith("metal_flash_sdpa:")]


def qkv(dtype=torch.float32, head_dim=16, grad=False):
    return [torch.randn(2, 2, 40, head_dim, dtype=dtype).requires_grad_(grad) for _ in range(3)]


def stored(tmp_path):
    """-> [(variant, record)] of the verdict file."""
    data = json.loads((tmp_path / trust.STORE_NAME).read_text())
    return [(json.loads(key)["variant"], record) for key, record in data["verdicts"].items()]


def test_a_wrong_variant_never_answers_the_others_do(fresh, warned):
    kernel = fresh(Wrong())
    for _ in range(2):
        for dtype in (torch.float32, torch.bfloat16):
            for causal in (False, True):
                q, k, v = qkv(dtype)
                before = kernel.count("forward", "user")
                out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
                torch.testing.assert_close(out, pytorch_sdpa(q, k, v, is_causal=causal), atol=ATOL, rtol=RTOL)
                wrong = dtype == torch.bfloat16 and causal
                assert kernel.count("forward", "user") - before == (0 if wrong else 1), (dtype, causal)
    assert kernel.count("forward", "canary") == 4  # one check per variant, the wrong one's too
    assert metal_flash_sdpa.get_dispatch_count() == 6
    reason = f"kernel wrong {SELF_CHECK} for this variant"
    assert fallbacks() == {reason: 2}
    assert metal_flash_sdpa.explain(q, k, v, is_causal=True) == reason
    (message,) = warned()
    assert message.startswith(f"metal_flash_sdpa: kernel wrong {SELF_CHECK} in forward (device=cpu dtype=bfloat16 ")
    assert re.search(r"causal=True mask=none\): max error 0\.2\d* in out; out: max \|ours - float64\| 0\.2", message)
    assert message.endswith("PyTorch's SDPA serves this variant from now on") and "\n" not in message


def test_a_wrong_backward_sends_that_variant_with_grad_to_pytorch(fresh, warned):
    kernel = fresh(Wrong())
    for head_dim in (16, 32):
        q, k, v = qkv(head_dim=head_dim, grad=True)
        grad_out = torch.randn(2, 2, 40, head_dim)
        for _ in range(2):
            out = F.scaled_dot_product_attention(q, k, v)
            got = [out, *torch.autograd.grad(out, (q, k, v), grad_out)]
            expected = pytorch_sdpa(q, k, v)
            expected = [expected, *torch.autograd.grad(expected, (q, k, v), grad_out)]
            for a, b in zip(got, expected):
                torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
        with torch.no_grad():  # the forward passed its own check: it still serves calls without grad
            F.scaled_dot_product_attention(q, k, v)
    user = [run[::3] for run in kernel.runs if run[1] == "user"]
    # head dim 16: both calls; 32: the first call's forward (checked and right), its gradients
    # by PyTorch; the second call whole by PyTorch
    assert user == [("forward", 16), ("backward", 16)] * 2 + [("forward", 16), ("forward", 32), ("forward", 32)]
    (message,) = warned()
    assert f"{SELF_CHECK} in backward (device=cpu dtype=float32 head_dim=32 " in message
    assert "max error" in message and "in dk; dk: max |ours - float64|" in message
    assert message.endswith("serves this variant with grad from now on")
    assert fallbacks() == {f"kernel wrong {SELF_CHECK} for this variant": 1}


class DropsOtherwise(ReferenceKernel):
    """Drops other elements than metal_flash_sdpa.dropout decides (another seed): right
    without dropout, wrong with it."""

    name = "drops-otherwise"
    supports_dropout = True

    def __init__(self):
        super().__init__(block_size=32)
        self.canaries = []  # the dropout argument of each canary forward

    def forward(self, q, k, v, scale, causal, mask, dropout=None):
        if q.shape[0] == 1:
            self.canaries.append(dropout)
        return super().forward(q, k, v, scale, causal, mask, dropout=dropout and (dropout[0], dropout[1] + 1))


def test_a_dropout_variant_is_checked_with_dropout(fresh, warned):
    # Dropout kernels are other kernels (ccv patch 0015): their variant's canary drops, and
    # PyTorch's math takes the same decisions; a kernel that drops otherwise fails it alone.
    kernel = fresh(DropsOtherwise())
    q, k, v = qkv()
    with torch.no_grad():
        F.scaled_dot_product_attention(q, k, v)
        assert metal_flash_sdpa.get_dispatch_count() == 1 and fallbacks() == {}
        F.scaled_dot_product_attention(q, k, v, dropout_p=0.5)
    assert kernel.canaries == [None, (trust.CANARY_DROPOUT, trust.SEED)]
    assert metal_flash_sdpa.get_dispatch_count() == 1
    assert fallbacks() == {f"kernel drops-otherwise {SELF_CHECK} for this variant": 1}
    (message,) = warned()
    assert "mask=none dropout)" in message


class MaskGradOff(ReferenceKernel):
    """Returns the mask's gradient doubled: right in every variant but a learned mask's."""

    name = "mask-grad-off"
    supports_mask_grad = True

    def __init__(self):
        super().__init__(block_size=32)
        self.canaries = []  # the mask_grad argument of each canary backward

    def backward(self, grad_out, q, k, v, out, lse, scale, causal, mask, dropout=None, mask_grad=False):
        if q.shape[0] == 1:
            self.canaries.append(mask_grad)
        grads = super().backward(grad_out, q, k, v, out, lse, scale, causal, mask, dropout=dropout, mask_grad=mask_grad)
        return (*grads[:3], grads[3] * 2) if mask_grad else grads


def test_a_mask_gradient_variant_is_checked_with_its_gradient(fresh, warned):
    # A backward returning the mask's gradient runs other kernels (ccv patch 0017): its
    # canary asks for the gradient and judges it with dq, dk, dv; a wrong one fails alone.
    kernel = fresh(MaskGradOff())
    q, k, v = qkv(grad=True)
    bias = torch.randn(1, 2, 40, 40)
    F.scaled_dot_product_attention(q, k, v, attn_mask=bias).sum().backward()
    assert metal_flash_sdpa.get_dispatch_count() == 1 and fallbacks() == {}
    learned = bias.clone().requires_grad_()
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=learned)
    out.sum().backward()
    assert kernel.canaries == [False, True]
    assert fallbacks() == {}  # the forward passed; the backward went to PyTorch's gradients
    expected = torch.autograd.grad(pytorch_sdpa(q, k, v, attn_mask=learned).sum(), learned)[0]
    torch.testing.assert_close(learned.grad, expected)  # PyTorch's, not the doubled one
    (message,) = warned()
    assert "mask=per-head, grad)" in message


def test_verdicts_persist_and_key_the_machine(fresh, tmp_path, monkeypatch):
    class Machine(Recording):
        build = "23A344"

        def machine(self, device):
            return {"device": device.type, "os_build": self.build}

    kernel = fresh(Machine())
    q, k, v = qkv()
    F.scaled_dot_product_attention(q, k, v)
    assert kernel.count("forward", "canary") == 1
    ((variant, record),) = stored(tmp_path)
    assert variant["kernel"] == "recording" and variant["stage"] == "forward" and variant["mask"] == "none"
    assert variant["scale"] == 0.25 and record["passed"] and record["max_error"] < 1e-6

    new_process()  # the same machine: the file's verdict is used
    F.scaled_dot_product_attention(q, k, v)
    assert kernel.count("forward", "canary") == 1 and kernel.count("forward", "user") == 2

    new_process()  # an OS update: checked again
    Machine.build = "24A335"
    F.scaled_dot_product_attention(q, k, v)
    assert kernel.count("forward", "canary") == 2 and len(stored(tmp_path)) == 2

    new_process()  # MFA_SELFCHECK=always: checked in every process, the file notwithstanding
    monkeypatch.setattr(trust, "mode", "always")
    F.scaled_dot_product_attention(q, k, v)
    assert kernel.count("forward", "canary") == 3

    F.scaled_dot_product_attention(q, k, v, scale=0.5)  # another scale is another variant
    assert kernel.count("forward", "canary") == 4 and len(stored(tmp_path)) == 3


def test_selfcheck_off_trusts_without_checking(fresh, tmp_path, monkeypatch):
    monkeypatch.setattr(trust, "mode", "off")
    kernel = fresh(Wrong())
    q, k, v = qkv(torch.bfloat16)
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert kernel.count("forward", "canary") == 0 and metal_flash_sdpa.get_dispatch_count() == 1
    assert (out - pytorch_sdpa(q, k, v, is_causal=True)).abs().max() > 0.2  # the wrong kernel answered
    assert not (tmp_path / trust.STORE_NAME).exists()


def test_a_second_process_reads_the_verdicts(tmp_path):
    code = """
import torch, torch.nn.functional as F, metal_flash_sdpa
from metal_flash_sdpa import ReferenceKernel, kernels

torch.set_num_threads(1)  # tiny matrices; two threads on a busy machine wait on each other

class Counting(ReferenceKernel):
    runs = 0
    def forward(self, *args):
        Counting.runs += 1
        return super().forward(*args)
    def backward(self, *args):
        Counting.runs += 1
        return super().backward(*args)

kernels.register_kernel("cpu", Counting(32))
metal_flash_sdpa.enable()
metal_flash_sdpa.MIN_SEQ_LEN = 0
q, k, v = (torch.randn(1, 2, 40, 16, requires_grad=True) for _ in range(3))
for causal in (False, True):
    F.scaled_dot_product_attention(q, k, v, is_causal=causal).sum().backward()
print(Counting.runs, metal_flash_sdpa.get_dispatch_count())
"""
    env = {"MFA_CACHE_DIR": str(tmp_path)}
    first = run_python(code, env)
    assert first.returncode == 0 and first.stderr == "", first.stderr
    # 2 variants x (a forward check: 1 run; a backward check: 2 runs) + the user's 4 runs
    assert first.stdout.split() == ["10", "2"]
    assert sorted(variant["stage"] for variant, _ in stored(tmp_path)) == ["backward"] * 2 + ["forward"] * 2
    second = run_python(code, env)
    assert second.returncode == 0 and second.stderr == "", second.stderr
    assert second.stdout.split() == ["4", "2"]  # the user's calls only


def test_two_threads_check_a_new_variant_once(fresh):
    class Slow(Recording):
        def forward(self, q, k, v, scale, causal, mask):
            if q.shape[0] == 1:
                time.sleep(0.2)  # the check is under way while the other thread arrives
            return super().forward(q, k, v, scale, causal, mask)

    kernel = fresh(Slow())
    inputs = [qkv() for _ in range(2)]
    outputs = [None, None]
    barrier = threading.Barrier(2)

    def call(i):
        barrier.wait()
        outputs[i] = F.scaled_dot_product_attention(*inputs[i])

    threads = [threading.Thread(target=call, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert kernel.count("forward", "canary") == 1 and kernel.count("forward", "user") == 2
    for out, (q, k, v) in zip(outputs, inputs):
        torch.testing.assert_close(out, pytorch_sdpa(q, k, v))


@pytest.mark.parametrize("problem", ["corrupt", "unwritable"])
def test_an_unusable_file_degrades_to_memory_with_one_warning(fresh, tmp_path, monkeypatch, warned, problem):
    path = tmp_path / trust.STORE_NAME
    if problem == "corrupt":
        path.write_text('{"format": 1, "verdicts": {')
    else:  # a regular file where the directory should be
        monkeypatch.setenv("MFA_CACHE_DIR", str(path / "below"))
        path.write_text("")
    kernel = fresh(Recording())
    for _ in range(2):
        for causal in (False, True):
            q, k, v = qkv()
            out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
            torch.testing.assert_close(out, pytorch_sdpa(q, k, v, is_causal=causal))
    assert kernel.count("forward", "canary") == 2  # checked once per variant, remembered in memory
    assert metal_flash_sdpa.get_dispatch_count() == 4
    (message,) = warned()
    assert "the self-check's verdict file is not usable" in message and "kept in memory" in message
    assert path.read_text() == ('{"format": 1, "verdicts": {' if problem == "corrupt" else "")


def test_status_lists_the_verdicts(fresh, warned):
    fresh(Wrong())
    for causal in (False, True):
        F.scaled_dot_product_attention(*qkv(torch.bfloat16), is_causal=causal)
    lines = trust.status_lines()
    assert lines[0].startswith("Self-check (MFA_SELFCHECK -> on): verdicts in ")
    assert lines[1].startswith("  device=cpu; metal-flash-sdpa ") and "not used" not in lines[1]
    text = "\n".join(lines)
    assert "    passed  wrong      bfloat16 forward  D=16 Dv=16 Hq=2 Hk=2 scale=0.25 causal=False mask=none" in text
    assert "    FAILED  wrong      bfloat16 forward  D=16 Dv=16 Hq=2 Hk=2 scale=0.25 causal=True mask=none" in text
    assert "      out: max |ours - float64|" in text
    assert len(warned()) == 1


def test_a_compiled_call_is_checked_when_it_runs(fresh, warned):
    torch._dynamo.reset()
    kernel = fresh(Wrong())
    q, k, v = qkv(torch.bfloat16)
    compiled = torch.compile(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True), backend="aot_eager", fullgraph=True)
    try:
        out = compiled(q, k, v)
    finally:
        torch._dynamo.reset()
    torch.testing.assert_close(out, pytorch_sdpa(q, k, v, is_causal=True), atol=ATOL, rtol=RTOL)
    assert kernel.count("forward", "canary") == 1 and kernel.count("forward", "user") == 0
    assert fallbacks() == {f"kernel wrong {SELF_CHECK} for this variant": 1}
    assert len(warned()) == 1


def test_the_build_id_follows_the_patch_series(tmp_path):
    """Verdicts are keyed by the build id meson wrote (tools/build_id.py): ccv's pin, our
    patches as ccv.wrap lists them, the bridge sources. A changed patch is another build."""
    spec = importlib.util.spec_from_file_location("build_id", REPO / "tools" / "build_id.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    assert trust.build_id() == tool.build_id(REPO), "the installed package is not this tree's: reinstall it"
    for part in ("subprojects/ccv.wrap", "subprojects/packagefiles/ccv", "native"):
        copy = shutil.copytree if (REPO / part).is_dir() else shutil.copyfile
        (tmp_path / part).parent.mkdir(parents=True, exist_ok=True)
        copy(REPO / part, tmp_path / part)
    assert tool.build_id(tmp_path) == tool.build_id(REPO)
    patch = sorted((tmp_path / "subprojects/packagefiles/ccv").glob("*.patch"))[-1]
    patch.write_text(patch.read_text() + "\n")
    assert tool.build_id(tmp_path) != tool.build_id(REPO)


def test_mfa_keys_its_verdicts_with_the_bridges_device_info(monkeypatch):
    from metal_flash_sdpa.kernels import mfa

    info = {"gpu": "Apple M3 Pro", "macos_version": "26.1", "macos_build": "25B78", "async_copies": False, "metal_language": "3.2"}

    class Native:  # the bridge's device_info(), which only a Mac runs
        @staticmethod
        def device_info():
            return info

    monkeypatch.setattr(mfa, "_native", Native)
    assert mfa.MFAKernel().machine(torch.device("mps")) == {**info, "async_copies": "False"}
