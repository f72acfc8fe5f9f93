"""The erased model as one checkpoint file in the original (LDM/SGM) key layout, the file Automatic1111, Forge,
ComfyUI, InvokeAI and diffusers' ``from_single_file`` read (``format="single-file"``): SD 1.x/2.x and SDXL.

Two paths:

- the pipeline was loaded from a single file (``from_single_file``): pass that file as ``source``; the export is a
  copy of it in which only the edited tensors are replaced, every other tensor (and the file's metadata) byte for
  byte the user's. Which key of the file holds an edited layer is found by diffusers' own single-file conversion
  (``convert_ldm_unet_checkpoint``), by tensor identity: no key table of ours decides it.
- otherwise the whole checkpoint is written: UNet, VAE and text encoders renamed to the original layout, and the
  result converted back with diffusers' own conversion before anything is written; every tensor must come back
  under the diffusers name it left (:func:`single_file_state_dict`), so a renaming mistake is an error, never a
  file that loads wrongly.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch
from torch import Tensor

__all__ = ["SINGLE_FILE_NAME", "SingleFileError", "check_single_file", "single_file_keys", "single_file_state_dict",
           "write_single_config", "write_single_file", "load_single_file"]

#: The checkpoint file of a ``format="single-file"`` export.
SINGLE_FILE_NAME = "model.safetensors"

_UNET = "model.diffusion_model."
_VAE = "first_stage_model."
_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "norm2": "out_layers.0",
           "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}  # fmt: skip
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
# Where each pipeline class keeps its text encoders in the original file, and in which layout.
_TEXT_ENCODERS = {
    "StableDiffusionPipeline": {"text_encoder": ("cond_stage_model.transformer.", "clip")},
    "StableDiffusionXLPipeline": {"text_encoder": ("conditioner.embedders.0.transformer.", "clip"),
                                  "text_encoder_2": ("conditioner.embedders.1.model.", "open_clip")},  # fmt: skip
}


class SingleFileError(ValueError):
    """The pipeline (or the given file) has no single-file layout this package can write and check."""


# SD 2.x's text encoder (OpenCLIP ViT-H, 1024 wide) keeps OpenCLIP's layout in the original file; SD 1.x's (CLIP
# ViT-L, 768) the transformers one.
_SD2_TEXT_WIDTH = 1024


def _check_pipeline(pipeline) -> dict[str, tuple[str, str]]:
    kind = type(pipeline).__name__
    if kind not in _TEXT_ENCODERS:
        raise SingleFileError(
            f"format='single-file' writes the original (LDM/SGM) checkpoint of SD 1.x/2.x and SDXL pipelines; "
            f"{kind} has none this package writes: export the diffusers folder (format='merged') or a LoRA "
            "(format='lora')"
        )
    encoders = dict(_TEXT_ENCODERS[kind])
    if kind == "StableDiffusionPipeline" and pipeline.text_encoder.config.hidden_size == _SD2_TEXT_WIDTH:
        encoders["text_encoder"] = ("cond_stage_model.model.", "open_clip")
    if kind == "StableDiffusionPipeline" and not hasattr(pipeline.text_encoder, "text_model") and \
            type(pipeline.text_encoder).__name__ != "CLIPTextModel":  # fmt: skip
        raise SingleFileError(f"format='single-file': the text encoder {type(pipeline.text_encoder).__name__} is "
                              "not a CLIP text model, which the original SD layout holds")  # fmt: skip
    layers = pipeline.unet.config.layers_per_block
    if not isinstance(layers, int):
        raise SingleFileError(f"format='single-file': a UNet with layers_per_block={layers!r} (one per block) has "
                              "no original layout; export format='merged'")  # fmt: skip
    return encoders


def _unet_key(key: str, config) -> str:
    """The original name of UNet tensor ``key`` (diffusers' ``UNet2DConditionModel`` layout)."""
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

    table = DIFFUSERS_TO_LDM_MAPPING["unet"]
    for group in ("layers", "class_embed_type", "addition_embed_type"):
        if key in table[group]:
            return table[group][key]
    step = config.layers_per_block + 1  # each level: its resnets, then the down- (or up-) sampler
    m = re.match(r"(down|up)_blocks\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.(.*)", key)
    if m:
        side, i, part, j, rest = m[1], int(m[2]), m[3], int(m[4]), m[5]
        if part == "downsamplers":
            return f"input_blocks.{(i + 1) * step}.0.op.{rest.removeprefix('conv.')}"
        if part == "upsamplers":
            has_attention = "CrossAttn" in config.up_block_types[i]  # then the upsampler follows the attention
            return f"output_blocks.{i * step + step - 1}.{2 if has_attention else 1}.{rest}"
        index = 1 + i * step + j if side == "down" else i * step + j
        blocks = "input_blocks" if side == "down" else "output_blocks"
        return f"{blocks}.{index}.{1 if part == 'attentions' else 0}.{_resnet(rest) if part == 'resnets' else rest}"
    m = re.match(r"mid_block\.(resnets|attentions)\.(\d+)\.(.*)", key)
    if m:
        if m[1] == "attentions":
            return f"middle_block.1.{m[3]}"
        return f"middle_block.{2 * int(m[2])}.{_resnet(m[3])}"
    raise SingleFileError(f"format='single-file': the UNet tensor {key!r} has no place in the original layout")


def _resnet(rest: str) -> str:
    head, _, tail = rest.partition(".")
    return f"{_RESNET.get(head, head)}.{tail}"


def _vae_key(key: str, levels: int) -> str:
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

    table = DIFFUSERS_TO_LDM_MAPPING["vae"]
    if key in table:
        return table[key]
    m = re.match(r"(encoder|decoder)\.(down|up)_blocks\.(\d+)\.(resnets|downsamplers|upsamplers)\.(\d+)\.(.*)", key)
    if m:
        side, i, part, j, rest = m[1], int(m[3]), m[4], int(m[5]), m[6]
        level = i if side == "encoder" else levels - 1 - i  # the decoder's levels are numbered from the bottom
        where = f"{side}.{'down' if side == 'encoder' else 'up'}.{level}"
        if part == "resnets":
            return f"{where}.block.{j}.{rest.replace('conv_shortcut', 'nin_shortcut')}"
        return f"{where}.{'downsample' if part == 'downsamplers' else 'upsample'}.{rest}"
    m = re.match(r"(encoder|decoder)\.mid_block\.(resnets|attentions)\.(\d+)\.(.*)", key)
    if m:
        if m[2] == "resnets":
            return f"{m[1]}.mid.block_{int(m[3]) + 1}.{m[4]}"
        layer, _, param = m[4].rpartition(".")
        return f"{m[1]}.mid.attn_1.{_VAE_ATTENTION[layer]}.{param}"
    raise SingleFileError(f"format='single-file': the VAE tensor {key!r} has no place in the original layout")


def _clip_tensors(encoder, prefix: str) -> dict[str, Tensor]:
    """A transformers CLIP text encoder in the original layout (``<prefix>text_model.*``)."""
    out = {}
    for k, v in encoder.state_dict().items():
        if k.startswith("text_projection"):
            raise SingleFileError("format='single-file': a CLIP text encoder with a projection has no place in the "
                                  "original layout of this slot")  # fmt: skip
        out[prefix + (k if k.startswith("text_model.") else f"text_model.{k}")] = v
    return out


def _open_clip_tensors(encoder, prefix: str) -> dict[str, Tensor]:
    """A transformers CLIP text encoder with projection in OpenCLIP's layout (SDXL's second encoder, SD 2.x): q, k
    and v joined into ``in_proj``, the projection transposed, the rest renamed by diffusers' own table."""
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

    table = DIFFUSERS_TO_LDM_MAPPING["openclip"]
    sd = {(k if k.startswith(("text_model.", "text_projection")) else f"text_model.{k}"): v
          for k, v in encoder.state_dict().items()}  # fmt: skip
    out = {}
    for k, v in sd.items():
        if k in table["layers"]:
            out[prefix + table["layers"][k]] = v.T.contiguous() if k == "text_projection.weight" else v
            continue
        m = re.match(r"(text_model\.encoder\.layers\.\d+\.self_attn)\.([qkv])_proj\.(weight|bias)", k)
        if m:
            if m[2] == "q":
                parts = [sd[f"{m[1]}.{x}_proj.{m[3]}"] for x in "qkv"]
                out[prefix + "transformer." + _open_clip_name(f"{m[1]}.in_proj_{m[3]}")] = torch.cat(parts)
            continue
        if k.startswith("text_model.encoder."):
            out[prefix + "transformer." + _open_clip_name(k)] = v
            continue
        if k.endswith("position_ids"):
            continue
        raise SingleFileError(f"format='single-file': the text encoder tensor {k!r} has no place in OpenCLIP's layout")
    return out


def _open_clip_name(key: str) -> str:
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

    for new, old in DIFFUSERS_TO_LDM_MAPPING["openclip"]["transformer"].items():
        key = key.replace(new, old)
    return key


def single_file_state_dict(pipeline) -> dict[str, Tensor]:
    """The whole pipeline (UNet, VAE, text encoders) as one original-layout state dict, its tensors the pipeline's
    own (no copies). Checked before it is returned: diffusers' single-file conversion of it gives back every
    diffusers tensor under its own name, equal bit for bit."""
    encoders = _check_pipeline(pipeline)
    unet, vae = pipeline.unet, pipeline.vae
    out: dict[str, Tensor] = {}
    for k, v in unet.state_dict().items():
        out[_UNET + _unet_key(k, unet.config)] = v
    levels = len(vae.config.block_out_channels)
    for k, v in vae.state_dict().items():
        name = _vae_key(k, levels)
        out[_VAE + name] = v[:, :, None, None] if ".mid.attn_1." in name and v.ndim == 2 else v
    for comp, (prefix, layout) in encoders.items():
        enc = getattr(pipeline, comp)
        out.update(_clip_tensors(enc, prefix) if layout == "clip" else _open_clip_tensors(enc, prefix))
    _check_round_trip(pipeline, out, encoders)
    return out


def _converted_back(pipeline, checkpoint: dict[str, Tensor], encoders: dict) -> dict[str, dict[str, Tensor]]:
    """diffusers' own single-file conversion of ``checkpoint``, per component."""
    from diffusers.loaders import single_file_utils as sf

    back = {
        "unet": sf.convert_ldm_unet_checkpoint(checkpoint, dict(pipeline.unet.config)),
        "vae": sf.convert_ldm_vae_checkpoint(checkpoint, dict(pipeline.vae.config)),
    }
    for comp, (prefix, layout) in encoders.items():
        enc = getattr(pipeline, comp)
        if layout == "clip":
            back[comp] = sf.convert_ldm_clip_checkpoint(checkpoint, remove_prefix=prefix)
        else:
            back[comp] = sf.convert_open_clip_checkpoint(enc, checkpoint, prefix=prefix)
    return back


def _check_round_trip(pipeline, checkpoint: dict[str, Tensor], encoders: dict) -> None:
    back = _converted_back(pipeline, checkpoint, encoders)
    for comp, converted in back.items():
        own = {(k if comp not in encoders or k.startswith(("text_model.", "text_projection")) else f"text_model.{k}"): v
               for k, v in getattr(pipeline, comp).state_dict().items() if not k.endswith("position_ids")}  # fmt: skip
        converted = {k: v for k, v in converted.items() if not k.endswith("position_ids")}
        missing, extra = sorted(set(own) - set(converted)), sorted(set(converted) - set(own))
        wrong = [k for k in sorted(set(own) & set(converted))
                 if converted[k].shape != own[k].shape or not torch.equal(converted[k], own[k])]  # fmt: skip
        if missing or extra or wrong:
            raise SingleFileError(
                f"format='single-file': diffusers' single-file conversion does not give back the {comp} of "
                f"{type(pipeline).__name__} (missing {missing[:3]}, unexpected {extra[:3]}, different {wrong[:3]}): "
                "this diffusers version reads another layout; export format='merged'"
            )


def single_file_keys(path: str | os.PathLike, pipeline, layers: list[str]) -> dict[str, str]:
    """``{layer: key}``: where the single file at ``path`` holds the weight of each edited UNet layer (``unet.<name>``),
    found by diffusers' own conversion of the file's UNet tensors, by identity (each converted tensor is the one
    read from the file)."""
    from diffusers.loaders import single_file_utils as sf
    from safetensors import safe_open

    outside = sorted({n.split(".", 1)[0] for n in layers} - {"unet"})
    if outside:
        raise SingleFileError(f"format='single-file' patches the UNet of a single file; this erasure edits its "
                              f"{', '.join(outside)}")  # fmt: skip
    with safe_open(str(path), framework="pt") as f:
        keys = list(f.keys())
    # Placeholders, one per tensor, whose identity the conversion keeps: no tensor is read to map the keys.
    probe = {k: torch.empty(0) for k in keys if k.startswith(_UNET)}
    if not probe:
        raise SingleFileError(f"{path} holds no UNet tensors ({_UNET}...): it is not an SD/SDXL single-file "
                              "checkpoint")  # fmt: skip
    converted = sf.convert_ldm_unet_checkpoint(probe, dict(pipeline.unet.config))
    by_id = {id(v): k for k, v in probe.items()}
    out = {}
    for layer in layers:
        name = layer.removeprefix("unet.") + ".weight"
        if name not in converted or id(converted[name]) not in by_id:
            raise SingleFileError(f"{path} holds no tensor that diffusers' conversion maps to {layer}.weight: it is "
                                  "not the file this pipeline was loaded from")  # fmt: skip
        out[layer] = by_id[id(converted[name])]
    return out


def check_single_file(pipeline, source: str | os.PathLike | None, layers: list[str]) -> None:
    """Refuse, before anything is written, a ``format="single-file"`` export this pipeline (or ``source``) cannot
    take: the layout is checked through diffusers' conversion, and ``source``'s keys for the edited layers found."""
    if source is None:
        single_file_state_dict(pipeline)
        return
    source = Path(source)
    if source.suffix != ".safetensors" or not source.is_file():
        raise SingleFileError(f"source_file={str(source)!r} is not a .safetensors file: pass the single file the "
                              "pipeline was loaded from, or no source_file to write the whole checkpoint")  # fmt: skip
    _check_pipeline(pipeline)
    single_file_keys(source, pipeline, layers)


def write_single_file(pipeline, target: Path, source: str | os.PathLike | None, layers: list[str]) -> dict:
    """Write the single file of ``pipeline`` to ``target``; return what the manifest records of it (its format, the
    key of each edited layer, and the sha256 of each edited tensor as written)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from ..editing import tensor_sha256

    if source is None:
        tensors = {k: v.detach().cpu().contiguous() for k, v in single_file_state_dict(pipeline).items()}
        names = {layer: _UNET + _unet_key(layer.removeprefix("unet.") + ".weight", pipeline.unet.config)
                 for layer in layers}  # fmt: skip
        metadata = {"format": "pt"}
    else:
        source = Path(source)
        names = single_file_keys(source, pipeline, layers)
        edited = {key: _layer_weight(pipeline, layer) for layer, key in names.items()}
        with safe_open(str(source), framework="pt") as f:
            metadata = f.metadata()
            tensors = {}
            for k in f.keys():
                if k not in edited:
                    tensors[k] = f.get_tensor(k)
                    continue
                before = f.get_slice(k)
                if list(before.get_shape()) != list(edited[k].shape):
                    raise SingleFileError(f"{source}: {k} has shape {before.get_shape()}, the erased layer "
                                          f"{tuple(edited[k].shape)}: not the file this pipeline was loaded from")
                tensors[k] = edited[k].to(_dtype_of(before.get_dtype())).contiguous()
    save_file(tensors, str(target), metadata=metadata)
    return {
        "export_format": "single-file",
        "single_file": target.name,
        "single_file_source": None if source is None else Path(source).name,
        "single_file_keys": names,
        "edited_tensors": {f"{layer}.weight": tensor_sha256(tensors[key]) for layer, key in names.items()},
    }


def write_single_config(pipeline, folder: Path) -> None:
    """The diffusers configs (and tokenizers) ``from_single_file(..., config=folder)`` reads offline, no weights."""
    folder.mkdir()
    pipeline.save_config(folder)
    for name, comp in pipeline.components.items():
        if comp is None:
            continue
        if hasattr(comp, "save_config"):  # diffusers models and schedulers
            comp.save_config(folder / name)
        elif hasattr(comp, "config") and hasattr(comp.config, "save_pretrained"):  # transformers models
            comp.config.save_pretrained(folder / name)
        elif hasattr(comp, "save_pretrained"):  # tokenizers, feature extractors
            comp.save_pretrained(folder / name)


def _layer_weight(pipeline, layer: str) -> Tensor:
    from ..parts import resolve_layer

    return resolve_layer(pipeline, layer).weight.detach().cpu()


_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def _dtype_of(name: str) -> torch.dtype:
    if name not in _SAFETENSORS_DTYPES:
        raise SingleFileError(f"the source file stores an edited layer as {name}, which an erased weight cannot be "
                              "written as")  # fmt: skip
    return _SAFETENSORS_DTYPES[name]


def load_single_file(folder: Path, manifest: dict):
    """The pipeline of a ``format="single-file"`` export, by diffusers' ``from_single_file`` with the shipped
    configs (offline)."""
    import diffusers

    cls = getattr(diffusers, manifest["pipeline_class"])
    return cls.from_single_file(str(folder / manifest["single_file"]), config=str(folder / "config"),
                                local_files_only=True)  # fmt: skip
