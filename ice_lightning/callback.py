"""``ICECallback``: keep a concept erased while a diffusion model is fine-tuned with Lightning.

Example:
    >>> from lightning.pytorch import Trainer
    >>> from ice_lightning import ICECallback
    >>> ice = ICECallback(erase=["Van Gogh"], family="style", every_n_epochs=1, export_dir="erased-model")
    >>> trainer = Trainer(callbacks=[ice], max_epochs=2, logger=False)  # then trainer.fit(module, data)

The callback finds the pipeline through :meth:`ICECallback.get_pipeline`: the module's ``pipeline``
attribute, or the module itself when it holds the components (``unet`` or ``transformer``, ``tokenizer``,
``text_encoder``). Subclass and override ``get_pipeline`` for anything else.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import MutableMapping
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from .concepts import ConceptSpec
from .editing import apply_edits
from .erase import DENOISER_COMPONENTS, erase, resolve_layer
from .metrics import TextSpaceProbe
from .solver import DissociationOperator

__all__ = ["ICECallback", "SavePipeline"]

_UNSUPPORTED_STRATEGIES = ("FSDP", "DeepSpeed", "ModelParallel", "XLA")


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
        erase, preserve, family, synonyms, anchor, templates, include_eot: the concept spec, as in
            :func:`ice_lightning.erase`.
        method: ``"ice"`` or a baseline (``"cure"``, ``"uce"``, ``"projection"``).
        hparams: solver hyperparameters (``ICEHyperParams`` fields for ICE).
        at_setup: erase when fitting starts (at ``setup`` if the model is built, else ``on_fit_start``).
        every_n_epochs: re-apply after every N training epochs (``None``: never).
        reapply_at: ``"train_epoch_end"`` or ``"validation_start"`` (that epoch's validation then sees the
            erased model; needs a validation loop, and applies once per epoch).
        at_fit_end: apply once more at the end of fitting (after weight-averaging callbacks) and export.
        export_dir: where to save the erased pipeline (diffusers folder + ``ice_manifest.json``).
        layers: explicit qualified layer names instead of the layer table.
        verify: confirm the layers with a forward hook.
        log_metrics: log the text-space metrics after every application.
        drop_concept_samples: remove from every training batch the samples whose caption names an erased
            concept or one of its synonyms (whole words, any case), so the fine-tune never sees them.
            Re-applying the edit alone does not stop a fine-tune on data that shows the concept under its
            own name: the denoiser learns it back from what the edit leaves of the prompt (measured in
            ``benchmarks/shapes_resurgence.py``). The batch must be a dict; rows of every tensor and list
            of the batch's length are dropped, and a batch left empty reaches ``training_step`` empty
            (``ICEModule`` then skips the step).
        caption_key: the batch key that holds the captions (for ``drop_concept_samples``).

    The operator is computed once per embedding space (the text encoder is frozen) and reused. A
    re-application edits only what changed since the last one, ``W <- W - (W - W_last) D``: with no
    training in between it is an exact no-op, so re-applying never compounds.
    """

    def __init__(
        self,
        erase: list[str],
        preserve: list[str] | None = None,
        family: str = "custom",
        synonyms: dict[str, list[str]] | None = None,
        anchor: str | None = None,
        templates: list[str] | None = None,
        include_eot: bool = False,
        method: str = "ice",
        hparams: dict[str, Any] | None = None,
        at_setup: bool = True,
        every_n_epochs: int | None = None,
        reapply_at: str = "train_epoch_end",
        at_fit_end: bool = True,
        export_dir: str | None = None,
        layers: list[str] | None = None,
        verify: bool = True,
        log_metrics: bool = True,
        drop_concept_samples: bool = False,
        caption_key: str = "captions",
    ) -> None:
        super().__init__()
        self.spec = ConceptSpec(
            erase=erase, preserve=preserve, family=family, synonyms=synonyms or {}, anchor=anchor,
            templates=templates, include_eot=include_eot,
        )  # fmt: skip
        if every_n_epochs is not None and every_n_epochs < 1:
            raise ValueError(f"every_n_epochs must be >= 1 or None, got {every_n_epochs}")
        if reapply_at not in ("train_epoch_end", "validation_start"):
            raise ValueError(f"reapply_at must be 'train_epoch_end' or 'validation_start', got {reapply_at!r}")
        self.method, self.hparams = method, dict(hparams or {})
        self.at_setup, self.every_n_epochs, self.reapply_at = at_setup, every_n_epochs, reapply_at
        self.at_fit_end, self.export_dir = at_fit_end, export_dir
        self.layers, self.verify, self.log_metrics = layers, verify, log_metrics
        self.applications: list[dict[str, Any]] = []
        self._operators: dict[str, DissociationOperator] | None = None
        self._layer_spaces: dict[str, str] = {}
        self._last: dict[str, torch.Tensor] = {}
        self._probe: TextSpaceProbe | None = None
        self._probe_state: dict | None = None
        self._last_epoch_applied = -1
        self.drop_concept_samples, self.caption_key = drop_concept_samples, caption_key
        self.dropped_samples = 0
        names = sorted(self.spec.erase_names(), key=len, reverse=True)  # longest first: "round dot" before "dot"
        self._names_concept = re.compile(r"(?<!\w)(?:" + "|".join(map(re.escape, names)) + r")(?!\w)", re.IGNORECASE)

    # -- the protocol ---------------------------------------------------------------------------
    def get_pipeline(self, pl_module: LightningModule) -> Any:
        """The diffusers pipeline (or an object with its components) that ``pl_module`` trains."""
        return find_pipeline(pl_module)

    # -- hooks -------------------------------------------------------------------------------------
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        strategy = type(trainer.strategy).__name__
        if any(s in strategy for s in _UNSUPPORTED_STRATEGIES):
            raise RuntimeError(
                f"ICECallback does not support {strategy} yet: the edit needs the full, unsharded weights of "
                "the text-conditioning layers on every rank. Use a single device or DDP"
            )
        self._check_export_dir()
        self._after_weight_averaging(trainer)
        pipe = self._pipeline_or_none(pl_module)
        if self.export_dir is not None and not hasattr(pipe, "save_pretrained"):
            raise ValueError("export_dir needs a diffusers pipeline (with save_pretrained) on the module")
        if self.at_setup and trainer.ckpt_path is None and pipe is not None:
            self.apply(trainer, pl_module, "setup")

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        pipe = self.get_pipeline(pl_module)  # raises the protocol error if the module exposes none
        if self._operators is not None and not self._last:  # resumed: the checkpoint holds erased weights
            self._bind(pipe)
            self._last = {n: m.weight.detach().clone() for n, m in self._modules(pipe).items()}
            due = self._last_due_epoch(trainer.current_epoch - 1)
            if due > self._last_epoch_applied:  # an application was due before the checkpoint: catch up
                self.apply(trainer, pl_module, f"resume catch-up (epoch {due})", epoch=due)
        elif self.at_setup and self._operators is None:
            self.apply(trainer, pl_module, "fit_start")
        else:  # weights may have been synced or moved since setup: measure changes from here
            self._last = {n: m.weight.detach().clone() for n, m in self._modules(pipe).items()}

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.reapply_at == "train_epoch_end" and self._due(trainer.current_epoch):
            self.apply(trainer, pl_module, "epoch_end", epoch=trainer.current_epoch)

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if self.drop_concept_samples:
            self.dropped_samples += self.drop_concept_rows(batch)

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != TrainerFn.FITTING or self.reapply_at != "validation_start":
            return
        epoch = trainer.current_epoch
        if self._due(epoch) and epoch > self._last_epoch_applied:  # once per epoch, however often it validates
            self.apply(trainer, pl_module, "validation_start", epoch=epoch)

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.at_fit_end:
            self.apply(trainer, pl_module, "fit_end")
        if self.export_dir is not None:
            if trainer.is_global_zero:
                from .export import save_erased

                save_erased(self.get_pipeline(pl_module), self.export_dir, extra={"ice_callback": self.summary()})
                rank_zero_info(f"ICECallback: exported the erased model to {self.export_dir}")
            trainer.strategy.barrier("ice_export")

    # -- the data guard --------------------------------------------------------------------------
    def names_concept(self, caption: str) -> bool:
        """Whether ``caption`` names an erased concept or one of its synonyms (a whole word, any case)."""
        return self._names_concept.search(caption) is not None

    def drop_concept_rows(self, batch: Any) -> int:
        """Remove, in place, the rows of ``batch`` whose caption names an erased concept; returns how many."""
        if not isinstance(batch, MutableMapping) or self.caption_key not in batch:
            raise TypeError(
                f"drop_concept_samples needs dict batches with the captions under {self.caption_key!r}; got "
                f"{type(batch).__name__}" + (f" with keys {sorted(batch)}" if isinstance(batch, MutableMapping) else "")
                + ": set caption_key to your captions' key"
            )  # fmt: skip
        captions = list(batch[self.caption_key])
        keep = [not self.names_concept(c) for c in captions]
        n = len(captions)
        if all(keep):
            return 0
        mask = torch.tensor(keep)
        for k, v in list(batch.items()):
            if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == n:
                batch[k] = v[mask.to(v.device)]
            elif isinstance(v, (list, tuple)) and len(v) == n:
                batch[k] = type(v)(x for x, kept in zip(v, keep, strict=True) if kept)
        return n - sum(keep)

    # -- applying ------------------------------------------------------------------------------
    @torch.no_grad()
    def apply(self, trainer: Trainer, pl_module: LightningModule, reason: str, epoch: int | None = None) -> None:
        """Apply (or re-apply) the erasure now; see the class docstring for why this never compounds."""
        pipe = self.get_pipeline(pl_module)
        if self._operators is None:
            result = erase(pipe, spec=self.spec, method=self.method, layers=self.layers, verify=self.verify,
                           **self.hparams)  # fmt: skip
            self._operators = self._broadcast(trainer, result.operators)
            self._layer_spaces = dict(result.layer_spaces)
            self._probe = TextSpaceProbe.from_result(result)
            if self._operators is not result.operators:  # rank 0's operator differs: redo on this rank
                result.undo()
                self._apply_operators(pipe, bases=None)
        else:
            self._bind(pipe)
            self._apply_operators(pipe, bases=self._last)
        modules = self._modules(pipe)
        self._sync_weights(trainer, modules)
        self._last = {n: m.weight.detach().clone() for n, m in modules.items()}
        self._reset_optimizer_state(trainer, modules)
        from .export import tensor_sha256

        record = {
            "reason": reason,
            "epoch": trainer.current_epoch,
            "global_step": trainer.global_step,
            "weights_sha256": hashlib.sha256(
                "".join(tensor_sha256(m.weight) for m in modules.values()).encode()
            ).hexdigest(),
        }
        if epoch is not None:
            self._last_epoch_applied = max(self._last_epoch_applied, epoch)
        if self.log_metrics and self._probe is not None:
            metrics = self._probe.compute(self._operators)
            record["metrics"] = metrics
            for logger in trainer.loggers:
                logger.log_metrics({f"ice/{k}": v for k, v in metrics.items()}, step=trainer.global_step)
            rank_zero_info(f"ICECallback ({reason}): " + ", ".join(f"{k}={v:.3f}" for k, v in metrics.items()))
        self.applications.append(record)

    def _apply_operators(self, pipe: Any, bases: dict[str, torch.Tensor] | None) -> None:
        modules = self._modules(pipe)
        targets = [(n, modules[n], self._operators[s]) for n, s in self._layer_spaces.items()]
        apply_edits(targets, bases=bases)

    def _modules(self, pipe: Any) -> dict[str, torch.nn.Linear]:
        return {name: resolve_layer(pipe, name) for name in self._layer_spaces}

    def _bind(self, pipe: Any) -> None:
        """After a resume, rebuild what is not in the state dict (module handles, the probe's states)."""
        if self._probe is None and self._probe_state is not None:
            from .erase import pipeline_spaces

            mods = self._modules(pipe)
            layers = {n: (mods[n], s) for n, s in self._layer_spaces.items()}
            self._probe = TextSpaceProbe(layers, pipeline_spaces(pipe), self.spec)
            self._probe.load_state_dict(self._probe_state)

    def _due(self, epoch: int) -> bool:
        return self.every_n_epochs is not None and (epoch + 1) % self.every_n_epochs == 0

    def _last_due_epoch(self, completed: int) -> int:
        if self.every_n_epochs is None or completed < 0:
            return -1
        return completed - (completed + 1) % self.every_n_epochs

    # -- distributed and optimizer -------------------------------------------------------------
    @staticmethod
    def _broadcast(trainer: Trainer, operators: dict[str, DissociationOperator]) -> dict:
        if trainer.world_size <= 1:
            return operators
        return trainer.strategy.broadcast(operators, src=0)

    @staticmethod
    def _sync_weights(trainer: Trainer, modules: dict[str, torch.nn.Linear]) -> None:
        """Under DDP, check that every rank holds byte-identical edited weights; take rank 0's if not.

        The edit is deterministic and every rank starts from the same weights and operator, so the check
        (one hash per layer) normally passes; the fallback keeps a rank from silently drifting."""
        if trainer.world_size <= 1:
            return
        from .export import tensor_sha256

        digest = [tensor_sha256(m.weight) for m in modules.values()]
        differs = float(trainer.strategy.broadcast(digest, src=0) != digest)
        flag = torch.tensor(differs, device=trainer.strategy.root_device)
        if float(trainer.strategy.reduce(flag, reduce_op="sum")) > 0:
            rank_zero_warn("ICECallback: ranks disagreed on the edited weights; taking rank 0's")
            weights = trainer.strategy.broadcast({n: m.weight.detach().cpu() for n, m in modules.items()}, src=0)
            for n, m in modules.items():
                m.weight.copy_(weights[n].to(m.weight.device))

    @staticmethod
    def _reset_optimizer_state(trainer: Trainer, modules: dict[str, torch.nn.Linear]) -> None:
        """Drop Adam moments (and any other state) of the edited weights: stale moments would push the
        weights straight back along the erased directions."""
        params = {id(m.weight) for m in modules.values()}
        for opt in trainer.optimizers:
            for p in list(opt.state):
                if id(p) in params:
                    del opt.state[p]

    # -- checks ----------------------------------------------------------------------------------
    def _pipeline_or_none(self, pl_module: LightningModule) -> Any:
        try:
            return self.get_pipeline(pl_module)
        except AttributeError:
            return None

    def _check_export_dir(self) -> None:
        if self.export_dir is None:
            return
        path = Path(self.export_dir)
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise PermissionError(f"ICECallback export_dir {path} cannot be created ({err}); choose another") from err
        if not os.access(path, os.W_OK):
            raise PermissionError(f"ICECallback export_dir {path} is not writable; choose another before training")

    @staticmethod
    def _after_weight_averaging(trainer: Trainer) -> None:
        """Run the final application after weight-averaging callbacks have written the averaged weights."""
        from lightning.pytorch.callbacks import StochasticWeightAveraging, WeightAveraging

        cbs = trainer.callbacks
        mine = [c for c in cbs if isinstance(c, ICECallback)]
        averaging = [i for i, c in enumerate(cbs) if isinstance(c, (WeightAveraging, StochasticWeightAveraging))]
        if averaging and mine and cbs.index(mine[0]) < max(averaging):
            for c in mine:
                cbs.remove(c)
            last = max(i for i, c in enumerate(cbs) if isinstance(c, (WeightAveraging, StochasticWeightAveraging)))
            cbs[last + 1 : last + 1] = mine

    # -- state -----------------------------------------------------------------------------------
    def summary(self) -> dict[str, Any]:
        """What was applied and when (goes into the export manifest)."""
        return {
            "applications": self.applications,
            "every_n_epochs": self.every_n_epochs,
            "reapply_at": self.reapply_at,
            "drop_concept_samples": self.drop_concept_samples,
            "dropped_samples": self.dropped_samples,
        }

    def state_dict(self) -> dict[str, Any]:
        ops = None
        if self._operators is not None:
            ops = {
                s: {"U": o.U.cpu(), "M": o.M.cpu(), "method": o.method, "hparams": o.hparams}
                for s, o in self._operators.items()
            }
        return {
            "applications": self.applications,
            "last_epoch_applied": self._last_epoch_applied,
            "operators": ops,
            "layer_spaces": self._layer_spaces,
            "probe": None if self._probe is None else self._probe.state_dict(),
            "dropped_samples": self.dropped_samples,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.applications = list(state_dict["applications"])
        self._last_epoch_applied = state_dict["last_epoch_applied"]
        self.dropped_samples = state_dict.get("dropped_samples", 0)
        self._layer_spaces = dict(state_dict["layer_spaces"])
        ops = state_dict["operators"]
        self._operators = None if ops is None else {s: DissociationOperator(**o) for s, o in ops.items()}
        self._probe_state, self._probe, self._last = state_dict["probe"], None, {}


class SavePipeline(Callback):
    """Save the module's diffusers pipeline with ``save_pretrained`` at the end of ``fit`` (rank zero), so a
    model trained through ``ice-lightning fit`` comes out as a folder ``from_pretrained`` loads.

    Example (in a config's ``trainer.callbacks``)::

        - class_path: ice_lightning.callback.SavePipeline
          init_args: {dirpath: models/shapes-image}
    """

    def __init__(self, dirpath: str) -> None:
        self.dirpath = dirpath

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.is_global_zero:
            pipe = find_pipeline(pl_module)
            pipe.save_pretrained(self.dirpath)
            rank_zero_info(f"SavePipeline: saved {type(pipe).__name__} to {self.dirpath}")
