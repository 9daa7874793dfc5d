"""Model kinds: the name written into a run folder's ``config.toml`` -> (Config, Module).

A run folder says ``kind = "dvae"`` and holds a ``[model]`` table; ``build_model`` turns the
two back into a module without unpickling anything. Model files register themselves with
``@register_kind("name", ConfigClass)``; ``cvformers.models`` / ``cvformers.vae`` import them.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable

from cvformers.config import ConfigError, from_dict

_KINDS: dict[str, tuple[type, type]] = {}

# Modules whose import registers kinds; imported lazily so that `import cvformers` stays fast.
_KIND_MODULES = (
    "cvformers.vae.dvae",
    "cvformers.vae.vqvae",
    "cvformers.models.dalle",
    "cvformers.models.clip",
    "cvformers.models.vision",
)


def register_kind(name: str, config_cls: type) -> Callable[[type], type]:
    def deco(module_cls: type) -> type:
        _KINDS[name] = (config_cls, module_cls)
        return module_cls

    return deco


def _load_all() -> None:
    for mod in _KIND_MODULES:
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name != mod:  # a real missing dependency inside the module: surface it
                raise


def kinds() -> dict[str, tuple[type, type]]:
    _load_all()
    return dict(_KINDS)


def build_model(kind: str, model_cfg: dict[str, Any] | Any):
    """Build the module of ``kind`` from a config dataclass or a plain dict (strictly checked)."""
    known = kinds()
    if kind not in known:
        raise ConfigError(f"unknown model kind {kind!r}; known kinds: {', '.join(sorted(known))}")
    config_cls, module_cls = known[kind]
    cfg = model_cfg if isinstance(model_cfg, config_cls) else from_dict(config_cls, dict(model_cfg), "model")
    return module_cls(cfg)
