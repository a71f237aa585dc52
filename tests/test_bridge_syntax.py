"""The Objective-C++ bridge (native/mfa_bridge.mm) compiles, checked on Linux.

No other check reads that file before a Mac does, so clang parses it here as the Meson build
would (`-x objective-c++ -fobjc-arc`, the same defines), against the installed torch's real
headers, ccv's real headers after our patch series (with the real metal-cpp), and stub Apple
headers (tools/bridge_stubs/) that declare, with Apple's signatures, only what the bridge
and those headers use. It cannot show what links or runs, only that the source is C++ and
Objective-C that names things as declared. Skips with one line without clang or ccv's
sources, unless MFA_ENGINE_REQUIRED=1.
"""

import concurrent.futures
import pathlib
import re
import shutil
import subprocess
import sys
import sysconfig

import pytest
import torch.utils.cpp_extension

from conftest import REPO
from engine_setup import engine_required  # puts tools/ on sys.path

from engine import build  # noqa: E402  (after engine_setup)

NATIVE = REPO / "native"
STUBS = REPO / "tools" / "bridge_stubs"


@pytest.fixture(scope="module")
def checked(tmp_path_factory):
    """clang's results for the bridge and for a copy with every mistake of PLANTED (beside
    native/*.hpp), and that copy's path and lines: the two runs at once, since each reads
    all of torch's headers (about half a minute)."""
    if sys.platform == "darwin":
        pytest.skip("on macOS the Meson build compiles the bridge against the real SDK")
    with engine_required("the bridge's syntax check"):
        compiler = build.clang()
        ccv = build.patched_ccv(tmp_path_factory.mktemp("ccv"))
    flags = [
        # native/meson.build's objcpp_args; Linux clang also needs the runtime named
        "-std=c++17",
        "-fobjc-arc",
        "-fobjc-runtime=macosx-13.0",
        "-fblocks",
        "-Wall",
        "-ferror-limit=0",
        # torch_dep's and ccv_mfa_dep's compile args
        "-DTORCH_EXTENSION_NAME=_mfa_native",
        "-DTORCH_API_INCLUDE_EXTENSION_H",
        "-DMETALCPP_SYMBOL_VISIBILITY_HIDDEN",
        f"-I{STUBS}",
        *(f"-isystem{path}" for path in torch.utils.cpp_extension.include_paths()),
        f"-isystem{sysconfig.get_paths()['include']}",
        f"-I{build.PACKAGEFILES / 'ccv' / 'standalone'}",  # nnc/ccv_nnc.h, as the overlay orders it
        f"-I{ccv / 'lib'}",
        f"-I{ccv / 'lib' / 'nnc' / 'mfa'}",
    ]

    def run(bridge: pathlib.Path) -> subprocess.CompletedProcess:
        command = [compiler, "-x", "objective-c++", "-fsyntax-only", *flags, str(bridge)]
        return subprocess.run(command, capture_output=True, text=True)

    planted, lines = plant(tmp_path_factory.mktemp("planted"))
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        bridge_result, planted_result = pool.map(run, [NATIVE / "mfa_bridge.mm", planted])
    return bridge_result, planted_result, planted, lines


def test_bridge_compiles(checked):
    result = checked[0]
    assert result.returncode == 0, result.stderr[-6000:]


# Each a mistake only a compiler reading all these headers catches: (what, the bridge's
# text, the mistaken text, the text of the line the error must be on).
PLANTED = [
    ("a Metal message Metal does not have", "addCompletedHandler:", "addCompletionHandler:", None),
    ("a missing ARC bridge cast", "(__bridge MTL::Buffer*)buffer_of(t)", "(MTL::Buffer*)buffer_of(t)", None),
    ("a wrong ccv signature", "&batch, bindings.buffers, offsets)", "&batch, bindings.buffers)", None),
    ("a torch MPS API that does not exist", "stream->commandEncoder()", "stream->computeEncoder()", None),
    ("a block writing a variable not __block", "__block std::string failure;", "std::string failure;", "failure = failure_of(*run);"),
]


def plant(directory: pathlib.Path):
    """A copy of the bridge with every mistake planted, in ``directory`` beside copies of
    native/*.hpp -> (its path, the line each mistake is on)."""
    source = (NATIVE / "mfa_bridge.mm").read_text()
    for what, right, wrong, _ in PLANTED:
        assert source.count(right) == 1, f"{what}: {right!r} is no longer in the bridge once"
        source = source.replace(right, wrong)
    lines = {what: source[: source.index(at or wrong)].count("\n") + 1 for what, _, wrong, at in PLANTED}
    for header in NATIVE.glob("*.hpp"):
        shutil.copy(header, directory)
    planted = directory / "mfa_bridge.mm"
    planted.write_text(source)
    return planted, lines


def test_planted_errors_fail(checked):
    """One copy with every mistake planted; clang must report an error on each one's line."""
    _, result, planted, lines = checked
    assert result.returncode != 0
    flagged = {int(n) for n in re.findall(rf"{re.escape(str(planted))}:(\d+):\d+: error:", result.stderr)}
    missed = [what for what, line in lines.items() if line not in flagged]
    assert not missed, f"no error for {missed}:\n{result.stderr[-6000:]}"
