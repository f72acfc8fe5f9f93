"""Run by tests/lightning/test_data_formats.py: a 2-process CPU DDP fit (gloo) of a module that only records the
captions it is given, over each data module in turn; each rank writes OUT/<module>-rank{N}.json: the captions it saw,
per epoch. Then litdata checkpointed after step 1 (mid-epoch 0), stopped, and resumed from there:
OUT/litdata-resumed-rank{N}.json, the captions of both parts (up to the checkpoint, then resumed), per epoch."""

import json
import sys
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")

from lightning.pytorch import Trainer  # noqa: E402
from recording import CaptionRecorder, CheckpointAt  # noqa: E402

from ice_lightning.lightning.data_formats import (  # noqa: E402
    HFDatasetDataModule,
    LitDataModule,
    WebDatasetDataModule,
)

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
        module = CaptionRecorder()
        fit = trainer()
        fit.fit(module, datamodule=data)
        (out / f"{name}-rank{fit.global_rank}.json").write_text(json.dumps(module.seen))
    first, rest = CaptionRecorder(), CaptionRecorder()
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
