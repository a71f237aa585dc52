"""Start-up cost of the installed hook, as medians measured in one run.

1. `python -c pass` with the hook against the same interpreter without it: a throwaway
   virtual environment (same base interpreter) with and without a copy of this package and
   its .pth; budget: within 1 ms.
2. `python -c "import torch"` with MFA_ENABLE=1 (patches) against MFA_ENABLE=0; budget: 3%.

Run with the package installed: python benchmarks/startup.py [--runs 40] [--torch-runs 15]
"""

import argparse
import os
import pathlib
import shutil
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time

import metal_flash_sdpa


def wall_ms(python, code, env, runs):
    """Median wall time of ``runs`` fresh interpreters, after one warm-up."""
    times = []
    for i in range(runs + 1):
        start = time.perf_counter()
        subprocess.run([python, "-c", code], env=env, check=True, stdout=subprocess.DEVNULL)
        if i:
            times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def alternate(pairs, runs):
    """Medians of several commands, interleaved so machine noise hits each alike."""
    samples = {name: [] for name in pairs}
    for _ in range(runs):
        for name, (python, code, env) in pairs.items():
            samples[name].append(wall_ms(python, code, env, 1))
    return {name: statistics.median(values) for name, values in samples.items()}


def bare_venvs(root):
    """Two empty venvs of this interpreter; the second gets this package and its .pth."""
    site_name = pathlib.Path(sysconfig.get_paths()["purelib"]).relative_to(sysconfig.get_paths()["data"])
    pythons = {}
    for name in ("without", "with"):
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root / name)], check=True)
        pythons[name] = str(root / name / "bin" / "python")
    installed = pathlib.Path(metal_flash_sdpa.__file__).parent
    site = root / "with" / site_name
    shutil.copytree(installed, site / "metal_flash_sdpa")
    for hook in ("metal_flash_sdpa.pth", "metal_flash_sdpa.start"):
        shutil.copy(installed.parent / hook, site / hook)
    return pythons


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=40)
    parser.add_argument("--torch-runs", type=int, default=15)
    options = parser.parse_args()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MFA_")}

    with tempfile.TemporaryDirectory() as tmp:
        pythons = bare_venvs(pathlib.Path(tmp))
        env_on = dict(env, MFA_ENABLE="1")
        medians = alternate(
            {
                "without hook": (pythons["without"], "pass", env),
                "with hook (MFA_ENABLE unset)": (pythons["with"], "pass", env),
                "with hook (MFA_ENABLE=1)": (pythons["with"], "pass", env_on),
            },
            options.runs,
        )
    base = medians["without hook"]
    print(f"python -c pass, median of {options.runs} interleaved runs ({sys.version.split()[0]}, {sys.platform})")
    for name, value in medians.items():
        print(f"  {name:<32}{value:8.2f} ms  {value - base:+6.2f} ms")

    torch_medians = alternate(
        {
            "MFA_ENABLE=0": (sys.executable, "import torch", dict(env, MFA_ENABLE="0")),
            "MFA_ENABLE=1 (patched)": (sys.executable, "import torch", dict(env, MFA_ENABLE="1")),
        },
        options.torch_runs,
    )
    base = torch_medians["MFA_ENABLE=0"]
    print(f'python -c "import torch", median of {options.torch_runs} interleaved runs')
    for name, value in torch_medians.items():
        print(f"  {name:<32}{value:8.1f} ms  ratio {value / base:.3f}")


if __name__ == "__main__":
    main()
