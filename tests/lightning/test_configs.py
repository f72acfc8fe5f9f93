"""Every YAML in configs/ parses (--print_config); the tiny ones fit through the CLI entry point."""

from pathlib import Path

import pytest
import yaml

from ice_lightning.cli import main

CONFIGS = sorted((Path(__file__).parents[2] / "configs").glob("*.yaml"))
ROOT = Path(__file__).parents[2]


def _command(path: Path) -> str:
    return "erase" if "trainer" not in yaml.safe_load(path.read_text()) else "fit"


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_print_config(path, capsys):
    with pytest.raises(SystemExit) as done:
        main([_command(path), "--config", str(path), "--print_config"])
    assert done.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    source = yaml.safe_load(path.read_text())
    if _command(path) == "fit":
        assert printed["model"]["pipeline"] == source["model"]["pipeline"]
        assert printed["data"]["class_path"] == source["data"]["class_path"]
        wanted = [c for c in source["trainer"]["callbacks"] if c["class_path"] == "ice_lightning.ICECallback"]
        ice = [c for c in printed["trainer"]["callbacks"] if c["class_path"] == "ice_lightning.ICECallback"]
        assert len(ice) == len(wanted)  # training configs of the shapes world have none
        if wanted:
            given, shown = wanted[0]["init_args"], ice[0]["init_args"]  # concepts as keywords, or in a spec
            assert (shown.get("erase") or shown["spec"]["erase"]) == (given.get("erase") or given["spec"]["erase"])
    else:
        assert printed["erase"] == source["erase"]


def test_configs_cover_the_documented_cases():
    names = {p.name for p in CONFIGS}
    assert {
        "tiny_t2i.yaml",
        "tiny_t2v.yaml",
        "sd15_style_finetune.yaml",
        "sdxl_object_erase.yaml",
        "zeroscope_t2v.yaml",
        "explicit_content.yaml",
        "flux_lora_erase.yaml",
        "sd3_finetune.yaml",
        "wan_t2v_lora.yaml",
        "cogvideox_finetune.yaml",
        "sdxl_fsdp2_finetune.yaml",
        "tiny_flux_lora.yaml",
        "shapes_finetune_guarded.yaml",
    } <= names


@pytest.mark.slow
@pytest.mark.parametrize("name", ["tiny_t2i.yaml", "tiny_t2v.yaml", "tiny_flux_lora.yaml"])
def test_tiny_configs_fit_through_the_cli(name, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)  # the configs name data folders relative to the repository root
    # the shipped config with its export moved into tmp_path: a user's own export at the config's path (the README's
    # run) is neither overwritten nor taken for this run's
    config = yaml.safe_load((ROOT / "configs" / name).read_text())
    export = tmp_path / "export"
    config["trainer"]["callbacks"][0]["init_args"]["export"] = str(export)
    (tmp_path / name).write_text(yaml.safe_dump(config))
    out = tmp_path / "erased"
    args = ["fit", "--config", str(tmp_path / name), "--trainer.fast_dev_run", "true",
            "--trainer.default_root_dir", str(tmp_path)]  # fmt: skip
    assert main(args) == 0
    # fast_dev_run still runs the callback end to end: its export exists where the config says, and nowhere else
    assert (export / "ice_manifest.json").exists()
    assert not out.exists()
