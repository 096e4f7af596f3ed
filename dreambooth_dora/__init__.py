"""dreambooth-dora: DreamBooth personalization of Stable Diffusion with DoRA adapters.

The public Python API. Names are imported lazily so that ``import dreambooth_dora.dora`` stays light.
"""

from importlib import import_module

_EXPORTS = {
    "AdapterError": "inject",
    "AdapterFileError": "adapter_io",
    "ModelLoadError": "models",
    "Studio": "generate",
    "add_adapter": "inject",
    "analyze_runs": "analysis",
    "bake_adapters": "inject",
    "describe_architecture": "models",
    "disable_adapters": "inject",
    "export_merged": "export",
    "export_svd_lora": "export",
    "list_adapters": "inject",
    "load_adapter": "adapter_io",
    "load_pipeline": "models",
    "merge_adapters": "inject",
    "remove_adapter": "inject",
    "save_adapter": "adapter_io",
    "set_adapter_enabled": "inject",
    "set_adapter_scale": "inject",
    "train": "train",
    "unmerge_adapters": "inject",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'dreambooth_dora' has no attribute {name!r}")
    return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
