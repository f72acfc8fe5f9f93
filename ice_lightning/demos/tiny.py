"""Tiny diffusers pipelines built from configs, offline (no hub): for tests, examples and the README demo.

Each builder returns a real pipeline object (``StableDiffusionPipeline``, ``FluxPipeline``, ...) whose
models are a few thousand parameters, with a word-level tokenizer made with ``tokenizers`` (it knows the
words of the default templates and concept lists). Save one with ``save_pretrained`` and load it back
with ``from_pretrained`` to exercise the real loading path::

    python -m ice_lightning.demos.tiny sd /tmp/tiny-sd
    ice-lightning erase --pipeline /tmp/tiny-sd --erase "Van Gogh" --family style --out /tmp/tiny-sd-erased
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import torch

from .tiny_parts import TEXT_DIM, _ddim, minilm_path, tiny_clip, tiny_t5, tiny_unet, tiny_vae, word_tokenizer

__all__ = ["TINY_KINDS", "build_tiny_pipeline", "main"]


def _sd(text_encoder=None, tokenizer=None):
    from diffusers import StableDiffusionPipeline

    tokenizer = word_tokenizer() if tokenizer is None else tokenizer
    text_encoder = tiny_clip(tokenizer) if text_encoder is None else text_encoder
    return StableDiffusionPipeline(
        vae=tiny_vae(),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=tiny_unet(text_encoder.config.hidden_size),
        scheduler=_ddim(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def _sdxl():
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    tok = word_tokenizer()
    unet = tiny_unet(
        2 * TEXT_DIM,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=6 * 8 + TEXT_DIM,
        transformer_layers_per_block=(1, 2),
        use_linear_projection=True,
    )
    return StableDiffusionXLPipeline(
        vae=tiny_vae(),
        text_encoder=tiny_clip(tok, seed=0),
        text_encoder_2=tiny_clip(tok, projection=True, seed=1),
        tokenizer=tok,
        tokenizer_2=word_tokenizer(),
        unet=unet,
        scheduler=EulerDiscreteScheduler(),
    )


def _sd3():
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(
        sample_size=8,
        patch_size=1,
        in_channels=4,
        num_layers=1,
        attention_head_dim=8,
        num_attention_heads=4,
        caption_projection_dim=32,
        joint_attention_dim=TEXT_DIM,
        pooled_projection_dim=2 * TEXT_DIM,
        out_channels=4,
    )
    tok = word_tokenizer()
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=tiny_vae(),
        text_encoder=tiny_clip(tok, projection=True, seed=0),
        tokenizer=tok,
        text_encoder_2=tiny_clip(tok, projection=True, seed=1),
        tokenizer_2=word_tokenizer(),
        text_encoder_3=tiny_t5(word_tokenizer(style="t5", max_length=256)),
        tokenizer_3=word_tokenizer(style="t5", max_length=256),
    )


def _flux():
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=4,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=TEXT_DIM,
        pooled_projection_dim=TEXT_DIM,
        axes_dims_rope=[4, 4, 8],
    )
    t5_tok = word_tokenizer(style="t5", max_length=512)
    clip_tok = word_tokenizer()
    return FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=tiny_vae(latent_channels=1),
        text_encoder=tiny_clip(clip_tok),
        tokenizer=clip_tok,
        text_encoder_2=tiny_t5(t5_tok),
        tokenizer_2=t5_tok,
        transformer=transformer,
    )


def _pixart():
    from diffusers import PixArtAlphaPipeline, PixArtTransformer2DModel

    torch.manual_seed(0)
    transformer = PixArtTransformer2DModel(
        sample_size=8,
        num_layers=2,
        patch_size=2,
        attention_head_dim=8,
        num_attention_heads=3,
        caption_channels=TEXT_DIM,
        in_channels=4,
        cross_attention_dim=24,
        out_channels=8,
        attention_bias=True,
        activation_fn="gelu-approximate",
        num_embeds_ada_norm=1000,
        norm_type="ada_norm_single",
        norm_elementwise_affine=False,
        norm_eps=1e-6,
    )
    tok = word_tokenizer(style="t5", max_length=120)
    return PixArtAlphaPipeline(
        tokenizer=tok, text_encoder=tiny_t5(tok), vae=tiny_vae(), transformer=transformer, scheduler=_ddim()
    )


def _text2video(text_encoder=None, tokenizer=None):
    from diffusers import TextToVideoSDPipeline, UNet3DConditionModel

    tok = word_tokenizer() if tokenizer is None else tokenizer
    text_encoder = tiny_clip(tok) if text_encoder is None else text_encoder
    torch.manual_seed(0)
    unet = UNet3DConditionModel(
        block_out_channels=(16, 32),
        layers_per_block=1,
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"),
        up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"),
        cross_attention_dim=text_encoder.config.hidden_size,
        attention_head_dim=4,
        norm_num_groups=4,
    )
    return TextToVideoSDPipeline(
        vae=tiny_vae(), text_encoder=text_encoder, tokenizer=tok, unet=unet, scheduler=_ddim()
    )


def _animatediff():
    from diffusers import AnimateDiffPipeline, MotionAdapter

    tok = word_tokenizer()
    torch.manual_seed(0)
    adapter = MotionAdapter(
        block_out_channels=(32, 64),
        motion_layers_per_block=1,
        motion_norm_num_groups=2,
        motion_num_attention_heads=2,
    )
    return AnimateDiffPipeline(
        vae=tiny_vae(),
        text_encoder=tiny_clip(tok),
        tokenizer=tok,
        unet=tiny_unet(TEXT_DIM, block_out_channels=(32, 64), attention_head_dim=8, norm_num_groups=2),
        motion_adapter=adapter,
        scheduler=_ddim(),
        feature_extractor=None,
        image_encoder=None,
    )


def _cogvideox():
    from diffusers import AutoencoderKLCogVideoX, CogVideoXPipeline, CogVideoXTransformer3DModel

    torch.manual_seed(0)
    transformer = CogVideoXTransformer3DModel(
        num_attention_heads=4,
        attention_head_dim=8,
        in_channels=4,
        out_channels=4,
        time_embed_dim=2,
        text_embed_dim=TEXT_DIM,
        num_layers=1,
        sample_width=2,
        sample_height=2,
        sample_frames=9,
        patch_size=2,
        temporal_compression_ratio=4,
        max_text_seq_length=16,
    )
    torch.manual_seed(0)
    vae = AutoencoderKLCogVideoX(
        in_channels=3,
        out_channels=3,
        down_block_types=("CogVideoXDownBlock3D",) * 4,
        up_block_types=("CogVideoXUpBlock3D",) * 4,
        block_out_channels=(8, 8, 8, 8),
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=2,
        temporal_compression_ratio=4,
    )
    tok = word_tokenizer(style="t5", max_length=226)
    return CogVideoXPipeline(
        tokenizer=tok, text_encoder=tiny_t5(tok), vae=vae, transformer=transformer, scheduler=_ddim()
    )


def _wan():
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel

    torch.manual_seed(0)
    vae = AutoencoderKLWan(
        base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True]
    )
    torch.manual_seed(0)
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=12,
        in_channels=16,
        out_channels=16,
        text_dim=TEXT_DIM,
        freq_dim=256,
        ffn_dim=32,
        num_layers=2,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32,
    )
    tok = word_tokenizer(style="t5", max_length=512)
    return WanPipeline(
        tokenizer=tok,
        text_encoder=tiny_t5(tok, umt5=True),
        vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0),
        transformer=transformer,
    )


def _wan22():
    """Wan 2.2 with two experts: ``transformer`` for the high-noise steps, ``transformer_2`` for the rest."""
    from diffusers import WanPipeline, WanTransformer3DModel

    pipe = _wan()
    torch.manual_seed(1)
    second = WanTransformer3DModel(**{k: v for k, v in pipe.transformer.config.items() if not k.startswith("_")})
    return WanPipeline(tokenizer=pipe.tokenizer, text_encoder=pipe.text_encoder, vae=pipe.vae, scheduler=pipe.scheduler,
                       transformer=pipe.transformer, transformer_2=second, boundary_ratio=0.875)  # fmt: skip


def _ltx():
    from diffusers import (
        AutoencoderKLLTXVideo,
        FlowMatchEulerDiscreteScheduler,
        LTXPipeline,
        LTXVideoTransformer3DModel,
    )

    torch.manual_seed(0)
    transformer = LTXVideoTransformer3DModel(
        in_channels=8,
        out_channels=8,
        patch_size=1,
        patch_size_t=1,
        num_attention_heads=4,
        attention_head_dim=8,
        cross_attention_dim=32,
        num_layers=1,
        caption_channels=TEXT_DIM,
    )
    torch.manual_seed(0)
    vae = AutoencoderKLLTXVideo(
        in_channels=3,
        out_channels=3,
        latent_channels=8,
        block_out_channels=(8, 8, 8, 8),
        decoder_block_out_channels=(8, 8, 8, 8),
        layers_per_block=(1, 1, 1, 1, 1),
        decoder_layers_per_block=(1, 1, 1, 1, 1),
        spatio_temporal_scaling=(True, True, False, False),
        decoder_spatio_temporal_scaling=(True, True, False, False),
        decoder_inject_noise=(False, False, False, False, False),
        upsample_residual=(False, False, False, False),
        upsample_factor=(1, 1, 1, 1),
        timestep_conditioning=False,
        patch_size=1,
        patch_size_t=1,
        encoder_causal=True,
        decoder_causal=False,
    )
    tok = word_tokenizer(style="t5", max_length=128)
    return LTXPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=vae,
        text_encoder=tiny_t5(tok),
        tokenizer=tok,
        transformer=transformer,
    )


def _minilm():
    from transformers import AutoModel, AutoTokenizer

    path = minilm_path()
    # Stable Diffusion pipelines pad every prompt to the tokenizer's maximum length and pass no attention mask. The
    # MiniLM tokenizer's is 512, which would make each prompt 512 positions that every text layer reads (and 7x
    # the encoding cost); 77 is what these pipelines pad CLIP's prompts to.
    return {"text_encoder": AutoModel.from_pretrained(path),
            "tokenizer": AutoTokenizer.from_pretrained(path, model_max_length=77)}


def _sd_minilm():
    """SD pipeline whose text encoder is the real pretrained MiniLM (BERT, 384-d)."""
    return _sd(**_minilm())


def _text2video_minilm():
    """TextToVideoSD (UNet3D) pipeline whose text encoder is the real pretrained MiniLM."""
    return _text2video(**_minilm())


TINY_KINDS: dict[str, Callable] = {
    "sd": _sd,
    "sdxl": _sdxl,
    "sd3": _sd3,
    "flux": _flux,
    "pixart": _pixart,
    "text2video": _text2video,
    "animatediff": _animatediff,
    "cogvideox": _cogvideox,
    "wan": _wan,
    "wan22": _wan22,
    "ltx": _ltx,
    "sd-minilm": _sd_minilm,
    "text2video-minilm": _text2video_minilm,
}


def build_tiny_pipeline(kind: str):
    """A tiny pipeline of ``kind`` (one of :data:`TINY_KINDS`), random weights, built offline."""
    if kind not in TINY_KINDS:
        raise ValueError(f"unknown tiny pipeline {kind!r}; choose one of {sorted(TINY_KINDS)}")
    pipe = TINY_KINDS[kind]()
    for comp in pipe.components.values():  # as from_pretrained leaves them: no dropout
        if isinstance(comp, torch.nn.Module):
            comp.eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def main(argv: list[str] | None = None) -> int:
    """``python -m ice_lightning.demos.tiny KIND OUT_DIR``: build a tiny pipeline and save it."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print(f"usage: python -m ice_lightning.demos.tiny {{{','.join(TINY_KINDS)}}} OUT_DIR", file=sys.stderr)
        return 2
    build_tiny_pipeline(args[0]).save_pretrained(args[1])
    print(f"saved a tiny {args[0]} pipeline to {args[1]}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
