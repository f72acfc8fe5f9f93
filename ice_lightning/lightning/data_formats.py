"""Captioned images kept as teams keep them at scale, as ``LightningDataModule``s with the transforms of the
caption folders (``resolution``, ``center_crop``, ``random_flip``, as diffusers' ``train_text_to_image.py``):

- :class:`HFDatasetDataModule`: a Hugging Face ``datasets`` dataset: a local ``imagefolder`` (images with a
  ``metadata.jsonl`` of captions), parquet files, or any ``datasets.Dataset``; map-style, so Lightning shards it over
  ranks with a ``DistributedSampler``.
- :class:`WebDatasetDataModule`: WebDataset tar shards (``000.tar``: ``key.jpg`` + ``key.txt``), streamed; the
  shards are split over ranks, then over ``DataLoader`` workers, so each sample is read once per epoch.
- :class:`LitDataModule`: Lightning's streaming format (``litdata`` chunks, made from a caption folder by
  :func:`optimize_caption_folder`), read by ``litdata.StreamingDataset``, which splits the chunks over ranks and
  workers itself; its loader's position goes into Lightning's checkpoint, so a fit resumed mid-epoch sees exactly
  the samples the uninterrupted fit would have.

Each item is ``{"pixel_values": (3, H, W) in [-1, 1], "captions": str}``, as :class:`CaptionFolderDataModule`'s.

Example:
    >>> from ice_lightning.lightning.data_formats import HFDatasetDataModule
    >>> HFDatasetDataModule("data/my_imagefolder", resolution=512).hparams.caption_column
    'text'
"""

from __future__ import annotations

import glob
import io
import random
from pathlib import Path
from typing import Any

from lightning.pytorch import LightningDataModule
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from .data import Augment, CaptionedImageFolder, _to_tensor, collate

__all__ = ["HFDatasetDataModule", "LitDataModule", "WebDatasetDataModule", "optimize_caption_folder"]

_IMAGE_KEYS = "jpg;jpeg;png;webp"


def _item(image: Image.Image, caption: Any, resolution: int, augment: Augment, train: bool) -> dict:
    """One training item; a list of captions gives a random one in training and the first otherwise (the script's
    ``tokenize_captions``)."""
    if isinstance(caption, (list, tuple)):
        caption = random.choice(caption) if train else caption[0]
    if not isinstance(caption, str):
        raise ValueError(f"a caption must be a string or a list of strings, got {type(caption).__name__}")
    window = augment.draw(image.size, resolution)
    return {"pixel_values": _to_tensor(image, resolution, window), "captions": caption}


class _Rows(Dataset):
    def __init__(self, data, image_column: str, caption_column: str, resolution: int, augment: Augment,
                 train: bool) -> None:  # fmt: skip
        self.data, self.image_column, self.caption_column = data, image_column, caption_column
        self.resolution, self.augment, self.train = resolution, augment, train

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> dict:
        row = self.data[i]
        return _item(row[self.image_column], row[self.caption_column], self.resolution, self.augment, self.train)


class HFDatasetDataModule(LightningDataModule):
    """Captioned images from a Hugging Face ``datasets`` dataset.

    Args:
        dataset: a local folder of images with a ``metadata.jsonl`` (``{"file_name": ..., "text": ...}`` per line:
            the ``imagefolder`` layout), a parquet file or a folder of them, or a ``datasets.Dataset`` (Python only).
        image_column: the column of images (``datasets.Image``), as the script's ``--image_column``.
        caption_column: the column of captions (a string or a list of strings), as ``--caption_column``.
        split: the split to train on.
        val_split: a split to validate on (``None``: no validation data).
        resolution, center_crop, random_flip: as :class:`~ice_lightning.lightning.data.CaptionFolderDataModule`
            (validation images are only resized and centre-cropped).
        batch_size, num_workers, shuffle, seed: the ``DataLoader``'s.
    """

    def __init__(self, dataset: Any, image_column: str = "image", caption_column: str = "text", split: str = "train",
                 val_split: str | None = None, resolution: int = 512, center_crop: bool = True,
                 random_flip: bool = False, batch_size: int = 4, num_workers: int = 0, shuffle: bool = True,
                 seed: int = 0) -> None:  # fmt: skip
        super().__init__()
        self.save_hyperparameters(ignore=["dataset"])
        self.dataset = dataset
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None

    def _load(self, split: str):
        import datasets

        if isinstance(self.dataset, (datasets.Dataset, datasets.DatasetDict)):
            data = self.dataset[split] if isinstance(self.dataset, datasets.DatasetDict) else self.dataset
        else:
            path = Path(self.dataset)
            if not path.exists():
                raise FileNotFoundError(f"dataset {self.dataset!r} does not exist: pass a local imagefolder (images "
                                        "with a metadata.jsonl), parquet files, or a datasets.Dataset")  # fmt: skip
            files = sorted(glob.glob(str(path / "**" / "*.parquet"), recursive=True)) if path.is_dir() else [str(path)]
            if path.suffix == ".parquet" or (path.is_dir() and files):
                data = datasets.load_dataset("parquet", data_files={split: files}, split=split)
            else:
                data = datasets.load_dataset("imagefolder", data_dir=str(path), split=split)
        missing = [c for c in (self.hparams.image_column, self.hparams.caption_column) if c not in data.column_names]
        if missing:
            raise ValueError(f"the dataset has no column {missing[0]!r} (it has {data.column_names}): set "
                             "image_column / caption_column")  # fmt: skip
        return data

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        h = self.hparams
        self.train_set = _Rows(self._load(h.split), h.image_column, h.caption_column, h.resolution,
                               Augment(h.center_crop, h.random_flip), train=True)  # fmt: skip
        if h.val_split is not None:
            self.val_set = _Rows(self._load(h.val_split), h.image_column, h.caption_column, h.resolution, Augment(),
                                 train=False)  # fmt: skip

    def train_dataloader(self) -> DataLoader:
        import torch

        return DataLoader(self.train_set, batch_size=self.hparams.batch_size, shuffle=self.hparams.shuffle,
                          num_workers=self.hparams.num_workers, collate_fn=collate,
                          generator=torch.Generator().manual_seed(self.hparams.seed))  # fmt: skip

    def val_dataloader(self) -> DataLoader:
        if self.val_set is None:
            return []
        return DataLoader(self.val_set, batch_size=self.hparams.batch_size, num_workers=self.hparams.num_workers,
                          collate_fn=collate)  # fmt: skip


class WebDatasetDataModule(LightningDataModule):
    """Captioned images from WebDataset tar shards, streamed.

    Args:
        shards: the training shards: a brace pattern (``"data/{000..015}.tar"``), a glob (``"data/*.tar"``) or a list
            of paths. Under DDP their number must be a multiple of the world size (each rank reads its own shards:
            give every shard the same number of samples, as WebDataset's writers do with ``maxcount``).
        val_shards: shards to validate on (``None``: no validation data).
        image_key: the extensions that hold the image (``"jpg;png"``: the first present).
        caption_key: the extension that holds the caption.
        resolution, center_crop, random_flip: as :class:`~ice_lightning.lightning.data.CaptionFolderDataModule`.
        batch_size, num_workers: the ``DataLoader``'s; the shards are split over the workers too.
        shuffle: the order of the shards, and a buffer of ``shuffle_buffer`` samples, each epoch.
        seed: the shuffle's seed.
    """

    def __init__(self, shards: str | list[str], val_shards: str | list[str] | None = None,
                 image_key: str = _IMAGE_KEYS, caption_key: str = "txt", resolution: int = 512,
                 center_crop: bool = True, random_flip: bool = False, batch_size: int = 4, num_workers: int = 0,
                 shuffle: bool = True, shuffle_buffer: int = 100, seed: int = 0) -> None:  # fmt: skip
        super().__init__()
        self.save_hyperparameters()

    def _urls(self, shards: str | list[str]) -> list[str]:
        import braceexpand

        if isinstance(shards, str):
            urls = [u for pattern in braceexpand.braceexpand(shards) for u in (sorted(glob.glob(pattern)) or [pattern])]
        else:
            urls = [str(s) for s in shards]
        absent = [u for u in urls if not Path(u).is_file()]
        if not urls or absent:
            raise FileNotFoundError(f"no WebDataset shard at {absent[0] if absent else shards!r}")
        return urls

    def _pipeline(self, shards, train: bool):
        import torch.distributed as dist
        import webdataset as wds

        urls = self._urls(shards)
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        if len(urls) % world:
            raise ValueError(f"{len(urls)} WebDataset shards cannot be split evenly over {world} ranks: each rank "
                             "reads whole shards, so give a multiple of the world size")  # fmt: skip
        h = self.hparams
        augment = Augment(h.center_crop, h.random_flip) if train else Augment()
        shuffle = train and h.shuffle
        # Shards in a new (seeded) order each epoch, then split over ranks and workers: a sample is read once.
        data = wds.WebDataset(urls, shardshuffle=len(urls) if shuffle else False, detshuffle=True, seed=h.seed,
                              nodesplitter=wds.split_by_node, workersplitter=wds.split_by_worker, empty_check=False)
        if shuffle:
            data = data.shuffle(h.shuffle_buffer, rng=random.Random(h.seed))
        return data.decode("pil").to_tuple(h.image_key, h.caption_key).map(
            lambda s: _item(s[0], s[1], h.resolution, augment, train))  # fmt: skip

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self._pipeline(self.hparams.shards, train=True), batch_size=self.hparams.batch_size,
                          num_workers=self.hparams.num_workers, collate_fn=collate)  # fmt: skip

    def val_dataloader(self) -> DataLoader:
        if self.hparams.val_shards is None:
            return []
        return DataLoader(self._pipeline(self.hparams.val_shards, train=False), batch_size=self.hparams.batch_size,
                          num_workers=self.hparams.num_workers, collate_fn=collate)  # fmt: skip


def _litdata():
    """``litdata``, or an error that says how to install it."""
    try:
        import litdata
    except ImportError as err:
        raise ImportError("litdata chunks need the litdata package: pip install 'ice-lightning[litdata]' or "
                          "pip install litdata (it requires torchvision; "
                          "beside a CPU-only torch wheel, pip install --no-deps litdata and then boto3 obstore "
                          "tifffile requests, as this project's set-up does)") from err  # fmt: skip
    return litdata


def _chunk_sample(pair: tuple[str, str]) -> dict:
    """One caption-folder sample as a litdata item: the image file's bytes as they are (no re-encoding), its caption."""
    image, caption = pair
    return {"image": Path(image).read_bytes(), "caption": Path(caption).read_text().strip()}


def optimize_caption_folder(folder: str | Path, output_dir: str | Path, chunk_bytes: int | str = "64MB",
                            chunk_size: int | None = None, num_workers: int = 1) -> Path:  # fmt: skip
    """Write a caption folder (``cat.png`` + ``cat.txt``, as :class:`CaptionFolderDataModule` reads) as ``litdata``
    chunks for :class:`LitDataModule`, with ``litdata.optimize``: each sample keeps its image file's bytes and its
    caption. ``output_dir`` must not exist yet (or be empty): nothing there is overwritten.

    Args:
        folder: the caption folder.
        output_dir: the new folder of chunks.
        chunk_bytes: the size of a chunk (``litdata``'s default unit: a few tens of MB suit streaming).
        chunk_size: a number of samples per chunk instead of ``chunk_bytes``.
        num_workers: ``litdata.optimize``'s processes.

    Example (``litdata`` installed)::

        optimize_caption_folder("data/images", "data/chunks")
        LitDataModule("data/chunks", resolution=512)
    """
    litdata = _litdata()
    output = Path(output_dir)
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise FileExistsError(f"{output} already exists and is not an empty folder: optimize_caption_folder writes "
                              "chunks only into a new folder; pass another output_dir or remove it")  # fmt: skip
    pairs = [(str(image), str(caption)) for image, caption in CaptionedImageFolder(folder).items]
    litdata.optimize(fn=_chunk_sample, inputs=pairs, output_dir=str(output.resolve()),
                     chunk_bytes=None if chunk_size else chunk_bytes, chunk_size=chunk_size, num_workers=num_workers,
                     verbose=False)  # fmt: skip
    return output


class _ChunkItem:
    """A litdata item (image bytes, caption) as a training item; a class, so the loader's workers can pickle it."""

    def __init__(self, image_key: str, caption_key: str, resolution: int, augment: Augment, train: bool) -> None:
        self.image_key, self.caption_key = image_key, caption_key
        self.resolution, self.augment, self.train = resolution, augment, train

    def __call__(self, sample: dict) -> dict:
        missing = [k for k in (self.image_key, self.caption_key) if k not in sample]
        if missing:
            raise ValueError(f"the litdata samples have no {missing[0]!r} (they have {sorted(sample)}): set "
                             "image_key / caption_key")  # fmt: skip
        image = sample[self.image_key]
        image = Image.open(io.BytesIO(image)) if isinstance(image, bytes) else image  # bytes, or a PIL image
        return _item(image, sample[self.caption_key], self.resolution, self.augment, self.train)


class LitDataModule(LightningDataModule):
    """Captioned images in Lightning's streaming format (``litdata`` chunks; make them from a caption folder with
    :func:`optimize_caption_folder`, or with ``litdata.optimize`` writing ``{"image": bytes, "caption": str}``).

    ``litdata.StreamingDataset`` splits the chunks over ranks and ``DataLoader`` workers (no distributed sampler),
    and its ``StreamingDataLoader`` keeps its position: Lightning saves it in every checkpoint, so
    ``trainer.fit(..., ckpt_path=...)`` mid-epoch resumes with the next unseen sample.

    Args:
        input_dir: the folder of chunks (``index.json`` + ``chunk-*.bin``); a local path (remote ``s3://`` folders
            work as ``litdata`` reads them, untested here).
        val_dir: chunks to validate on (``None``: no validation data).
        image_key: the sample's key that holds the image (encoded bytes, or a PIL image as ``litdata.optimize``
            stores one).
        caption_key: the sample's key that holds the caption (a string, or a list of strings: a random one in
            training).
        resolution, center_crop, random_flip: as :class:`~ice_lightning.lightning.data.CaptionFolderDataModule`.
        batch_size, num_workers: the loader's.
        shuffle, seed: ``StreamingDataset``'s (chunks, then samples in a chunk, in a new order each epoch).
        cache_dir: where ``litdata`` keeps downloaded chunks of a remote ``input_dir``.
    """

    def __init__(self, input_dir: str, val_dir: str | None = None, image_key: str = "image",
                 caption_key: str = "caption", resolution: int = 512, center_crop: bool = True,
                 random_flip: bool = False, batch_size: int = 4, num_workers: int = 0, shuffle: bool = True,
                 seed: int = 0, cache_dir: str | None = None) -> None:  # fmt: skip
        super().__init__()
        self.save_hyperparameters()

    def _loader(self, input_dir: str, train: bool):
        litdata = _litdata()
        from .streaming_loader import ResumableStreamingDataLoader

        if "://" not in input_dir and not (Path(input_dir) / "index.json").is_file():
            raise FileNotFoundError(f"{input_dir!r} has no index.json: it is not a folder of litdata chunks; "
                                    "make one with optimize_caption_folder(folder, output_dir)")  # fmt: skip
        h = self.hparams
        augment = Augment(h.center_crop, h.random_flip) if train else Augment()
        item = _ChunkItem(h.image_key, h.caption_key, h.resolution, augment, train)
        data = litdata.StreamingDataset(input_dir, cache_dir=h.cache_dir, shuffle=train and h.shuffle, seed=h.seed,
                                        transform=item)  # fmt: skip
        data[0]  # the keys checked here, by name, not in a loader's worker
        return ResumableStreamingDataLoader(data, batch_size=h.batch_size, num_workers=h.num_workers,
                                           collate_fn=collate)  # fmt: skip

    def train_dataloader(self):
        return self._loader(self.hparams.input_dir, train=True)

    def val_dataloader(self):
        return [] if self.hparams.val_dir is None else self._loader(self.hparams.val_dir, train=False)
