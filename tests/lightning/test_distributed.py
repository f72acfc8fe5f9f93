"""DDP with two CPU processes (gloo): every rank holds byte-identical edited weights after each application."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.slow
def test_ddp_rank_zero_solves_and_ranks_hold_identical_weights_after_every_application(tmp_path):
    script = Path(__file__).with_name("ddp_run.py")
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    run = subprocess.run(
        [sys.executable, str(script), str(tmp_path)], capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path
    )
    assert run.returncode == 0, run.stderr[-4000:]
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["solver_calls"] for r in results] == [1, 0]  # rank 0 solves once (one space); rank 1 never
    ranks = [r["applications"] for r in results]
    assert [a["reason"] for a in ranks[0]] == ["setup", "epoch_end", "epoch_end", "fit_end"]
    assert ranks[0] == ranks[1]  # same applications, same weight hashes, on both ranks
    assert len({a["sha"] for a in ranks[0]}) >= 3  # and training did move the weights between applications


def _fsdp2(out: Path, mode: str, *args: str) -> list[dict]:
    out.mkdir(parents=True, exist_ok=True)
    script = Path(__file__).with_name("fsdp2_run.py")
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, str(script), str(out), mode, *args], capture_output=True, text=True, env=env,
                         timeout=600, cwd=out)  # fmt: skip
    assert run.returncode == 0, run.stderr[-4000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]


@pytest.mark.slow
def test_fsdp2_edits_shards_exports_the_one_process_erasure_and_resumes(tmp_path):
    """ModelParallelStrategy (FSDP2 fully_shard, 2 gloo processes): ICEModule sharding a Flux transformer itself
    (lr 0) exports exactly a one-process erase(), hardening included (it reads the layers' Gram matrix: each rank sums
    its own rows and an all-reduce adds the rest); a user's own module that shards its UNet trains with every
    application passing the per-shard hash check, each rank editing its own rows, and exports; a resume from the
    sharded checkpoint applies nothing twice."""
    from diffusers import DiffusionPipeline

    from ice_lightning import erase
    from ice_lightning.core.export import load_manifest, verify_export
    from ice_lightning.core.parts import resolve_layer
    from ice_lightning.core.pipelines import load_pipeline

    # lr 0: the export equals a one-process erase() of the same spec (the Flux text layers sit in the root FSDP unit)
    own = _fsdp2(tmp_path / "module", "module", "flux")
    assert own[0]["sharded"] and own[0]["applications"] == own[1]["applications"]
    expected = load_pipeline("tiny:flux")
    result = erase(expected, ["Van Gogh"], family="style")
    shipped = DiffusionPipeline.from_pretrained(tmp_path / "module" / "export")
    assert set(result.layers) == set(own[0]["rows"])
    for name in result.layers:
        a, b = resolve_layer(shipped, name).weight.detach(), resolve_layer(expected, name).weight.detach()
        assert float((a - b).norm() / b.norm()) < 1e-6, name
    assert all(verify_export(tmp_path / "module" / "export").values())
    # the default hardened it: one round, at a strength the budget chose from the all-reduced Gram matrix
    plain = load_pipeline("tiny:flux")
    erase(plain, ["Van Gogh"], family="style", harden_rounds=0)
    hparams = load_manifest(tmp_path / "module" / "export")["erasures"][0]["hparams"]
    assert hparams["harden_rounds"] == 1 and hparams["harden_expansion"] > 0
    for name in own[0]["rows"]:
        hardened = resolve_layer(shipped, name).weight.detach()
        moved = resolve_layer(plain, name).weight.detach() - hardened
        assert float(moved.norm() / hardened.norm()) > 1e-4, name  # the hardening changed every edited layer

    # lr > 0: every application passed the per-shard hash check (a failure raises on every rank) and agreed
    train = _fsdp2(tmp_path / "train", "train")
    for r in train:
        assert r["sharded"] and all(local < full for local, full in r["rows"].values())  # rows split over ranks
        # the only tensors made whole were layer outputs (prompts x out): never an edited weight
        assert r["gathered"] and not any(shape in r["weight_shapes"] for shape in r["gathered"])
    assert all(verify_export(tmp_path / "train" / "export").values())
    assert train[0]["applications"] == train[1]["applications"]
    assert [a["reason"] for a in train[0]["applications"]] == ["setup", "epoch_end", "epoch_end", "fit_end"]
    assert len({a["sha"] for a in train[0]["applications"]}) == 3  # training moved the weights in between
    # resume from the sharded checkpoint of epoch 0: its two applications come from the checkpoint, not again
    resumed = _fsdp2(tmp_path / "resume", "resume")
    apps = resumed[0]["applications"]
    assert resumed[0]["applications"] == resumed[1]["applications"]
    assert [a["reason"] for a in apps] == ["setup", "epoch_end", "epoch_end", "fit_end"]
    # the first two come from the checkpoint; the run then ends exactly where the uninterrupted one did
    assert [r["applications"] for r in resumed] == [r["applications"] for r in train]
    assert [r["final"] for r in resumed] == [r["final"] for r in train]
    assert all(r["metrics"][-1] for r in resumed)  # the probe came back with the checkpoint
