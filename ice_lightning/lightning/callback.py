"""``ICECallback``: keep a concept erased while a diffusion model is fine-tuned with Lightning.

Example:
    >>> from lightning.pytorch import Trainer
    >>> from ice_lightning import ICECallback
    >>> ice = ICECallback(erase=["Van Gogh"], family="style", every_n_epochs=1, export="erased-model")
    >>> trainer = Trainer(callbacks=[ice], max_epochs=2, logger=False)  # then trainer.fit(module, data)
    >>> ice.state_key
    "ICECallback{'erase': ['Van Gogh'], 'family': 'style', 'method': 'ice'}"

The callback finds the pipeline through :meth:`ICECallback.get_pipeline`: the module's ``pipeline``
attribute, or the module itself when it holds the components (``unet`` or ``transformer``, ``tokenizer``,
``text_encoder``). Subclass and override ``get_pipeline`` for anything else.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Literal

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info

from ..core.concepts import ConceptSpec, Family
from ..core.export import check_export_destination, save_erased
from ..core.parts import DENOISER_COMPONENTS, edit_history
from ..core.plan import ErasurePlan, Method
from ..core.preview import PREVIEW_NAME, Preview
from ..core.probe import TextSpaceProbe
from ..core.sharding import gather_pipeline, is_sharded, reshard
from ..core.solver import DissociationOperator, check_hparams
from .callback_state import (
    ExportOptions,
    ICEState,
    LayerTargets,
    LogOptions,
    remember_weights,
    weight_at_last_application,
)
from .filter_callback import filtering_summary
from .image_logging import log_image
from .strategies import check_ranks_agree, check_strategy, reset_optimizer_state

__all__ = ["ICECallback", "find_pipeline"]

ReapplyAt = Literal["train_epoch_end", "validation_start"]


def find_pipeline(pl_module: LightningModule) -> Any:
    """The module's ``pipeline`` attribute, or the module itself when it holds a denoiser and a text encoder."""
    pipe = getattr(pl_module, "pipeline", None)
    if pipe is not None:
        return pipe
    if any(getattr(pl_module, n, None) is not None for n in DENOISER_COMPONENTS) and hasattr(pl_module, "text_encoder"):
        return pl_module
    raise AttributeError(
        f"ICECallback cannot find a diffusers pipeline on {type(pl_module).__name__}: expose it as "
        "`self.pipeline`, or hold `unet` (or `transformer`), `tokenizer` and `text_encoder` attributes, "
        "or subclass ICECallback and override get_pipeline()"
    )


class ICECallback(Callback):
    """Erase concepts at setup, again every ``every_n_epochs`` epochs, and at the end before export.

    Args:
        erase: the concepts to erase (names, as a prompt would write them).
        preserve: concepts to keep unchanged; default: the family's preserve set.
        family: ``"style"``, ``"object"``, ``"identity"``, ``"explicit"`` or ``"custom"``: picks the prompt
            templates, the default preserve set and synonyms.
        synonyms: ``{concept: [other names]}`` whose tokens are erased too (``explicit`` has a default list).
        spec: a ready :class:`~ice_lightning.core.concepts.ConceptSpec` instead of the keywords above: for a guide
            concept (``anchor``), templates or the end-of-text token.
        method: ``"ice"``, a baseline (``"cure"``, ``"uce"``, ``"projection"``, ``"rece"``) or a registered method.
        hparams: the method's hyperparameters (fields of its dataclass: ``ICEHyperParams`` for ICE).
        at_setup: erase when fitting starts (``on_fit_start``: after a checkpoint is restored, so a resumed run
            never edits weights the restore then overwrites). Recorded with the reason ``"setup"``.
        every_n_epochs: re-apply after every N training epochs (``None``: never); see :meth:`should_apply`.
        reapply_at: ``"train_epoch_end"`` or ``"validation_start"`` (that epoch's validation then sees the
            erased model; needs a validation loop, and applies once per epoch).
        at_fit_end: apply once more at the end of fitting (after weight averaging has copied its average into
            the model: ``on_fit_end`` runs after every callback's ``on_train_end``) and export.
        export: where to save the erased pipeline at the end: a folder, or :class:`ExportOptions` (replace a
            foreign folder; LoRA adapters merged or beside; the format: diffusers folder, LoRA, single file). The
            manifest records every ``ICECallback`` of the trainer under ``ice_callbacks`` and what every
            :class:`~ice_lightning.lightning.filter_callback.SampleFilterCallback` dropped under ``sample_filtering``.
            With several callbacks, give it to the last one in the trainer's list: its ``on_fit_end`` runs after
            the others' final applications.
        targets: :class:`LayerTargets` (explicit layer names; the check pass).
        log: what to log after every application: ``True`` (the text-space metrics), ``False`` (nothing), or
            :class:`LogOptions` (metrics, and a before/after ``preview`` grid of held-out prompts to every logger).

    Training data that shows the concept brings it back whatever the schedule: add a
    :class:`~ice_lightning.lightning.filter_callback.SampleFilterCallback` (``drop_concepts=ice.spec``, detectors).

    LoRA: where an adapter wraps a text-conditioning layer, the edit covers its base weight and its
    ``lora_A`` (``(W + B A)(I - D) = W (I - D) + B A (I - D)``); a re-application edits what training added
    to ``lora_A`` since, exactly as it does for full weights.

    The operator is computed once per embedding space (the text encoder is frozen) and reused. A
    re-application edits only what changed since the last application, ``W <- W - (W - W_last) D``: with no
    training in between it is an exact no-op, so re-applying never compounds. Several callbacks with
    different concepts can share one ``Trainer``: each keeps its state under its own :attr:`state_key`, and
    ``W_last`` is the weight after the last application of *any* of them, so none re-edits another's edit.
    """

    def __init__(
        self,
        erase: list[str] | None = None,
        preserve: list[str] | None = None,
        family: Family = "custom",
        synonyms: dict[str, list[str]] | None = None,
        spec: ConceptSpec | None = None,
        method: Method = "ice",
        hparams: dict[str, Any] | None = None,
        at_setup: bool = True,
        every_n_epochs: int | None = None,
        reapply_at: ReapplyAt = "train_epoch_end",
        at_fit_end: bool = True,
        export: str | ExportOptions | None = None,
        targets: LayerTargets | None = None,
        log: bool | LogOptions = True,
    ) -> None:
        super().__init__()
        if spec is not None and erase is not None:
            raise ValueError("pass either spec=ConceptSpec(...) or the concept keywords (erase=[...]), not both")
        self.spec = spec if spec is not None else ConceptSpec(
            erase=erase if erase is not None else [], preserve=preserve, family=family, synonyms=synonyms or {},
        )  # fmt: skip
        if every_n_epochs is not None and (not isinstance(every_n_epochs, int) or isinstance(every_n_epochs, bool)
                                           or every_n_epochs < 1):  # fmt: skip
            raise ValueError(f"every_n_epochs must be a whole number >= 1 or None, got {every_n_epochs!r}")
        check_hparams(method, dict(hparams or {}))
        if reapply_at not in ("train_epoch_end", "validation_start"):
            raise ValueError(f"reapply_at must be 'train_epoch_end' or 'validation_start', got {reapply_at!r}")
        self.method, self.hparams = method, dict(hparams or {})
        self.at_setup, self.every_n_epochs, self.reapply_at = at_setup, every_n_epochs, reapply_at
        self.at_fit_end = at_fit_end
        #: where and how the erased model is shipped at the end (``None``: not exported)
        self.export_options = ExportOptions(export) if isinstance(export, (str, os.PathLike)) else export
        self.targets = targets or LayerTargets()
        #: what is logged after every application
        self.log_options = LogOptions(metrics=log) if isinstance(log, bool) else log
        self._preview: Preview | None = None
        self._preview_png: bytes | None = None
        self.state = ICEState(spec_fingerprint=self.spec_fingerprint())
        self._plan: ErasurePlan | None = None
        self._probe: TextSpaceProbe | None = None
        self._deferred = False

    @property
    def export_dir(self) -> str | None:
        """The export folder (``None``: not exported)."""
        return None if self.export_options is None else str(self.export_options.dir)

    @property
    def state_key(self) -> str:
        """Unique per erasure: the concepts, family and method, and the hyperparameters when any are given (two
        callbacks that differ only there are two erasures; without any, the key of earlier checkpoints)."""
        extra = {"hparams": sorted(self.hparams.items())} if self.hparams else {}
        return self._generate_state_key(erase=self.spec.erase, family=self.spec.family, method=self.method, **extra)

    def spec_fingerprint(self) -> str:
        """sha256 of what defines the operators: the concept spec, the method and the hyperparameters."""
        what = {"spec": self.spec.to_dict(), "method": self.method, "hparams": self.hparams}
        return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()

    @property
    def applications(self) -> list[dict[str, Any]]:
        """One record per application so far (reason, epoch, global step, weights hash, metrics)."""
        return self.state.applications

    @property
    def operators(self) -> dict[str, DissociationOperator] | None:
        """The operator per embedding space (``None`` before the first application)."""
        return self.state.operators

    @property
    def probe(self) -> TextSpaceProbe | None:
        """The text-space metrics against the model before the first edit (``None`` without ``LogOptions.metrics``)."""
        return self._probe

    # -- the protocol and the schedule -----------------------------------------------------------------
    def get_pipeline(self, pl_module: LightningModule) -> Any:
        """The diffusers pipeline (or an object with its components) that ``pl_module`` trains."""
        return find_pipeline(pl_module)

    def should_apply(self, trainer: Trainer, epoch: int) -> bool:
        """Whether a re-application is due after training epoch ``epoch`` (override for another schedule)."""
        return self.every_n_epochs is not None and (epoch + 1) % self.every_n_epochs == 0

    def edited_modules(self) -> dict[str, torch.nn.Linear]:
        """``{qualified name: linear layer}`` of the layers this callback edits (empty before it first applies)."""
        return self._plan.modules() if self._plan is not None else {}

    # -- hooks -------------------------------------------------------------------------------------
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        check_strategy(trainer)
        pipe = self._pipeline_or_none(pl_module)
        if self.export_dir is not None:
            if pipe is None:
                self.get_pipeline(pl_module)  # raises the protocol error, naming how to expose the pipeline
            if not hasattr(pipe, "save_pretrained"):
                raise ValueError(
                    f"export needs a diffusers pipeline (with save_pretrained); get_pipeline() found a "
                    f"{type(pipe).__name__}: expose the pipeline as `self.pipeline` or override get_pipeline()"
                )
            check_export_destination(pipe, self.export_dir, self.export_options.overwrite, self.export_options.format)

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # ModelParallelStrategy restores a checkpoint (this callback's state included) after this hook, and
        # does not say yet whether it will: start once training starts, when the restore has happened.
        self._deferred = bool(getattr(getattr(trainer, "strategy", None), "restore_checkpoint_after_setup", False))
        if self._deferred:
            return
        self._start(trainer, pl_module)

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if getattr(self, "_deferred", False):
            self._deferred = False
            self._start(trainer, pl_module)

    def _start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """The first application, or, after a resume, binding to the checkpoint's erased weights: at
        ``on_fit_start``, or at ``on_train_start`` under a strategy that restores checkpoints after setup
        (``ModelParallelStrategy``; its sanity-check validation then sees the model before the first edit)."""
        pipe = self.get_pipeline(pl_module)  # raises the protocol error if the module exposes none
        if self.log_options.preview and not self.state.resumed:  # the model before any application
            self._preview = Preview(pipe, self.log_options.preview, self.log_options.seed, self.log_options.steps)
            self._preview.before(self.spec)  # every rank samples (a sharded forward is collective); rank 0 logs
        if self.state.resumed:  # the checkpoint's weights hold the erasure: bind to them, apply nothing again
            self._bind(pipe)
            self._remember_weights()
            self.state.resumed = False
            completed = trainer.current_epoch - 1
            due = max((e for e in range(completed + 1) if self.should_apply(trainer, e)), default=-1)
            if due > self.state.last_epoch_applied:  # an application was due before the checkpoint: catch up
                self.apply(trainer, pl_module, f"resume catch-up (epoch {due})", epoch=due)
        elif self.at_setup and self.state.operators is None:
            # Here, not in setup: a checkpoint is restored after setup, so an edit there would be overwritten.
            self.apply(trainer, pl_module, "setup")
        elif self._plan is not None:  # weights may have been synced or moved since setup: measure from here
            self._remember_weights()

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.reapply_at == "train_epoch_end" and self.should_apply(trainer, trainer.current_epoch):
            self.apply(trainer, pl_module, "epoch_end", epoch=trainer.current_epoch)

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != TrainerFn.FITTING or self.reapply_at != "validation_start":
            return
        epoch = trainer.current_epoch
        if self.should_apply(trainer, epoch) and epoch > self.state.last_epoch_applied:  # once per epoch
            self.apply(trainer, pl_module, "validation_start", epoch=epoch)

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.at_fit_end:
            self.apply(trainer, pl_module, "fit_end")
        if self.export_dir is not None:
            self.export(trainer, pl_module)

    def export(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Save the erased pipeline to the export folder from rank 0 (every rank calls this). Sharded weights are
        first gathered whole to rank 0's CPU (``torch.distributed.checkpoint.state_dict``, a collective), and
        the export is written from that copy, which records the erasures of every ``ICECallback``."""
        pipe = self.get_pipeline(pl_module)
        every = [c for c in trainer.callbacks if isinstance(c, ICECallback)]
        extra = {"ice_callback": self.summary(), "ice_callbacks": {c.state_key: c.summary() for c in every}}
        filtering = filtering_summary(trainer.callbacks)
        if filtering is not None:
            extra["sample_filtering"] = filtering
        settings = getattr(pl_module, "evaluation_settings", None)  # ICEModule's sample metrics, if any
        evaluation = settings() if callable(settings) else None
        if evaluation:
            extra["evaluation"] = evaluation
        results = None
        reshard(self._plan.denoisers.values())
        if any(is_sharded(m.weight) for m in self._plan.modules().values()):
            whole = gather_pipeline(pipe)  # None on every rank but 0
            if whole is not None:
                results = [r.record.renamed({}, "gathered shards") for r in edit_history(pipe) if not r.undone]
            pipe = whole
        if trainer.is_global_zero:
            files = {} if self._preview_png is None else {PREVIEW_NAME: self._preview_png}
            save_erased(pipe, self.export_dir, results=results, extra=extra, overwrite=self.export_options.overwrite,
                        adapters=self.export_options.adapters, format=self.export_options.format,
                        extra_files=files)  # fmt: skip
            rank_zero_info(f"ICECallback: exported the erased model to {self.export_dir}")
        trainer.strategy.barrier("ice_export")

    # -- applying ------------------------------------------------------------------------------
    @torch.no_grad()
    def apply(self, trainer: Trainer, pl_module: LightningModule, reason: str, epoch: int | None = None) -> None:
        """Apply (or re-apply) the erasure now; see the class docstring for why this never compounds.

        The first application plans on every rank, solves on rank 0 only and broadcasts the operators, so
        every rank writes the same edit; later ones re-apply those operators to what changed since."""
        if self._plan is None:
            self._plan = ErasurePlan(self.get_pipeline(pl_module), self.spec, method=self.method,
                                     hparams=self.hparams, layers=self.targets.layers,
                                     verify=self.targets.verify)  # fmt: skip
        if self.state.operators is None:
            if self._plan.needs_gram:  # a collective under FSDP2: every rank takes part before rank 0 solves
                self._plan.grams()
            operators = self._plan.solve() if trainer.is_global_zero else None
            for space, found in self._plan.triggers.items():  # rank 0's trigger search (trigger_rounds > 0)
                rank_zero_info(f"ICECallback: the trigger search erased {len(found)} prompt(s) in the {space!r} space, "
                               f"e.g. {found[0]!r}")  # fmt: skip
            self.state.operators = trainer.strategy.broadcast(operators, src=0) if trainer.world_size > 1 else operators
            self.state.layer_spaces = self._plan.layer_spaces
            result = self._plan.apply(self.state.operators)
            if self.log_options.metrics:
                self._probe = TextSpaceProbe.from_result(result)
        else:
            bases = {n: weight_at_last_application(n, m) for n, m in self._plan.modules().items()}
            result = self._plan.apply(self.state.operators, bases=bases, record=False)
        modules = self._plan.modules()
        # Each edit holds the exact hash of the weight it wrote (in the order of the modules): no second pass.
        hashes = check_ranks_agree(trainer, modules, [e.fingerprint for e in result.edits])
        # one hash per layer (DDP, one process); sharded weights are checked per shard: frozen ones hashed anew
        self._remember_weights(dict(zip(modules, hashes, strict=True)) if len(hashes) == len(modules) else None)
        reset_optimizer_state(trainer, modules)
        digest = hashlib.sha256("".join(hashes).encode()).hexdigest()
        record = {"reason": reason, "epoch": trainer.current_epoch, "global_step": trainer.global_step,
                  "weights_sha256": digest}  # fmt: skip
        if epoch is not None:
            self.state.last_epoch_applied = max(self.state.last_epoch_applied, epoch)
        if self._probe is not None:
            metrics = self.application_metrics(result)
            record["metrics"] = metrics
            last = self.state.applications[-1] if self.state.applications else None
            # A fit-end application right after an epoch-end one (no step in between) is an exact no-op: its
            # row would repeat the previous one at the same step.
            if last is None or last["global_step"] != trainer.global_step or "metrics" not in last:
                row = {f"ice/{k}": v for k, v in metrics.items()}
                for logger in trainer.loggers:
                    logger.log_metrics({**row, "epoch": trainer.current_epoch}, step=trainer.global_step)
            rank_zero_info(f"ICECallback ({reason}): " + ", ".join(f"{k}={v:.3f}" for k, v in metrics.items()))
        if self._preview is not None:
            record["preview_logged_to"] = self._log_preview(trainer)
        self.state.applications.append(record)

    def _log_preview(self, trainer: Trainer) -> list[str]:
        """Sample the preview after this application, keep its PNG for the export, log it from rank 0."""
        self._preview_png = self._preview.after()
        if not trainer.is_global_zero:
            return []
        return log_image(trainer.loggers, "ice/preview", self._preview.last_grid, trainer.global_step)

    def application_metrics(self, result) -> dict[str, float]:
        """The metrics of one application, each against the reference it is about:

        - ``erasure``, ``leakage``, ``concept_residual``: the concept, against the model before the first edit
          (is it still gone?);
        - ``collateral_near``, ``collateral_far``: this application's own edit, its weights just after against
          just before (what the erasure costs, without the fine-tuning that happened in between);
        - ``drift_near``, ``drift_far``: fine-tuning alone, the weights just before this application against
          the model before the first edit (0 at setup)."""
        before = result.reference_weights()  # rebuilt from the undo record once, for both comparisons
        total = self._probe.compute(self.state.operators)
        own = TextSpaceProbe.from_result(result, reference=before).compute()
        drift = self._probe.compute(weights=before)
        return {
            "erasure": total["erasure"],
            "leakage": total["leakage"],
            "concept_residual": total["concept_residual"],
            "collateral_near": own["collateral_near"],
            "collateral_far": own["collateral_far"],
            "drift_near": drift["collateral_near"],
            "drift_far": drift["collateral_far"],
        }

    def _remember_weights(self, hashes: dict[str, str] | None = None) -> None:
        remember_weights(self._plan.denoisers.values(), self._plan.modules(), hashes)

    def _bind(self, pipe: Any) -> None:
        """After a resume, rebuild the plan over the checkpoint's layers and the probe from its references."""
        self._plan = ErasurePlan(pipe, self.spec, method=self.method, hparams=self.hparams,
                                 layers=dict(self.state.layer_spaces), verify=False)  # fmt: skip
        self._plan.restore(self.state.operators)  # the export's manifest lists it as after a fresh run
        if self.log_options.metrics and self.state.probe is not None:
            self._probe = TextSpaceProbe(self._plan.targets, self._plan.spaces, self.spec)
            self._probe.load_state_dict(self.state.probe)

    # -- checks ----------------------------------------------------------------------------------
    def _pipeline_or_none(self, pl_module: LightningModule) -> Any:
        try:
            return self.get_pipeline(pl_module)
        except AttributeError:
            return None

    # -- state -----------------------------------------------------------------------------------
    def summary(self) -> dict[str, Any]:
        """What was applied and when (goes into the export manifest)."""
        return {
            "applications": self.state.applications,
            "every_n_epochs": self.every_n_epochs,
            "reapply_at": self.reapply_at,
        }

    def state_dict(self) -> dict[str, Any]:
        if self._probe is not None:
            self.state.probe = self._probe.state_dict()
        return self.state.to_dict()

    def on_load_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        """Refuse, before any training, a checkpoint whose weights hold an erasure no callback of this run
        continues: the export's manifest would not describe them."""
        mine = [c for c in trainer.callbacks if isinstance(c, ICECallback)]
        states = checkpoint.get("callbacks", {})
        ours = {c.state_key for c in mine}
        foreign = [k for k in states if k.startswith("ICECallback") and k not in ours]
        if foreign:
            raise ValueError(
                f"the checkpoint holds the erasure of {foreign}, which no ICECallback of this run continues (this "
                f"run has {sorted(ours)}): resume with the same concepts, family and method, or start a new run "
                "from the exported model"
            )

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state = ICEState.from_dict(state_dict)
        if state.spec_fingerprint and state.spec_fingerprint != self.spec_fingerprint():
            raise ValueError(
                "the checkpoint's ICECallback state was made from another concept spec, method or hyperparameters "
                f"than this callback's ({self.spec.erase}, {self.method}): its weights hold that erasure. Resume "
                "with the same settings, or start a new run from the exported model"
            )
        self.state = state
        self._plan, self._probe = None, None
