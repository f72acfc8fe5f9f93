"""Caption + image folders and caption + video-frame folders as a ``LightningDataModule``.

Layouts::

    images/                      videos/
      cat.png   cat.txt            clip_000/ caption.txt 000.png 001.png ...
      dog.jpg   dog.txt            clip_001/ caption.txt 000.png ...

Each item is ``{"pixel_values": Tensor, "captions": str}`` with pixels in [-1, 1]: (3, H, W) for images,
(F, 3, H, W) for videos (``num_frames`` frames sampled evenly).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Subset, random_split

__all__ = ["Augment", "CaptionedImageFolder", "CaptionedVideoFolder", "CaptionFolderDataModule", "collate"]

_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}


@dataclass(frozen=True)
class Augment:
    """The image transforms of diffusers' ``train_text_to_image.py`` after its resize of the short side to
    ``resolution``: ``CenterCrop`` (``center_crop=True``) or ``RandomCrop``, then ``RandomHorizontalFlip`` with
    ``random_flip``. A clip's frames share one crop and one flip."""

    center_crop: bool = True
    random_flip: bool = False

    def draw(self, size: tuple[int, int], resolution: int) -> tuple[int, int, bool]:
        """``(left, top, flip)`` for an image of ``size`` (w, h) resized so its short side is ``resolution``."""
        w, h = _resized(size, resolution)
        if self.center_crop:
            left, top = (w - resolution) // 2, (h - resolution) // 2
        else:  # RandomCrop: every window equally likely
            left, top = (int(torch.randint(0, d - resolution + 1, ())) for d in (w, h))
        flip = self.random_flip and bool(torch.rand(()) < 0.5)
        return left, top, flip


def _resized(size: tuple[int, int], resolution: int) -> tuple[int, int]:
    w, h = size
    scale = resolution / min(w, h)
    return max(resolution, round(w * scale)), max(resolution, round(h * scale))


def _to_tensor(img: Image.Image, resolution: int, window: tuple[int, int, bool]) -> torch.Tensor:
    """Resize the short side to ``resolution``, crop the ``window`` (``(left, top, flip)`` of :meth:`Augment.draw`),
    scale to [-1, 1], (3, H, W)."""
    img = img.convert("RGB")
    img = img.resize(_resized(img.size, resolution), Image.BICUBIC)
    left, top, flip = window
    img = img.crop((left, top, left + resolution, top + resolution))
    arr = np.asarray(img, dtype=np.float32) / 127.5 - 1.0
    out = torch.from_numpy(arr).permute(2, 0, 1).contiguous()
    return out.flip(-1) if flip else out


class CaptionedImageFolder(Dataset):
    """Images with a same-name ``.txt`` caption beside each."""

    def __init__(self, root: str | Path, resolution: int = 512, augment: Augment | None = None) -> None:
        self.root, self.resolution, self.augment = Path(root), resolution, augment or Augment()
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder {self.root} does not exist")
        self.items = [
            (p, p.with_suffix(".txt")) for p in sorted(self.root.iterdir()) if p.suffix.lower() in _IMAGE_SUFFIXES
        ]
        missing = [str(c) for _, c in self.items if not c.exists()]
        if missing:
            raise FileNotFoundError(f"{len(missing)} image(s) have no caption file, e.g. {missing[0]}")
        if not self.items:
            raise ValueError(f"no images ({', '.join(sorted(_IMAGE_SUFFIXES))}) in {self.root}")

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        image, caption = self.items[i]
        img = Image.open(image)
        window = self.augment.draw(img.size, self.resolution)
        return {"pixel_values": _to_tensor(img, self.resolution, window), "captions": caption.read_text().strip()}


class CaptionedVideoFolder(Dataset):
    """One sub-folder per clip: frame images (sorted by name) and ``caption.txt``."""

    def __init__(self, root: str | Path, resolution: int = 256, num_frames: int = 8,
                 augment: Augment | None = None) -> None:  # fmt: skip
        self.root, self.resolution, self.num_frames = Path(root), resolution, num_frames
        self.augment = augment or Augment()
        if not self.root.is_dir():
            raise FileNotFoundError(f"video folder {self.root} does not exist")
        self.clips = [d for d in sorted(self.root.iterdir()) if d.is_dir()]
        if not self.clips:
            raise ValueError(f"no clip folders in {self.root}")
        for d in self.clips:
            if not (d / "caption.txt").exists():
                raise FileNotFoundError(f"clip {d} has no caption.txt")

    def __len__(self) -> int:
        return len(self.clips)

    def __getitem__(self, i: int) -> dict:
        clip = self.clips[i]
        frames = sorted(p for p in clip.iterdir() if p.suffix.lower() in _IMAGE_SUFFIXES)
        if len(frames) < self.num_frames:
            raise ValueError(f"clip {clip} has {len(frames)} frames, fewer than num_frames={self.num_frames}")
        idx = np.linspace(0, len(frames) - 1, self.num_frames).round().astype(int)
        images = [Image.open(frames[k]) for k in idx]
        window = self.augment.draw(images[0].size, self.resolution)  # one crop and flip for the whole clip
        pixels = torch.stack([_to_tensor(img, self.resolution, window) for img in images])
        return {"pixel_values": pixels, "captions": (clip / "caption.txt").read_text().strip()}


def collate(items: list[dict]) -> dict:
    return {"pixel_values": torch.stack([x["pixel_values"] for x in items]), "captions": [x["captions"] for x in items]}


#: Caption sets shipped with the package (beside the packaged configs), found by name.
SHIPPED_DATA = Path(__file__).resolve().parents[1] / "configs" / "data"


def shipped_data(root: str | os.PathLike) -> Path:
    """``root`` as given, or, when no such folder exists here and it names a caption set shipped with the
    package (``tiny_images``, ``tiny_videos``), that set."""
    path = Path(root)
    shipped = SHIPPED_DATA / path
    if not path.exists() and len(path.parts) == 1 and shipped.is_dir():
        return shipped
    return path


class CaptionFolderDataModule(LightningDataModule):
    """Train (and optionally validation) data from caption folders, images or videos.

    Args:
        train_dir: the training folder (``NNN.png`` + ``NNN.txt`` pairs, or ``clip_NNN/`` folders of frames with a
            ``caption.txt``). The name of a caption set shipped with the package (``tiny_images``,
            ``tiny_videos``: what the packaged ``tiny_*`` configs train on) works from any directory unless a
            folder of that name exists there.
        val_dir: a validation folder; ``None`` splits ``val_fraction`` off the training folder.
        video: clips of frames instead of images.
        resolution: side of the square images (or frames) in pixels.
        num_frames: frames taken evenly from each clip (``video=True``).
        batch_size: samples per batch.
        num_workers: ``DataLoader`` worker processes.
        val_fraction: share of ``train_dir`` held out when there is no ``val_dir``.
        seed: the seed of that split.
        shuffle: shuffle the training set each epoch.
        center_crop: crop the centre of each training image (``False``: a random window), as
            ``train_text_to_image.py --center_crop``; validation images are always centre-cropped.
        random_flip: flip each training image (a clip: all its frames) horizontally with probability 1/2, as
            ``--random_flip``.

    Example:
        >>> from ice_lightning import CaptionFolderDataModule
        >>> data = CaptionFolderDataModule("tiny_images", resolution=16, batch_size=2)
        >>> data.setup("fit"); len(data.train_set), len(data.val_set)
        (6, 2)
    """

    def __init__(
        self,
        train_dir: str,
        val_dir: str | None = None,
        video: bool = False,
        resolution: int = 512,
        num_frames: int = 8,
        batch_size: int = 4,
        num_workers: int = 0,
        val_fraction: float = 0.25,
        seed: int = 0,
        shuffle: bool = True,
        center_crop: bool = True,
        random_flip: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None

    def _folder(self, root: str, train: bool) -> Dataset:
        h = self.hparams
        root = shipped_data(root)
        augment = Augment(h.center_crop, h.random_flip) if train else Augment()
        if h.video:
            return CaptionedVideoFolder(root, h.resolution, h.num_frames, augment)
        return CaptionedImageFolder(root, h.resolution, augment)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        data = self._folder(self.hparams.train_dir, train=True)
        if self.hparams.val_dir is not None:
            self.train_set, self.val_set = data, self._folder(self.hparams.val_dir, train=False)
        else:
            n_val = max(1, round(len(data) * self.hparams.val_fraction)) if len(data) > 1 else 0
            g = torch.Generator().manual_seed(self.hparams.seed)
            train, val = random_split(range(len(data)), [len(data) - n_val, n_val], generator=g)
            # the same split of the same files; the held-out part without the training transforms
            self.train_set = Subset(data, train.indices)
            self.val_set = Subset(self._folder(self.hparams.train_dir, train=False), val.indices)

    def _loader(self, data: Dataset, shuffle: bool) -> DataLoader:
        return DataLoader(
            data,
            batch_size=self.hparams.batch_size,
            shuffle=shuffle,
            num_workers=self.hparams.num_workers,
            collate_fn=collate,
            generator=torch.Generator().manual_seed(self.hparams.seed) if shuffle else None,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, shuffle=self.hparams.shuffle)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shuffle=False)
