"""Export from a record: an erasure's plain record (spec, method, hyperparameters, layer -> space, operators,
hashes) is all the export, the manifest, the LoRA and ``verify`` read, so a copy of the pipeline, which has no
erasure history, exports the same erasure; a record that does not fit the pipeline, or whose layers changed, is
refused or described as such."""

import copy
import json

import pytest
import torch

import ice_lightning
from ice_lightning.core.export import LORA_NAME, MANIFEST_NAME, save_erased, verify_export
from ice_lightning.core.export.lora import erasure_lora
from ice_lightning.core.parts import resolve_layer

STYLE = {"erase": ["Van Gogh"], "family": "style"}


def test_a_copy_of_the_pipeline_exports_merged_and_lora_from_the_record_alone(load_pipeline, tmp_path):
    pipe = load_pipeline("sd")
    result = ice_lightning.erase(pipe, **STYLE)
    twin = copy.deepcopy(pipe)  # the history is kept beside the pipeline: a copy has none
    with pytest.raises(ValueError, match="nothing was erased from this pipeline"):
        save_erased(twin, tmp_path / "none")
    record = result.record
    live = save_erased(pipe, tmp_path / "live")
    copied = save_erased(twin, tmp_path / "copied", results=[record])
    a, b = (json.loads((d / MANIFEST_NAME).read_text())["erasures"][0] for d in (live, copied))
    assert {k: a[k] for k in ("concepts", "method", "hparams", "layers", "layer_spaces", "operators")} == {
        k: b[k] for k in ("concepts", "method", "hparams", "layers", "layer_spaces", "operators")
    }
    assert b["concept_residual"] == pytest.approx(a["concept_residual"], rel=1e-9)
    # before the edit: from the undo record (live) or W (I - D)^-1 of the shipped weights (record)
    assert b["concept_residual_before"] == pytest.approx(a["concept_residual_before"], rel=1e-4)
    assert all(verify_export(copied).values())
    from_live, from_record = erasure_lora(pipe, [result]), erasure_lora(twin, [record])
    assert from_live.keys() == from_record.keys() and len(from_live) == 2 * len(result.layers)
    for k, v in from_live.items():
        assert float((from_record[k] - v).norm()) <= 1e-4 * float(v.norm()), k
    lora = save_erased(twin, tmp_path / "lora", results=[record], format="lora")
    assert (lora / LORA_NAME).is_file() and all(verify_export(lora).values())


def test_a_record_that_does_not_fit_or_whose_layers_changed_is_refused_or_described(load_pipeline, tmp_path):
    pipe = load_pipeline("sd")
    hard = ice_lightning.erase(pipe, **STYLE, method="projection").record  # eigenvalue 1: no way back
    with pytest.raises(ValueError, match="removes some directions of layer .* completely"):
        erasure_lora(copy.deepcopy(pipe), [hard])
    shipped = json.loads((save_erased(copy.deepcopy(pipe), tmp_path / "hard", results=[hard]) / MANIFEST_NAME)
                         .read_text())["erasures"][0]  # fmt: skip
    assert "concept_residual_before" not in shipped and "pre-edit weights are not known" in shipped["recorded_from"]
    other = load_pipeline("sdxl")
    with pytest.raises(ValueError, match=r"results\[0\] \(the erasure of \['Van Gogh'\]\) names layer .*which this"):
        save_erased(other, tmp_path / "other", results=[hard])
    assert not (tmp_path / "other").exists()
    pipe = load_pipeline("sd")
    record = ice_lightning.erase(pipe, **STYLE).record
    twin = copy.deepcopy(pipe)
    with torch.no_grad():
        resolve_layer(twin, record.layers[0]).weight.add_(1e-3)  # "training" since the erasure
    with pytest.raises(ValueError, match="changed since it was erased"):
        erasure_lora(twin, [record])
