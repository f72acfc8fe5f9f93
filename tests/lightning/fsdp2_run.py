"""Run by tests/lightning/test_distributed.py: a user's own module that shards its UNet with FSDP2
(``fully_shard`` in ``configure_model``) under ``ModelParallelStrategy`` on 2 CPU processes (gloo), with
ICECallback. Usage: ``fsdp2_run.py OUT MODE`` with MODE ``train`` (lr > 0, checkpoint every epoch, export),
``resume`` (from ``OUT/../train/ckpt/epoch=0*.ckpt``) or ``module KIND`` (ICEModule of the tiny pipeline KIND, which
shards itself, lr 0, export; the default's hardening reads the sharded layers' Gram matrix). Each rank writes
OUT/rank{N}.json."""

import hashlib
import json
import sys
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")

import torch  # noqa: E402
from lightning.pytorch import LightningModule, Trainer  # noqa: E402
from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402
from lightning.pytorch.strategies import ModelParallelStrategy  # noqa: E402
from torch.distributed.tensor import DTensor  # noqa: E402

from ice_lightning import ICECallback  # noqa: E402
from ice_lightning.core.pipelines import load_pipeline  # noqa: E402
from ice_lightning.core.sharding import local_shard  # noqa: E402

GATHERED = []  # shapes of every DTensor made whole during the callback's applications
_full_tensor = DTensor.full_tensor


def recording_full_tensor(self, *a, **k):
    GATHERED.append(list(self.shape))
    return _full_tensor(self, *a, **k)


DTensor.full_tensor = recording_full_tensor


class UserModule(LightningModule):
    """What a company's own training module looks like: its pipeline, its loss, its sharding."""

    def __init__(self, lr: float) -> None:
        super().__init__()
        self.pipeline = load_pipeline("tiny:sd")
        self.unet = self.pipeline.unet
        self.pipeline.text_encoder.requires_grad_(False)
        self.pipeline.vae.requires_grad_(False)
        self.lr = lr

    def configure_model(self) -> None:
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]
        for block in [*self.unet.down_blocks, *self.unet.up_blocks, self.unet.mid_block]:
            fully_shard(block, mesh=mesh)
        fully_shard(self.unet, mesh=mesh)

    def training_step(self, batch, batch_idx):
        g = torch.Generator().manual_seed(1000 * self.global_step + self.global_rank)
        x = torch.randn(2, 4, 8, 8, generator=g)
        with torch.no_grad():
            states = self.pipeline.encode_prompt(batch, "cpu", 1, False)[0]
        return torch.nn.functional.mse_loss(self.unet(x, 500, encoder_hidden_states=states).sample, x)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.unet.parameters(), lr=self.lr, weight_decay=0.0)


def main(out: Path, mode: str, kind: str = "sd") -> None:
    lr = 0.0 if mode == "module" else 1e-3
    if mode == "module":  # ICEModule shards itself (configure_model) under ModelParallelStrategy
        from ice_lightning import CaptionFolderDataModule, ICEModule

        module = ICEModule(f"tiny:{kind}", learning_rate=lr, weight_decay=0.0)
    else:
        module = UserModule(lr)
    ice = ICECallback(erase=["Van Gogh"], family="style", every_n_epochs=1,
                      export=str(out / "export") if mode in ("train", "module") else None)  # fmt: skip
    callbacks = [ice]
    if mode == "train":
        callbacks.append(ModelCheckpoint(dirpath=out / "ckpt", save_top_k=-1, every_n_epochs=1))
    trainer = Trainer(
        accelerator="cpu", devices=2, max_epochs=2, logger=False, callbacks=callbacks, enable_progress_bar=False,
        strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1),
        enable_checkpointing=mode == "train", enable_model_summary=False, default_root_dir=out,
    )  # fmt: skip
    data = [["a painting by Van Gogh", "a photo of a dog"]] * 2  # two batches of two captions per epoch
    ckpt = None
    if mode == "resume":
        ckpt = str(next((out.parent / "train" / "ckpt").glob("epoch=0*")))
    if mode == "module":
        images = Path(__file__).parents[2] / "examples" / "data" / "tiny_images"
        trainer.fit(module, datamodule=CaptionFolderDataModule(str(images), resolution=8, batch_size=2))
    else:
        trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(data, batch_size=None), ckpt_path=ckpt)
    # every parameter of the denoiser, this rank's shards: a resumed run must end where the uninterrupted one does
    den = module.denoiser if mode == "module" else module.unet
    final = hashlib.sha256(b"".join(local_shard(p).detach().numpy().tobytes() for p in den.parameters()))
    modules = ice.edited_modules()
    result = {
        "final": final.hexdigest(),
        "applications": [{"reason": a["reason"], "epoch": a["epoch"], "sha": a["weights_sha256"]}
                         for a in ice.applications],  # fmt: skip
        "sharded": all(isinstance(m.weight, DTensor) for m in modules.values()),
        "rows": {n: [m.weight.to_local().shape[0], m.weight.shape[0]] for n, m in modules.items()},
        "weight_shapes": [list(m.weight.shape) for m in modules.values()],
        "gathered": GATHERED,
        "metrics": [a.get("metrics", {}) for a in ice.applications],
    }
    (out / f"rank{trainer.global_rank}.json").write_text(json.dumps(result))
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), *sys.argv[2:])
