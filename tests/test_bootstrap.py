"""Start-up: the installed .pth hook, in fresh interpreters."""

import json
import pathlib
import sys
import textwrap

import pytest

import metal_flash_sdpa
from conftest import run_python

SITE = pathlib.Path(metal_flash_sdpa.__file__).resolve().parent.parent

REPORT = textwrap.dedent(
    """
    import json, sys
    pre = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'wrapt'))
    import torch.nn.functional as F
    print(json.dumps({
        "patched": getattr(F.scaled_dot_product_attention, "__module__", None) == "metal_flash_sdpa.dispatch",
        "builtin": type(F.scaled_dot_product_attention).__name__ == "builtin_function_or_method",
        "imported_before_torch": pre,
    }))
    """
)


def report(env=None, args=(), code=REPORT):
    result = run_python(code, env=env, args=args)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1]), result.stderr


def test_pth_and_start_files_are_installed():
    pth = (SITE / "metal_flash_sdpa.pth").read_text().strip()
    assert pth.startswith("import ") and "metal_flash_sdpa._bootstrap" in pth and "\n" not in pth
    start = (SITE / "metal_flash_sdpa.start").read_text().strip()
    assert start == "metal_flash_sdpa._bootstrap:start"


def test_enabled_patches_without_importing_the_package_by_hand():
    state, stderr = report({"MFA_ENABLE": "1"})
    assert state == {"patched": True, "builtin": False, "imported_before_torch": []}
    assert stderr == ""


@pytest.mark.parametrize("value", ["0", "off", None])
def test_off_and_auto_without_kernel_leave_pytorchs_object(value):
    state, stderr = report({} if value is None else {"MFA_ENABLE": value})
    assert state["builtin"] and not state["patched"]
    assert stderr == ""


def test_startup_imports_only_the_standard_library():
    code = "import sys, json; print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'wrapt', 'metal_flash_sdpa'))))"
    for env in ({"MFA_ENABLE": "1"}, {}):
        result = run_python(code, env=env)
        assert result.returncode == 0 and result.stderr == ""
        assert json.loads(result.stdout) == ["metal_flash_sdpa", "metal_flash_sdpa._bootstrap", "metal_flash_sdpa.config"]
    off = run_python(code, env={"MFA_ENABLE": "0"})
    assert json.loads(off.stdout) == ["metal_flash_sdpa", "metal_flash_sdpa._bootstrap", "metal_flash_sdpa.config"]
    assert "_TorchImportWatcher" not in run_python("import sys; print(sys.meta_path)", env={"MFA_ENABLE": "0"}).stdout


def test_isolated_mode_patches_and_no_site_starts_cleanly():
    state, stderr = report({"MFA_ENABLE": "1"}, args=("-I",))
    assert state["patched"] and stderr == ""
    # -S skips site-packages and so the hook: a clean start with nothing of ours loaded
    result = run_python("import sys; print([m for m in sys.modules if 'metal' in m])", env={"MFA_ENABLE": "1"}, args=("-S",))
    assert result.returncode == 0 and result.stderr == "" and result.stdout.strip() == "[]"


def test_torch_already_imported_when_the_hook_runs():
    code = f"import sys; sys.path.append({str(SITE)!r}); import torch, site; site.main()\n" + REPORT
    state, stderr = report({"MFA_ENABLE": "1"}, args=("-S",), code=code)
    assert state["patched"] and stderr == ""


def test_torch_imported_from_a_thread():
    code = "import threading; t = threading.Thread(target=__import__, args=('torch',)); t.start(); t.join()\n" + REPORT
    state, stderr = report({"MFA_ENABLE": "1"}, code=code)
    assert state["patched"] and stderr == ""


def test_multiprocessing_spawn_child_is_patched(tmp_path):
    script = tmp_path / "spawn_child.py"
    script.write_text(
        textwrap.dedent(
            """
            import multiprocessing as mp

            def child(queue):
                import torch.nn.functional as F
                queue.put(F.scaled_dot_product_attention.__module__)

            if __name__ == "__main__":
                ctx = mp.get_context("spawn")
                queue = ctx.Queue()
                process = ctx.Process(target=child, args=(queue,))
                process.start()
                print(queue.get(timeout=120))
                process.join()
            """
        )
    )
    result = run_python(f"import runpy; runpy.run_path({str(script)!r}, run_name='__main__')", env={"MFA_ENABLE": "1"})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "metal_flash_sdpa.dispatch"


@pytest.mark.skipif(sys.version_info >= (3, 12), reason="uses the 3.11 _xxsubinterpreters module")
def test_subinterpreter_starts_cleanly():
    code = textwrap.dedent(
        """
        import _xxsubinterpreters as interpreters
        interp = interpreters.create()
        interpreters.run_string(interp, "import sys; assert 'metal_flash_sdpa._bootstrap' in sys.modules; print('sub ok')")
        interpreters.destroy(interp)
        """
    )
    result = run_python(code, env={"MFA_ENABLE": "1"})
    assert result.returncode == 0, result.stderr
    assert "sub ok" in result.stdout and result.stderr == ""


def test_start_is_idempotent():
    code = (
        "import sys, metal_flash_sdpa._bootstrap as b; b.start(); b.start()\n"
        "print(sum(type(f).__name__ == '_TorchImportWatcher' for f in sys.meta_path))"
    )
    result = run_python(code, env={"MFA_ENABLE": "1"})
    assert result.stdout.strip() == "1"


def _fault(tmp_path, sitecustomize):
    (tmp_path / "sitecustomize.py").write_text(textwrap.dedent(sitecustomize))
    return {"MFA_ENABLE": "1", "PYTHONPATH": str(tmp_path)}


FAULTS = {
    "wrapt missing": "import sys; sys.modules['wrapt'] = None\n",
    "activation raises": """
        import metal_flash_sdpa.activation as activation
        def broken():
            raise RuntimeError("injected fault")
        activation.activate_from_environment = broken
        """,
    "patching raises": """
        import sys, types
        class Finder:
            def find_spec(self, name, path=None, target=None):
                if name == "metal_flash_sdpa.patch":
                    raise ImportError("injected fault in metal_flash_sdpa.patch")
        sys.meta_path.insert(0, Finder())
        """,
}


@pytest.mark.parametrize("fault", list(FAULTS))
def test_faults_never_break_import_torch(tmp_path, fault):
    env = _fault(tmp_path, FAULTS[fault])
    state, stderr = report(env, code="import torch\n" + REPORT)
    assert state["builtin"] and not state["patched"]
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("metal_flash_sdpa: not activated:")
    assert ("wrapt" in lines[0]) if fault == "wrapt missing" else ("injected fault" in lines[0])


def test_garbage_in_every_variable():
    env = {"MFA_ENABLE": "perhaps", "MFA_MIN_SEQ_LEN": "many", "MFA_LOG": "\x01"}
    state, stderr = report(env, code=REPORT + "import metal_flash_sdpa as m; print(m.MIN_SEQ_LEN)\n".replace("print(m", "m.MIN_SEQ_LEN or print(m"))
    assert state["builtin"] and not state["patched"]  # garbage MFA_ENABLE means auto: no kernel here
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    for name in env:
        assert name in lines[0]
    assert "metal_flash_sdpa" in lines[0]


def test_api_used_before_torch_is_imported():
    code = "import metal_flash_sdpa as m; m.enable(); print(m.is_enabled())\n" + REPORT
    for env in ({"MFA_ENABLE": "1"}, {"MFA_ENABLE": "0"}, {}):
        result = run_python(code, env=env)
        assert result.returncode == 0 and result.stderr == "", result.stderr
        assert json.loads(result.stdout.splitlines()[-1])["patched"]


def test_submodule_imported_before_torch_says_why_it_did_not_activate():
    code = "import metal_flash_sdpa.kernels.reference\n" + REPORT
    state, stderr = report({"MFA_ENABLE": "1"}, code=code)
    assert not state["patched"]
    assert stderr.splitlines() == [
        "metal_flash_sdpa: not activated: torch was first imported by metal_flash_sdpa.kernels; "
        "import torch before it, or call metal_flash_sdpa.enable()"
    ]
