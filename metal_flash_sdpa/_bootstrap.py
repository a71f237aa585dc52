"""Start-up hook run by metal_flash_sdpa.pth (and metal_flash_sdpa.start on Python 3.15+).

Don't import any costly modules here: this runs in every interpreter of the environment.
It reads MFA_ENABLE and, unless patching is off, waits for ``import torch`` with a tiny
meta-path finder. Only when torch is first requested does it import wrapt (its ~90 ms
hides inside torch's own import) and let wrapt's post-import hook activate the package
once torch has finished importing. It never raises: any failure is one stderr line and
torch imports as if the package were not installed.
"""

import sys

_started = False


def _report(error: BaseException) -> None:
    try:
        sys.stderr.write(f"metal_flash_sdpa: not activated: {type(error).__name__}: {error}\n")
    except Exception:
        pass


def _on_torch_imported(_torch_module) -> None:
    try:
        busy = [
            name
            for name, module in list(sys.modules.items())
            if name.startswith("metal_flash_sdpa.") and getattr(getattr(module, "__spec__", None), "_initializing", False)
        ]
        if busy:  # activating now would import that half-initialised module
            sys.stderr.write(
                f"metal_flash_sdpa: not activated: torch was first imported by {busy[0]}; "
                "import torch before it, or call metal_flash_sdpa.enable()\n"
            )
            return
        from metal_flash_sdpa import activation

        activation.activate_from_environment()
    except Exception as error:  # a raising post-import hook would fail `import torch`
        _report(error)


class _TorchImportWatcher:
    """Meta-path finder that hands the first `import torch` to wrapt's post-import hook."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "torch":
            return None
        _uninstall(self)
        try:
            import wrapt
            import wrapt.importer

            wrapt.register_post_import_hook(_on_torch_imported, "torch")
            # importlib is already iterating sys.meta_path past the position where wrapt
            # just put its finder, so ask that finder for torch's spec directly.
            for finder in sys.meta_path:
                if isinstance(finder, wrapt.importer.ImportHookFinder):
                    return finder.find_spec(fullname, path, target)
        except Exception as error:
            _report(error)
        return None


def _uninstall(watcher) -> None:
    try:
        sys.meta_path.remove(watcher)
    except ValueError:  # another thread got here first
        pass


def start() -> None:
    """Entry point of the .pth line; idempotent and never raises."""
    global _started
    if _started:
        return
    _started = True
    try:
        from metal_flash_sdpa import config

        if config.enable_mode(warn=False) == "off":
            return
        if "torch" in sys.modules:
            _on_torch_imported(sys.modules["torch"])
        else:
            sys.meta_path.insert(0, _TorchImportWatcher())
    except Exception as error:
        _report(error)
