"""Export an erased pipeline: diffusers ``save_pretrained`` + ``ice_manifest.json`` + the operators + a
model-card section; and :func:`verify_export`, which checks an export against its manifest.

- :mod:`.save`: :func:`save_erased` and the safe write (destination check, lock, temporary folder, atomic move);
- :mod:`.manifest`: the manifest, the operators file, the schema, the model card;
- :mod:`.lora`: the erasure alone as a LoRA, diffusers/PEFT (``format="lora"``) or kohya (``"lora-kohya"``);
- :mod:`.adapters`: a LoRA fine-tune's adapters, merged or shipped beside the model;
- :mod:`.verify`: :func:`verify_export`.

The manifest records what was erased (concepts, method, hyperparameters, layers and the embedding space each
reads), the library versions, the sha256 of every file of the export and of each edited tensor, and the concept
residual of each erasure through the shipped layers. ``ice_operators.safetensors`` holds the operators, so
:func:`verify_export` can recompute that residual and confirm that the erasure is present, not only that the bytes
match.
"""

from __future__ import annotations

from .adapters import ADAPTERS_DIR, Adapters, without_adapters
from .lora import LORA_FORMATS, LORA_NAME, erasure_lora
from .manifest import MANIFEST_NAME, OPERATORS_NAME, ExportVerificationError, load_manifest
from .save import ExportFormat, check_export_destination, export_lock, save_erased
from .verify import verify_export

__all__ = [
    "MANIFEST_NAME",
    "OPERATORS_NAME",
    "ExportVerificationError",
    "save_erased",
    "check_export_destination",
    "export_lock",
    "verify_export",
    "load_manifest",
    "without_adapters",
    "ADAPTERS_DIR",
    "Adapters",
    "ExportFormat",
    "LORA_NAME",
    "LORA_FORMATS",
    "erasure_lora",
]
