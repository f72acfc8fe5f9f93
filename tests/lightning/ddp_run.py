"""Run by tests/test_distributed.py: a 2-process CPU DDP fit (gloo) with ICECallback; each rank writes the
hash of the edited weights after every application, and how often it ran the solver, to OUT/rank{N}.json."""

import json
import sys
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")

from lightning.pytorch import Trainer, seed_everything  # noqa: E402

import ice_lightning.core.plan as plan  # noqa: E402
from ice_lightning import CaptionFolderDataModule, ICECallback, ICEModule  # noqa: E402

SOLVER_CALLS = []
_build_operator = plan.build_operator


def counting_build_operator(*args, **kwargs):
    SOLVER_CALLS.append(kwargs.get("concepts"))
    return _build_operator(*args, **kwargs)


plan.build_operator = counting_build_operator

if __name__ == "__main__":
    out = Path(sys.argv[1])
    seed_everything(0)
    module = ICEModule("tiny:sd", learning_rate=1e-3, validation_concepts=None)
    ice = ICECallback(erase=["Van Gogh"], family="style", every_n_epochs=1)
    data = CaptionFolderDataModule(
        str(Path(__file__).parents[2] / "examples" / "data" / "tiny_images"), resolution=16, batch_size=2
    )
    trainer = Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_epochs=2,
        logger=False,
        callbacks=[ice],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        default_root_dir=out,
    )
    trainer.fit(module, datamodule=data)
    records = [{"reason": a["reason"], "epoch": a["epoch"], "sha": a["weights_sha256"]} for a in ice.applications]
    result = {"applications": records, "solver_calls": len(SOLVER_CALLS)}
    (out / f"rank{trainer.global_rank}.json").write_text(json.dumps(result))
    # Shut the gloo group down before interpreter exit: tearing it down implicitly at exit can abort the
    # process ("terminate called without an active exception") after all the work is done.
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
