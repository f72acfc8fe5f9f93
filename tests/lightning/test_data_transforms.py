"""``center_crop`` and ``random_flip`` of the caption-folder data, as ``train_text_to_image.py`` applies them after
resizing the short side: ``CenterCrop`` or ``RandomCrop``, then ``RandomHorizontalFlip``; validation untouched."""

import numpy as np
import torch
from PIL import Image

from ice_lightning.lightning.data import Augment, CaptionedImageFolder, CaptionedVideoFolder, CaptionFolderDataModule
from ice_lightning.lightning.data import _to_tensor as to_tensor


def _folder(tmp_path, size=(24, 16), n=1):
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(tmp_path / f"{i:03d}.png")
        (tmp_path / f"{i:03d}.txt").write_text(f"caption {i}")
    return tmp_path


def test_random_crop_draws_every_window_and_flip_mirrors_it(tmp_path):
    """A 24 x 16 image at resolution 16: 9 windows (left 0..8), each drawn; every item is exactly one window of the
    resized image, flipped or not; both happen."""
    root = _folder(tmp_path)
    image = Image.open(root / "000.png")
    windows = {(left, flip): to_tensor(image, 16, (left, 0, flip)) for left in range(9) for flip in (False, True)}
    assert torch.equal(windows[(3, True)], windows[(3, False)].flip(-1))
    data = CaptionedImageFolder(root, 16, Augment(center_crop=False, random_flip=True))
    torch.manual_seed(0)
    seen = set()
    for _ in range(200):
        x = data[0]["pixel_values"]
        (match,) = [k for k, w in windows.items() if torch.equal(w, x)]
        seen.add(match)
    assert {left for left, _ in seen} == set(range(9)) and {flip for _, flip in seen} == {False, True}
    centred = CaptionedImageFolder(root, 16)[0]["pixel_values"]  # the default: the centre, unflipped
    assert torch.equal(centred, windows[(4, False)])


def test_a_clip_shares_one_flip_and_validation_is_never_augmented(tmp_path):
    clip = tmp_path / "videos" / "clip_000"
    clip.mkdir(parents=True)
    rng = np.random.default_rng(1)
    for k in range(4):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(clip / f"{k:03d}.png")
    (clip / "caption.txt").write_text("a clip")
    plain = CaptionedVideoFolder(tmp_path / "videos", 16, 4)[0]["pixel_values"]
    flipping = CaptionedVideoFolder(tmp_path / "videos", 16, 4, Augment(random_flip=True))
    torch.manual_seed(0)
    kinds = set()
    for _ in range(20):
        x = flipping[0]["pixel_values"]
        assert torch.equal(x, plain) or torch.equal(x, plain.flip(-1))  # all frames, or none
        kinds.add(torch.equal(x, plain))
    assert kinds == {True, False}
    (tmp_path / "images").mkdir()
    images = _folder(tmp_path / "images", size=(16, 16), n=8)
    data = CaptionFolderDataModule(str(images), resolution=16, batch_size=2, random_flip=True, center_crop=False)
    data.setup("fit")
    reference = CaptionedImageFolder(images, 16)
    assert len(data.train_set) == 6 and len(data.val_set) == 2
    for _ in range(5):  # the held-out items are the plain centre crops, every time
        assert all(torch.equal(data.val_set[i]["pixel_values"], reference[j]["pixel_values"])
                   for i, j in enumerate(data.val_set.indices))  # fmt: skip
