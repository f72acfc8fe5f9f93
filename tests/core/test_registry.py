"""One method registry: a method registered in one place is a method of ``erase()``, of the CLI (its choices and
its flags, typed from the dataclass) and of the manifest; an unknown method or field is refused by name."""

import json
from dataclasses import dataclass

import pytest
import torch

import ice_lightning
from ice_lightning.cli import build_erase_parser, main
from ice_lightning.core import solver
from ice_lightning.core.export import MANIFEST_NAME, save_erased, verify_export
from ice_lightning.core.solver import DissociationOperator, energy_subspace, method_params, register_method


@dataclass(frozen=True)
class HalfParams:
    """A toy method: ``D = scale * P``, ``P`` the projector onto the concept's token states.

    Attributes:
        scale: how much of the concept's directions the edit removes, in (0, 1].
    """

    scale: float = 0.5

    def __post_init__(self) -> None:
        if not 0 < self.scale <= 1:
            raise ValueError(f"scale must lie in (0, 1], got {self.scale!r}")

    @property
    def needs_gram(self) -> bool:
        return False

    def build(self, E_erase, E_preserve, anchor=None, concepts=1, E_base=None, gram=None):
        V = energy_subspace(E_erase, float("inf")).basis
        return DissociationOperator(V, self.scale * torch.eye(V.shape[1], dtype=V.dtype), "half", {"scale": self.scale})


@pytest.fixture
def half():
    register_method("half", HalfParams)
    yield
    solver.METHODS.pop("half")
    solver._TITLES.pop("half")


def test_a_registered_method_erases_exports_and_verifies(half, load_pipeline, tmp_path):
    pipe = load_pipeline("sd")
    name, lin = next((n, m) for n, m in pipe.unet.named_modules() if n.endswith("attn2.to_k"))
    before = lin.weight.detach().clone()
    result = ice_lightning.erase(pipe, erase=["Van Gogh"], family="style", method="half", scale=0.25)
    (op,) = result.operators.values()
    assert op.method == "half" and torch.allclose(op.M, 0.25 * torch.eye(op.rank, dtype=op.M.dtype))
    assert torch.allclose(lin.weight, op.apply(before), atol=1e-6)  # W (I - D), as for every method
    out = save_erased(pipe, tmp_path / "out")
    (erasure,) = json.loads((out / MANIFEST_NAME).read_text())["erasures"]
    assert erasure["method"] == "half" and erasure["hparams"] == {"scale": 0.25}
    assert all(verify_export(out).values())


def test_a_registered_method_is_a_cli_choice_with_its_own_typed_flag(half, saved_pipeline, tmp_path, capsys):
    help_text = build_erase_parser().format_help()
    assert "{ice,cure,uce,projection,rece,half}" in help_text
    assert "half (0.5): how much of the concept's directions the edit removes, in (0, 1]" in " ".join(help_text.split())
    out = tmp_path / "out"
    assert main(["erase", "--pipeline", saved_pipeline("sd"), "--erase", "Van Gogh", "--family", "style", "--method",
                 "half", "--scale", "0.75", "--out", str(out)]) == 0  # fmt: skip
    (erasure,) = json.loads((out / MANIFEST_NAME).read_text())["erasures"]
    assert erasure["method"] == "half" and erasure["hparams"] == {"scale": 0.75}
    with pytest.raises(ValueError, match="--scale does not apply to --method ice: it takes --objective.*--method half"):
        main(["erase", "--pipeline", saved_pipeline("sd"), "--erase", "Van Gogh", "--scale", "0.5", "--out",
              str(tmp_path / "ice")])  # fmt: skip
    assert not (tmp_path / "ice").exists()


def test_method_params_are_typed_and_refuse_unknown_methods_and_fields():
    assert method_params("uce", {"lam": 2.0}) == solver.UCEParams(lam=2.0, preserve_scale=1.0)
    # the default hardens where the layers are known: the plan gives it their Gram matrix, states alone do without
    assert method_params("ice").needs_gram is True and method_params("ice").gram_optional is True
    assert method_params("ice", {"harden_rounds": 0}).needs_gram is False and method_params("rece").needs_gram is True
    assert method_params("ice", {"metric": "output"}).needs_gram is True
    assert method_params("ice", {"metric": "output"}).gram_optional is False
    with pytest.raises(ValueError, match=r"unknown method 'half'; choose one of \('ice', 'cure', 'uce'"):
        method_params("half")
    with pytest.raises(ValueError, match=r"unknown projection hyperparameter.*\['lam'\]; choose from \['energy_kept'"):
        method_params("projection", {"lam": 1.0})
    with pytest.raises(TypeError, match="not a hyperparameter dataclass"):
        register_method("broken", dict)
