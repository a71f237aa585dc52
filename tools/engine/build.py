"""Builds the MFA engine on Linux: ccv's pinned sources plus our patch series (the files and
order of subprojects/ccv.wrap's diff_files, as the Meson wrap applies them on a Mac),
compiled with clang against the recording metal-cpp stand-in in host/, linked with the
driver that encodes one call (driver.cpp).

ccv comes from MFA_CCV_SOURCE (the pinned tarball, or a directory holding lib/nnc/mfa) or
from ../shared/ccv/ beside the checkout. Builds are cached by the hash of everything that
goes into them, under MFA_ENGINE_CACHE (default ~/.cache/metal-flash-sdpa/engine).
"""

from __future__ import annotations

import concurrent.futures
import configparser
import functools
import hashlib
import os
import pathlib
import platform
import shutil
import subprocess
import sys
import tarfile
import tempfile

ENGINE = pathlib.Path(__file__).resolve().parent
REPO = ENGINE.parent.parent
WRAP = REPO / "subprojects" / "ccv.wrap"
PACKAGEFILES = REPO / "subprojects" / "packagefiles"
PINNED_TARBALL = REPO.parent / "shared" / "ccv" / "ccv-85efcf82-mfa.tar.gz"
PINNED_SHA256 = "fb9dbd05a7de1e0a3d72c4af5294369832df5801f7d9b27e45839fec0c1fa4ab"

# ccv's attention path: the encode, the v2 generator, the cast kernel, and the context with
# the caches it declares (normalization, depalettize, adam, gemv: linked, never called).
# Metal.cpp and Dispatch.cpp are Apple runtime glue; GEMM, CMul, Gelu and Add kernels are
# not reached from attention.
CCV_SOURCES = (
    "ccv_nnc_mfa.cpp",
    "ccv_nnc_mfa_attention.cpp",
    "ccv_nnc_mfa_cast.cpp",
    "ccv_nnc_mfa_error.cpp",
    "ccv_nnc_mfa_normalization.cpp",
    "ccv_nnc_mfa_depalettize.cpp",
    "ccv_nnc_mfa_adam.cpp",
    "ccv_nnc_mfa_gemv.cpp",
    "v2/AttentionDescriptor.cpp",
    "v2/AttentionKernelDescriptor.cpp",
    "v2/AttentionKernel.cpp",
    "v2/CastDescriptor.cpp",
    "v2/CastKernel.cpp",
    "v2/CodeWriter.cpp",
    "v2/GEMMHeaders.cpp",
)
OUR_SOURCES = ("recorder.cpp", "driver.cpp")


class Unavailable(Exception):
    """The engine cannot be built here (no ccv sources, no clang); the message says why."""


MIN_CLANG = 18  # bf16 arithmetic, __builtin_vectorelements


@functools.lru_cache(maxsize=None)
def clang() -> str:
    """clang++ (Debian's packages), the newest installed. The engine runs on Linux x86-64
    only: the executor's fibers switch x86-64 stacks and kernels are compiled for it."""
    if sys.platform != "linux" or platform.machine() != "x86_64":
        raise Unavailable(f"the engine runs on Linux x86-64 (this is {sys.platform} {platform.machine()})")
    for name in ("clang++-19", "clang++-18", "clang++"):
        path = shutil.which(name)
        if path:
            version = subprocess.run([path, "-dumpversion"], capture_output=True, text=True).stdout
            if int(version.split(".")[0] or 0) >= MIN_CLANG:
                return path
    raise Unavailable(f"no clang++ {MIN_CLANG} or newer on PATH (apt-get install clang-19)")


def ccv_source() -> pathlib.Path:
    """The pinned ccv: a tarball or a directory holding lib/nnc/mfa."""
    named = os.environ.get("MFA_CCV_SOURCE")
    if named:
        path = pathlib.Path(named)
        if not path.exists():
            raise Unavailable(f"MFA_CCV_SOURCE={named} does not exist")
        return path
    if PINNED_TARBALL.exists():
        return PINNED_TARBALL
    raise Unavailable(f"no ccv sources: set MFA_CCV_SOURCE or provide {PINNED_TARBALL}")


def patch_series() -> list[pathlib.Path]:
    """Our patches to ccv, in the order subprojects/ccv.wrap applies them."""
    wrap = configparser.ConfigParser()
    wrap.read(WRAP)
    names = wrap.get("wrap-git", "diff_files", fallback="")
    return [PACKAGEFILES / name.strip() for name in names.split(",") if name.strip()]


def _digest(paths, extra=()) -> str:
    h = hashlib.sha256()
    for item in extra:
        h.update(item.encode())
    for path in paths:
        h.update(str(path.relative_to(REPO) if path.is_relative_to(REPO) else path.name).encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:20]


def _ccv_fingerprint(source: pathlib.Path) -> str:
    if source.is_file():
        return hashlib.sha256(source.read_bytes()).hexdigest()
    return _digest(sorted((source / "lib" / "nnc" / "mfa").rglob("*.?pp")))


def _extract(source: pathlib.Path, into: pathlib.Path) -> pathlib.Path:
    """Copy ccv's lib/nnc tree into ``into``; returns the root holding lib/."""
    root = into / "ccv"
    if source.is_file():
        digest = hashlib.sha256(source.read_bytes()).hexdigest()
        if source.resolve() == PINNED_TARBALL.resolve() and digest != PINNED_SHA256:
            raise Unavailable(f"{source} has sha256 {digest}, not the pinned {PINNED_SHA256}")
        with tempfile.TemporaryDirectory() as tmp, tarfile.open(source) as tar:
            tar.extractall(tmp, filter="data")
            found = next(pathlib.Path(tmp).rglob("lib/nnc/mfa"), None)
            if found is None:
                raise Unavailable(f"{source} holds no lib/nnc/mfa")
            shutil.copytree(found.parent.parent.parent, root)
    else:
        if not (source / "lib" / "nnc" / "mfa").is_dir():
            raise Unavailable(f"{source} holds no lib/nnc/mfa")
        shutil.copytree(source / "lib" / "nnc", root / "lib" / "nnc", ignore=shutil.ignore_patterns(".git"))
    return root


def _apply_patches(root: pathlib.Path) -> None:
    for patch in patch_series():
        result = subprocess.run(
            ["patch", "-p1", "--batch", "--forward", "--no-backup-if-mismatch", "-i", str(patch)],
            cwd=root,
            capture_output=True,
            text=True,
        )
        if result.returncode != 0:
            raise RuntimeError(f"{patch.name} does not apply to the pinned ccv:\n{result.stdout}{result.stderr}")


def patched_ccv(into: pathlib.Path) -> pathlib.Path:
    """ccv's pinned lib/nnc with our patch series applied, copied under ``into``; returns the
    root holding lib/ (the tree the Mac build compiles; tests/test_bridge_syntax.py reads it)."""
    root = _extract(ccv_source(), into)
    _apply_patches(root)
    return root


def build(verbose: bool = False) -> pathlib.Path:
    """The driver executable for the current sources, patches and shim; built once."""
    compiler = clang()
    source = ccv_source()
    inputs = sorted(p for p in (ENGINE / "host").rglob("*") if p.is_file())
    inputs += [ENGINE / name for name in OUR_SOURCES] + [ENGINE / "recorder.hpp"] + sorted((REPO / "native").glob("*.hpp"))
    inputs += patch_series() + [WRAP, PACKAGEFILES / "ccv" / "standalone" / "nnc" / "ccv_nnc.h"]
    key = _digest(inputs, extra=(compiler, _ccv_fingerprint(source), __file__))
    cache = pathlib.Path(os.environ.get("MFA_ENGINE_CACHE", pathlib.Path.home() / ".cache" / "metal-flash-sdpa" / "engine"))
    out = cache / key
    driver = out / "driver"
    if driver.exists():
        return driver
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f"{key}.", dir=_mkdir(cache)))
    try:
        root = patched_ccv(tmp)
        mfa = root / "lib" / "nnc" / "mfa"
        flags = [
            "-std=c++17",
            "-O1",
            "-w",
            f"-I{ENGINE / 'host'}",  # first: our metal-cpp, simd, QuartzCore stand-ins
            f"-I{PACKAGEFILES / 'ccv' / 'standalone'}",  # nnc/ccv_nnc.h, as on the Mac
            f"-I{root / 'lib'}",
            f"-I{mfa}",
        ]
        units = [(mfa / name, tmp / (name.replace("/", "_") + ".o")) for name in CCV_SOURCES]
        units += [(ENGINE / name, tmp / (name + ".o")) for name in OUR_SOURCES]

        def compile_unit(unit):
            src, obj = unit
            result = subprocess.run([compiler, *flags, "-c", str(src), "-o", str(obj)], capture_output=True, text=True)
            if result.returncode != 0:
                raise RuntimeError(f"compiling {src.name} failed:\n{result.stderr}")
            return obj

        with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
            objects = list(pool.map(compile_unit, units))
        subprocess.run([compiler, *map(str, objects), "-o", str(tmp / "driver")], check=True, capture_output=True)
        try:
            os.replace(tmp, out)
        except OSError:  # another process (a test worker) built the same key first
            if not driver.exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return driver


def _mkdir(path: pathlib.Path) -> pathlib.Path:
    path.mkdir(parents=True, exist_ok=True)
    return path
