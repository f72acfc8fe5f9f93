"""Run by tests/lightning/test_data_formats.py: a 2-process CPU DDP fit (gloo) of a module that only records the
captions it is given, over each data module in turn; each rank writes OUT/<module>-rank{N}.json: the captions it saw,
per epoch."""

import json
import sys
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")

import torch  # noqa: E402
from lightning.pytorch import LightningModule, Trainer  # noqa: E402

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

    def on_train_epoch_start(self):
        self.seen.append([])

    def training_step(self, batch, batch_idx):
        self.seen[-1] += list(batch["captions"])
        return (self.w * batch["pixel_values"].mean()).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


if __name__ == "__main__":
    out, data_dir = Path(sys.argv[1]), Path(sys.argv[2])
    modules = {
        "datasets": HFDatasetDataModule(str(data_dir / "imagefolder"), resolution=16, batch_size=2),
        "webdataset": WebDatasetDataModule(str(data_dir / "shards" / "{000..003}.tar"), resolution=16, batch_size=2),
        "litdata": LitDataModule(str(data_dir / "chunks"), resolution=16, batch_size=2),
    }
    for name, data in modules.items():
        module = Recorder()
        trainer = Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=2, logger=False,
                          enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                          limit_val_batches=0, default_root_dir=out, use_distributed_sampler=True)  # fmt: skip
        trainer.fit(module, datamodule=data)
        (out / f"{name}-rank{trainer.global_rank}.json").write_text(json.dumps(module.seen))
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
