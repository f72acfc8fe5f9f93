"""EMA as diffusers' scripts keep it (``--use_ema``) through Lightning's ``WeightAveraging``, checked against
diffusers' own ``EMAModel``; with ``ICECallback``, the export ships the EMA weights, erased."""

from pathlib import Path

import pytest
import torch
from diffusers.training_utils import EMAModel
from lightning.pytorch import Callback, Trainer
from torch.optim.swa_utils import AveragedModel

import ice_lightning
from ice_lightning import ICECallback, ICEModule
from ice_lightning.lightning import DiffusersEMA
from ice_lightning.lightning.data import CaptionFolderDataModule

DATA = Path(__file__).parents[2] / "examples" / "data"


@pytest.mark.parametrize("schedule", [{}, {"decay": 0.9, "update_after_step": 2},
                                      {"use_ema_warmup": True, "power": 0.75, "min_decay": 0.1}])  # fmt: skip
def test_the_preset_averages_exactly_as_diffusers_ema_model(schedule):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    reference = EMAModel(model.parameters(), **schedule)
    averaged = AveragedModel(model, **DiffusersEMA(**schedule)._kwargs)  # Lightning builds it the same way
    for _ in range(15):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        reference.step(model.parameters())
        averaged.update_parameters(model)
    for ours, theirs in zip(averaged.module.parameters(), reference.shadow_params, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-7)


class _Reference(Callback):
    """diffusers' EMAModel over the UNet, stepped after every optimizer step, and the weights right after the
    callback's first application (when training starts)."""

    def on_train_start(self, trainer, pl_module):
        self.unet = pl_module.pipeline.unet
        self.after_setup = {k: v.detach().clone() for k, v in self.unet.state_dict().items()}
        self.ema = EMAModel(self.unet.parameters(), decay=0.9)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.ema.step(self.unet.parameters())


def test_a_fit_with_the_ema_preset_exports_the_ema_weights_erased(tmp_path):
    reference = _Reference()
    ice = ICECallback(erase=["Van Gogh"], family="style", export=str(tmp_path / "export"), log=False)
    trainer = Trainer(default_root_dir=tmp_path, max_epochs=1, limit_train_batches=3, limit_val_batches=0,
                      callbacks=[reference, DiffusersEMA(decay=0.9), ice], logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")  # fmt: skip
    trainer.fit(ICEModule("tiny:sd", num_samples=0, learning_rate=1e-2), datamodule=CaptionFolderDataModule(
        str(DATA / "tiny_images"), resolution=16, batch_size=2))  # fmt: skip
    assert [a["reason"] for a in ice.state.applications] == ["setup", "fit_end"]
    from diffusers import DiffusionPipeline

    shipped = DiffusionPipeline.from_pretrained(tmp_path / "export").unet.state_dict()
    ema = dict(zip([n for n, _ in reference.unet.named_parameters()], reference.ema.shadow_params, strict=True))
    edited = {f"{n.removeprefix('unet.')}.weight": n for n in ice.state.layer_spaces}
    assert edited and set(edited) <= set(ema)
    for name, value in ema.items():
        if name not in edited:  # every other weight is the EMA copy
            torch.testing.assert_close(shipped[name], value, rtol=0, atol=1e-7)
            continue
        # the EMA weight, erased: what changed since the setup application, edited by the operator
        D = ice.state.operators[ice.state.layer_spaces[edited[name]]].dense()
        last = reference.after_setup[name].double()
        expected = last + (value.double() - last) @ (torch.eye(D.shape[0], dtype=D.dtype) - D)
        torch.testing.assert_close(shipped[name].double(), expected, rtol=0, atol=1e-6)
        assert not torch.allclose(shipped[name], value)  # the erasure is there
    assert float((ema[next(iter(edited))] - reference.after_setup[next(iter(edited))]).abs().max()) > 1e-4  # trained
    assert all(ice_lightning.verify_export(tmp_path / "export").values())
