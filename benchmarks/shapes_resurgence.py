"""Concept resurgence in the shapes world: erase "red" from the shipped image model, then fine-tune on a data
set of which a quarter is red shapes captioned *without naming red* ("a circle", "a shape", or the colour's
held-out words "ruby", "cherry"), with sample filters and without.

Every run erases at setup through ICECallback (ICE defaults, the world's concept spec) and re-applies the edit
after every epoch. The runs differ in what keeps red out of the fine-tune: nothing; the caption filter
(``SampleFilterCallback(drop_concepts=spec)``: red and its training synonyms by name); the shapes detector on
the images (``SampleFilterCallback(ShapesDetectorFilter("red"))``). A ShapesProbe after the callback samples every
seen prompt after every epoch and records red's presence on its prompts and the mean accuracy of the other concepts.

    python benchmarks/shapes_resurgence.py          # about 10 minutes on 2 CPU cores
    python benchmarks/shapes_resurgence.py --tiny   # the suite's smoke run
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

from _common import RESULTS, table, write_report
from lightning.pytorch import Trainer, seed_everything

from ice_lightning import ICECallback, ICEModule, SampleFilterCallback
from ice_lightning.demos.shapes import ShapesDataModule, ShapesDetectorFilter
from ice_lightning.demos.shapes.evaluation import ShapesProbe, concept_spec

TARGET_PRESENCE = 0.05
#: Where red is measured: prompts that ask for it with training words ("a red circle") and with held-out words
#: ("a ruby disc", as in the disguised captions), and prompts that name only a shape ("a circle").
SPLITS = ("seen", "paraphrase", "unnamed")
PRESENCE = {"seen": "presence", "paraphrase": "presence_paraphrase", "unnamed": "presence_unnamed"}
NO_FILTER = "ICECallback every epoch, no filter"
CAPTION = "ICECallback every epoch + caption filter"
GUARDED = "ICECallback every epoch + detector filter"


def fine_tune(concept: str, every_n_epochs: int | None, args, drop: bool = False, detector: bool = False) -> dict:
    seed_everything(args.seed, verbose=False)
    module = ICEModule(pipeline=str(args.pipeline), learning_rate=args.lr, weight_decay=0.0, seed=args.seed)
    spec = concept_spec(concept)
    ice = ICECallback(spec=spec, every_n_epochs=every_n_epochs, at_fit_end=False, log=False)
    guard = SampleFilterCallback(ShapesDetectorFilter(concept) if detector else None,
                                 drop_concepts=spec if drop else None) if drop or detector else None  # fmt: skip
    probe = ShapesProbe(concept, samples=args.samples, seed=args.seed, steps=args.sample_steps, splits=SPLITS)
    data = ShapesDataModule(size=module.unet.config.sample_size, train_size=args.train_size, val_size=64,
                            batch_size=64, seed=args.seed + 100, disguise=[concept])  # fmt: skip
    callbacks = [c for c in (guard, ice, probe) if c is not None]
    trainer = Trainer(accelerator="cpu", max_epochs=args.epochs, callbacks=callbacks, logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      limit_val_batches=0, num_sanity_val_steps=0)  # fmt: skip
    trainer.fit(module, datamodule=data)
    return {"history": probe.history, "dropped_by_filter": dict(guard.state.dropped_by_filter) if guard else {},
            "dropped_samples": guard.dropped_samples if guard else 0}


def plot(runs: dict[str, list[dict]], path: Path, concept: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6))
    for (label, hist), colour in zip(runs.items(), ("tab:red", "tab:blue", "tab:green"), strict=True):
        epochs = list(range(len(hist)))
        ax.plot(epochs, [max(h[k] for k in PRESENCE.values()) for h in hist], "o-", color=colour,
                label=f"{concept} presence (highest of 3 prompt sets), {label}")  # fmt: skip
        ax.plot(epochs, [h["accuracy_others"] for h in hist], "s--", color=colour, alpha=0.6,
                label=f"other concepts' accuracy, {label}")  # fmt: skip
    ax.axhline(TARGET_PRESENCE, color="grey", lw=0.8, ls=":")
    ax.set_xlabel("fine-tuning epochs after erasure")
    ax.set_ylabel("rate on generated samples")
    ax.set_ylim(-0.02, 1.02)
    ax.legend(fontsize=7, loc="center right")
    ax.set_title(f"Resurgence of '{concept}' during fine-tuning on data that contains it", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def report(runs: dict[str, list[dict]], dropped: dict[str, dict], args, seconds: float, name: str) -> list[str]:
    """The markdown report; the target is checked on the measurements after each fine-tuning epoch (the first row
    is the erased model before fine-tuning: its "unnamed" value is the model's own prior for a shape with no
    colour, which an edit of the word does not touch)."""
    held = {label: max(h[k] for h in hist[1:] for k in PRESENCE.values()) for label, hist in runs.items()}
    md = [f"# Shapes world: resurgence of {args.concept!r} during fine-tuning ({'tiny' if args.tiny else 'full'})",
          "", f"{args.epochs} epochs of {args.train_size} samples (all colours, so a quarter {args.concept}, captioned "
          f"without naming {args.concept}), lr {args.lr}, batch 64; {args.samples} samples per prompt per "
          "measurement. Epoch 0 is right after the erasure, before any fine-tuning.", ""]  # fmt: skip
    md += [f"{args.concept} presence on three prompt sets (seen: \"a {args.concept} circle\"; paraphrase: held-out "
           f"words, \"a ruby disc\"; unnamed: \"a circle\") and the other concepts' accuracy, per run:", ""]
    for label, hist in runs.items():
        md += [f"**{label}**", ""]
        md += table(["epoch", "seen", "paraphrase", "unnamed", "others' accuracy"],
                    [[e, h["presence"], h["presence_paraphrase"], h["presence_unnamed"], h["accuracy_others"]]
                     for e, h in enumerate(hist)])  # fmt: skip
        md += [""]
    md += [f"Highest {args.concept} presence after a fine-tuning epoch (any prompt set), {label}: {v:.3f} (target <= "
           f"{TARGET_PRESENCE}); samples dropped: {dropped[label] or 0}." for label, v in held.items()]  # fmt: skip
    md += ["", f"![resurgence]({name}.png)", "", f"Total {seconds:.0f} s."]
    return md


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="1 epoch of 1 step, 1 sample per prompt (tests)")
    ap.add_argument("--pipeline", default="shapes-image", help="the shipped model or a pipeline folder")
    ap.add_argument("--concept", default="red", help="a colour (its samples are captioned without naming it)")
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--train-size", type=int, default=1024, help="fine-tuning samples per epoch (a quarter red)")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--samples", type=int, default=8, help="samples per prompt at each measurement")
    ap.add_argument("--sample-steps", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--report-only", action="store_true", help="rewrite the report and plot from the saved JSON")
    args = ap.parse_args(argv)
    if args.tiny:
        args.epochs, args.train_size, args.samples, args.sample_steps = 1, 64, 1, 2
    name = "shapes_resurgence_tiny" if args.tiny else "shapes_resurgence"
    if args.report_only:
        saved = json.loads((args.out / f"{name}.json").read_text())
        runs, dropped, seconds = saved["runs"], saved["dropped"], saved["seconds"]
    else:
        warnings.filterwarnings("ignore")
        t0 = time.perf_counter()
        results = {NO_FILTER: fine_tune(args.concept, 1, args),
                   CAPTION: fine_tune(args.concept, 1, args, drop=True),
                   GUARDED: fine_tune(args.concept, 1, args, detector=True)}  # fmt: skip
        runs = {label: r["history"] for label, r in results.items()}
        dropped = {k: r["dropped_by_filter"] for k, r in results.items()}
        seconds = time.perf_counter() - t0
    args.out.mkdir(parents=True, exist_ok=True)
    plot(runs, args.out / f"{name}.png", args.concept)
    md = report(runs, dropped, args, seconds, name)
    write_report(args.out, name, {"args": {k: str(v) for k, v in vars(args).items()}, "runs": runs,
                                  "dropped": dropped, "seconds": seconds}, md)  # fmt: skip
    return {"runs": runs, "dropped": dropped}


if __name__ == "__main__":
    main()
