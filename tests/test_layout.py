"""The layout holds: the core imports no Lightning, the product loads no evaluation, shapes or test-pipeline
module, and the top-level names are the product's."""

import ast
import json
import subprocess
import sys

import pytest
from helpers import ENV, ROOT

PACKAGE = ROOT / "ice_lightning"
BESIDE = ("ice_lightning.evaluation", "ice_lightning.demos.shapes", "ice_lightning.demos.tiny")


def _imports(path, top_level_only: bool = False) -> set[str]:
    """Absolute names of the modules (and imported names) a file imports, relative imports resolved: at any
    depth, or only those run when the module loads."""
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    tree = ast.parse(path.read_text())
    out = set()
    for node in tree.body if top_level_only else ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level else ""
            mod = ".".join(p for p in (base, node.module or "") if p)
            out |= {mod} | {f"{mod}.{a.name}" for a in node.names}
    return out


def test_core_imports_neither_lightning_nor_anything_above_or_beside_it():
    files = sorted((PACKAGE / "core").glob("*.py"))
    assert len(files) >= 10
    for f in files:
        bad = {m for m in _imports(f) if m.split(".")[0] == "lightning" or m.startswith(("ice_lightning.lightning",
               *BESIDE))}  # fmt: skip
        assert not bad, f"{f.name} imports {sorted(bad)}"


def test_the_lightning_layer_imports_nothing_beside_it_at_load_time():
    files = sorted((PACKAGE / "lightning").glob("*.py"))
    assert len(files) >= 6
    for f in files:
        bad = {m for m in _imports(f, top_level_only=True) if m.startswith(BESIDE)}
        assert not bad, f"{f.name} imports {sorted(bad)} when it loads"


@pytest.mark.slow
def test_using_the_product_loads_no_evaluation_shapes_or_test_pipeline_module(saved_pipeline, tmp_path):
    folder = saved_pipeline("sd")
    data = ROOT / "examples" / "data" / "tiny_images"
    script = f"""
import json, sys, warnings
warnings.filterwarnings("ignore")
import ice_lightning
from diffusers import DiffusionPipeline
from lightning.pytorch import Trainer

style = {{"erase": ["Van Gogh"], "family": "style"}}
pipe = DiffusionPipeline.from_pretrained({str(folder)!r})
ice_lightning.erase(pipe, **style).undo()
module = ice_lightning.ICEModule({str(folder)!r}, validation_concepts=style)
ice = ice_lightning.ICECallback(**style, every_n_epochs=1, export={str(tmp_path / "out")!r})
data = ice_lightning.CaptionFolderDataModule({str(data)!r}, resolution=16, batch_size=4)
Trainer(max_epochs=1, limit_train_batches=1, limit_val_batches=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[ice],
        default_root_dir={str(tmp_path)!r}).fit(module, datamodule=data)
ice_lightning.verify_export({str(tmp_path / "out")!r})
print(json.dumps(sorted(m for m in sys.modules if m.startswith("ice_lightning"))))
"""
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=ENV, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    loaded = json.loads(run.stdout.strip().splitlines()[-1])
    assert "ice_lightning.core.plan" in loaded and "ice_lightning.lightning.callback" in loaded
    assert not [m for m in loaded if m.startswith(BESIDE)], loaded


def test_the_top_level_erase_is_the_function():
    import ice_lightning

    assert callable(ice_lightning.erase) and ice_lightning.erase.__module__ == "ice_lightning.core.plan"
