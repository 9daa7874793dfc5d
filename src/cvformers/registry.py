"""Model kinds: the name written into a run folder's ``config.toml`` -> (Config, Module).

A run folder says ``kind = "dvae"`` and holds a ``[model]`` table; ``build_model`` turns the
two back into a module without unpickling anything. Model files register themselves with
``@register_kind("name", ConfigClass)``; every module of ``cvformers.models`` and ``cvformers.vae`` is imported
before a kind is looked up, so a new model file is found without editing a list.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any, Callable

from cvformers.config import ConfigError, from_dict

_KINDS: dict[str, tuple[type, type]] = {}

# Packages whose modules register kinds; imported on first use so that `import cvformers` stays fast.
_KIND_PACKAGES = ("cvformers.models", "cvformers.vae", "cvformers.diffusion")


def register_kind(name: str, config_cls: type) -> Callable[[type], type]:
    def deco(module_cls: type) -> type:
        if name in _KINDS and _KINDS[name][1].__qualname__ != module_cls.__qualname__:
            raise ValueError(f"model kind {name!r} is registered twice")
        _KINDS[name] = (config_cls, module_cls)
        return module_cls

    return deco


def _load_all() -> None:
    """Import every module of the model packages: each registers its kinds (complete by construction)."""
    for package in _KIND_PACKAGES:
        pkg = importlib.import_module(package)
        for info in pkgutil.iter_modules(pkg.__path__):
            importlib.import_module(f"{package}.{info.name}")


def kinds() -> dict[str, tuple[type, type]]:
    _load_all()
    return dict(_KINDS)


def build_model(kind: str, model_cfg: dict[str, Any] | Any):
    """Build the module of ``kind`` from a config dataclass or a plain dict (strictly checked)."""
    known = kinds()
    if not isinstance(kind, str) or kind not in known:
        raise ConfigError(f"unknown model kind {kind!r}; known kinds: {', '.join(sorted(known))}")
    config_cls, module_cls = known[kind]
    if not isinstance(model_cfg, (config_cls, dict)):
        raise ConfigError(f"[model] must be a table of settings, got {type(model_cfg).__name__} {model_cfg!r}")
    cfg = model_cfg if isinstance(model_cfg, config_cls) else from_dict(config_cls, dict(model_cfg), "model")
    try:
        return module_cls(cfg)
    except (RuntimeError, ValueError, TypeError) as e:  # e.g. a negative width reaching a tensor's shape
        raise ConfigError(f"[model] does not describe a buildable {kind} model: {e}") from e


def kind_of(module: Any) -> str:
    """The kind name ``module``'s class is registered under (what its run's ``config.toml`` says)."""
    for name, (_, module_cls) in kinds().items():
        if type(module) is module_cls:
            return name
    raise ConfigError(f"{type(module).__name__} is not a registered model kind")
