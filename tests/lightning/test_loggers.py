"""Sample grids reach every logger a Trainer has, each in its own way, offline: TensorBoard (an image summary),
Weights & Biases in offline mode (a media file), MLflow with a ``file:`` store (an artifact), CSV (PNG files beside
``metrics.csv``)."""

from pathlib import Path

import numpy as np
import pytest
from lightning.pytorch import Trainer
from lightning.pytorch.loggers import CSVLogger, MLFlowLogger, TensorBoardLogger, WandbLogger

from ice_lightning import ICEModule
from ice_lightning.lightning.data import CaptionFolderDataModule
from ice_lightning.lightning.image_logging import log_image

DATA = Path(__file__).parents[2] / "examples" / "data"


@pytest.fixture
def loggers(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    pytest.importorskip("mlflow")
    pytest.importorskip("tensorboard")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # the file: store, offline (mlflow 3 asks for the opt-in)
    yield [CSVLogger(tmp_path / "csv"), TensorBoardLogger(tmp_path / "tb"),
           WandbLogger(save_dir=str(tmp_path), project="ice", offline=True),
           MLFlowLogger(experiment_name="ice", tracking_uri=f"file:{tmp_path / 'mlruns'}")]  # fmt: skip
    import wandb

    wandb.finish()  # W&B keeps one run per process: the next test starts its own


def _images_in_tensorboard(folder: Path) -> list[str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(next(folder.rglob("events.out.tfevents.*")).parent), size_guidance={"images": 0})
    events.Reload()
    return events.Tags()["images"]


def test_log_image_reaches_every_logger(loggers, tmp_path):
    image = np.zeros((8, 12, 3), dtype=np.uint8)
    image[:, :6, 0] = 255
    assert log_image(loggers, "preview/before_after", image, step=3) == [
        "CSVLogger", "TensorBoardLogger", "WandbLogger", "MLFlowLogger"]  # fmt: skip
    for logger in loggers:
        logger.finalize("success")
    from PIL import Image

    (csv_png,) = (tmp_path / "csv").rglob("images/preview_before_after_step000003.png")
    assert np.array_equal(np.asarray(Image.open(csv_png)), image)  # the pixels, exactly
    assert "preview/before_after" in _images_in_tensorboard(tmp_path / "tb")
    assert list((tmp_path / "wandb").rglob("media/images/preview/before_after_*.png"))
    (artifact,) = (tmp_path / "mlruns").rglob("artifacts/preview/before_after/preview_before_after_step000003.png")
    assert np.array_equal(np.asarray(Image.open(artifact)), image)


def test_module_sample_grids_go_to_every_logger(loggers, tmp_path):
    module = ICEModule("tiny:sd", validation_concepts={"erase": ["Van Gogh"], "family": "style"}, num_samples=1,
                       sample_steps=2)  # fmt: skip
    data = CaptionFolderDataModule(str(DATA / "tiny_images"), resolution=16, batch_size=2)
    trainer = Trainer(default_root_dir=tmp_path, max_epochs=1, limit_train_batches=1, limit_val_batches=1,
                      num_sanity_val_steps=0, logger=loggers, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, accelerator="cpu")  # fmt: skip
    trainer.fit(module, datamodule=data)
    csv_dir = Path(loggers[0].log_dir)
    assert (csv_dir / "metrics.csv").exists() and list((csv_dir / "samples").glob("epoch000.png"))  # beside it
    assert not list(csv_dir.rglob("images/*.png"))  # written once
    assert "samples" in _images_in_tensorboard(tmp_path / "tb")
    assert list((tmp_path / "wandb").rglob("media/images/samples_*.png"))
    assert list((tmp_path / "mlruns").rglob("artifacts/samples/*.png"))


def test_callback_preview_goes_to_every_logger_and_into_the_export(tmp_path):
    """``ICECallback(log=LogOptions(preview=1))``: the before/after grid after each application reaches the loggers
    (CSV, TensorBoard); the export ships the last one as ``before_after.png`` in its card; its "before" half equals a
    fresh sampling of the original pipeline with the same seeds, its "after" half a sampling of the export."""
    pytest.importorskip("tensorboard")
    from diffusers import DiffusionPipeline
    from PIL import Image

    from ice_lightning import ICECallback
    from ice_lightning.core.preview import generate, preview_prompts, preview_rows_grid
    from ice_lightning.demos.tiny import build_tiny_pipeline
    from ice_lightning.lightning import LogOptions

    ice = ICECallback(erase=["Van Gogh"], family="style", every_n_epochs=1, export=str(tmp_path / "export"),
                      log=LogOptions(metrics=False, preview=1, seed=3, steps=2))  # fmt: skip
    loggers = [CSVLogger(tmp_path / "csv"), TensorBoardLogger(tmp_path / "tb")]
    trainer = Trainer(default_root_dir=tmp_path, max_epochs=1, limit_train_batches=1, limit_val_batches=0,
                      logger=loggers, callbacks=[ice], enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, accelerator="cpu")  # fmt: skip
    trainer.fit(ICEModule("tiny:sd", num_samples=0), datamodule=CaptionFolderDataModule(
        str(DATA / "tiny_images"), resolution=16, batch_size=2))  # fmt: skip
    steps = [a["global_step"] for a in ice.state.applications]
    assert [a["preview_logged_to"] for a in ice.state.applications] == [["CSVLogger", "TensorBoardLogger"]] * 3
    pngs = sorted(p.name for p in Path(loggers[0].log_dir).rglob("images/ice_preview_step*.png"))
    assert pngs == sorted({f"ice_preview_step{s:06d}.png" for s in steps})
    assert "ice/preview" in _images_in_tensorboard(tmp_path / "tb")
    shipped = np.asarray(Image.open(tmp_path / "export" / "before_after.png"))
    assert "![before/after](before_after.png)" in (tmp_path / "export" / "README.md").read_text()
    prompts = preview_prompts(ice.spec, 1)
    before = generate(build_tiny_pipeline("sd"), prompts, seed=3, steps=2)
    after = generate(DiffusionPipeline.from_pretrained(tmp_path / "export"), prompts, seed=3, steps=2)
    assert np.abs(shipped.astype(int) - preview_rows_grid(prompts, before, after).astype(int)).max() <= 1
    assert all(__import__("ice_lightning").verify_export(tmp_path / "export").values())
