"""Enterprise flow: fine-tune, keep a concept erased throughout, export, and verify the shipped model.

    python examples/enterprise_finetune.py --out /tmp/shipped            # tiny, CPU, about a minute
    python examples/enterprise_finetune.py --pipeline stable-diffusion-v1-5/stable-diffusion-v1-5 \
        --data /data/images --resolution 512 --epochs 10 --accelerator gpu --out exports/sd15-no-van-gogh

Steps: (1) ICEModule loads the pipeline with from_pretrained; (2) ICECallback erases at setup, after every
epoch and at the end, and exports a diffusers folder with ice_manifest.json; (3) the shipped folder is
reloaded from disk, its edited tensors are checked against the manifest hashes, and the erasure is measured
against the original model.
"""

import argparse
from pathlib import Path

from diffusers import DiffusionPipeline
from lightning.pytorch import Trainer, seed_everything

from ice_lightning import CaptionFolderDataModule, ConceptSpec, ICECallback, ICEModule, verify_export
from ice_lightning.core.export import load_manifest
from ice_lightning.core.pipelines import load_pipeline
from ice_lightning.core.probe import compare_pipelines

CONCEPT = {"erase": ["Van Gogh"], "family": "style"}


def verify_shipped(folder: Path, original_id: str) -> dict:
    """Reload the shipped model, check hashes, and measure erasure against the original model."""
    checks = verify_export(folder)
    shipped, original = DiffusionPipeline.from_pretrained(folder), load_pipeline(original_id)
    return {
        "hashes_ok": all(checks.values()),
        "tensors": len(checks),
        **compare_pipelines(shipped, original, ConceptSpec(**CONCEPT)),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pipeline", default="tiny:sd-minilm")
    ap.add_argument("--data", default=str(Path(__file__).parent / "data" / "tiny_images"))
    ap.add_argument("--resolution", type=int, default=16)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--accelerator", default="cpu")
    ap.add_argument("--out", default="exports/enterprise-demo")
    args = ap.parse_args()

    seed_everything(0)
    module = ICEModule(args.pipeline, learning_rate=3e-4, validation_concepts=CONCEPT)
    ice = ICECallback(**CONCEPT, every_n_epochs=1, export=args.out)  # checked writable before training
    trainer = Trainer(
        max_epochs=args.epochs, accelerator=args.accelerator, callbacks=[ice], logger=False, enable_checkpointing=False
    )
    trainer.fit(module, datamodule=CaptionFolderDataModule(args.data, resolution=args.resolution, batch_size=4))

    manifest = load_manifest(args.out)
    print("applications:", [(a["reason"], a["epoch"]) for a in manifest["ice_callback"]["applications"]])
    report = verify_shipped(Path(args.out), args.pipeline)
    print("shipped model:", {k: round(v, 3) if isinstance(v, float) else v for k, v in report.items()})
    if not report["hashes_ok"] or report["erasure"] < 0.5:
        raise SystemExit("the shipped model is not the erased one")


if __name__ == "__main__":
    main()
