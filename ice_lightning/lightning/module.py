"""``ICEModule``: fine-tune the denoiser of a diffusers pipeline (T2I or T2V), in full or as a LoRA.

Example:
    >>> from ice_lightning import ICEModule
    >>> module = ICEModule(pipeline="tiny:sd", validation_concepts={"erase": ["Van Gogh"], "family": "style"})
    >>> type(module.pipeline).__name__, module.objective
    ('StableDiffusionPipeline', 'epsilon')
    >>> ICEModule(pipeline="tiny:flux", lora_rank=4).objective
    'flow_matching'

Every architecture of the table (:mod:`ice_lightning.core.architectures`) trains: UNets (SD, SDXL, TextToVideoSD,
AnimateDiff, SVD) and transformers (SD3, Flux, PixArt, CogVideoX, Wan 2.1 and 2.2, LTX-Video), each with its
architecture's latents, text conditioning and model call (:mod:`ice_lightning.core.denoising` names the training
script each follows). The VAE and text encoders are frozen (and left out of checkpoints); the denoiser, or
with ``lora_rank`` only its PEFT adapters, is trained with the scheduler's own objective (epsilon,
v-prediction or flow matching with the scheduler's shift and a weighting scheme) and classifier-free-guidance
dropout. Validation logs the loss on fixed noise, the text-space metrics of ``validation_concepts``
(:mod:`ice_lightning.core.probe`) against the model as it was loaded, and, with ``num_samples > 0``,
generated samples per erased concept.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from torchmetrics import Metric

from ..core.architectures import architecture_of
from ..core.concepts import ConceptSpec
from ..core.denoising import (
    WeightingScheme,
    ddpm_training_input,
    expert_rows,
    experts,
    flow_loss_weights,
    sample_flow_sigmas,
    shift_sigmas,
    timestep_bias_weights,
)
from ..core.parts import denoisers, pipeline_spaces
from ..core.pipelines import load_pipeline
from ..core.plan import text_conditioning_layers
from ..core.probe import TextSpaceProbe
from ..core.training_cache import CachedVAE, TextConditioningCache, text_cache_key
from .sampling import SamplingMixin
from .strategies import shard_denoisers

__all__ = ["ICEModule", "LRSchedule", "TimestepBias", "DEFAULT_LORA_TARGETS"]

LRSchedule = Literal["constant", "cosine"]
TimestepBias = Literal["none", "later", "earlier"]
#: The attention projections diffusers' LoRA training scripts adapt by default.
DEFAULT_LORA_TARGETS = ("to_k", "to_q", "to_v", "to_out.0")
_FROZEN_COMPONENTS = ("vae", "text_encoder", "text_encoder_2", "text_encoder_3")


class ICEModule(SamplingMixin, LightningModule):
    """Fine-tunes the denoiser(s) of a diffusers pipeline; exposes it as ``self.pipeline`` for ``ICECallback``.

    Each denoiser is an attribute named as the pipeline's component (``unet``, ``transformer``, and Wan 2.2's
    ``transformer_2``); :attr:`denoiser` is the first.

    Args:
        pipeline: local diffusers folder or hub id (``from_pretrained``), or a registered name
            (:func:`~ice_lightning.core.pipelines.load_pipeline`: ``"shapes-image"``, ``"tiny:sd"``...).
        learning_rate: AdamW learning rate of the trained parameters.
        weight_decay: AdamW weight decay.
        betas: AdamW betas.
        cfg_dropout: probability of training a caption as "" (classifier-free guidance).
        gradient_checkpointing: trade compute for memory in the denoiser.
        torch_dtype: dtype the pipeline is loaded in.
        validation_concepts: keyword arguments of a ``ConceptSpec`` whose text-space metrics are logged at
            every validation (``{"erase": ["Van Gogh"], "family": "style"}``).
        red_team: keyword arguments of :class:`~ice_lightning.evaluation.attacks.RedTeam` (``{"paraphrases": [...]}``,
            ``{}`` for the defaults): the text-space attacks' success rates are logged at every validation
            as ``val/attack_<name>`` (needs ``validation_concepts``).
        num_samples: generated samples per erased concept logged at each validation (0: none).
        sample_steps: denoising steps of the validation samples.
        guidance_scale: classifier-free guidance scale of the validation samples.
        seed: draw the training noise from ``seed`` and the global step, so a run resumed from a
            checkpoint trains exactly as the uninterrupted run (``None``: the global RNG).
        lr_schedule: ``"constant"`` or ``"cosine"`` (decay to 0 over the run's optimizer steps), after
            ``warmup_steps`` steps of linear warm-up.
        warmup_steps: optimizer steps of linear learning-rate warm-up.
        timestep_bias: as in diffusers' training scripts, draw the training timesteps of the ``"later"``
            (noisiest) or ``"earlier"`` part of the schedule more often (``"none"``: uniform). What is decided
            only at the noisiest steps, such as which way a shape moves in a clip (at lower noise the noisy clip
            itself shows it), is otherwise learned from the text far too slowly.
        timestep_bias_portion: the share of the schedule that ``timestep_bias`` favours.
        timestep_bias_multiplier: how many times as often those timesteps are drawn.
        weighting_scheme: flow matching only: how the noise levels are drawn and the loss weighted
            (diffusers' ``--weighting_scheme``: ``"none"`` uniform, ``"logit_normal"``, ``"mode"``, ``"cosmap"``,
            ``"sigma_sqrt"``). The drawn levels are then shifted as the pipeline's scheduler shifts them (static
            ``shift``, or Flux's and LTX's dynamic shift at the batch's sequence length).
        logit_mean: mean of ``"logit_normal"``.
        logit_std: standard deviation of ``"logit_normal"``.
        mode_scale: scale of ``"mode"``.
        snr_gamma: Min-SNR loss weights, this gamma (diffusers' ``train_text_to_image.py --snr_gamma``; DDPM only).
        noise_offset: per-channel offset added to the noise (``--noise_offset``; DDPM only).
        input_perturbation: extra noise on the noisy input only (``--input_perturbation``; DDPM only).
        prediction_type: override the scheduler's (``"epsilon"``, ``"v_prediction"``, ``"sample"``).
        lora_rank: train PEFT LoRA adapters of this rank instead of the full weights (``None``: full
            fine-tune). ``ICECallback`` edits the adapters' ``lora_A`` where they read the text states, and exports
            the adapters merged (or beside an erased base: ``ExportOptions(adapters=...)``).
        lora_alpha: LoRA scale numerator (scale ``lora_alpha / lora_rank``; default: the rank).
        lora_target_modules: the denoiser modules that get adapters (default: the attention projections
            :data:`DEFAULT_LORA_TARGETS`).
        lora_init: PEFT's ``init_lora_weights``.
        text_cache_size: caption sets whose text conditioning is kept in memory (the text encoders are frozen, so
            a repeated batch of captions is encoded once); 0 disables.
        disk_cache: keep each sample's latent distribution and each caption's text conditioning on disk, keyed by
            the VAE's and text encoders' weights (:mod:`ice_lightning.core.training_cache`): later epochs and runs
            call neither; latents are still sampled at every step, as without it.
        sample_metrics: image-level metrics of generated samples
            (:class:`~ice_lightning.lightning.sample_metrics.ConceptPresence`: CLIP zero-shot, NudeNet, the shapes
            detector, or your own), logged at every validation as ``val/<metric name>/<concept>`` for every erased
            and every preserved concept of ``validation_concepts`` (a metric made for one ``concept`` scores only
            it), from ``metric_samples`` samples of each of the concept's held-out prompts (needs
            ``validation_concepts``). Not saved in checkpoints.
        metric_samples: samples per held-out prompt for ``sample_metrics``.

    A batch is ``{"captions": [...], "pixel_values": ...}`` (images ``(B, 3, H, W)`` or clips
    ``(B, F, 3, H, W)`` in [-1, 1]), or carries ``"latents"`` already encoded by :meth:`encode_pixels`
    (precomputed VAE latents) instead of the pixels.
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
        weighting_scheme: WeightingScheme = "none",
        logit_mean: float = 0.0,
        logit_std: float = 1.0,
        mode_scale: float = 1.29,
        snr_gamma: float | None = None,
        noise_offset: float = 0.0,
        input_perturbation: float = 0.0,
        prediction_type: str | None = None,
        lora_rank: int | None = None,
        lora_alpha: float | None = None,
        lora_target_modules: list[str] | None = None,
        lora_init: bool | str = True,
        text_cache_size: int = 256,
        disk_cache: bool = False,
        sample_metrics: list[Metric] | None = None,
        metric_samples: int = 2,
    ) -> None:
        super().__init__()
        if lr_schedule not in ("constant", "cosine"):
            raise ValueError(f"lr_schedule must be 'constant' or 'cosine', got {lr_schedule!r}")
        if timestep_bias not in ("none", "later", "earlier"):
            raise ValueError(f"timestep_bias must be 'none', 'later' or 'earlier', got {timestep_bias!r}")
        if not (0 < timestep_bias_portion <= 1 and timestep_bias_multiplier > 0):
            raise ValueError("timestep_bias_portion must be in (0, 1] and timestep_bias_multiplier > 0, got "
                             f"{timestep_bias_portion} and {timestep_bias_multiplier}")  # fmt: skip
        if weighting_scheme not in ("none", "logit_normal", "mode", "cosmap", "sigma_sqrt"):
            raise ValueError("weighting_scheme must be 'none', 'logit_normal', 'mode', 'cosmap' or 'sigma_sqrt', "
                             f"got {weighting_scheme!r}")  # fmt: skip
        if not (noise_offset >= 0 and input_perturbation >= 0 and (snr_gamma is None or snr_gamma > 0)):
            raise ValueError(f"noise_offset and input_perturbation must be >= 0 and snr_gamma > 0 (or None), got "
                             f"{noise_offset}, {input_perturbation}, {snr_gamma}")  # fmt: skip
        if lora_rank is not None and (isinstance(lora_rank, bool) or not isinstance(lora_rank, int) or lora_rank < 1):
            raise ValueError(f"lora_rank must be a whole number >= 1 (or None for a full fine-tune), got {lora_rank!r}")
        if sample_metrics and not validation_concepts:
            raise ValueError("sample_metrics needs validation_concepts: they score samples of each concept's prompts")
        if isinstance(metric_samples, bool) or not isinstance(metric_samples, int) or metric_samples < 1:
            raise ValueError(f"metric_samples must be a whole number >= 1, got {metric_samples!r}")
        self.save_hyperparameters(ignore=["sample_metrics"])
        # a plain list: not submodules, so neither in checkpoints nor moved with the model (moved when used)
        self._sample_metrics: list[Metric] = list(sample_metrics or [])
        pipe = load_pipeline(pipeline, torch_dtype)
        pipe.set_progress_bar_config(disable=True)
        self.pipeline = pipe
        self.denoisers = denoisers(pipe)  # {component name: denoiser}; plain dict: registered below by name
        self.architecture = architecture_of(self.denoiser)
        for name, model in self.denoisers.items():
            setattr(self, name, model)
        for name in _FROZEN_COMPONENTS:  # registered, so Lightning moves them; frozen, and not checkpointed
            comp = getattr(pipe, name, None)
            if isinstance(comp, torch.nn.Module):
                setattr(self, name, comp.requires_grad_(False).eval())
        self.vae = getattr(pipe, "vae", None)  # None: a pixel-space model (PixelDiffusionPipeline)
        if lora_rank is not None:
            self._add_adapters()
        if gradient_checkpointing:
            for model in self.denoisers.values():
                model.enable_gradient_checkpointing()
        self.video = self.architecture.video
        disk_key = text_cache_key(pipe, self.architecture.name) if disk_cache else None
        self.text_conditioning = TextConditioningCache(self._encode_text, text_cache_size, disk_key)
        self._vae_cache = CachedVAE(self.vae) if disk_cache and self.vae is not None else None
        self.objective = self._objective(pipe.scheduler)
        self.spec = ConceptSpec(**validation_concepts) if validation_concepts else None
        # Reference outputs of the text-conditioning layers as loaded, before any erasure or training.
        self.probe = self._make_probe() if self.spec is not None else None
        if red_team is not None and self.spec is None:
            raise ValueError("red_team needs validation_concepts: the attacks target the erased concept(s)")
        self.red_team = None
        if red_team is not None:  # evaluation sits beside the product: imported only when asked for
            from ..evaluation.attacks import RedTeam

            self.red_team = RedTeam(self.probe.layers, self.probe.spaces, self.spec, **red_team)

    def train(self, mode: bool = True) -> ICEModule:
        """Lightning puts the whole module in training mode at every fit epoch; the frozen VAE and text
        encoders stay in eval mode (T5's dropout would otherwise noise every caption's conditioning)."""
        super().train(mode)
        for name in _FROZEN_COMPONENTS:
            comp = getattr(self, name, None)
            if isinstance(comp, torch.nn.Module):
                comp.eval()
        return self

    @property
    def denoiser(self) -> torch.nn.Module:
        """The pipeline's (first) denoiser: ``unet`` or ``transformer``."""
        return next(iter(self.denoisers.values()))

    def _objective(self, sched) -> str:
        hp = self.hparams
        if "FlowMatch" in type(sched).__name__ or sched.config.get("use_flow_sigmas", False):
            if hp.snr_gamma is not None or hp.noise_offset or hp.input_perturbation or hp.prediction_type:
                raise ValueError("snr_gamma, noise_offset, input_perturbation and prediction_type follow "
                                 "train_text_to_image.py's DDPM objectives; this pipeline trains with flow matching: "
                                 "use weighting_scheme")  # fmt: skip
            return "flow_matching"
        from diffusers import DDPMScheduler

        # CogVideoX's schedulers rescale the SNR (snr_shift_scale): noise with the pipeline's own class.
        cls = type(sched) if "snr_shift_scale" in sched.config else DDPMScheduler
        self.noise_scheduler = cls.from_config(sched.config)
        if self.hparams.prediction_type is not None:  # as the script's --prediction_type
            self.noise_scheduler.register_to_config(prediction_type=self.hparams.prediction_type)
        objective = self.noise_scheduler.config.prediction_type
        if objective not in ("epsilon", "v_prediction", "sample"):
            raise ValueError(f"unknown prediction_type {objective!r} in the pipeline's scheduler config")
        return objective

    def _add_adapters(self) -> None:
        """Freeze every denoiser and give it PEFT LoRA adapters, the only trained weights."""
        from peft import LoraConfig, inject_adapter_in_model

        hp = self.hparams
        targets = list(hp.lora_target_modules or DEFAULT_LORA_TARGETS)
        for name, model in self.denoisers.items():
            model.requires_grad_(False)
            config = LoraConfig(r=hp.lora_rank, lora_alpha=hp.lora_alpha or hp.lora_rank, target_modules=targets,
                                init_lora_weights=hp.lora_init)  # fmt: skip
            try:  # diffusers' own adapter bookkeeping where the class has it (PeftAdapterMixin), else PEFT's
                model.add_adapter(config) if hasattr(model, "add_adapter") else inject_adapter_in_model(config, model)
            except ValueError as err:
                raise ValueError(f"lora_target_modules={targets} match no layer of the {name} "
                                 f"({type(model).__name__}): {err}") from err  # fmt: skip

    def configure_model(self) -> None:
        """Under ``ModelParallelStrategy`` (torch FSDP2), shard every denoiser over the data-parallel mesh:
        each block of it (``fully_shard``), then the whole. Nothing otherwise. ``ICECallback`` edits the
        row shards this leaves on each rank."""
        mesh = self.device_mesh
        if mesh is None or getattr(self, "_sharded", False):
            return
        if self.hparams.lora_rank is not None:
            raise NotImplementedError(
                "ICEModule does not shard a LoRA fine-tune: its adapters are small, so train it with DDP (strategy: "
                "ddp), or shard a full fine-tune"
            )
        shard_denoisers(self.denoisers.values(), mesh)
        self._sharded = True

    def _make_probe(self) -> TextSpaceProbe:
        return TextSpaceProbe(text_conditioning_layers(self.pipeline), pipeline_spaces(self.pipeline), self.spec)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Leave the frozen VAE and text encoders out of checkpoints (they are reloaded with the pipeline)."""
        frozen = tuple(f"{n}." for n in _FROZEN_COMPONENTS)
        state = checkpoint.get("state_dict", {})
        for k in [k for k in state if k.startswith(frozen)]:
            del state[k]
        self.strict_loading = False

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.strict_loading = False  # the frozen components are not in the checkpoint

    def evaluation_settings(self) -> dict[str, dict]:
        """``{metric name: its settings}`` of the sample metrics (checkpoint, threshold, ...): ``ICECallback``'s
        export records them, so that the numbers logged under those names compare across teams."""
        return {getattr(m, "name", type(m).__name__): m.settings() if callable(getattr(m, "settings", None))
                else {"metric": type(m).__qualname__} for m in self._sample_metrics}  # fmt: skip

    # -- conditioning and latents ------------------------------------------------------------------
    @torch.no_grad()
    def encode_text(self, captions: list[str]) -> dict[str, Any]:
        """The denoiser's keyword arguments for ``captions`` from the pipeline's own ``encode_prompt`` (the
        architecture's ``conditioning``); cached per caption set (the text encoders are frozen)."""
        return self.text_conditioning(list(captions), self.device)

    def _encode_text(self, captions: list[str]) -> dict[str, Any]:
        return self.architecture.conditioning(self.pipeline, captions, self.device, self.denoiser)

    @torch.no_grad()
    def encode_pixels(self, pixels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Normalised latents in the architecture's layout (:mod:`ice_lightning.core.denoising`), through its image
        or video VAE; a pixel-space model denoises the pixels themselves (clips as ``(B, C, F, H, W)``)."""
        if self.vae is None:
            return pixels.permute(0, 2, 1, 3, 4) if self.video else pixels
        return self.architecture.latents(self._vae_cache or self.vae, pixels, generator)

    def timestep_weights(self, n: int) -> torch.Tensor:
        """Sampling weights of the ``n`` training timesteps under ``timestep_bias`` (diffusers' scheme)."""
        hp = self.hparams
        return timestep_bias_weights(n, hp.timestep_bias, hp.timestep_bias_portion, hp.timestep_bias_multiplier)

    def draw_timesteps(self, b: int, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``b`` training timesteps in ``[0, n)`` drawn with :meth:`timestep_weights`."""
        w = self.timestep_weights(n).to(generator.device if generator is not None else self.device)
        return torch.multinomial(w, b, replacement=True, generator=generator)

    def noisy_input(self, x0: torch.Tensor, noise: torch.Tensor, generator: torch.Generator | None = None):
        """``(noisy latents, timesteps, target, per-sample loss weights or None)`` for clean latents ``x0``."""
        b, hp = x0.shape[0], self.hparams
        if self.objective == "flow_matching":
            u = sample_flow_sigmas(hp.weighting_scheme, b, generator, x0.device, hp.logit_mean, hp.logit_std,
                                   hp.mode_scale).to(x0.dtype)  # fmt: skip
            if hp.timestep_bias != "none":  # the bin the bias draws, then uniform inside it
                u = (self.draw_timesteps(b, 1000, generator).to(u) + u) / 1000
            tokens = self.architecture.tokens(x0) if self.architecture.tokens else x0.shape[2:].numel()
            sigma = shift_sigmas(self.pipeline.scheduler.config, u, tokens)
            s = sigma.view(-1, *([1] * (x0.dim() - 1)))
            weights = None if hp.weighting_scheme == "none" else flow_loss_weights(hp.weighting_scheme, sigma)
            return (1 - s) * x0 + s * noise, sigma * 1000, noise - x0, weights
        n = self.noise_scheduler.config.num_train_timesteps

        def timesteps(k: int) -> torch.Tensor:
            if hp.timestep_bias == "none":
                return torch.randint(0, n, (k,), generator=generator, device=x0.device)
            return self.draw_timesteps(k, n, generator).to(x0.device)

        return ddpm_training_input(self.noise_scheduler, self.objective, x0, noise, timesteps, generator,
                                   hp.noise_offset, hp.input_perturbation, hp.snr_gamma)  # fmt: skip

    def predict(self, noisy: torch.Tensor, t: torch.Tensor, cond: dict[str, Any]) -> torch.Tensor:
        """The denoiser's prediction through the architecture's call; Wan 2.2 routes each sample to its expert."""
        routes = experts(self.pipeline, self.denoisers, t)
        if len(routes) == 1:
            return self.architecture.denoise(routes[0][0], noisy, t, **cond)
        pred = None
        for model, mask in routes:
            if mask.any():
                part = self.architecture.denoise(model, noisy[mask], t[mask], **expert_rows(cond, mask, len(t)))
                pred = part.new_zeros(noisy.shape) if pred is None else pred
                pred[mask] = part
        return pred

    def diffusion_loss(self, batch: dict, generator: torch.Generator | None = None) -> torch.Tensor:
        """The scheduler's own objective on one batch (``generator`` fixes the noise, for validation)."""
        captions = list(batch["captions"])
        if self.training and self.hparams.cfg_dropout > 0:
            drop = torch.rand(len(captions), generator=generator, device=generator.device if generator else None)
            drop = drop.cpu() < self.hparams.cfg_dropout
            captions = ["" if d else c for c, d in zip(captions, drop.tolist(), strict=True)]
        x0 = batch["latents"] if "latents" in batch else self.encode_pixels(batch["pixel_values"], generator)
        noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        noisy, t, target, weights = self.noisy_input(x0, noise, generator)
        pred = self.predict(noisy, t, self.encode_text(captions))
        if weights is None:
            return F.mse_loss(pred.float(), target.float())
        per_sample = ((pred.float() - target.float()) ** 2).flatten(1).mean(1)
        return (weights.float() * per_sample).mean()

    # -- Lightning hooks -----------------------------------------------------------------------------
    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor | None:
        if len(batch["captions"]) == 0:  # every sample dropped (a SampleFilterCallback): skip
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
        # a sharded denoiser runs forward on every rank together (FSDP2 gathers its weights): all ranks sample
        sampling_ranks = self.device_mesh is not None or self.trainer.is_global_zero
        if self.hparams.num_samples > 0 and not self.trainer.sanity_checking and sampling_ranks:
            self.log_samples()
        if self._sample_metrics and not self.trainer.sanity_checking and sampling_ranks:
            for key, value in self.score_samples().items():
                self.log(key, value, sync_dist=False, rank_zero_only=True)

    def configure_optimizers(self):
        params = [p for m in self.denoisers.values() for p in m.parameters() if p.requires_grad]
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
