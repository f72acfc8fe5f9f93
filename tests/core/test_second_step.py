"""The second step of a workflow, tried as a skeptical user would: export again, undo again, export from two places
at once, export what another pipeline erased, export what kept no undo record. Each refusal is checked for its
error, the weights (bit for bit) and the user's files (sha256 of every file)."""

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import changed, snapshot

import ice_lightning
import ice_lightning.core.editing as editing
import ice_lightning.core.export.save as export
from ice_lightning.cli import main as cli
from ice_lightning.core.export import MANIFEST_NAME, save_erased, verify_export
from ice_lightning.core.parts import edit_history

STYLE = {"erase": ["Van Gogh"], "family": "style"}


def tree(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(folder).rglob("*")) if p.is_file()}  # fmt: skip


@pytest.fixture
def erased(load_pipeline):
    pipe = load_pipeline("sd")
    before = snapshot(pipe)
    result = ice_lightning.erase(pipe, **STYLE)
    return pipe, result, before


# -- 1. re-export keeps the user's files -------------------------------------------------------------------
def test_reexport_refuses_a_folder_holding_the_users_own_files(erased, tmp_path):
    pipe, _, _ = erased
    out = tmp_path / "good"
    save_erased(pipe, out)
    (out / "NOTES.txt").write_text("my notes")
    before = tree(tmp_path)
    with pytest.raises(FileExistsError, match=r"holds files the earlier export did not write \(NOTES.txt\)"):
        save_erased(pipe, out)
    assert tree(tmp_path) == before
    with pytest.raises(FileExistsError, match="NOTES.txt"):  # the CLI says the same, and leaves it as well
        cli(["erase", "--pipeline", str(pipe.config._name_or_path), "--erase", "Van Gogh", "--out", str(out)])
    assert tree(tmp_path) == before
    save_erased(pipe, out, overwrite=True)  # asked for: replaced
    assert not (out / "NOTES.txt").exists() and all(verify_export(out).values())


def test_reexport_refuses_a_stub_manifest_and_an_export_of_another_format(erased, tmp_path):
    pipe, _, _ = erased
    stub = tmp_path / "stub"
    stub.mkdir()
    (stub / MANIFEST_NAME).write_text(json.dumps({"format": "ice-lightning/whatever"}))
    (stub / "model.bin").write_bytes(b"x" * 100)
    merged = tmp_path / "merged"
    save_erased(pipe, merged)
    before = tree(tmp_path)
    with pytest.raises(FileExistsError, match="not a valid export manifest"):
        save_erased(pipe, stub)
    with pytest.raises(FileExistsError, match="holds an earlier merged export; replacing it with a lora export"):
        save_erased(pipe, merged, format="lora")
    assert tree(tmp_path) == before
    save_erased(pipe, merged)  # the same format, only its own files: replaced without asking
    assert all(verify_export(merged).values())


# -- 2. the swap survives Ctrl-C, and a SIGKILL's leftovers are recovered ---------------------------------------
def test_ctrl_c_between_moving_the_old_export_aside_and_the_new_one_in_leaves_a_whole_export(erased, tmp_path,
                                                                                             monkeypatch):  # fmt: skip
    pipe, _, _ = erased
    out = tmp_path / "export"
    save_erased(pipe, out)
    real_replace = os.replace
    calls = []

    def replace_then_interrupt(src, dst):
        real_replace(src, dst)
        calls.append(dst)
        if len(calls) == 1:  # the old export is aside, the new one not yet in place: a real SIGINT now
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(export.os, "replace", replace_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        save_erased(pipe, out)
    assert len(calls) == 2  # both renames happened before the interrupt took effect
    assert all(verify_export(out).values())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]  # nothing hidden left


def test_next_export_recovers_what_a_killed_export_left(erased, tmp_path, caplog):
    pipe, _, _ = erased
    out = tmp_path / "export"
    save_erased(pipe, out)
    earlier = tree(out)
    aside = tmp_path / ".export.ice-replaced-x1"  # a SIGKILL right after the old export was moved aside
    aside.mkdir()
    os.replace(out, aside / "export")
    (tmp_path / ".export.ice-export-x2").mkdir()  # and a partial export
    (tmp_path / ".export.ice-export-x2" / "half.safetensors").write_bytes(b"x")
    export._recover_leftovers(out)
    assert tree(out) == earlier and sorted(p.name for p in tmp_path.iterdir()) == ["export"]
    assert "restored the earlier export" in caplog.text and "a partial export" in caplog.text
    os.replace(out, aside.parent / "elsewhere")  # the same through save_erased: recovered, then replaced
    aside.mkdir()
    os.replace(aside.parent / "elsewhere", aside / "export")
    save_erased(pipe, out)
    assert all(verify_export(out).values()) and sorted(p.name for p in tmp_path.iterdir()) == ["export"]


# -- 3. undo is all or nothing ---------------------------------------------------------------------------------
def test_ctrl_c_during_undo_keeps_the_erasure_whole_and_a_second_undo_finishes(erased, monkeypatch):
    pipe, result, before = erased
    edited = snapshot(pipe)
    real_write, writes = editing._write, []

    def interrupted_write(weight, value):
        writes.append(1)
        if len(writes) == 4:
            raise KeyboardInterrupt
        real_write(weight, value)

    monkeypatch.setattr(editing, "_write", interrupted_write)
    with pytest.raises(KeyboardInterrupt):
        result.undo()
    monkeypatch.setattr(editing, "_write", real_write)
    assert not changed(edited, pipe)  # every layer edited again: none half-undone
    assert not result.undone and edit_history(pipe) == [result]
    result.undo()
    assert not changed(before, pipe)  # the original weights, bit for bit


# -- 4. two exports to one folder ----------------------------------------------------------------------------
def test_a_second_export_to_a_folder_being_exported_is_refused(erased, tmp_path):
    pipe, _, _ = erased
    out = tmp_path / "export"
    with export.export_lock(out):  # another export holds the folder
        with pytest.raises(FileExistsError, match=r"another export to .*export is in progress \(process \d+"):
            save_erased(pipe, out)
        assert not out.exists()
    save_erased(pipe, out)  # released: the next one goes through
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]


def test_a_lock_left_by_a_killed_export_is_taken_over(erased, tmp_path, caplog):
    pipe, _, _ = erased
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    out = tmp_path / "export"
    lock = export._lock_path(out)
    import socket

    lock.write_text(json.dumps({"pid": int(dead.stdout), "host": socket.gethostname()}))
    save_erased(pipe, out)
    assert "taking over the lock" in caplog.text and not lock.exists() and all(verify_export(out).values())


# -- 12. foreign records; 13. keep_undo=False ------------------------------------------------------------------
def test_save_erased_refuses_an_erasure_of_another_pipeline(erased, load_pipeline, tmp_path):
    pipe_a, result_a, _ = erased
    pipe_b = load_pipeline("sd")
    before = snapshot(pipe_b)
    with pytest.raises(ValueError, match=r"results\[0\] \(the erasure of \['Van Gogh'\]\) was applied to another"):
        save_erased(pipe_b, tmp_path / "out", results=[result_a])
    assert not (tmp_path / "out").exists() and not changed(before, pipe_b)


def test_an_erasure_without_undo_record_exports_merged_and_verifies(load_pipeline, tmp_path):
    pipe = load_pipeline("sd")
    kept = load_pipeline("sd")
    ice_lightning.erase(pipe, keep_undo=False, **STYLE)
    ice_lightning.erase(kept, **STYLE)
    save_erased(pipe, tmp_path / "lean")
    save_erased(kept, tmp_path / "kept")
    assert all(verify_export(tmp_path / "lean").values())
    lean, full = (json.loads((tmp_path / f / MANIFEST_NAME).read_text())["erasures"][0] for f in ("lean", "kept"))
    # the pre-edit residual was recorded before the weights were written: the same as from the undo record
    assert lean["concept_residual_before"] == pytest.approx(full["concept_residual_before"], rel=1e-9)
    assert lean["concept_residual"] == pytest.approx(full["concept_residual"], rel=1e-9)
    with pytest.raises(ValueError, match="keep_undo=False"):  # a LoRA still needs the record: refused, nothing written
        save_erased(pipe, tmp_path / "lora", format="lora")
    assert not (tmp_path / "lora").exists()


# -- 5. anchor and preserve words are checked like erase words -------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"anchor": "qqzzxx"}, "anchor 'qqzzxx' maps to the unknown token '<unk>'.*Name the anchor in words"),
        ({"preserve": ["zzqqxx"]}, "preserve concept 'zzqqxx' maps to the unknown token '<unk>'"),
        ({"anchor": "van gogh"}, "the anchor 'van gogh' is one of the erased concepts"),
    ],
)
def test_anchor_and_preserve_words_are_checked_like_erase_words(load_pipeline, kwargs, message):
    pipe = load_pipeline("sd")
    before = snapshot(pipe)
    with pytest.raises(ValueError, match=message):
        ice_lightning.erase(pipe, **STYLE, **kwargs)
    assert not changed(before, pipe) and edit_history(pipe) == []


# -- 6. verify cannot be weakened by deleting or relabelling fields; 14. it raises its own error ---------------
def _rewrite(folder: Path, edit) -> None:
    """Edit the manifest with ``edit(manifest)``, then recompute every file hash (a forger's second step)."""
    m = json.loads((folder / MANIFEST_NAME).read_text())
    edit(m)
    m["files"] = export._file_hashes(folder)
    (folder / MANIFEST_NAME).write_text(json.dumps(m))


def test_verify_requires_every_field_its_checks_need(erased, tmp_path):
    from ice_lightning.core.export import ExportVerificationError

    pipe, _, _ = erased
    for case, edit, message in [
        ("no-before", lambda m: m["erasures"][0].pop("concept_residual_before"), "concept_residual_before"),
        ("relabelled", lambda m: m.update(export_format="lora", lora_file="made_up.safetensors"),
         "lora_file.*must be one of the export's hashed files"),
        ("unknown-format", lambda m: m.update(export_format="gguf"), "export_format"),
    ]:
        out = tmp_path / case
        save_erased(pipe, out)
        _rewrite(out, edit)
        with pytest.raises(ExportVerificationError, match=message):
            verify_export(out)


def test_verify_of_a_lora_export_checks_the_lora_file_itself(load_pipeline, tmp_path):
    import torch
    from safetensors.torch import load_file, save_file

    from ice_lightning.core.concepts import FAMILY_TEMPLATES
    from ice_lightning.core.export import ExportVerificationError

    pipe = load_pipeline("sd")  # the family's own templates: with every family's the operator's row space fills the
    ice_lightning.erase(pipe, **STYLE, templates=list(FAMILY_TEMPLATES["style"]))  # tiny width, leaving no room
    out = tmp_path / "lora"
    save_erased(pipe, out, format="lora")
    assert verify_export(out)["lora"]
    name = json.loads((out / MANIFEST_NAME).read_text())["lora_file"]
    lora = load_file(str(out / name))
    key = next(k for k in lora if k.endswith("lora_A.weight"))
    lora[key] = torch.randn_like(lora[key])  # another edit, hashes recomputed
    save_file(lora, str(out / name))
    _rewrite(out, lambda m: None)
    with pytest.raises(ExportVerificationError, match="is not the recorded operators' change"):
        verify_export(out)
    (out / name).unlink()  # the LoRA file deleted, hashes recomputed
    _rewrite(out, lambda m: None)
    with pytest.raises(ExportVerificationError, match="lora_file.*must be one of the export's hashed files"):
        verify_export(out)


def test_verify_raises_its_own_error_for_missing_parts_and_hostile_names(erased, tmp_path):
    import shutil

    from ice_lightning.core.export import OPERATORS_NAME, ExportVerificationError

    pipe, _, _ = erased
    cases = {
        "no-unet": lambda out: shutil.rmtree(out / "unet"),
        "no-operators": lambda out: (out / OPERATORS_NAME).unlink(),
    }
    for case, damage in cases.items():
        out = tmp_path / case
        save_erased(pipe, out)
        damage(out)
        _rewrite(out, lambda m: None)
        with pytest.raises(ExportVerificationError, match="cannot be verified"):
            verify_export(out)
    out = tmp_path / "hostile"
    save_erased(pipe, out)

    def hostile(m):
        layer = m["erasures"][0]["layers"][0]
        bad = "unet.__class__.__init__"
        m["erasures"][0]["layers"][0] = bad
        spaces, tensors = m["erasures"][0]["layer_spaces"], m["edited_tensors"]
        m["erasures"][0]["layer_spaces"] = {bad if k == layer else k: v for k, v in spaces.items()}
        m["edited_tensors"] = {(bad + ".weight" if k == layer + ".weight" else k): v for k, v in tensors.items()}

    _rewrite(out, hostile)
    with pytest.raises(ExportVerificationError, match="names the edited tensor 'unet.__class__.__init__.weight'"):
        verify_export(out)


# -- 14. the CLI says what is wrong in one line ----------------------------------------------------------------
def _console(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "HF_HUB_OFFLINE": "1"}
    return subprocess.run(["ice-lightning", *args], capture_output=True, text=True, env=env, timeout=300)


def test_cli_refusals_print_the_message_alone_and_exit_1(saved_pipeline, tmp_path, monkeypatch, capsys):
    from ice_lightning.cli import run

    afile = tmp_path / "afile"
    afile.write_text("x")
    sd = saved_pipeline("sd")
    cases = [
        (["--pipeline", "./nope"], "no such folder: './nope'"),
        # the spec is checked before the pipeline is looked for: a bad one costs no loading
        (["--pipeline", "./nope", "--family", "custom", "--anchor", "family"],
         "anchor='family' takes the family's generic anchor, and the 'custom' family has none"),
        (["--pipeline", str(afile)], "is not a pipeline folder: it is a file"),
        (["--pipeline", sd, "--device", "cuda"], "--device cuda: no CUDA device is available"),
        (["--pipeline", sd, "--method", "uce", "--lam", "999999", "--base-weight", "5"],
         "--base-weight does not apply to --method uce"),
        (["--pipeline", sd, "--mu", "1e-300"], "mu \\(the ridge weight\\) must be at least 1e-12"),
        (["--pipeline", sd, "--out", "/proc/x"], "the export folder /proc/x cannot be written"),
    ]
    capsys.readouterr()
    for extra, message in cases:  # the console script's own entry point, in this process
        args = ["erase", "--erase", "Van Gogh", "--family", "style", "--out", str(tmp_path / "out"), *extra]
        monkeypatch.setattr(sys, "argv", ["ice-lightning", *args])
        with pytest.raises(SystemExit) as done:
            run()
        err = capsys.readouterr().err
        assert done.value.code == 1, (extra, err[-2000:])
        last = err.replace("\r", "\n").strip().splitlines()[-1]  # after any loading bars: the message alone
        assert last.startswith("ice-lightning: error: ") and "Traceback" not in err, err[-2000:]
        assert re.search(message, last), (message, last)
    # the installed console script: --debug shows the traceback of the same kind of refusal
    run_ = _console("erase", "--erase", "Van\u202eGogh", "--pipeline", sd, "--out", str(tmp_path / "o"), "--debug")
    assert run_.returncode == 1 and "Traceback" in run_.stderr and "RIGHT-TO-LEFT OVERRIDE" in run_.stderr
    assert not (tmp_path / "out").exists()


# -- 7. a LoRA that diffusers cannot load back exactly is refused before anything is written ---------------------
@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("wan22", "edits both experts"),
        ("pixart", "has no load_lora_weights"),
        ("text2video", r"\(UNet3DConditionModel\) has no load_lora_adapter"),
    ],
)
def test_lora_export_is_refused_where_diffusers_cannot_load_it(kind, load_pipeline, tmp_path, message):
    pipe = load_pipeline(kind)
    ice_lightning.erase(pipe, **STYLE)
    with pytest.raises(ValueError, match=message):
        save_erased(pipe, tmp_path / "lora", format="lora")
    assert list(tmp_path.iterdir()) == []
    save_erased(pipe, tmp_path / "merged")  # what to ship instead
    assert all(verify_export(tmp_path / "merged").values())


# -- 8. the on-disk cache checks what it reads ------------------------------------------------------------------
def test_a_hand_edited_layer_entry_is_recomputed_not_trusted(load_pipeline, monkeypatch, tmp_path, caplog):
    import ice_lightning.core.layers as layers

    monkeypatch.setenv("ICE_LIGHTNING_CACHE", str(tmp_path))
    monkeypatch.setattr(layers, "_CHECKED", {})
    full = ice_lightning.erase(load_pipeline("sd"), **STYLE)
    entry = next((tmp_path / "layers").glob("*.json"))
    data = json.loads(entry.read_text())
    data["value"] = data["value"][:1]  # one of the eight layers
    entry.write_text(json.dumps(data))
    monkeypatch.setattr(layers, "_CHECKED", {})  # a new process: only the disk knows
    again = ice_lightning.erase(load_pipeline("sd"), **STYLE)
    assert again.layers == full.layers and len(full.layers) == 8
    assert "does not match its checksum; recomputing it" in caplog.text


def test_a_base_entry_of_another_encoder_is_recomputed_and_one_edited_row_changes_the_key(
        load_pipeline, monkeypatch, tmp_path, caplog):  # fmt: skip
    import shutil

    import torch

    from ice_lightning.core.encoders import EmbeddingSpace
    from ice_lightning.core.parts import pipeline_spaces

    monkeypatch.setenv("ICE_LIGHTNING_CACHE", str(tmp_path))
    prompts = ice_lightning.ConceptSpec(erase=["x"]).base_prompts()[:30]
    a, b = (pipeline_spaces(load_pipeline("sd"))["text"] for _ in range(2))
    embedding = b.sources[0].encoder.get_input_embeddings().weight
    key_a = a._disk_key(prompts)
    with torch.no_grad():
        embedding[7] += 1e-3  # a single row of one embedding
    assert b._disk_key(prompts) != key_a
    with torch.no_grad():
        embedding.mul_(1.5)  # and an encoder whose states differ
    key_b = b._disk_key(prompts)
    first = EmbeddingSpace(a.name, a.sources).base_states(prompts)
    truth = EmbeddingSpace(b.name, b.sources).base_states(prompts)  # b's own entry, then replaced by a's
    shutil.copy(tmp_path / "base" / f"{key_a}.safetensors", tmp_path / "base" / f"{key_b}.safetensors")
    again = EmbeddingSpace(b.name, b.sources).base_states(prompts)
    assert "was stored under another key (or by an older version); recomputing it" in caplog.text
    assert torch.equal(again.s, truth.s) and not torch.equal(again.s, first.s)


def test_filling_the_whole_space_is_said_once_and_the_table_says_n_a(load_pipeline, caplog):
    from ice_lightning.core.probe import format_table
    from ice_lightning.demos.tiny_parts import default_vocabulary

    pipe = load_pipeline("sd")
    words = [w for w in default_vocabulary() if w.isalpha()][:220]
    result = ice_lightning.erase(pipe, erase=words, family="style")
    op = result.operators["text"]
    assert op.rank >= 0.9 * op.dim
    assert caplog.text.count("dimensions of the 'text' space: the edit reaches nearly every direction") == 1
    caplog.clear()
    result.undo()
    ice_lightning.erase(pipe, **STYLE)  # one concept: nothing to say
    assert "dimensions of the" not in caplog.text
    table = format_table({"erasure": 0.9, "collateral_near": float("nan"), "collateral_far": 0.3, "leakage": 0.0})
    assert "nan" not in table and "n/a" in table


# -- 11. an export of an erased export carries the earlier erasures ------------------------------------------
def test_erasing_an_export_again_keeps_the_earlier_erasures_in_the_manifest(erased, tmp_path):
    from diffusers import DiffusionPipeline

    from ice_lightning.core.export import ExportVerificationError

    pipe, _, _ = erased
    first = tmp_path / "no-van-gogh"
    save_erased(pipe, first)
    again = DiffusionPipeline.from_pretrained(first)
    ice_lightning.erase(again, erase=["Monet"], family="style")
    second = tmp_path / "no-van-gogh-no-monet"
    save_erased(again, second)
    manifest = json.loads((second / MANIFEST_NAME).read_text())
    assert [e["concepts"]["erase"] for e in manifest["erasures"]] == [["Van Gogh"], ["Monet"]]
    assert manifest["erased_concepts"] == ["Van Gogh", "Monet"]
    assert manifest["erasures"][0]["inherited_from"]["export"] == str(first.resolve())
    checks = verify_export(second)
    assert checks["erasure:0"] and checks["erasure:1"]  # both recomputed through the shipped layers
    _rewrite(second, lambda m: m["erasures"][0].update(concept_residual=m["erasures"][0]["concept_residual"] * 0.5))
    with pytest.raises(ExportVerificationError, match=r"erasure 0 \(\['Van Gogh'\]\)"):
        verify_export(second)


# -- 12. an export of the earlier manifest format (v2) still verifies, and carries into a new export -------------
def test_a_v2_export_verifies_against_the_residual_it_recorded_and_a_new_export_carries_it(erased, tmp_path):
    from diffusers import DiffusionPipeline

    from ice_lightning.core.export import ExportVerificationError
    from ice_lightning.core.export.manifest import _concept_states, _v2_residual

    pipe, result, _ = erased
    first = tmp_path / "v2"
    save_erased(pipe, first)
    states = _concept_states(pipe, result.spec, set(result.layer_spaces.values()))
    args = (result.layer_spaces, states, result.operators)
    now = {n: (m.weight, m.bias) for n, m in result.modules().items()}
    v2 = {"concept_residual": _v2_residual(now, *args), "concept_residual_before": _v2_residual(
        result.reference_weights(), *args)}  # fmt: skip

    def as_v2(m):  # what the earlier version wrote: its format and its quantity, ||W D c|| / ||W c + b||
        m["format"] = "ice-lightning/manifest-v2"
        m["erasures"][0].update(v2)

    v3 = json.loads((first / MANIFEST_NAME).read_text())["erasures"][0]["concept_residual"]
    assert abs(v3 - v2["concept_residual"]) > 0.01  # two different quantities: the dispatch is what is tested
    _rewrite(first, as_v2)
    assert all(verify_export(first).values())
    _rewrite(first, lambda m: m["erasures"][0].update(concept_residual=v3))  # v2's name, v3's quantity
    with pytest.raises(ExportVerificationError, match="these are not the erased weights"):
        verify_export(first)
    _rewrite(first, as_v2)

    again = DiffusionPipeline.from_pretrained(first)
    ice_lightning.erase(again, erase=["Monet"], family="style")
    second = tmp_path / "v3"
    save_erased(again, second)
    e = json.loads((second / MANIFEST_NAME).read_text())["erasures"][0]
    assert e["inherited_from"]["manifest_format"] == "ice-lightning/manifest-v2"
    assert e["inherited_from"]["concept_residual_at_export"] == v2["concept_residual"]
    assert "concept_residual_before" not in e and "manifest-v2 export" in e["recorded_from"]
    assert all(verify_export(second).values())  # its residual recomputed as v3 defines it, through today's layers


def test_a_dtype_that_does_not_exist_is_refused_by_name():
    from ice_lightning.core.pipelines import load_pipeline
    from ice_lightning.lightning.module import ICEModule

    with pytest.raises(ValueError, match=r"must be one of float32, float16, bfloat16, float64, got 'float8'"):
        ICEModule("tiny:sd", torch_dtype="float8")
    with pytest.raises(ValueError, match="torch_dtype must be one of"):
        load_pipeline("tiny:sd", torch_dtype="int8")


def test_two_callbacks_that_differ_only_in_hyperparameters_keep_separate_states():
    from ice_lightning import ICECallback

    plain = ICECallback(**STYLE)
    hardened = ICECallback(**STYLE, hparams={"harden_rounds": 3})
    softer = ICECallback(**STYLE, hparams={"lam": 3.0})
    assert len({plain.state_key, hardened.state_key, softer.state_key}) == 3
    # without hyperparameters, the key of checkpoints written before hyperparameters were part of it
    assert plain.state_key == "ICECallback{'erase': ['Van Gogh'], 'family': 'style', 'method': 'ice'}"
