"""The command line describes itself (help for every option, choices, version, shipped configs by name) and is
quiet: no warning from ice-lightning's own calls in a tiny fit or in the shapes-world main job."""

import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import yaml
from helpers import warnings_of_ours

import ice_lightning
from ice_lightning.cli import main, packaged_configs, resolve_config

ROOT = Path(__file__).parents[2]
PACKAGE = Path(ice_lightning.__file__).parent


def _options(help_text: str) -> dict[str, str]:
    """``{--option: its help text}`` from an argparse help screen (the text before ``(type:``/``(default:``)."""
    out, current = {}, None
    for line in help_text.splitlines():
        m = re.match(r"^  (--[\w.-]+)(.*)$", line)
        if m:
            current, rest = m.group(1), m.group(2)
            if re.match(r"^\s{2,}", rest):  # no metavar: the help starts on this line
                out[current] = rest.strip()
            else:  # after the metavar, two spaces or more, or on the next line
                parts = re.split(r"\s{2,}", rest.strip(), maxsplit=1)
                out[current] = parts[1] if len(parts) == 2 else ""
        elif current and line.startswith(" " * 10):
            out[current] = (out[current] + " " + line.strip()).strip()
        else:
            current = None
    return out


def test_top_level_help_version_and_configs_answer_without_loading_torch():
    code = ("import sys; from ice_lightning.cli import main; rc = main(sys.argv[1:]); "
            "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH'); sys.exit(rc)")  # fmt: skip
    for args, expect in ((["--help"], "configs"), (["--version"], f"ice-lightning {ice_lightning.__version__}"),
                         (["configs"], "tiny_t2i")):  # fmt: skip
        run = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120)
        assert run.returncode == 0, run.stderr
        assert expect in run.stdout and "NO-TORCH" in run.stdout, run.stdout
    run = subprocess.run(["ice-lightning", "--help"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and all(c in run.stdout for c in ("erase", "verify", "fit", "configs", "--version"))


def test_erase_help_lists_every_option_with_help_and_choices():
    run = subprocess.run(["ice-lightning", "erase", "--help"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    options = _options(run.stdout)
    expected = {"--pipeline", "--erase", "--preserve", "--family", "--anchor", "--template", "--include-eot",
                "--method", "--lam", "--mu", "--erase-expansion", "--preserve-expansion", "--base-weight",
                "--harden-rounds", "--metric", "--harden-metric", "--harden-budget", "--trigger-rounds",
                "--context-expansion",
                "--overlap", "--objective", "--device", "--out", "--format", "--pipeline-config", "--overwrite",
                "--samples", "--seed", "--grid", "--quiet", "--config"}  # fmt: skip
    assert expected <= set(options)
    missing = sorted(o for o, text in options.items() if o in expected and len(text) < 10)
    assert not missing, f"options without help text: {missing}"
    assert "{style,object,identity,explicit,custom}" in run.stdout  # Literal choices are listed
    assert "{ice,cure,uce,projection,rece}" in run.stdout and "{merged,lora,lora-kohya,single-file}" in run.stdout
    assert "{input,output}" in run.stdout


def test_fit_help_documents_the_callback_and_module_options(capsys):
    with pytest.raises(SystemExit):
        main(["fit", "--trainer.callbacks.help", "ice_lightning.ICECallback"])
    options = _options(capsys.readouterr().out)
    for name in ("erase", "preserve", "family", "synonyms", "spec", "method", "every_n_epochs", "export", "targets"):
        assert len(options[f"--trainer.callbacks.{name}"].split("(type:")[0]) > 10, name
    with pytest.raises(SystemExit):
        main(["fit", "--help"])
    options = _options(capsys.readouterr().out)
    bare = [o for o, text in options.items() if o.startswith("--model.") and text.startswith("(type:")]
    assert not bare, f"ICEModule options without help text: {bare}"


def test_shipped_configs_are_found_by_name_from_any_directory(tmp_path, monkeypatch, capsys):
    shipped = packaged_configs()
    assert {"tiny_t2i", "tiny_t2v", "shapes_t2i", "sdxl_object_erase"} <= set(shipped)
    monkeypatch.chdir(tmp_path)  # not the checkout: only the package can answer
    assert resolve_config("tiny_t2i") == str(PACKAGE / "configs" / "tiny_t2i.yaml")
    assert resolve_config("configs/tiny_t2i.yaml") == str(PACKAGE / "configs" / "tiny_t2i.yaml")
    assert resolve_config("elsewhere/mine.yaml") == "elsewhere/mine.yaml"  # a user's path is left as given
    with pytest.raises(SystemExit):
        main(["fit", "--config", "tiny_t2i", "--print_config"])
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["pipeline"] == "tiny:sd-minilm"
    from ice_lightning import CaptionFolderDataModule

    data = CaptionFolderDataModule(printed["data"]["init_args"]["train_dir"], resolution=16, batch_size=2)
    data.setup("fit")  # the shipped caption folder, found by its name
    assert len(data.train_set) + len(data.val_set) == 8


@pytest.mark.slow
def test_no_warning_from_our_own_calls_in_a_tiny_fit_and_its_export(tmp_path, monkeypatch, capfd):
    """(The main job's own check is ``tests/shapes/test_shapes_eval.py::test_main_job_command_...``.)"""
    monkeypatch.chdir(tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(["fit", "--config", "tiny_t2i", "--trainer.max_epochs", "1", "--trainer.limit_val_batches", "1",
                     "--trainer.default_root_dir", str(tmp_path), "--quiet"]) == 0  # fmt: skip
        assert main(["verify", "lightning_logs/tiny_t2i/erased"]) == 0  # reloads the SD-with-MiniLM export
    printed = capfd.readouterr()
    ours = warnings_of_ours(caught, printed.err + printed.out)
    assert not ours, "warnings from ice-lightning's own calls:\n" + "\n".join(ours)
