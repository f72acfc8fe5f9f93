"""Concept resurgence in the shapes world: erase "red" from the shipped image model, then fine-tune on a data
set that contains red shapes, with and without ICECallback re-applying the edit after every epoch.

Every run erases at setup through ICECallback (ICE defaults, the world's concept spec). The first never
re-applies (a customer fine-tunes the erased model as shipped); the second re-applies every epoch; the third
re-applies every epoch and also drops from each batch the samples whose caption names red or a synonym
(``drop_concept_samples=True``). A ShapesProbe after the callback samples every seen prompt after every
epoch and records red's presence on its prompts and the mean accuracy of the other concepts.

    python benchmarks/shapes_resurgence.py          # about 8 minutes on 2 CPU cores
    python benchmarks/shapes_resurgence.py --tiny   # the suite's smoke run
"""

from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path

from _common import RESULTS, table, write_report
from lightning.pytorch import Trainer, seed_everything

from ice_lightning import ICECallback, ICEModule
from ice_lightning.shapes import ShapesDataModule
from ice_lightning.shapes.evaluation import ShapesProbe, concept_spec

TARGET_PRESENCE = 0.05
GUARDED = "ICECallback every epoch + drop_concept_samples"


def fine_tune(concept: str, every_n_epochs: int | None, args, drop: bool = False) -> list[dict]:
    seed_everything(args.seed, verbose=False)
    module = ICEModule(pipeline=str(args.pipeline), learning_rate=args.lr, weight_decay=0.0, seed=args.seed)
    spec = concept_spec(concept)
    ice = ICECallback(erase=spec.erase, preserve=spec.preserve, synonyms=spec.synonyms, templates=spec.templates,
                      anchor=spec.anchor,
                      every_n_epochs=every_n_epochs, at_fit_end=False, log_metrics=False,
                      drop_concept_samples=drop)  # fmt: skip
    probe = ShapesProbe(concept, samples=args.samples, seed=args.seed, steps=args.sample_steps)
    data = ShapesDataModule(size=module.unet.config.sample_size, train_size=args.train_size, val_size=64,
                            batch_size=64, seed=args.seed + 100)  # fmt: skip
    trainer = Trainer(accelerator="cpu", max_epochs=args.epochs, callbacks=[ice, probe], logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      limit_val_batches=0, num_sanity_val_steps=0)  # fmt: skip
    trainer.fit(module, datamodule=data)
    return probe.history


def plot(runs: dict[str, list[dict]], path: Path, concept: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6))
    for (label, hist), colour in zip(runs.items(), ("tab:red", "tab:blue", "tab:green"), strict=True):
        epochs = list(range(len(hist)))
        ax.plot(epochs, [h["presence"] for h in hist], "o-", color=colour, label=f"{concept} presence, {label}")
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


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="2 epochs of 2 steps, 1 sample per prompt (tests)")
    ap.add_argument("--pipeline", default="shapes-image", help="the shipped model or a pipeline folder")
    ap.add_argument("--concept", default="red")
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--train-size", type=int, default=1024, help="fine-tuning samples per epoch (a quarter red)")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--samples", type=int, default=8, help="samples per prompt at each measurement")
    ap.add_argument("--sample-steps", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    if args.tiny:
        args.epochs, args.train_size, args.samples, args.sample_steps = 2, 128, 1, 4
    warnings.filterwarnings("ignore")
    t0 = time.perf_counter()
    runs = {"erased once (no callback)": fine_tune(args.concept, None, args),
            "ICECallback every epoch": fine_tune(args.concept, 1, args),
            GUARDED: fine_tune(args.concept, 1, args, drop=True)}  # fmt: skip
    name = "shapes_resurgence_tiny" if args.tiny else "shapes_resurgence"
    args.out.mkdir(parents=True, exist_ok=True)
    plot(runs, args.out / f"{name}.png", args.concept)
    held = {label: max(h["presence"] for h in runs[label]) for label in list(runs)[1:]}
    md = [f"# Shapes world: resurgence of {args.concept!r} during fine-tuning ({'tiny' if args.tiny else 'full'})",
          "", f"{args.epochs} epochs of {args.train_size} samples (all colours, so a quarter {args.concept}), lr "
          f"{args.lr}, batch 64; {args.samples} samples per seen prompt per measurement. Epoch 0 is right after "
          "the erasure.", ""]  # fmt: skip
    rows = []
    for e in range(args.epochs + 1):
        row = [e]
        for hist in runs.values():
            row += [hist[e]["presence"], hist[e]["accuracy_others"]]
        rows.append(row)
    header = ["epoch"]
    for label in runs:
        header += [f"{args.concept} presence, {label}", f"others' accuracy, {label}"]
    md += table(header, rows)
    md += [""] + [f"Highest {args.concept} presence, {label}: {v:.3f} (target <= {TARGET_PRESENCE})."
                  for label, v in held.items()]  # fmt: skip
    md += ["", f"![resurgence]({name}.png)", "", f"Total {time.perf_counter() - t0:.0f} s."]
    write_report(args.out, name, {"args": {k: str(v) for k, v in vars(args).items()}, "runs": runs}, md)
    return {"runs": runs}


if __name__ == "__main__":
    main()
