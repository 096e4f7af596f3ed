"""dreambooth-dora: DreamBooth personalization of Stable Diffusion with DoRA adapters.

The public Python API. Names are imported lazily so that ``import dreambooth_dora`` stays light (the command-line
entry points set the CPU threading policy before torch loads). The layers and their import rule are described in
docs/ARCHITECTURE.md.
"""

import sys
from importlib import import_module

from dreambooth_dora import _legacy, notices, threads

# `python -m dreambooth_dora.<command>` imports this package before the command's module (argv[0] is "-m"
# meanwhile): the one moment every command passes before torch starts its threads. Importing the package from
# a script of your own changes nothing.
if sys.argv[:1] == ["-m"]:
    threads.configure(threads.requested(sys.argv))
    notices.quiet()
    # `python -m dreambooth_dora.threads` runs a module this file has just imported: runpy's warning about it
    # says nothing a user can act on.
    import warnings

    warnings.filterwarnings("ignore", r"'dreambooth_dora\.threads' found in sys\.modules", RuntimeWarning)

_EXPORTS = {
    "AdapterError": "adapters.inject",
    "AdapterFileError": "adapters.io",
    "ModelLoadError": "sd.pipelines",
    "Studio": "tools.generate",
    "add_adapter": "adapters.inject",
    "analyze_runs": "tools.analysis",
    "bake_adapters": "adapters.inject",
    "describe_architecture": "sd.pipelines",
    "disable_adapters": "adapters.inject",
    "export_merged": "tools.export",
    "export_svd_lora": "tools.export",
    "list_adapters": "adapters.inject",
    "load_adapter": "adapters.io",
    "load_pipeline": "sd.pipelines",
    "merge_adapters": "adapters.inject",
    "remove_adapter": "adapters.inject",
    "save_adapter": "adapters.io",
    "set_adapter_enabled": "adapters.inject",
    "set_adapter_scale": "adapters.inject",
    "train": "training.loop",
    "unmerge_adapters": "adapters.inject",
}
__all__ = sorted(_EXPORTS)

_legacy.install()


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'dreambooth_dora' has no attribute {name!r}")
    return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
