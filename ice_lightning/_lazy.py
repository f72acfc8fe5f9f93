"""Attributes of a package imported on first use (PEP 562), so ``import ice_lightning`` and the command line's
``--help`` do not pay for torch, diffusers and Lightning until a name that needs them is asked for."""

from __future__ import annotations

import importlib


def lazy_attributes(package: str, names: dict[str, str]):
    """``(__getattr__, __dir__)`` for ``package``: ``names`` maps each public name to the module (relative to
    ``package``) that defines it."""

    def __getattr__(name: str):
        where = names.get(name)
        if where is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        module = importlib.import_module(where, package)
        value = getattr(module, name)
        setattr(importlib.import_module(package), name, value)  # later lookups are plain attribute reads
        return value

    def __dir__() -> list[str]:
        return sorted(set(vars(importlib.import_module(package))) | set(names))

    return __getattr__, __dir__
