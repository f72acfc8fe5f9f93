"""Write the tiny caption folders used by configs/tiny_*.yaml and the examples (committed; rerun to remake).

python examples/make_tiny_data.py
"""

from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).parents[1] / "ice_lightning" / "configs" / "data"  # examples/data links here
COLOURS = {"red": (220, 40, 40), "green": (40, 200, 60), "blue": (40, 70, 220), "yellow": (230, 220, 40)}
CAPTIONS = [
    "a painting by Van Gogh of a {} square",
    "a photo of a {} square",
    "a {} square on a table",
    "Van Gogh style artwork, a {} square",
]


def square(colour, x: int, y: int, size: int = 16, side: int = 6) -> Image.Image:
    img = np.full((size, size, 3), 245, dtype=np.uint8)
    img[y : y + side, x : x + side] = colour
    return Image.fromarray(img)


def main() -> None:
    rng = np.random.default_rng(0)
    images = ROOT / "tiny_images"
    images.mkdir(parents=True, exist_ok=True)
    for i, (name, rgb) in enumerate(c for c in COLOURS.items() for _ in range(2)):
        x, y = rng.integers(0, 10, size=2)
        square(rgb, int(x), int(y)).save(images / f"{i:02d}.png")
        (images / f"{i:02d}.txt").write_text(CAPTIONS[i % len(CAPTIONS)].format(name) + "\n")
    videos = ROOT / "tiny_videos"
    for i, (name, rgb) in enumerate(COLOURS.items()):
        clip = videos / f"clip_{i:02d}"
        clip.mkdir(parents=True, exist_ok=True)
        for f in range(4):
            square(rgb, 2 + 2 * f, 5).save(clip / f"{f:03d}.png")
        (clip / "caption.txt").write_text(f"a {name} square moving right, Van Gogh style\n")
    print(f"wrote {ROOT}")


if __name__ == "__main__":
    main()
