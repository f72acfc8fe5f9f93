"""Data at scale: Hugging Face ``datasets`` (imagefolder + metadata.jsonl, parquet), WebDataset shards and litdata
chunks, made in the test; each fits ``tiny_t2i``-style through the CLI from YAML, under DDP with 2 CPU processes
every sample is seen exactly once per epoch, and a litdata fit resumed mid-epoch sees what the uninterrupted one
does."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from lightning.pytorch import Trainer
from PIL import Image
from recording import CaptionRecorder, CheckpointAt, Crash

from ice_lightning.cli import main
from ice_lightning.lightning.data_formats import (
    HFDatasetDataModule,
    LitDataModule,
    WebDatasetDataModule,
    optimize_caption_folder,
)

datasets = pytest.importorskip("datasets")
wds = pytest.importorskip("webdataset")
pytest.importorskip("litdata")

N = 8


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """The same 8 captioned images as an imagefolder, a parquet file, 4 WebDataset shards and 4 litdata chunks (made
    from a caption folder)."""
    root = tmp_path_factory.mktemp("data")
    folder = root / "imagefolder"
    folder.mkdir()
    rng = np.random.default_rng(0)
    rows = []
    for i in range(N):
        Image.fromarray(rng.integers(0, 256, (20, 16, 3), dtype=np.uint8)).save(folder / f"{i:03d}.png")
        rows.append({"file_name": f"{i:03d}.png", "text": f"caption {i}"})
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    table = datasets.Dataset.from_dict({"image": [str(folder / r["file_name"]) for r in rows],
                                        "text": [r["text"] for r in rows]}).cast_column("image", datasets.Image())
    table.to_parquet(str(root / "train.parquet"))
    (root / "shards").mkdir()
    for s in range(4):
        with wds.TarWriter(str(root / "shards" / f"{s:03d}.tar")) as sink:
            for i in range(2 * s, 2 * s + 2):
                png = (folder / f"{i:03d}.png").read_bytes()
                sink.write({"__key__": f"{i:03d}", "png": png, "txt": f"caption {i}"})
    (root / "captions").mkdir()
    for i in range(N):
        (root / "captions" / f"{i:03d}.png").write_bytes((folder / f"{i:03d}.png").read_bytes())
        (root / "captions" / f"{i:03d}.txt").write_text(f"caption {i}\n")
    optimize_caption_folder(root / "captions", root / "chunks", chunk_size=2)
    return root


def _items(module):
    module.setup("fit")
    return {x["captions"]: x["pixel_values"] for b in module.train_dataloader() for x in _unbatch(b)}


def _unbatch(batch):
    return [{"captions": c, "pixel_values": p} for c, p in zip(batch["captions"], batch["pixel_values"], strict=True)]


def test_every_source_gives_the_same_items(data):
    """imagefolder, parquet and shards: the same captions and the same pixels (resized and centre-cropped); a bad
    column name is refused by name."""
    folder = _items(HFDatasetDataModule(str(data / "imagefolder"), resolution=16, batch_size=3))
    parquet = _items(HFDatasetDataModule(str(data / "train.parquet"), resolution=16, batch_size=3))
    shards = _items(WebDatasetDataModule(str(data / "shards" / "*.tar"), resolution=16, batch_size=3))
    chunks = _items(LitDataModule(str(data / "chunks"), resolution=16, batch_size=3))
    assert set(folder) == set(parquet) == set(shards) == set(chunks) == {f"caption {i}" for i in range(N)}
    for caption, pixels in folder.items():
        assert pixels.shape == (3, 16, 16)
        for other in (parquet, shards, chunks):
            assert torch.equal(pixels, other[caption])
    with pytest.raises(ValueError, match="no column 'caption'.*set image_column / caption_column"):
        HFDatasetDataModule(str(data / "imagefolder"), caption_column="caption").setup("fit")
    with pytest.raises(FileNotFoundError, match="no WebDataset shard"):
        WebDatasetDataModule(str(data / "nothing" / "{000..001}.tar")).train_dataloader()
    with pytest.raises(FileNotFoundError, match="no index.json.*make one with optimize_caption_folder"):
        LitDataModule(str(data / "captions")).train_dataloader()
    with pytest.raises(ValueError, match=r"no 'text' \(they have \['caption', 'image'\]\): set image_key"):
        LitDataModule(str(data / "chunks"), caption_key="text").train_dataloader()


def test_optimize_writes_only_into_a_new_folder(data, tmp_path):
    """The chunks hold each image file's bytes as they were; an existing, non-empty folder is refused untouched."""
    import litdata

    stream = litdata.StreamingDataset(str(data / "chunks"))
    assert sorted(stream[i]["caption"] for i in range(len(stream))) == [f"caption {i}" for i in range(N)]
    assert {stream[i]["image"] for i in range(N)} == {p.read_bytes() for p in (data / "captions").glob("*.png")}
    assert len(list((data / "chunks").glob("chunk-*.bin"))) == N // 2
    (tmp_path / "mine.txt").write_text("keep")
    with pytest.raises(FileExistsError, match="not an empty folder.*another output_dir"):
        optimize_caption_folder(data / "captions", tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["mine.txt"] and (tmp_path / "mine.txt").read_text() == "keep"


def test_without_litdata_the_error_says_how_to_install_it(data, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "litdata", None)  # import litdata now raises ImportError
    with pytest.raises(ImportError, match="pip install litdata.*--no-deps"):
        LitDataModule(str(data / "chunks")).train_dataloader()
    with pytest.raises(ImportError, match="pip install litdata"):
        optimize_caption_folder(data / "captions", tmp_path / "chunks")
    assert not (tmp_path / "chunks").exists()


@pytest.mark.parametrize("source", ["datasets", "webdataset", "litdata"])
def test_each_source_fits_through_the_cli_from_yaml(source, data, tmp_path):
    init = ({"class_path": "ice_lightning.lightning.data_formats.HFDatasetDataModule",
             "init_args": {"dataset": str(data / "imagefolder"), "resolution": 16, "batch_size": 4}}
            if source == "datasets" else
            {"class_path": "ice_lightning.lightning.data_formats.WebDatasetDataModule",
             "init_args": {"shards": str(data / "shards" / "{000..003}.tar"), "resolution": 16, "batch_size": 4}}
            if source == "webdataset" else
            {"class_path": "ice_lightning.lightning.data_formats.LitDataModule",
             "init_args": {"input_dir": str(data / "chunks"), "resolution": 16, "batch_size": 4}})
    config = {"seed_everything": 0,
              "trainer": {"accelerator": "cpu", "max_epochs": 1, "logger": False, "enable_checkpointing": False,
                          "limit_val_batches": 0, "default_root_dir": str(tmp_path),
                          "callbacks": [{"class_path": "ice_lightning.ICECallback",
                                         "init_args": {"erase": ["Van Gogh"], "family": "style",
                                                       "export": str(tmp_path / "erased")}}]},
              "model": {"pipeline": "tiny:sd", "learning_rate": 1.0e-3},
              "data": init}  # fmt: skip
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    assert main(["fit", "--config", str(tmp_path / "config.yaml")]) == 0
    manifest = json.loads((tmp_path / "erased" / "ice_manifest.json").read_text())
    assert manifest["ice_callback"]["applications"][-1]["global_step"] == 2  # 8 samples in batches of 4


@pytest.mark.slow
def test_ddp_sees_every_sample_exactly_once_per_epoch_and_litdata_resumes_exactly(data, tmp_path):
    script = Path(__file__).with_name("data_formats_ddp_run.py")
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "HF_DATASETS_OFFLINE": "1"}  # fmt: skip
    run = subprocess.run([sys.executable, str(script), str(tmp_path), str(data)], capture_output=True, text=True,
                         env=env, timeout=600, cwd=tmp_path)  # fmt: skip
    assert run.returncode == 0, run.stderr[-4000:]
    everything = sorted(f"caption {i}" for i in range(N))
    for name in ("datasets", "webdataset", "litdata"):
        ranks = [json.loads((tmp_path / f"{name}-rank{r}.json").read_text()) for r in (0, 1)]
        assert len(ranks[0]) == len(ranks[1]) == 2, name  # two epochs on each rank
        for epoch in range(2):
            both = ranks[0][epoch] + ranks[1][epoch]
            assert sorted(both) == everything, (name, epoch)  # each sample once: no rank misses or repeats one
            assert ranks[0][epoch] and ranks[1][epoch]
    for r in (0, 1):  # stopped mid-epoch, checkpointed and resumed: each rank sees what it saw uninterrupted
        resumed = json.loads((tmp_path / f"litdata-resumed-rank{r}.json").read_text())
        assert resumed == json.loads((tmp_path / f"litdata-rank{r}.json").read_text()), r


@pytest.mark.parametrize(("limit", "at_step"), [(None, 3), (3, 2)])
def test_litdata_resumes_mid_epoch_exactly(data, tmp_path, limit, at_step):
    """A fit that crashes after a checkpoint mid-epoch 0 (step 3 of 4 batches of 2; or step 2 of 3 with
    ``limit_train_batches=3``), resumed from that checkpoint, sees the same batches as the uninterrupted 2-epoch fit:
    the rest of epoch 0 (not again from its start), then a whole, freshly shuffled epoch 1 (not a replay of the
    resumed epoch's tail, as litdata's own loader gives under Lightning). In-process loading: with 2 workers it holds
    too (checked by hand), but each suspended epoch then waits out PyTorch's worker shutdown (~5 s)."""

    def fit(module, *callbacks, ckpt_path=None):
        trainer = Trainer(accelerator="cpu", max_epochs=2, logger=False, enable_checkpointing=False,
                          enable_progress_bar=False, enable_model_summary=False, callbacks=list(callbacks),
                          default_root_dir=tmp_path, limit_train_batches=limit)  # fmt: skip
        trainer.fit(module, datamodule=LitDataModule(str(data / "chunks"), resolution=16, batch_size=2),
                    ckpt_path=ckpt_path)  # fmt: skip

    per_epoch = 2 * (limit or 4)  # captions
    whole = CaptionRecorder()
    fit(whole)
    assert [len(epoch) for epoch in whole.seen] == [per_epoch, per_epoch]
    if limit is None:
        assert all(sorted(epoch) == [f"caption {i}" for i in range(N)] for epoch in whole.seen)
    assert whole.seen[0] != whole.seen[1]  # each epoch its own order
    crashed = CaptionRecorder()
    with pytest.raises(Crash):
        fit(crashed, CheckpointAt(tmp_path / "mid.ckpt", step=at_step, crash_after=2))
    resumed = CaptionRecorder()
    fit(resumed, ckpt_path=tmp_path / "mid.ckpt")
    assert [crashed.seen[0][: 2 * at_step] + resumed.seen[0], resumed.seen[1]] == whole.seen
