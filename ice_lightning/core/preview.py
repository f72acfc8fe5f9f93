"""Before/after samples of any pipeline, with fixed seeds: the held-out prompts of each erased concept and a few of
the preserved ones, sampled before the edit and after it, laid out as one image (rows: prompts; left: before,
right: after). ``ice-lightning erase --preview N`` ships it in the export as ``before_after.png``, which the model
card shows; ``ICECallback(log=LogOptions(preview=N))`` logs it after every application; the shapes world's report
draws its grid with the same :func:`render_grid`.

Example:
    >>> import torch
    >>> before, after = torch.zeros(2, 3, 4, 4), torch.ones(2, 3, 4, 4)
    >>> grid = render_grid([("a prompt", before, after)], scale=2)  # two samples of 4 x 4, twice enlarged
    >>> grid.shape[0] == 16 + 8 + 2 and grid.dtype.name
    'uint8'
"""

from __future__ import annotations

import io

import numpy as np
import torch
from torch import Tensor

from .concepts import ConceptSpec
from .progress import pipeline_bar_config

__all__ = ["PREVIEW_NAME", "Preview", "preview_prompts", "sample_grid", "render_grid", "preview_rows_grid", "png_bytes",
           "generate"]

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
    # In eval mode (no dropout) whatever mode training left the models in, and back as they were after.
    modules = [m for m in getattr(pipe, "components", {}).values() if isinstance(m, torch.nn.Module)]
    modes = [m.training for m in modules]
    for m in modules:
        m.eval()
    try:
        return _samples(pipe, prompts, seed, steps, device)
    finally:
        for m, mode in zip(modules, modes, strict=True):
            m.train(mode)


def _samples(pipe, prompts: list[str], seed: int, steps: int, device) -> Tensor:
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


def render_grid(rows: list[tuple[str, Tensor, Tensor]], scale: int = 1, gap: int = 8) -> np.ndarray:
    """The before/after picture of every preview (``--preview``, the callback's, the shapes world's report): one row
    per prompt, its label, the ``before`` samples side by side, a gap, the ``after`` samples (images ``(N, 3, H, W)``
    or clips ``(N, F, 3, H, W)``, a clip's frames side by side), each ``scale`` times enlarged; uint8 ``(H', W', 3)``.
    ``rows``: ``(label, before, after)``."""
    from PIL import Image, ImageDraw

    def strip(x: Tensor) -> Tensor:  # (N, 3, H, W) or (N, F, 3, H, W) -> (3, H, W_total)
        return torch.cat(list(x.flatten(0, 1) if x.dim() == 5 else x), dim=-1)

    strips = [(label, strip(b), strip(a)) for label, b, a in rows]
    h = strips[0][1].shape[1] * scale
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    label_w = 8 + max(int(measure.textlength(label)) for label, _, _ in strips)  # every label whole
    w = label_w + (strips[0][1].shape[2] + strips[0][2].shape[2]) * scale + gap
    canvas = Image.new("RGB", (w, 16 + len(strips) * (h + 2)), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((label_w, 2), "before", fill="black")
    draw.text((label_w + strips[0][1].shape[2] * scale + gap, 2), "after", fill="black")
    for r, (label, b, a) in enumerate(strips):
        y = 16 + r * (h + 2)
        draw.text((2, y + h // 2 - 6), label, fill="black")
        x = label_w
        for part in (b, a):
            arr = (part.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
            canvas.paste(Image.fromarray(arr).resize((part.shape[2] * scale, h), Image.NEAREST), (x, y))
            x += part.shape[2] * scale + gap
    return np.asarray(canvas)


def png_bytes(image: np.ndarray) -> bytes:
    """``image`` (uint8 ``(H, W, 3)``) as PNG bytes."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


class Preview:
    """Before/after samples of one erasure: :meth:`before` just before the edit, :meth:`after` once it is written
    (the PNG bytes, for ``save_erased(..., extra_files={PREVIEW_NAME: ...})``)."""

    def __init__(self, pipe, n: int, seed: int = 0, steps: int = 10) -> None:
        if not (isinstance(n, int) and n >= 1):
            raise ValueError(f"a preview needs at least one prompt per erased concept, got {n!r}")
        self.pipe, self.n, self.seed, self.steps = pipe, n, seed, steps
        self.prompts: list[str] = []
        self._before: Tensor | None = None
        #: the grid of the last :meth:`after` (``(H, W, 3)`` uint8, before | after), for a logger
        self.last_grid: np.ndarray | None = None

    def before(self, spec: ConceptSpec) -> None:
        self.prompts = preview_prompts(spec, self.n)
        self._before = generate(self.pipe, self.prompts, self.seed, self.steps, "preview before the edit")

    def after(self) -> bytes:
        if self._before is None:
            raise RuntimeError("Preview.after() before Preview.before(): nothing to compare with")
        after = generate(self.pipe, self.prompts, self.seed, self.steps, "preview after the edit")
        self.last_grid = preview_rows_grid(self.prompts, self._before, after)
        return png_bytes(self.last_grid)


def preview_rows_grid(prompts: list[str], before: Tensor, after: Tensor) -> np.ndarray:
    """:func:`render_grid` of one sample per prompt, enlarged to at least 64 pixels high."""
    rows = [(p, before[i : i + 1], after[i : i + 1]) for i, p in enumerate(prompts)]
    return render_grid(rows, scale=max(1, 64 // before.shape[-2]))
