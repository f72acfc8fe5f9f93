"""Loading a pipeline by name: a local diffusers folder, a hub id, or a name that a plugin registered.

Everything that is not a plain ``from_pretrained`` comes from a registry, filled by Python entry points
(so nothing is imported until it is asked for) or by :func:`register_pipeline` at run time:

- group ``ice_lightning.pipelines``: named pipelines. ``NAME`` calls the factory with no argument,
  ``NAME:ARG`` with ``ARG`` (this package registers ``shapes-image``, ``shapes-video``, ``new:KIND`` for an
  untrained shapes-world pipeline and ``tiny:KIND`` for the tiny test pipelines);
- group ``ice_lightning.pipeline_classes``: pipeline classes that diffusers does not know, by the class
  name written in a saved folder's ``model_index.json`` (this package registers ``PixelDiffusionPipeline``);
- group ``ice_lightning.erase_reports``: by pipeline class name, a report hook (:class:`EraseReport`): what
  ``ice-lightning erase`` shows for such a pipeline instead of the text-space table (the shapes world samples
  images before and after). It reports; the command itself erases and exports.

A local folder always wins over a registered name of the same spelling.

Example:
    >>> from ice_lightning.core.pipelines import registered_pipelines
    >>> {"shapes-image", "tiny"} <= set(registered_pipelines())
    True
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import torch

if TYPE_CHECKING:
    from .concepts import ConceptSpec
    from .result import ErasureResult

__all__ = ["load_pipeline", "load_pipeline_folder", "register_pipeline", "registered_pipelines", "erase_report",
           "EraseReport"]  # fmt: skip

_NAMES_GROUP = "ice_lightning.pipelines"
_CLASSES_GROUP = "ice_lightning.pipeline_classes"
_REPORTS_GROUP = "ice_lightning.erase_reports"
_REGISTERED: dict[str, Callable] = {}


def register_pipeline(name: str, factory: Callable) -> None:
    """Make ``load_pipeline(name)`` (or ``name:ARG``) call ``factory()`` (or ``factory(ARG)``)."""
    if ":" in name or not name:
        raise ValueError(f"a pipeline name is a non-empty word without ':', got {name!r}")
    _REGISTERED[name] = factory


def _entry_points(group: str) -> dict[str, metadata.EntryPoint]:
    return {ep.name: ep for ep in metadata.entry_points(group=group)}


def registered_pipelines() -> list[str]:
    """Names that :func:`load_pipeline` resolves besides folders and hub ids."""
    return sorted({*_entry_points(_NAMES_GROUP), *_REGISTERED})


def _factory(name: str) -> Callable | None:
    if name in _REGISTERED:
        return _REGISTERED[name]
    ep = _entry_points(_NAMES_GROUP).get(name)
    return ep.load() if ep is not None else None


def load_pipeline(pipeline: str, torch_dtype: str | torch.dtype = "float32", config: str | None = None):
    """The pipeline named ``pipeline``, in ``torch_dtype``: a local folder, a registered name (``NAME`` or
    ``NAME:ARG``), a single-file checkpoint (``.safetensors``, with ``config``: the diffusers folder whose configs
    ``from_single_file`` reads), else a hub id through ``from_pretrained``."""
    dtype = resolve_dtype(torch_dtype)
    if is_single_file(pipeline):
        return load_single_file_pipeline(pipeline, config, dtype)
    if config is not None:
        raise ValueError(f"a pipeline config ({config!r}) is read only with a single-file checkpoint (.safetensors); "
                         f"{pipeline!r} is not one: drop the config")  # fmt: skip
    if not Path(pipeline).exists():
        name, sep, arg = pipeline.partition(":")
        factory = _factory(name)
        if factory is not None:
            pipe = factory(arg) if sep else factory()
            return _cast(pipe, dtype)
        if _looks_like_a_path(pipeline):
            raise FileNotFoundError(f"no such folder: {pipeline!r} (a local pipeline folder, a hub id such as "
                                    "'org/model', or a registered name such as 'tiny:sd')")  # fmt: skip
    elif not (Path(pipeline) / "model_index.json").is_file():
        what = "a file" if Path(pipeline).is_file() else "a folder without model_index.json"
        raise ValueError(f"{pipeline!r} is not a pipeline folder: it is {what}. Pass the folder that "
                         "save_pretrained wrote (it holds model_index.json)")  # fmt: skip
    # float32 is what from_pretrained loads anyway; naming it would only pass transformers a deprecated keyword
    return load_pipeline_folder(pipeline, **({} if dtype == torch.float32 else {"torch_dtype": dtype}))


def is_single_file(pipeline: str) -> bool:
    """Whether ``pipeline`` names a single-file checkpoint (an existing ``.safetensors`` file)."""
    return Path(pipeline).suffix == ".safetensors" and Path(pipeline).is_file()


def load_single_file_pipeline(path: str, config: str | None, dtype: torch.dtype = torch.float32):
    """``from_single_file`` of an SD/SDXL checkpoint file, offline, with the configs of the diffusers folder
    ``config`` (its ``model_index.json`` names the pipeline class)."""
    import diffusers

    if config is None or not (Path(config) / "model_index.json").is_file():
        raise ValueError(f"{path!r} is a single-file checkpoint: pass the diffusers folder with its configs (one "
                         "that holds model_index.json, e.g. the base model's) as --pipeline-config (config=...), "
                         f"got {config!r}")  # fmt: skip
    name = json.loads((Path(config) / "model_index.json").read_text()).get("_class_name", "")
    cls = getattr(diffusers, name, None)
    if cls is None or not hasattr(cls, "from_single_file"):
        raise ValueError(f"{config}/model_index.json names {name!r}, which diffusers cannot load from a single file")
    kwargs = {} if dtype == torch.float32 else {"torch_dtype": dtype}
    return cls.from_single_file(path, config=str(config), local_files_only=True, **kwargs)


#: The dtypes a pipeline can be loaded in (what diffusers' models compute in).
DTYPES = ("float32", "float16", "bfloat16", "float64")


def resolve_dtype(torch_dtype: str | torch.dtype) -> torch.dtype:
    """``"float16"`` or ``torch.float16`` -> ``torch.float16``; anything else is refused with the valid names."""
    if isinstance(torch_dtype, torch.dtype) and str(torch_dtype).removeprefix("torch.") in DTYPES:
        return torch_dtype
    if isinstance(torch_dtype, str) and torch_dtype.removeprefix("torch.") in DTYPES:
        return getattr(torch, torch_dtype.removeprefix("torch."))
    raise ValueError(f"torch_dtype must be one of {', '.join(DTYPES)}, got {torch_dtype!r}")


def _looks_like_a_path(name: str) -> bool:
    """A name meant as a local path, not a hub id (``org/model``): relative or absolute, or with two slashes."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name or name.endswith("/")


def _cast(pipe, dtype: torch.dtype):
    """``pipe`` with every floating parameter in ``dtype``: only the components that are not cast (a no-op
    ``to()`` of a diffusers model would still warn about modules kept in float32)."""
    for component in getattr(pipe, "components", {}).values():
        if isinstance(component, torch.nn.Module) and any(
            p.is_floating_point() and p.dtype != dtype for p in component.parameters()
        ):
            component.to(dtype=dtype)
    return pipe


def load_pipeline_folder(path: str, **kwargs):
    """``from_pretrained`` of a local folder or hub id, with the class its ``model_index.json`` names when a
    plugin registered that class, and diffusers' ``DiffusionPipeline`` otherwise."""
    from diffusers import DiffusionPipeline

    index = Path(path) / "model_index.json"
    with _other_text_encoders_welcome():
        if index.is_file():
            ep = _entry_points(_CLASSES_GROUP).get(json.loads(index.read_text()).get("_class_name", ""))
            if ep is not None:
                return ep.load().from_pretrained(path, **kwargs)
        return DiffusionPipeline.from_pretrained(path, **kwargs)


class _TextEncoderTypeNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.getMessage()).startswith("Expected types for text_encoder")


@contextmanager
def _other_text_encoders_welcome():
    """While loading: drop diffusers' notice that a text encoder is not the class the pipeline's signature names.
    A pipeline built around another ``transformers`` encoder (a BERT in place of CLIP) is supported by design;
    every other message passes."""
    log = logging.getLogger("diffusers.pipelines.pipeline_utils")
    notice = _TextEncoderTypeNotice()
    log.addFilter(notice)
    try:
        yield
    finally:
        log.removeFilter(notice)


class EraseReport(Protocol):
    """What ``ice-lightning erase`` shows of one erasure of a pipeline, made by the factory registered for its class
    as ``factory(pipeline, samples=N, seed=S)``. The command calls :meth:`concept_spec`, :meth:`before`, erases,
    calls :meth:`after`, prints its text and ships its files in the export."""

    def concept_spec(self, **given) -> ConceptSpec:
        """The spec to erase with, from the :class:`~ice_lightning.core.concepts.ConceptSpec` fields the command's
        flags give (``None``: not given). A world of its own adds its synonyms, contexts and guide concept; the
        flags the user gave win."""

    def before(self) -> None:
        """Called just before the edit (sample the unedited model)."""

    def after(self, result: ErasureResult) -> tuple[str, dict[str, bytes]]:
        """Called after the edit: the text to print, and ``{file name: bytes}`` to ship in the export (an image
        grid, ``before_after.png``)."""


def erase_report(pipeline) -> Callable[..., EraseReport] | None:
    """The erase report factory registered for ``pipeline``'s class (or a base class), or ``None``: see
    :class:`EraseReport`."""
    reports = _entry_points(_REPORTS_GROUP)
    for cls in type(pipeline).__mro__:
        if cls.__name__ in reports:
            return reports[cls.__name__].load()
    return None
