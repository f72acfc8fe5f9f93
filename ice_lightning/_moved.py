"""Module paths from before the subpackage layout, kept importable (with a ``FutureWarning``) for user code
and configs that name them, e.g. ``ice_lightning.callback.SavePipeline`` in a YAML file.

An old path resolves to a small module that hands on every name from the new one, so classes keep one
identity. Nothing is imported
until an old path is asked for. ``ice_lightning.erase`` is not among them: that name is the function.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import types
import warnings

MOVED: dict[str, str] = {
    "ice_lightning.solver": "ice_lightning.core.solver",
    "ice_lightning.concepts": "ice_lightning.core.concepts",
    "ice_lightning.text_encoders": "ice_lightning.core.encoders",
    "ice_lightning.layers": "ice_lightning.core.layers",
    "ice_lightning.editing": "ice_lightning.core.editing",
    "ice_lightning.export": "ice_lightning.core.export",
    "ice_lightning.callback": "ice_lightning.lightning.callback",
    "ice_lightning.module": "ice_lightning.lightning.module",
    "ice_lightning.data": "ice_lightning.lightning.data",
    "ice_lightning.cli": "ice_lightning.lightning.cli",
    "ice_lightning.attacks": "ice_lightning.evaluation.attacks",
    "ice_lightning.devset": "ice_lightning.evaluation.devset",
    "ice_lightning.shapes_eval": "ice_lightning.shapes.evaluation",
    "ice_lightning.pixel_pipeline": "ice_lightning.shapes.pipeline",
}
# SavePipeline has its own module now; configs name it under the old callback module.
_EXTRA_NAMES = {"ice_lightning.callback": {"SavePipeline": "ice_lightning.lightning.save"}}


class _MovedFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Resolves an old path to a module that forwards every attribute to the new one."""

    def find_spec(self, fullname, path=None, target=None):
        return importlib.util.spec_from_loader(fullname, self) if fullname in MOVED else None

    def create_module(self, spec):
        return types.ModuleType(spec.name)

    def exec_module(self, module) -> None:
        old = module.__name__
        new = MOVED[old]
        warnings.warn(f"{old} moved to {new}; import it from there", FutureWarning, stacklevel=2)
        homes = _EXTRA_NAMES.get(old, {})

        def forward(name: str):
            return getattr(importlib.import_module(homes.get(name, new)), name)

        module.__getattr__ = forward
        module.__doc__ = f"Moved to :mod:`{new}`."


def install() -> None:
    """Put the finder on ``sys.meta_path`` once."""
    if not any(isinstance(f, _MovedFinder) for f in sys.meta_path):
        sys.meta_path.append(_MovedFinder())
