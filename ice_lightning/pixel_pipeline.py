"""A text-conditioned pixel-space diffusion pipeline (no VAE) for small worlds such as the shapes world.

``PixelDiffusionPipeline`` holds a ``UNet2DConditionModel`` (images) or a video UNet (``UNet3DConditionModel``,
``UNetMotionModel``, ``UNetSpatioTemporalConditionModel``: clips) that denoises pixels directly, a
``transformers`` text encoder with its tokenizer, and a scheduler. It follows the Stable Diffusion
pipeline's conventions (``encode_prompt``, classifier-free guidance, the text encoder gets the attention
mask when its config says ``use_attention_mask``), so ICE finds its ``attn2.to_k/to_v`` layers and encodes
concepts exactly as for SD, and ``ICEModule`` trains it.

``save_pretrained``/``from_pretrained`` work as for any diffusers pipeline; diffusers' generic
``DiffusionPipeline.from_pretrained`` does not know this class, so use :func:`load_pipeline_folder` (which
every loader of this package calls) or ``PixelDiffusionPipeline.from_pretrained``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers import DiffusionPipeline
from diffusers.utils import BaseOutput

from .layers import VIDEO_UNETS, denoise

__all__ = ["PixelDiffusionPipeline", "PixelPipelineOutput", "load_pipeline_folder"]


@dataclass
class PixelPipelineOutput(BaseOutput):
    """``images`` (N, H, W, 3) or ``frames`` (N, F, H, W, 3), in [0, 1] (``np``) or as tensors (``pt``)."""

    images: np.ndarray | torch.Tensor | None = None
    frames: np.ndarray | torch.Tensor | None = None


class PixelDiffusionPipeline(DiffusionPipeline):
    """Pixel-space text-to-image (UNet2D) or text-to-video (UNet3D, UNetMotion) diffusion."""

    model_cpu_offload_seq = "text_encoder->unet"
    #: Frames of a clip when ``num_frames`` is not given (the shapes video model is trained on 6).
    default_num_frames = 6

    def __init__(self, unet, text_encoder, tokenizer, scheduler) -> None:
        super().__init__()
        self.register_modules(unet=unet, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler)
        self.vae_scale_factor = 1

    @property
    def video(self) -> bool:
        return type(self.unet).__name__ in VIDEO_UNETS

    @torch.no_grad()
    def _encode(self, texts: list[str], device) -> torch.Tensor:
        tok = self.tokenizer(texts, padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt")  # fmt: skip
        mask = tok.attention_mask.to(device) if getattr(self.text_encoder.config, "use_attention_mask", False) else None
        return self.text_encoder(tok.input_ids.to(device), attention_mask=mask)[0]

    def encode_prompt(self, prompt, device=None, num_images_per_prompt: int = 1,
                      do_classifier_free_guidance: bool = False, negative_prompt=None):  # fmt: skip
        """``(prompt_embeds, negative_prompt_embeds)`` as in Stable Diffusion (negative: ``""`` by default)."""
        device = device or self._execution_device
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        embeds = self._encode(prompts, device).repeat_interleave(num_images_per_prompt, 0)
        negative = None
        if do_classifier_free_guidance:
            neg = negative_prompt or ""
            neg = [neg] * len(prompts) if isinstance(neg, str) else list(neg)
            negative = self._encode(neg, device).repeat_interleave(num_images_per_prompt, 0)
        return embeds, negative

    @torch.no_grad()
    def __call__(self, prompt, num_inference_steps: int = 25, guidance_scale: float = 4.0,
                 generator: torch.Generator | None = None, num_frames: int | None = None, height: int | None = None,
                 width: int | None = None, output_type: str = "np", prompt_embeds: torch.Tensor | None = None,
                 negative_prompt_embeds: torch.Tensor | None = None) -> PixelPipelineOutput:  # fmt: skip
        """Sample with classifier-free guidance (``guidance_scale > 1``); ``prompt_embeds`` replace the text
        (the image-level attack optimises them)."""
        device = self._execution_device
        cfg = guidance_scale > 1.0
        if prompt_embeds is None:
            prompt_embeds, negative_prompt_embeds = self.encode_prompt(prompt, device, 1, cfg)
        elif cfg and negative_prompt_embeds is None:
            negative_prompt_embeds = self.encode_prompt([""] * prompt_embeds.shape[0], device, 1, True)[1]
        n = prompt_embeds.shape[0]
        size = self.unet.config.sample_size
        h, w = height or size, width or size
        c = self.unet.config.in_channels
        shape = (n, c, num_frames or self.default_num_frames, h, w) if self.video else (n, c, h, w)
        x = torch.randn(shape, generator=generator, device="cpu", dtype=prompt_embeds.dtype).to(device)
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        x = x * self.scheduler.init_noise_sigma
        cond = torch.cat([negative_prompt_embeds, prompt_embeds]) if cfg else prompt_embeds
        for t in self.progress_bar(self.scheduler.timesteps):
            inp = torch.cat([x, x]) if cfg else x
            inp = self.scheduler.scale_model_input(inp, t)
            out = denoise(self.unet, inp, t, cond)
            if cfg:
                uncond, text = out.chunk(2)
                out = uncond + guidance_scale * (text - uncond)
            x = self.scheduler.step(out, t, x).prev_sample
        pixels = ((x.clamp(-1, 1) + 1) / 2).float()
        if self.video:
            pixels = pixels.permute(0, 2, 1, 3, 4)  # (N, F, 3, H, W)
        if output_type == "np":
            pixels = pixels.movedim(-3, -1).cpu().numpy()
        return PixelPipelineOutput(frames=pixels) if self.video else PixelPipelineOutput(images=pixels)


def load_pipeline_folder(path: str, **kwargs):
    """``from_pretrained`` of a local folder or hub id, using :class:`PixelDiffusionPipeline` when the
    folder's ``model_index.json`` names it and diffusers' ``DiffusionPipeline`` otherwise."""
    index = Path(path) / "model_index.json"
    if index.is_file() and json.loads(index.read_text()).get("_class_name") == PixelDiffusionPipeline.__name__:
        return PixelDiffusionPipeline.from_pretrained(path, **kwargs)
    return DiffusionPipeline.from_pretrained(path, **kwargs)
