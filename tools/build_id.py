"""Print the build id: a hash of what decides the MFA kernels' code besides the package
version. Run by meson at configure time (the installed package cannot see its sources);
the self-check keys its verdicts with it (metal_flash_sdpa/trust.py), so a changed patch
series or bridge re-checks every variant.

Hashed, in order: ccv's pinned revision and the ``diff_files`` patches as listed in
subprojects/ccv.wrap (names and contents), then the sources under native/.

Usage: python tools/build_id.py [SOURCE_ROOT]
"""

import configparser
import hashlib
import pathlib
import sys


def build_id(root: pathlib.Path) -> str:
    wrap = configparser.ConfigParser(interpolation=None)
    wrap.read(root / "subprojects" / "ccv.wrap")
    section = wrap["wrap-git"]
    digest = hashlib.sha256(f"ccv {section['revision'].strip()}\n".encode())
    patches = [name.strip() for name in section.get("diff_files", "").split(",") if name.strip()]
    native = sorted(p.relative_to(root).as_posix() for p in (root / "native").rglob("*") if p.is_file())
    for relative in [f"subprojects/packagefiles/{name}" for name in patches] + native:
        digest.update(f"{relative}\n".encode())
        digest.update((root / relative).read_bytes())
    return digest.hexdigest()[:16]


if __name__ == "__main__":
    print(build_id(pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else pathlib.Path(__file__).parent.parent)))
