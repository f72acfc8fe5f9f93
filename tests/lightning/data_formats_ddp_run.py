"""Run by tests/lightning/test_data_formats.py: a 2-process CPU DDP fit (gloo) of a module that only records the
captions it is given, over each data module in turn; each rank writes OUT/<module>-rank{N}.json: the captions it saw,
per epoch. Then litdata checkpointed after step 1 (mid-epoch 0), stopped, and resumed from there:
OUT/litdata-resumed-rank{N}.json, the captions of both parts (up to the checkpoint, then resumed), per epoch."""

import json
import sys
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")

import torch  # noqa: E402
from lightning.pytorch import Callback, LightningModule, Trainer  # noqa: E402

from ice_lightning.lightning.data_formats import (  # noqa: E402
    HFDatasetDataModule,
    LitDataModule,
    WebDatasetDataModule,
)


class Recorder(LightningModule):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.seen: list[list[str]] = []

    def training_step(self, batch, batch_idx):
        while len(self.seen) <= self.current_epoch:  # by epoch: a fit resumed mid-epoch starts no epoch of its own
            self.seen.append([])
        self.seen[self.current_epoch] += list(batch["captions"])
        return (self.w * batch["pixel_values"].mean()).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


class CheckpointAt(Callback):
    """Saves a checkpoint after training step ``step``, as ``ModelCheckpoint(every_n_train_steps=...)`` does."""

    def __init__(self, path: Path, step: int):
        self.path, self.step = path, step

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step == self.step:
            trainer.save_checkpoint(self.path)


if __name__ == "__main__":
    out, data_dir = Path(sys.argv[1]), Path(sys.argv[2])
    modules = {
        "datasets": HFDatasetDataModule(str(data_dir / "imagefolder"), resolution=16, batch_size=2),
        "webdataset": WebDatasetDataModule(str(data_dir / "shards" / "{000..003}.tar"), resolution=16, batch_size=2),
        "litdata": LitDataModule(str(data_dir / "chunks"), resolution=16, batch_size=2),
    }

    def trainer(**kwargs) -> Trainer:
        return Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=2, logger=False,
                       enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                       limit_val_batches=0, default_root_dir=out, use_distributed_sampler=True, **kwargs)  # fmt: skip

    for name, data in modules.items():
        module = Recorder()
        fit = trainer()
        fit.fit(module, datamodule=data)
        (out / f"{name}-rank{fit.global_rank}.json").write_text(json.dumps(module.seen))
    first, rest = Recorder(), Recorder()
    stopped = trainer(max_steps=2, callbacks=[CheckpointAt(out / "litdata-mid.ckpt", step=1)])  # stands for a crash
    stopped.fit(first, datamodule=LitDataModule(str(data_dir / "chunks"), resolution=16, batch_size=2))
    resumed = trainer()
    resumed.fit(rest, datamodule=LitDataModule(str(data_dir / "chunks"), resolution=16, batch_size=2),
                ckpt_path=out / "litdata-mid.ckpt")  # fmt: skip
    both = [first.seen[0][:2] + rest.seen[0], *rest.seen[1:]]  # step 1's batch of 2, then the resumed fit
    (out / f"litdata-resumed-rank{resumed.global_rank}.json").write_text(json.dumps(both))
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
