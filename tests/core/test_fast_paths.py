"""What makes an erasure instant keeps it exact: the dense and low-rank edits agree with ``W (I - D)``, the undo
record (low-rank or copy) restores bit for bit, ``keep_undo=False`` is still all-or-nothing, and what is cached
on disk (base spectra, checked layers) is read back only for the model it was made from."""

import pytest
import torch

import ice_lightning
from ice_lightning.core import cache, layers
from ice_lightning.core.editing import apply_edits, dense_is_cheaper, undo_edits
from ice_lightning.core.encoders import EmbeddingSpace
from ice_lightning.core.parts import pipeline_spaces
from ice_lightning.core.solver import DissociationOperator

F64 = torch.float64


def _operator(rank: int, d: int = 16, seed: int = 0) -> DissociationOperator:
    g = torch.Generator().manual_seed(seed)
    U = torch.linalg.qr(torch.randn(d, rank, generator=g, dtype=F64))[0]
    return DissociationOperator(U=U, M=0.3 * torch.randn(rank, rank, generator=g, dtype=F64))


@pytest.mark.parametrize("rank", [2, 12])  # below and above half the width: low-rank and dense forms
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_both_forms_edit_exactly_and_undo_bit_for_bit(rank, dtype):
    assert dense_is_cheaper(rank, 16) == (rank >= 8)
    op = _operator(rank)
    torch.manual_seed(1)
    lins = [torch.nn.Linear(16, 24).to(dtype), torch.nn.Linear(16, 8).to(dtype)]
    originals = [lin.weight.detach().clone() for lin in lins]
    edits = apply_edits([(f"l{i}", lin, op) for i, lin in enumerate(lins)])
    for lin, w0 in zip(lins, originals, strict=True):
        want = (w0.to(F64) @ (torch.eye(16, dtype=F64) - op.dense())).to(dtype)
        tol = 1e-6 if dtype == torch.float32 else 1e-3
        assert torch.allclose(lin.weight.to(F64), want.to(F64), rtol=tol, atol=tol)
    undo_edits(edits)
    assert all(torch.equal(lin.weight, w0) for lin, w0 in zip(lins, originals, strict=True))


def test_the_cost_model_counts_every_layer_and_what_each_form_computes_once():
    """Dense ``D = U M U^T`` costs ``d k (k + d)`` once, then ``out d^2`` a layer; low-rank ``M U^T`` costs ``k^2 d``
    once, then ``2 out d k`` a layer. One layer with ``k`` near ``d`` stays low-rank (Wan's text layer with 100
    concepts); many layers sharing ``D`` go dense (SD, SDXL); and either way the edit is ``W (I - D)``."""
    assert not dense_is_cheaper(3600, 4096, [1536])  # 2.0e11 low-rank against 2.8e11 dense
    assert dense_is_cheaper(3600, 4096, [1536] * 4)
    assert dense_is_cheaper(768, 768, [320, 640, 1280] * 10) and dense_is_cheaper(2048, 2048, [640] * 140)
    assert not dense_is_cheaper(200, 2048, [640] * 140)
    op = _operator(14)
    lin = torch.nn.Linear(16, 4).double()
    w0 = lin.weight.detach().clone()
    (edit,) = apply_edits([("l", lin, op)])
    assert edit.L is not None and edit.original is None  # the low-rank form's undo record: the dense one copies
    assert torch.allclose(lin.weight, w0 @ (torch.eye(16, dtype=F64) - op.dense()), atol=1e-12)
    undo_edits([edit])
    assert torch.equal(lin.weight, w0)
    many = [torch.nn.Linear(16, 4).double() for _ in range(8)]
    assert all(e.original is not None for e in apply_edits([(f"l{i}", m, op) for i, m in enumerate(many)]))


def test_keep_undo_false_holds_no_record_but_still_rolls_back_a_failed_edit():
    ok, late = torch.nn.Linear(16, 8), torch.nn.Linear(16, 8).half()
    with torch.no_grad():
        late.weight.fill_(60000.0)  # the edit overflows float16 here, after ``ok`` was written
    before = [ok.weight.clone(), late.weight.clone()]
    op = _operator(2)
    big = DissociationOperator(op.U, -50 * torch.eye(2, dtype=F64))
    with pytest.raises(ValueError, match="overflow"):
        apply_edits([("ok", ok, op), ("late", late, big)], keep_undo=False)
    assert torch.equal(ok.weight, before[0]) and torch.equal(late.weight, before[1])
    edits = apply_edits([("ok", ok, op)], keep_undo=False)
    assert edits[0].L is None and edits[0].original is None and not edits[0].undoable
    with pytest.raises(RuntimeError, match="keep_undo=False"):
        undo_edits(edits)


def test_erase_without_undo_record_refuses_undo_with_a_clear_error(load_pipeline):
    pipe = load_pipeline("sd")
    result = ice_lightning.erase(pipe, erase=["Van Gogh"], family="style", keep_undo=False)
    assert not result.undoable
    with pytest.raises(RuntimeError, match="keep_undo=False.*reload the original model"):
        result.undo()


def test_base_spectrum_is_cached_on_disk_per_encoder(minilm_pipe, monkeypatch, tmp_path):
    monkeypatch.setenv("ICE_LIGHTNING_CACHE", str(tmp_path))
    space = pipeline_spaces(minilm_pipe)["text"]
    prompts = ice_lightning.ConceptSpec(erase=["x"]).base_prompts()[:40]
    fresh = EmbeddingSpace(space.name, space.sources)
    first = fresh.base_states(prompts)
    assert len(list((tmp_path / "base").glob("*.safetensors"))) == 1

    def no_encoding(*a, **k):
        raise AssertionError("encoded again although the spectrum is cached")

    again = EmbeddingSpace(space.name, space.sources)  # a new process would start like this
    monkeypatch.setattr(again, "read_rows", no_encoding)
    second = again.base_states(prompts)
    assert torch.equal(first.s, second.s) and torch.equal(first.Vh, second.Vh)
    # another encoder (one weight changed) has another key: it never reads this entry
    encoder = space.sources[0].encoder
    key = fresh._disk_key(prompts)
    param = next(encoder.parameters())
    with torch.no_grad():
        param.view(-1)[0] += 1.0
    try:
        assert fresh._disk_key(prompts) != key
    finally:
        with torch.no_grad():
            param.view(-1)[0] -= 1.0
    assert fresh._disk_key(prompts) == key
    monkeypatch.setenv("ICE_LIGHTNING_CACHE", "off")
    assert cache.cache_dir() is None and not cache.save_json("x", "y", {})


def test_checked_layers_are_cached_per_architecture(load_pipeline, monkeypatch, tmp_path):
    monkeypatch.setenv("ICE_LIGHTNING_CACHE", str(tmp_path))
    monkeypatch.setattr(layers, "_CHECKED", {})
    first = ice_lightning.find_text_conditioning(load_pipeline("sd"))["unet"]
    assert len(list((tmp_path / "layers").glob("*.json"))) == 1
    monkeypatch.setattr(layers, "_CHECKED", {})  # a new process: only the disk knows

    def no_check_pass(store):
        raise AssertionError("the check pass ran although this architecture was checked before")

    monkeypatch.setattr(layers, "_recorder", no_check_pass)
    second = ice_lightning.find_text_conditioning(load_pipeline("sd"))["unet"]
    assert sorted(second.layers) == sorted(first.layers)


@pytest.mark.parametrize(("rank", "copied"), [(27, False), (29, True)])
def test_the_undo_record_is_low_rank_only_where_it_saves_an_eighth_of_a_copy(rank, copied):
    """A float32 row of 64 costs 256 bytes as a copy; ``L``'s row costs ``8 k``: 216 bytes at rank 27 (saves more
    than an eighth), 232 at 29 (less, so the copy, which needs no second pass over the weight). Both undo exactly."""
    op = _operator(rank, d=64)
    lin = torch.nn.Linear(64, 8)
    w0 = lin.weight.detach().clone()
    (edit,) = apply_edits([("l", lin, op)])
    assert (edit.original is not None, edit.L is None) == (copied, copied)
    undo_edits([edit])
    assert torch.equal(lin.weight, w0)
