"""Module paths of the flat 0.1 layout, kept importable for one release.

``import dreambooth_dora.dora`` (and ``python -m dreambooth_dora.builtin.toy_eval`` …) still work: the old name
becomes an alias of the module's new home, with a FutureWarning naming that home. A module whose contents were
split over several new modules fails instead, with a message listing them. Remove this file in 0.3.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import types
import warnings

_PACKAGE = "dreambooth_dora"
MOVED = {
    "dora": "adapters.layers",
    "inject": "adapters.inject",
    "adapter_io": "adapters.io",
    "keys": "adapters.names",
    "ldm_keys": "sd.ldm",
    "config": "training.config",
    "data": "training.data",
    "prior": "training.prior",
    "objective": "training.objective",
    "checkpoint": "training.checkpoint",
    "jobs": "app.jobs",
    "builtin.tiny": "sd.fixtures",
    "builtin.make_vocab": "sd.vocab",
    "builtin.toy_world": "toy.world",
    "builtin.toy_eval": "toy.eval",
    "builtin.toy_pretrain": "toy.pretrain",
}
SPLIT = {
    "ui_backend": "dreambooth_dora.app (backend: uploads, form, presets, progress; registry; analysis)",
}


def _warn(old: str, new: str) -> None:
    warnings.warn(
        f"{old} moved to {new} in dreambooth-dora 0.2; the old name works until 0.3. Import {new} instead.",
        FutureWarning,
        stacklevel=3,
    )


class _AliasLoader(importlib.abc.Loader):
    """Loads an old module name as the already-importable new module (and runs it for ``python -m``)."""

    def __init__(self, old: str, new: str) -> None:
        self.old, self.new = old, new

    def create_module(self, spec):
        _warn(self.old, self.new)
        return importlib.import_module(self.new)

    def exec_module(self, module) -> None:
        pass  # the new module ran when it was imported

    def get_code(self, fullname):  # runpy (``python -m old.name``) executes the new module's code
        _warn(self.old, self.new)
        spec = importlib.util.find_spec(self.new)
        return spec.loader.get_code(self.new)


class _BuiltinPackageLoader(importlib.abc.Loader):
    """``dreambooth_dora.builtin``: an empty package so that its old submodules resolve through the aliases."""

    def create_module(self, spec):
        module = types.ModuleType(spec.name, "Removed in 0.2: see dreambooth_dora.sd.fixtures and dreambooth_dora.toy")
        module.__path__ = []
        from dreambooth_dora import shipped

        module.TOY_BASE_DIR, module.TOY_BUILD_COMMAND = shipped.TOY_BASE_DIR, shipped.TOY_BUILD_COMMAND
        return module

    def exec_module(self, module) -> None:
        pass


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        if not fullname.startswith(_PACKAGE + "."):
            return None
        old = fullname[len(_PACKAGE) + 1 :]
        if old in MOVED:
            return importlib.machinery.ModuleSpec(fullname, _AliasLoader(fullname, f"{_PACKAGE}.{MOVED[old]}"))
        if old == "builtin":
            return importlib.machinery.ModuleSpec(fullname, _BuiltinPackageLoader(), is_package=True)
        if old in SPLIT:
            raise ModuleNotFoundError(
                f"{fullname} was split in dreambooth-dora 0.2; its functions now live in {SPLIT[old]}", name=fullname
            )
        return None


def install() -> None:
    if not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.append(_Finder())  # after the normal finders: real modules always win
