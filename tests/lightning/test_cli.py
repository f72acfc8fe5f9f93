"""The console script, run as a user would (README commands) on a tiny saved pipeline."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from ice_lightning.cli import main
from ice_lightning.core.concepts import DEFAULT_TEMPLATES
from ice_lightning.core.export import MANIFEST_NAME, verify_export
from ice_lightning.core.probe import format_table

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}


@pytest.mark.slow
def test_readme_commands(tmp_path):
    tiny, out = tmp_path / "tiny-sd", tmp_path / "tiny-sd-erased"
    made = subprocess.run(
        [sys.executable, "-m", "ice_lightning.demos.tiny", "sd", str(tiny)],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=300,
    )
    assert made.returncode == 0, made.stderr
    run = subprocess.run(
        [
            "ice-lightning",
            "erase",
            "--pipeline",
            str(tiny),
            "--erase",
            "Van Gogh",
            "--family",
            "style",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "erasure (held-out concept tokens)" in run.stdout and "before" in run.stdout
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert manifest["erased_concepts"] == ["Van Gogh"] and manifest["erasures"][0]["concepts"]["family"] == "style"
    assert all(verify_export(out).values())


def test_cli_in_process_with_options(saved_pipeline, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(
        [
            "erase",
            "--pipeline",
            saved_pipeline("sd"),
            "--erase",
            "Van Gogh",
            "--erase",
            "Claude Monet",
            "--preserve",
            "Rembrandt",
            "--family",
            "style",
            "--method",
            "cure",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    text = capsys.readouterr().out
    assert "['Van Gogh', 'Claude Monet'] (cure)" in text
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert manifest["erasures"][0]["concepts"]["preserve"] == ["Rembrandt"]


def test_cli_metric_and_hardening_flags_reach_the_solve(saved_pipeline, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["erase", "--pipeline", saved_pipeline("sd"), "--erase", "Van Gogh", "--family", "style", "--metric",
            "output", "--harden-rounds", "1", "--erase-expansion", "5", "--harden-budget", "none", "--harden-metric",
            "none", "--out", str(out)]  # fmt: skip
    assert main(args) == 0
    (erasure,) = json.loads((out / MANIFEST_NAME).read_text())["erasures"]
    # "none" is the field's None: no budget, so the fixed harden_expansion (a budget records the one it chose)
    given = {"metric": "output", "harden_rounds": 1, "erase_expansion": 5.0, "harden_budget": None,
             "harden_metric": None, "harden_expansion": 3.0}
    assert {k: erasure["hparams"][k] for k in given} == given
    with pytest.raises(SystemExit):
        main(["erase", "--pipeline", saved_pipeline("sd"), "--erase", "Van Gogh", "--harden-budget", "nothing",
              "--out", str(tmp_path / "bad")])  # fmt: skip
    assert "invalid float or none value: 'nothing'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="--metric does not apply to --method uce"):
        main(["erase", "--pipeline", saved_pipeline("sd"), "--erase", "Van Gogh", "--method", "uce", "--metric",
              "output", "--out", str(tmp_path / "uce")])  # fmt: skip
    assert not (tmp_path / "uce").exists()


def test_cli_trigger_rounds_run_the_search_and_the_manifest_names_what_it_erased(saved_pipeline, tmp_path):
    out = tmp_path / "out"
    args = ["erase", "--pipeline", saved_pipeline("sd"), "--erase", "Van Gogh", "--family", "style",
            "--trigger-rounds", "1", "--out", str(out)]  # fmt: skip
    assert main(args) == 0
    (erasure,) = json.loads((out / MANIFEST_NAME).read_text())["erasures"]
    assert erasure["hparams"]["trigger_rounds"] == 1
    found = erasure["triggers"]["text"]
    assert len(found) == len(DEFAULT_TEMPLATES["style"]) and found[0].startswith("a painting by ")  # one per template
    assert all(verify_export(out).values())
    with pytest.raises(ValueError, match="--trigger-rounds does not apply to --method cure"):
        main(["erase", "--pipeline", saved_pipeline("sd"), "--erase", "Van Gogh", "--method", "cure",
              "--trigger-rounds", "1", "--out", str(tmp_path / "cure")])  # fmt: skip
    assert not (tmp_path / "cure").exists()


def test_cli_rejects_missing_arguments(capsys, tmp_path):
    with pytest.raises(SystemExit):
        main(["erase", "--out", "x"])
    assert "erase" in capsys.readouterr().err
    # with no --pipeline the shipped shapes model is used: a concept that world lacks is refused before any edit
    with pytest.raises(ValueError, match="unknown shapes concept 'Van Gogh'"):
        main(["erase", "--erase", "Van Gogh", "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()
    assert main(["bogus"]) == 2 and "unknown command" in capsys.readouterr().err
    assert main(["--help"]) == 0 and "erase" in capsys.readouterr().out


def test_table_format():
    table = format_table({"erasure": 0.9, "collateral_near": 0.1, "collateral_far": 0.05, "leakage": 0.2})
    lines = table.splitlines()
    assert lines[0].split()[-2:] == ["before", "after"]
    assert lines[2].split()[-6:-4] == ["0.000", "0.900"]


def test_cli_preview_ships_a_before_after_grid_shown_in_the_model_card(saved_pipeline, tmp_path):
    """``--preview 2``: the same held-out prompts (2 erased, 1 preserved) and seeds before and after the edit, one
    grid (rows: prompts; left: before, right: after) in the export, hashed by its manifest and shown in its card. Its
    "before" samples are a fresh sampling of the original with the same seeds, its "after" ones the export's."""
    from diffusers import DiffusionPipeline
    from PIL import Image

    from ice_lightning.core.concepts import ConceptSpec
    from ice_lightning.core.preview import generate, preview_prompts, preview_rows_grid

    out = tmp_path / "out"
    assert main(["erase", "--pipeline", saved_pipeline("sd"), "--erase", "Van Gogh", "--family", "style",
                 "--preview", "2", "--out", str(out)]) == 0  # fmt: skip
    grid = np.asarray(Image.open(out / "before_after.png"))
    prompts = preview_prompts(ConceptSpec(erase=["Van Gogh"], family="style"), 2)
    assert len(prompts) == 3
    before = generate(DiffusionPipeline.from_pretrained(saved_pipeline("sd")), prompts, seed=0)
    after = generate(DiffusionPipeline.from_pretrained(out), prompts, seed=0)
    assert not torch.equal(before, after)  # the erasure changed what the model draws
    assert np.abs(grid.astype(int) - preview_rows_grid(prompts, before, after).astype(int)).max() <= 1
    assert "before_after.png" in json.loads((out / MANIFEST_NAME).read_text())["files"]
    assert "![before/after](before_after.png)" in (out / "README.md").read_text()
    assert all(verify_export(out).values())
