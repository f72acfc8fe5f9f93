"""Before/after samples of any pipeline, with fixed seeds: the held-out prompts of each erased concept and a few of
the preserved ones, sampled before the edit and after it, laid out as one image (rows: prompts; left: before,
right: after). ``ice-lightning erase --preview N`` ships it in the export as ``before_after.png``, which the model
card shows.

Example:
    >>> import torch
    >>> before, after = torch.zeros(2, 3, 4, 4), torch.ones(2, 3, 4, 4)
    >>> preview_grid(before, after).shape  # 2 prompts of 4 x 4, before | after
    (8, 8, 3)
"""

from __future__ import annotations

import io

import numpy as np
import torch
from torch import Tensor

from .concepts import ConceptSpec
from .progress import pipeline_bar_config

__all__ = ["PREVIEW_NAME", "Preview", "preview_prompts", "sample_grid", "preview_grid", "generate"]

#: The preview's file in an export (the model card shows it).
PREVIEW_NAME = "before_after.png"


def preview_prompts(spec: ConceptSpec, n: int) -> list[str]:
    """``n`` held-out prompts of the erased concepts, then ``ceil(n / 2)`` of the preserved (nearby) ones."""
    erased = [p.text for p in spec.heldout_erase_prompts()][:n]
    kept = [p.text for p in spec.heldout_near_prompts()][: -(-n // 2)]
    return erased + kept


@torch.no_grad()
def generate(pipe, prompts: list[str], seed: int = 0, steps: int = 10, desc: str = "sampling") -> Tensor:
    """One sample per prompt as float tensors in [0, 1] (``(N, 3, H, W)`` images or ``(N, F, 3, H, W)`` clips),
    each with the noise of ``seed`` (the same before and after an edit)."""
    pipe.set_progress_bar_config(**pipeline_bar_config(desc))
    device = getattr(pipe, "device", torch.device("cpu"))
    samples = []
    for prompt in prompts:  # one generator per prompt: a prompt's noise does not depend on the others
        g = torch.Generator(device=device).manual_seed(seed)
        out = pipe([prompt], num_inference_steps=steps, generator=g, output_type="np")
        frames = getattr(out, "frames", None)
        x = torch.from_numpy(np.asarray(frames if frames is not None else out.images)).float()
        samples.append(x.movedim(-1, -3))
    return torch.cat(samples)


def sample_grid(samples: Tensor) -> np.ndarray:
    """One image of samples, ``(N, 3, H, W)`` or clips ``(N, F, 3, H, W)`` in [0, 1]: samples stacked top to bottom,
    a clip's frames side by side; uint8 ``(H', W', 3)``."""
    images = samples.movedim(-3, -1).numpy()  # (N, [F,] H, W, 3)
    if images.ndim == 5:  # frames side by side
        images = np.concatenate(list(np.moveaxis(images, 1, 0)), axis=2)
    return (np.concatenate(list(images), axis=0) * 255).clip(0, 255).astype(np.uint8)


def preview_grid(before: Tensor, after: Tensor) -> np.ndarray:
    """The before and after samples of the same prompts side by side (left: before)."""
    return np.concatenate([sample_grid(before), sample_grid(after)], axis=1)


class Preview:
    """Before/after samples of one erasure: :meth:`before` just before the edit, :meth:`after` once it is written
    (the PNG bytes, for ``save_erased(..., extra_files={PREVIEW_NAME: ...})``)."""

    def __init__(self, pipe, n: int, seed: int = 0, steps: int = 10) -> None:
        if not (isinstance(n, int) and n >= 1):
            raise ValueError(f"a preview needs at least one prompt per erased concept, got {n!r}")
        self.pipe, self.n, self.seed, self.steps = pipe, n, seed, steps
        self.prompts: list[str] = []
        self._before: Tensor | None = None

    def before(self, spec: ConceptSpec) -> None:
        self.prompts = preview_prompts(spec, self.n)
        self._before = generate(self.pipe, self.prompts, self.seed, self.steps, "preview before the edit")

    def after(self) -> bytes:
        if self._before is None:
            raise RuntimeError("Preview.after() before Preview.before(): nothing to compare with")
        after = generate(self.pipe, self.prompts, self.seed, self.steps, "preview after the edit")
        from PIL import Image

        buf = io.BytesIO()
        Image.fromarray(preview_grid(self._before, after)).save(buf, format="PNG")
        return buf.getvalue()
