"""A module that only records the captions it trains on, and a checkpoint (then, optionally, a crash) at a chosen
step: shared by the data-module tests and their DDP script."""

from pathlib import Path

import torch
from lightning.pytorch import Callback, LightningModule


class CaptionRecorder(LightningModule):
    """``seen[epoch]``: the captions of every training batch of that epoch, in order (a fit resumed mid-epoch starts
    no epoch of its own, so they are keyed by the trainer's epoch)."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.seen: list[list[str]] = []

    def training_step(self, batch, batch_idx):
        while len(self.seen) <= self.current_epoch:
            self.seen.append([])
        self.seen[self.current_epoch] += list(batch["captions"])
        return (self.w * batch["pixel_values"].mean()).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


class Crash(Exception):
    pass


class CheckpointAt(Callback):
    """Saves a checkpoint after training step ``step`` (as ``ModelCheckpoint(every_n_train_steps=...)`` does) and, with
    ``crash_after``, raises :class:`Crash` that many steps later."""

    def __init__(self, path: Path, step: int, crash_after: int | None = None):
        self.path, self.step, self.crash_after = path, step, crash_after

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step == self.step:
            trainer.save_checkpoint(self.path)
        if self.crash_after is not None and trainer.global_step == self.step + self.crash_after:
            raise Crash
