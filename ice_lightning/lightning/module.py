"""``ICEModule``: fine-tune the denoiser of a diffusers pipeline (T2I or T2V) with Lightning.

Example:
    >>> from ice_lightning import ICEModule
    >>> module = ICEModule(pipeline="tiny:sd", validation_concepts={"erase": ["Van Gogh"], "family": "style"})
    >>> type(module.pipeline).__name__, module.objective
    ('StableDiffusionPipeline', 'epsilon')

The VAE and text encoders are frozen; the UNet is trained with the scheduler's own objective
(epsilon, v-prediction or flow matching) and classifier-free-guidance dropout. Validation logs the loss on
fixed noise, the text-space metrics of ``validation_concepts`` (:mod:`ice_lightning.core.probe`) against the
model as it was loaded, and, with ``num_samples > 0``, generated samples per erased concept.
"""

from __future__ import annotations

import inspect
import math
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule

from ..core.concepts import ConceptSpec
from ..core.families import FAMILIES, denoise, family_of
from ..core.pipelines import load_pipeline
from ..core.plan import denoisers, pipeline_spaces, text_conditioning_layers
from ..core.probe import TextSpaceProbe

__all__ = ["ICEModule", "LRSchedule", "TimestepBias"]

LRSchedule = Literal["constant", "cosine"]
TimestepBias = Literal["none", "later", "earlier"]


class ICEModule(LightningModule):
    """Fine-tunes the UNet of a diffusers pipeline; exposes it as ``self.pipeline`` for ``ICECallback``.

    Args:
        pipeline: local diffusers folder or hub id (``from_pretrained``), or a registered name
            (:func:`~ice_lightning.core.pipelines.load_pipeline`: ``"shapes-image"``, ``"tiny:sd"``...).
        learning_rate, weight_decay, betas: AdamW settings for the denoiser.
        cfg_dropout: probability of training a caption as "" (classifier-free guidance).
        gradient_checkpointing: trade compute for memory in the denoiser.
        torch_dtype: dtype the pipeline is loaded in.
        validation_concepts: keyword arguments of a ``ConceptSpec`` whose text-space metrics are logged at
            every validation (``{"erase": ["Van Gogh"], "family": "style"}``).
        red_team: keyword arguments of :class:`~ice_lightning.evaluation.attacks.RedTeam` (``{"paraphrases": [...]}``,
            ``{}`` for the defaults): the text-space attacks' success rates are logged at every validation
            as ``val/attack_<name>`` (needs ``validation_concepts``).
        num_samples: generated samples per erased concept logged at each validation (0: none).
        sample_steps, guidance_scale: sampling settings.
        seed: draw the training noise from ``seed`` and the global step, so a run resumed from a
            checkpoint trains exactly as the uninterrupted run (``None``: the global RNG).
        lr_schedule: ``"constant"`` or ``"cosine"`` (decay to 0 over the run's optimizer steps), after
            ``warmup_steps`` steps of linear warm-up.
        timestep_bias, timestep_bias_portion, timestep_bias_multiplier: as in diffusers' training scripts,
            draw the training timesteps of the ``"later"`` (noisiest) or ``"earlier"`` ``portion`` of the
            schedule ``multiplier`` times as often (``"none"``: uniform). What is decided only at the noisiest
            steps, such as which way a shape moves in a clip (at lower noise the noisy clip itself shows it),
            is otherwise learned from the text far too slowly.
    """

    def __init__(
        self,
        pipeline: str,
        learning_rate: float = 1e-4,
        weight_decay: float = 1e-2,
        betas: tuple[float, float] = (0.9, 0.999),
        cfg_dropout: float = 0.1,
        gradient_checkpointing: bool = False,
        torch_dtype: str = "float32",
        validation_concepts: dict[str, Any] | None = None,
        red_team: dict[str, Any] | None = None,
        num_samples: int = 0,
        sample_steps: int = 10,
        guidance_scale: float = 4.0,
        seed: int | None = 0,
        lr_schedule: LRSchedule = "constant",
        warmup_steps: int = 0,
        timestep_bias: TimestepBias = "none",
        timestep_bias_portion: float = 0.25,
        timestep_bias_multiplier: float = 1.0,
    ) -> None:
        super().__init__()
        if lr_schedule not in ("constant", "cosine"):
            raise ValueError(f"lr_schedule must be 'constant' or 'cosine', got {lr_schedule!r}")
        if timestep_bias not in ("none", "later", "earlier"):
            raise ValueError(f"timestep_bias must be 'none', 'later' or 'earlier', got {timestep_bias!r}")
        if not (0 < timestep_bias_portion <= 1 and timestep_bias_multiplier > 0):
            raise ValueError("timestep_bias_portion must be in (0, 1] and timestep_bias_multiplier > 0, got "
                             f"{timestep_bias_portion} and {timestep_bias_multiplier}")  # fmt: skip
        self.save_hyperparameters()
        pipe = load_pipeline(pipeline, torch_dtype)
        pipe.set_progress_bar_config(disable=True)
        self.pipeline = pipe
        denoiser = next(iter(denoisers(pipe).values()))
        if getattr(pipe, "unet", None) is None or not family_of(denoiser).trainable:
            trainable = ", ".join(sorted(n for n, f in FAMILIES.items() if f.trainable))
            raise NotImplementedError(
                f"ICEModule trains the denoiser families with a training call ({trainable}); "
                f"{type(denoiser).__name__} training is not implemented yet. ICECallback and ice_lightning.erase "
                "work with it from your own module"
            )
        self.unet = pipe.unet
        self.vae = getattr(pipe, "vae", None)  # None: a pixel-space model (PixelDiffusionPipeline)
        self.text_encoder = pipe.text_encoder
        for frozen in (self.vae, self.text_encoder, getattr(pipe, "text_encoder_2", None)):
            if frozen is not None:
                frozen.requires_grad_(False).eval()
        if gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
        self.video = family_of(self.unet).video
        sched = pipe.scheduler
        if "FlowMatch" in type(sched).__name__:
            self.objective = "flow_matching"
        else:
            from diffusers import DDPMScheduler

            self.noise_scheduler = DDPMScheduler.from_config(sched.config)
            self.objective = self.noise_scheduler.config.prediction_type
            if self.objective not in ("epsilon", "v_prediction", "sample"):
                raise ValueError(f"unknown prediction_type {self.objective!r} in the pipeline's scheduler config")
        self.spec = ConceptSpec(**validation_concepts) if validation_concepts else None
        # Reference outputs of the text-conditioning layers as loaded, before any erasure or training.
        self.probe = self._make_probe() if self.spec is not None else None
        if red_team is not None and self.spec is None:
            raise ValueError("red_team needs validation_concepts: the attacks target the erased concept(s)")
        self.red_team = None
        if red_team is not None:  # evaluation sits beside the product: imported only when asked for
            from ..evaluation.attacks import RedTeam

            self.red_team = RedTeam(self.probe.layers, self.probe.spaces, self.spec, **red_team)

    def _make_probe(self) -> TextSpaceProbe:
        return TextSpaceProbe(text_conditioning_layers(self.pipeline), pipeline_spaces(self.pipeline), self.spec)

    # -- conditioning and latents ------------------------------------------------------------------
    @torch.no_grad()
    def encode_text(self, captions: list[str]) -> dict[str, torch.Tensor]:
        """Denoiser keyword arguments for ``captions``, through the pipeline's own ``encode_prompt``."""
        pipe = self.pipeline
        params = inspect.signature(pipe.encode_prompt).parameters
        wanted = {"prompt": captions, "device": self.device, "num_images_per_prompt": 1,
                  "do_classifier_free_guidance": False}  # fmt: skip
        out = pipe.encode_prompt(**{k: v for k, v in wanted.items() if k in params})
        cond = {"encoder_hidden_states": out[0]}
        if getattr(self.unet.config, "addition_embed_type", None) == "text_time":  # SDXL
            size = self.unet.config.sample_size * pipe.vae_scale_factor
            time_ids = torch.tensor([[size, size, 0, 0, size, size]], device=self.device, dtype=out[0].dtype)
            cond["added_cond_kwargs"] = {"text_embeds": out[2], "time_ids": time_ids.repeat(len(captions), 1)}
        return cond

    @torch.no_grad()
    def encode_pixels(self, pixels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """VAE latents, scaled; videos (B, F, 3, H, W) become (B, C, F, h, w) as UNet3D expects."""
        b = pixels.shape[0]
        if self.vae is None:  # pixel space: the model denoises the pixels themselves
            return pixels.permute(0, 2, 1, 3, 4) if self.video else pixels
        flat = pixels.flatten(0, 1) if self.video else pixels
        dist = self.vae.encode(flat.to(self.vae.dtype)).latent_dist
        lat = dist.sample(generator) if generator is not None else dist.sample()
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        lat = (lat - shift) * self.vae.config.scaling_factor
        if self.video:
            lat = lat.unflatten(0, (b, -1)).permute(0, 2, 1, 3, 4)
        return lat

    def timestep_weights(self, n: int) -> torch.Tensor:
        """Sampling weights of the ``n`` training timesteps under ``timestep_bias`` (diffusers' scheme)."""
        w = torch.ones(n)
        if self.hparams.timestep_bias != "none":
            k = max(1, int(n * self.hparams.timestep_bias_portion))
            w[slice(n - k, n) if self.hparams.timestep_bias == "later" else slice(0, k)] *= (
                self.hparams.timestep_bias_multiplier
            )
        return w / w.sum()

    def draw_timesteps(self, b: int, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``b`` training timesteps in ``[0, n)`` drawn with :meth:`timestep_weights`."""
        w = self.timestep_weights(n).to(generator.device if generator is not None else self.device)
        return torch.multinomial(w, b, replacement=True, generator=generator)

    def diffusion_loss(self, batch: dict, generator: torch.Generator | None = None) -> torch.Tensor:
        """The scheduler's own objective on one batch (``generator`` fixes the noise, for validation)."""
        captions = list(batch["captions"])
        if self.training and self.hparams.cfg_dropout > 0:
            drop = torch.rand(len(captions), generator=generator, device=generator.device if generator else None)
            drop = drop.cpu() < self.hparams.cfg_dropout
            captions = ["" if d else c for c, d in zip(captions, drop.tolist(), strict=True)]
        x0 = self.encode_pixels(batch["pixel_values"], generator)
        noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        b = x0.shape[0]
        if self.objective == "flow_matching":
            sigma = torch.rand(b, generator=generator, device=x0.device, dtype=x0.dtype)
            if self.hparams.timestep_bias != "none":  # the bin the bias draws, then uniform inside it
                sigma = (self.draw_timesteps(b, 1000, generator).to(sigma) + sigma) / 1000
            s = sigma.view(-1, *([1] * (x0.dim() - 1)))
            noisy, target, t = (1 - s) * x0 + s * noise, noise - x0, sigma * 1000
        else:
            n = self.noise_scheduler.config.num_train_timesteps
            if self.hparams.timestep_bias == "none":
                t = torch.randint(0, n, (b,), generator=generator, device=x0.device)
            else:
                t = self.draw_timesteps(b, n, generator).to(x0.device)
            noisy = self.noise_scheduler.add_noise(x0, noise, t)
            target = {"epsilon": noise, "sample": x0}.get(self.objective)
            if target is None:
                target = self.noise_scheduler.get_velocity(x0, noise, t)
        pred = denoise(self.unet, noisy, t, **self.encode_text(captions))
        return F.mse_loss(pred.float(), target.float())

    # -- Lightning hooks -----------------------------------------------------------------------------
    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor | None:
        if len(batch["captions"]) == 0:  # every sample dropped (ICECallback(drop_concept_samples=True)): skip
            return None
        g = None
        if self.hparams.seed is not None:
            g = torch.Generator(device=self.device).manual_seed(self.hparams.seed * 1_000_003 + self.global_step)
        loss = self.diffusion_loss(batch, generator=g)
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=len(batch["captions"]))
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        g = torch.Generator(device=self.device).manual_seed(1234 + batch_idx)
        loss = self.diffusion_loss(batch, generator=g)
        self.log("val/loss", loss, prog_bar=True, batch_size=len(batch["captions"]), sync_dist=True)
        return loss

    def test_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        g = torch.Generator(device=self.device).manual_seed(4321 + batch_idx)
        loss = self.diffusion_loss(batch, generator=g)
        self.log("test/loss", loss, batch_size=len(batch["captions"]), sync_dist=True)
        return loss

    def on_validation_epoch_end(self) -> None:
        if self.probe is not None:
            for k, v in self.probe.compute().items():
                self.log(f"val/{k}", v, sync_dist=False, rank_zero_only=True)
        if self.red_team is not None:
            for k, v in self.red_team.compute(original=False).items():
                self.log(f"val/attack_{k}", v, sync_dist=False, rank_zero_only=True)
        if self.hparams.num_samples > 0 and not self.trainer.sanity_checking and self.trainer.is_global_zero:
            self.log_samples()

    @torch.no_grad()
    def log_samples(self) -> Path:
        """Generate ``num_samples`` per erased concept and save a PNG grid (and add it to TensorBoard)."""
        prompts = [p.text for p in (self.spec.heldout_erase_prompts() if self.spec else [])] or [""]
        prompts = [p for p in prompts for _ in range(self.hparams.num_samples)]
        g = torch.Generator(device=self.device).manual_seed(0)
        out = self.pipeline(prompts, num_inference_steps=self.hparams.sample_steps, generator=g, output_type="np",
                            guidance_scale=self.hparams.guidance_scale)  # fmt: skip
        images = np.asarray(out.frames if self.video else out.images)  # (N, [F,] H, W, 3) in [0, 1]
        if self.video:  # frames side by side
            images = np.concatenate(list(np.moveaxis(images, 1, 0)), axis=2)
        grid = (np.concatenate(list(images), axis=0) * 255).clip(0, 255).astype(np.uint8)
        folder = Path(self.trainer.log_dir or self.trainer.default_root_dir) / "samples"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"epoch{self.current_epoch:03d}.png"
        from PIL import Image

        Image.fromarray(grid).save(path)
        experiment = getattr(self.logger, "experiment", None)
        if hasattr(experiment, "add_image"):
            experiment.add_image("samples", grid, self.global_step, dataformats="HWC")
        return path

    def configure_optimizers(self):
        params = [p for p in self.unet.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(
            params,
            lr=self.hparams.learning_rate,
            weight_decay=self.hparams.weight_decay,
            betas=tuple(self.hparams.betas),
        )
        if self.hparams.lr_schedule == "constant" and not self.hparams.warmup_steps:
            return opt
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup, cosine = self.hparams.warmup_steps, self.hparams.lr_schedule == "cosine"

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            if not cosine:
                return 1.0
            return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))

        return {"optimizer": opt, "lr_scheduler": {"scheduler": torch.optim.lr_scheduler.LambdaLR(opt, factor),
                                                    "interval": "step"}}  # fmt: skip
