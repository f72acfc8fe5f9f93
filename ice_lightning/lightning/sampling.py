"""Validation by generated samples, a mixin of :class:`~ice_lightning.lightning.module.ICEModule`: samples of every
erased and preserved concept's held-out prompts with fixed noise, scored by the sample metrics
(:mod:`ice_lightning.lightning.sample_metrics`) and saved as an image grid."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..core.concepts import NEUTRAL_WORD
from ..core.preview import sample_grid
from .image_logging import log_image

__all__ = ["SamplingMixin"]


class SamplingMixin:
    """What :class:`~ice_lightning.lightning.module.ICEModule` generates and scores at validation; it reads the
    module's ``pipeline``, ``spec`` (the validation concepts), ``video``, ``hparams`` (``sample_steps``,
    ``guidance_scale``, ``num_samples``, ``metric_samples``) and ``_sample_metrics``."""

    def concept_prompts(self) -> dict[str, list[str]]:
        """``{concept: its held-out prompts}`` for every erased and preserved concept of ``validation_concepts``."""
        spec = self.spec
        out: dict[str, list[str]] = {}
        for p in spec.heldout_erase_prompts() + spec.heldout_near_prompts():
            out.setdefault(p.text[p.span[0] : p.span[1]], []).append(p.text)
        return out

    @torch.no_grad()
    def generate(self, prompts: list[str], seed: int = 0) -> torch.Tensor:
        """Samples of ``prompts`` (one each) as float tensors in [0, 1]: ``(N, 3, H, W)`` or clips
        ``(N, F, 3, H, W)``, with fixed noise."""
        g = torch.Generator(device=self.device).manual_seed(seed)
        out = self.pipeline(prompts, num_inference_steps=self.hparams.sample_steps, generator=g, output_type="np",
                            guidance_scale=self.hparams.guidance_scale)  # fmt: skip
        x = torch.from_numpy(np.asarray(out.frames if self.video else out.images)).float()
        return x.movedim(-1, -3)

    def score_samples(self) -> dict[str, float]:
        """Each sample metric on each concept's samples: ``{"val/<metric name>/<concept>": value}``."""
        prompts = self.concept_prompts()
        neutral = NEUTRAL_WORD[self.spec.family]
        scores = {}
        samples: dict[str, torch.Tensor] = {}
        for metric in self._sample_metrics:
            fixed, own_neutral = getattr(metric, "concept", None), getattr(metric, "neutral", None)
            concepts = [fixed] if fixed is not None else list(prompts)
            for concept in concepts:
                texts = prompts.get(concept) or [t.format(concept) for t in self.spec._eval_templates()]
                if concept not in samples:
                    samples[concept] = self.generate([t for t in texts for _ in range(self.hparams.metric_samples)])
                metric.concept, metric.neutral = concept, own_neutral or neutral
                metric.reset()
                metric.update(samples[concept])
                scores[f"val/{getattr(metric, 'name', type(metric).__name__)}/{concept}"] = float(metric.compute())
            metric.concept, metric.neutral = fixed, own_neutral
        return scores

    @torch.no_grad()
    def log_samples(self) -> Path | None:
        """Generate ``num_samples`` per erased concept, save a PNG grid under the log folder and send it to every
        logger of the trainer (:func:`~ice_lightning.lightning.image_logging.log_image`) from rank 0 (``None``
        elsewhere)."""
        prompts = [p.text for p in (self.spec.heldout_erase_prompts() if self.spec else [])] or [""]
        prompts = [p for p in prompts for _ in range(self.hparams.num_samples)]
        grid = sample_grid(self.generate(prompts))
        if not self.trainer.is_global_zero:
            return None
        folder = Path(self.trainer.log_dir or self.trainer.default_root_dir) / "samples"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"epoch{self.current_epoch:03d}.png"
        from PIL import Image

        Image.fromarray(grid).save(path)
        log_image(self.trainer.loggers, "samples", grid, self.global_step, written=path)
        return path
