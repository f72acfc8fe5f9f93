"""ICECallback, ICEModule and the data module inside real Trainer.fit runs (CPU)."""

import csv
import types
from pathlib import Path

import pytest
import torch
from diffusers import DiffusionPipeline
from lightning.pytorch import Callback, LightningModule, Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint

import ice_lightning
from ice_lightning import ICECallback, ICEModule, SampleFilterCallback
from ice_lightning.core.concepts import ConceptSpec
from ice_lightning.core.export import MANIFEST_NAME, load_manifest, verify_export
from ice_lightning.core.probe import compare_pipelines
from ice_lightning.demos.tiny import build_tiny_pipeline
from ice_lightning.lightning.callback_state import ExportOptions
from ice_lightning.lightning.data import CaptionFolderDataModule
from ice_lightning.lightning.filters import drop_rows

DATA = Path(__file__).parents[2] / "examples" / "data"
STYLE = {"erase": ["Van Gogh"], "family": "style"}


class EpochLoss(Callback):
    def __init__(self):
        self.losses = []

    def on_train_epoch_end(self, trainer, pl_module):
        self.losses.append(float(trainer.callback_metrics["train/loss_epoch"]))


def _trainer(tmp_path, callbacks, epochs=3, **kw):
    kw.setdefault("logger", False)
    kw.setdefault("enable_checkpointing", False)
    return Trainer(
        accelerator="cpu",
        max_epochs=epochs,
        callbacks=callbacks,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        num_sanity_val_steps=0,
        **kw,
    )


def _data(video: bool, batch_size: int = 4) -> CaptionFolderDataModule:
    if video:
        return CaptionFolderDataModule(
            str(DATA / "tiny_videos"), video=True, resolution=16, num_frames=4, batch_size=2, shuffle=False
        )
    return CaptionFolderDataModule(str(DATA / "tiny_images"), resolution=16, batch_size=batch_size, shuffle=False)


def _still_erased(folder, kind: str) -> float:
    """Erasure of the exported model against a fresh (identical, seeded) original pipeline."""
    shipped = DiffusionPipeline.from_pretrained(folder)
    return compare_pipelines(shipped, build_tiny_pipeline(kind), ConceptSpec(**STYLE))["erasure"]


@pytest.mark.slow
@pytest.mark.parametrize(("kind", "video"), [("sd-minilm", False), ("text2video-minilm", True)])
def test_fit_keeps_the_concept_erased_and_ships_it(kind, video, tmp_path):
    seed_everything(0)
    module = ICEModule(f"tiny:{kind}", learning_rate=3e-4, cfg_dropout=0.0, validation_concepts=STYLE)
    ice = ICECallback(**STYLE, every_n_epochs=1, export=str(tmp_path / "erased"))
    losses = EpochLoss()
    _trainer(tmp_path, [ice, losses], epochs=4).fit(module, datamodule=_data(video))

    reasons = [a["reason"] for a in ice.applications]
    assert reasons == ["setup", "epoch_end", "epoch_end", "epoch_end", "epoch_end", "fit_end"]
    erasure = [a["metrics"]["erasure"] for a in ice.applications]
    assert min(erasure) > 0.7, erasure  # stays high after every epoch
    residual = [a["metrics"]["concept_residual"] for a in ice.applications]
    assert max(residual) < residual[0] + 0.05, residual  # and the concept is not re-learned
    assert losses.losses[-1] < losses.losses[0], losses.losses  # while the model trains
    out = tmp_path / "erased"
    manifest = load_manifest(out)
    assert [a["reason"] for a in manifest["ice_callback"]["applications"]] == reasons
    assert all(verify_export(out).values())
    assert _still_erased(out, kind) > 0.7


@pytest.mark.slow
def test_fine_tuning_relearns_the_concept_unless_the_callback_reapplies(tmp_path):
    """Training data captioned with the concept: the response along the erased directions grows back when
    the edit is applied once at setup, and stays down when it is re-applied every epoch."""
    final = {}
    for every in (1, None):
        seed_everything(0)
        module = ICEModule("tiny:sd-minilm", learning_rate=3e-3, cfg_dropout=0.0)
        ice = ICECallback(**STYLE, every_n_epochs=every, at_fit_end=every is not None)
        _trainer(tmp_path, [ice], epochs=3, limit_val_batches=0).fit(module, datamodule=_data(False))
        start = ice.applications[0]["metrics"]["concept_residual"]
        final[every] = ice.probe.compute(ice.operators)["concept_residual"]
    # Right after the edit the residual sits at the soft operator's floor ||W (I - D) D c|| (0 for a projector).
    assert final[None] > 5 * start  # fine-tuning alone re-learns the concept...
    # ...which the callback keeps removing: a re-application removes the training change along D, leaving
    # Delta (D - D^2) c, so a soft operator keeps a little of it (measured: 0.081 -> 0.100 with, 1.090 without)
    assert final[1] < 1.5 * start and final[1] < 0.2 * final[None]


def test_reapplication_never_compounds(tmp_path):
    module = ICEModule("tiny:sd-minilm", validation_concepts=STYLE)
    ice = ICECallback(**STYLE, at_fit_end=False)
    trainer = _trainer(tmp_path, [ice], epochs=1, limit_train_batches=0, limit_val_batches=0)
    trainer.fit(module, datamodule=_data(False))
    weights = {n: m.weight.detach().clone() for n, m in ice.edited_modules().items()}
    once = ice.probe.compute()
    ice.apply(trainer, module, "manual")
    for n, m in ice.edited_modules().items():
        assert (m.weight - weights[n]).norm() <= 1e-6 * weights[n].norm()
    for _ in range(10):
        ice.apply(trainer, module, "manual")
    assert ice.probe.compute() == pytest.approx(once, abs=1e-9)
    # and the operator is computed once: every application reuses the same objects
    assert len({id(op) for op in ice.operators.values()}) == len(ice.operators)


def test_optimizer_state_of_edited_weights_is_reset(tmp_path):
    module = ICEModule("tiny:sd", validation_concepts=None)
    ice = ICECallback(**STYLE, every_n_epochs=1)
    trainer = _trainer(tmp_path, [ice], epochs=1, limit_val_batches=0)
    trainer.fit(module, datamodule=_data(False, batch_size=8))
    opt = trainer.optimizers[0]
    edited = {id(m.weight) for m in ice.edited_modules().values()}
    states = {id(p): st for p, st in opt.state.items()}
    # Adam's moments and step of the edited weights are those of a fresh state (zero), kept as entries
    assert edited and all(id_ in states for id_ in edited)
    assert all(float(v.abs().sum()) == 0 for i in edited for v in states[i].values())
    # the rest of the UNet keeps its moments
    assert any(float(st["exp_avg"].abs().sum()) > 0 for i, st in states.items() if i not in edited)


class UserModule(LightningModule):
    """A user's own module: a diffusers UNet, a tokenizer and a text encoder, no ice_lightning class."""

    def __init__(self):
        super().__init__()
        pipe = build_tiny_pipeline("sd-minilm")
        self.unet, self.text_encoder, self.tokenizer = pipe.unet, pipe.text_encoder, pipe.tokenizer
        self.text_encoder.requires_grad_(False)

    def training_step(self, batch, batch_idx):
        ids = self.tokenizer(
            batch["captions"], padding="max_length", max_length=16, truncation=True, return_tensors="pt"
        ).input_ids
        with torch.no_grad():
            states = self.text_encoder(ids)[0]
        x = torch.randn(len(ids), 4, 8, 8)
        return torch.nn.functional.mse_loss(self.unet(x, 10, encoder_hidden_states=states).sample, x)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.unet.parameters(), lr=1e-3)


def test_callback_in_a_users_own_module(tmp_path):
    seed_everything(0)
    module = UserModule()
    ice = ICECallback(**STYLE, every_n_epochs=1)
    dm = _data(False)
    _trainer(tmp_path, [ice], epochs=2, limit_val_batches=0).fit(module, datamodule=dm)
    assert [a["reason"] for a in ice.applications] == ["setup", "epoch_end", "epoch_end", "fit_end"]
    assert all(a["metrics"]["erasure"] > 0.75 for a in ice.applications)
    assert all(n.startswith("unet.") for n in ice.state.layer_spaces)


def test_resume_never_repeats_or_loses_an_application(tmp_path):
    def run(root, epochs, ckpt=None):
        seed_everything(0)
        module = ICEModule("tiny:sd", learning_rate=1e-3, cfg_dropout=0.0, validation_concepts=STYLE)
        ice = ICECallback(**STYLE, every_n_epochs=1)
        ckpts = ModelCheckpoint(dirpath=root / "ckpt", every_n_epochs=1, save_top_k=-1)
        trainer = _trainer(root, [ice, ckpts], epochs=epochs, enable_checkpointing=True, limit_val_batches=0)
        seen = {}

        class Probe(Callback):
            def on_fit_start(self, trainer, pl_module):  # after restore and after ICECallback.on_fit_start
                seen.update({n: m.weight.detach().clone() for n, m in ice.edited_modules().items()})

        trainer.callbacks.append(Probe())
        trainer.fit(module, datamodule=_data(False, batch_size=8), ckpt_path=ckpt)
        return ice, module, seen

    full, full_module, _ = run(tmp_path / "a", 4)
    ckpt = sorted((tmp_path / "a" / "ckpt").glob("epoch=1-*.ckpt"))[0]
    resumed, resumed_module, at_start = run(tmp_path / "b", 4, ckpt=str(ckpt))
    # counting: the resumed run carries the first run's history and adds exactly the missing applications
    assert [(a["reason"], a["epoch"]) for a in resumed.applications] == [
        (a["reason"], a["epoch"]) for a in full.applications
    ]
    # weights: nothing was re-applied on resume (the checkpoint's weights, bit for bit)...
    state = torch.load(ckpt, weights_only=False)["state_dict"]
    for name, w in at_start.items():
        assert torch.equal(w, state[name + ".weight"]), name
    # ...and the resumed run ends where the uninterrupted one does
    for (n, a), b in zip(
        full.edited_modules().items(), resumed.edited_modules().values(), strict=True
    ):
        assert torch.allclose(a.weight, b.weight, atol=1e-6), n
    assert [a["weights_sha256"] for a in resumed.applications] == [a["weights_sha256"] for a in full.applications]


def test_resume_catches_up_an_application_the_checkpoint_missed(tmp_path):
    module = ICEModule("tiny:sd", validation_concepts=None)
    ice = ICECallback(**STYLE, every_n_epochs=1)
    trainer = _trainer(tmp_path, [ice], epochs=1, limit_val_batches=0)
    trainer.fit(module, datamodule=_data(False, batch_size=8))
    state = ice.state_dict()
    state["last_epoch_applied"] = -1  # as if saved before the epoch-0 application
    again = ICECallback(**STYLE, every_n_epochs=1)
    again.load_state_dict(state)
    fake = types.SimpleNamespace(current_epoch=1, global_step=2, loggers=[], optimizers=[], world_size=1)
    again.on_fit_start(fake, module)
    assert again.applications[-1]["reason"] == "resume catch-up (epoch 0)"


def test_clear_errors_before_training(tmp_path):
    ice = ICECallback(**STYLE)
    from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy

    for cls in (FSDPStrategy, DeepSpeedStrategy):
        strategy = cls.__new__(cls)  # the class is what is checked; these need CUDA to be constructed for real
        with pytest.raises(RuntimeError, match=f"does not support {cls.__name__}: .* Shard with ModelParallelStrategy"):
            ice.setup(types.SimpleNamespace(strategy=strategy, callbacks=[]), None, "fit")

    class NoPipeline(LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(2, 2)

    with pytest.raises(AttributeError, match="cannot find a diffusers pipeline.*override get_pipeline"):
        ice.on_fit_start(types.SimpleNamespace(current_epoch=0), NoPipeline())

    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    bad = ICECallback(**STYLE, export=str(blocker / "erased"))
    trainer = _trainer(tmp_path, [bad], epochs=1)
    with pytest.raises(PermissionError, match="export folder .* cannot be created"):
        trainer.fit(ICEModule("tiny:sd"), datamodule=_data(False))
    assert trainer.global_step == 0  # refused before the first step

    with pytest.raises(ValueError, match="every_n_epochs"):
        ICECallback(**STYLE, every_n_epochs=0)
    with pytest.raises(ValueError, match="nothing to erase"):
        ICECallback(erase=[])


def test_final_erasure_sees_the_averaged_weights_whatever_the_callback_order(tmp_path):
    # Weight averaging copies its average into the model in on_train_end, and every on_fit_end runs after every
    # on_train_end, so the final application edits the averaged weights in either order: no reordering needed.
    from lightning.pytorch.callbacks import EMAWeightAveraging

    finals = []
    for order in ("ice_first", "ema_first"):
        seed_everything(0)
        ice, ema = ICECallback(**STYLE, at_fit_end=True), EMAWeightAveraging(decay=0.5)
        callbacks = [ice, ema] if order == "ice_first" else [ema, ice]
        module = ICEModule("tiny:sd", learning_rate=1e-2)
        _trainer(tmp_path / order, callbacks, epochs=1, limit_val_batches=0).fit(module, datamodule=_data(False))
        assert [a["reason"] for a in ice.applications] == ["setup", "fit_end"]
        finals.append({n: m.weight.detach().clone() for n, m in ice.edited_modules().items()})
    assert finals[0].keys() == finals[1].keys()
    assert all(torch.equal(finals[0][n], finals[1][n]) for n in finals[0])


def test_manifest_records_the_callback(tmp_path):
    module = ICEModule("tiny:sd")
    ice = ICECallback(**STYLE, every_n_epochs=1, export=str(tmp_path / "out"))
    _trainer(tmp_path, [ice], epochs=1, limit_val_batches=0).fit(module, datamodule=_data(False, batch_size=8))
    manifest = (tmp_path / "out" / MANIFEST_NAME).read_text()
    assert '"reason": "fit_end"' in manifest and '"weights_sha256"' in manifest


def test_reapply_at_validation_start(tmp_path):
    module = ICEModule("tiny:sd", validation_concepts=STYLE)
    ice = ICECallback(**STYLE, every_n_epochs=1, reapply_at="validation_start", at_fit_end=False)
    seen = []

    class Val(Callback):
        def on_validation_epoch_end(self, trainer, pl_module):
            seen.append(ice.applications[-1]["reason"])

    _trainer(tmp_path, [ice, Val()], epochs=2, val_check_interval=0.5).fit(module, datamodule=_data(False, 2))
    assert [a["reason"] for a in ice.applications] == ["setup", "validation_start", "validation_start"]
    assert seen[-1] == "validation_start"  # that epoch's validation saw the re-erased model


@pytest.mark.parametrize("objective", ["epsilon", "v_prediction", "sample", "flow_matching"])
def test_training_objectives(objective):
    from diffusers import DDPMScheduler

    module = ICEModule("tiny:sd", cfg_dropout=0.5)
    if objective == "flow_matching":
        module.objective = "flow_matching"
    else:
        module.noise_scheduler = DDPMScheduler(prediction_type=objective)
        module.objective = objective
    data = _data(False)
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    g = torch.Generator().manual_seed(0)
    loss = module.diffusion_loss(batch, generator=g)
    loss.backward()
    assert torch.isfinite(loss) and module.unet.conv_in.weight.grad.abs().sum() > 0
    again = module.diffusion_loss(batch, generator=torch.Generator().manual_seed(0))
    assert torch.equal(loss.detach(), again.detach())  # seeded noise: reproducible


@pytest.mark.parametrize("bias", ["later", "earlier"])
def test_timestep_bias_draws_the_biased_portion_as_often_as_asked(bias):
    module = ICEModule("tiny:sd", timestep_bias=bias, timestep_bias_portion=0.1, timestep_bias_multiplier=9.0)
    w = module.timestep_weights(1000)
    hot = slice(900, 1000) if bias == "later" else slice(0, 100)
    assert w.sum().item() == pytest.approx(1.0) and w[hot].sum().item() == pytest.approx(0.5)  # 100*9 / (900+900)
    t = module.draw_timesteps(20_000, 1000, torch.Generator().manual_seed(0))
    in_hot = ((t >= 900) if bias == "later" else (t < 100)).float().mean().item()
    assert abs(in_hot - 0.5) < 0.02 and t.min() >= 0 and t.max() < 1000
    # the loss draws its timesteps this way: with (almost) all the weight on the last step, the UNet sees t=999
    module = ICEModule("tiny:sd", timestep_bias="later", timestep_bias_portion=0.001, timestep_bias_multiplier=1e12)
    seen = []
    module.unet.register_forward_pre_hook(lambda m, args: seen.append(args[1].clone()))
    data = _data(False)
    data.setup("fit")
    module.diffusion_loss(next(iter(data.train_dataloader())), generator=torch.Generator().manual_seed(0))
    assert torch.equal(seen[0], torch.full_like(seen[0], 999))
    assert torch.equal(ICEModule("tiny:sd").timestep_weights(10), torch.full((10,), 0.1))  # "none": uniform


def test_timestep_bias_rejects_bad_settings():
    with pytest.raises(ValueError, match="timestep_bias must be 'none', 'later' or 'earlier'"):
        ICEModule("tiny:sd", timestep_bias="late")
    with pytest.raises(ValueError, match="timestep_bias_portion must be in"):
        ICEModule("tiny:sd", timestep_bias="later", timestep_bias_portion=0.0)


def test_sdxl_trains_one_step(tmp_path):
    module = ICEModule("tiny:sdxl")
    _trainer(tmp_path, [ICECallback(**STYLE)], epochs=1, fast_dev_run=1).fit(module, datamodule=_data(False, 2))
    assert module.unet.config.addition_embed_type == "text_time"


def test_module_refuses_bad_training_settings_by_name():
    with pytest.raises(ValueError, match="weighting_scheme must be 'none', 'logit_normal'"):
        ICEModule("tiny:flux", weighting_scheme="logit")
    with pytest.raises(ValueError, match="lora_rank must be a whole number >= 1"):
        ICEModule("tiny:sd", lora_rank=0)
    with pytest.raises(ValueError, match=r"lora_target_modules=\['to_nothing'\] match no layer of the unet"):
        ICEModule("tiny:sd", lora_rank=2, lora_target_modules=["to_nothing"])


@pytest.mark.parametrize("kind", ["sd", "text2video"])
def test_validation_logs_generated_samples(kind, tmp_path):
    module = ICEModule(f"tiny:{kind}", validation_concepts=STYLE, num_samples=1, sample_steps=2)
    trainer = _trainer(tmp_path, [], epochs=1, limit_train_batches=1, limit_val_batches=1)
    trainer.fit(module, datamodule=_data(kind == "text2video", 2))
    grids = list((tmp_path / "samples").glob("epoch*.png"))
    assert len(grids) == 1
    from PIL import Image

    w, h = Image.open(grids[0]).size
    side = module.unet.config.sample_size * module.pipeline.vae_scale_factor  # the pipeline's default size
    assert h == len(ConceptSpec(**STYLE).heldout_erase_prompts()) * side  # one row per erase prompt
    frames = 16 if kind == "text2video" else 1  # TextToVideoSD's default num_frames, laid side by side
    assert w == side * frames


def test_drop_concept_samples_matches_names_and_synonyms_as_whole_words():
    ice = SampleFilterCallback(drop_concepts=ConceptSpec(erase=["red"], synonyms={"red": ["crimson", "round dot"]}))
    keep = ice.sample_filters[0]
    assert keep.names_concept("a Red circle") and keep.names_concept("one crimson box")
    assert keep.names_concept("a green round dot") and keep.names_concept("red")
    assert not keep.names_concept("a tired green circle") and not keep.names_concept("a reddish dot")
    batch = {
        "captions": ["a red circle", "a green circle", "a CRIMSON box", "a blue box"],
        "pixel_values": torch.arange(4.0).view(4, 1),
        "colour": ("red", "green", "red", "blue"),
        "scale": torch.tensor(2.0),  # not per-sample: left alone
        "meta": ["x", "y"],  # another length: left alone
    }
    assert keep(batch) == [False, True, False, True]
    assert drop_rows(batch, keep(batch)) == 2
    assert batch["captions"] == ["a green circle", "a blue box"]
    assert batch["pixel_values"].flatten().tolist() == [1.0, 3.0]
    assert batch["colour"] == ("green", "blue") and batch["meta"] == ["x", "y"] and float(batch["scale"]) == 2.0
    assert drop_rows(batch, keep(batch)) == 0
    with pytest.raises(TypeError, match="caption_key"):
        keep({"text": ["a red circle"]})
    with pytest.raises(TypeError, match="dict batches"):
        keep([torch.zeros(1)])


class CaptionRecorder(Callback):
    """Records, after ICECallback's hook has run, the captions each training step receives."""

    def __init__(self):
        self.seen = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.seen.append(list(batch["captions"]))


def test_fine_tune_never_sees_the_concepts_samples(tmp_path):
    """The tiny data set names Van Gogh in half its captions; with the guard no training step sees one, a
    batch left empty skips its step, and the count lands in the state dict and the manifest's summary."""
    seed_everything(0)
    module = ICEModule("tiny:sd-minilm", cfg_dropout=0.0)
    ice = ICECallback(**STYLE, every_n_epochs=1, log=False, export=str(tmp_path / "export"))
    guard = SampleFilterCallback(drop_concepts=ice.spec)
    given, recorder = CaptionRecorder(), CaptionRecorder()
    data = CaptionFolderDataModule(str(DATA / "tiny_images"), resolution=16, batch_size=2, shuffle=False)
    trainer = _trainer(tmp_path, [given, guard, ice, recorder], epochs=1, limit_val_batches=0)
    trainer.fit(module, datamodule=data)
    captions = [c for batch in given.seen for c in batch]  # what the loader gave, before the guard
    named = sum("Van Gogh" in c for c in captions)
    assert 0 < named < len(captions)
    seen = [c for batch in recorder.seen for c in batch]
    assert sorted(seen) == sorted(c for c in captions if "Van Gogh" not in c)
    assert guard.dropped_samples == named and guard.state_dict()["dropped_samples"] == named
    assert [] in recorder.seen  # a pair of Van Gogh captions left an empty batch, whose step was skipped
    assert guard.summary()["dropped_samples"] == named and guard.summary()["dropped_by_filter"] == {"caption": named}
    shipped = load_manifest(tmp_path / "export")["sample_filtering"]
    assert shipped["dropped_by_filter"] == {"caption": named} and shipped["sample_filters"] == ["caption"]


def test_two_callbacks_with_own_concepts_and_schedules_fit_checkpoint_resume_and_export(tmp_path):
    objects = ConceptSpec(erase=["dog"], family="object")

    def run(root, epochs, ckpt=None, lr=1e-3):
        seed_everything(0)
        module = ICEModule("tiny:sd", learning_rate=lr, cfg_dropout=0.0)
        style = ICECallback(**STYLE, every_n_epochs=1)
        obj = ICECallback(spec=objects, every_n_epochs=2, export=str(root / "out"))  # the last one exports
        ckpts = ModelCheckpoint(dirpath=root / "ckpt", every_n_epochs=1, save_top_k=-1)
        trainer = _trainer(root, [style, obj, ckpts], epochs=epochs, enable_checkpointing=True, limit_val_batches=0)
        trainer.fit(module, datamodule=_data(False, batch_size=8), ckpt_path=ckpt)
        return style, obj

    full_style, full_obj = run(tmp_path / "a", 4)
    assert full_style.state_key != full_obj.state_key
    assert [(a["reason"], a["epoch"]) for a in full_style.applications] == [
        ("setup", 0), ("epoch_end", 0), ("epoch_end", 1), ("epoch_end", 2), ("epoch_end", 3), ("fit_end", 4)]
    assert [(a["reason"], a["epoch"]) for a in full_obj.applications] == [
        ("setup", 0), ("epoch_end", 1), ("epoch_end", 3), ("fit_end", 4)]  # fmt: skip

    ckpt = sorted((tmp_path / "a" / "ckpt").glob("epoch=2-*.ckpt"))[0]
    saved = torch.load(ckpt, weights_only=False)["callbacks"]
    assert {full_style.state_key, full_obj.state_key} <= set(saved)
    style, obj = run(tmp_path / "b", 4, ckpt=str(ckpt))
    for resumed, full in ((style, full_style), (obj, full_obj)):  # each history continues its own schedule
        assert [(a["reason"], a["epoch"]) for a in resumed.applications] == [
            (a["reason"], a["epoch"]) for a in full.applications]  # fmt: skip
        assert [a["weights_sha256"] for a in resumed.applications] == [
            a["weights_sha256"] for a in full.applications]  # fmt: skip

    manifest = load_manifest(tmp_path / "b" / "out")
    assert manifest["erased_concepts"] == ["Van Gogh", "dog"]
    assert set(manifest["ice_callbacks"]) == {style.state_key, obj.state_key}
    assert len(manifest["ice_callbacks"][style.state_key]["applications"]) == 6
    assert all(v for v in verify_export(tmp_path / "b" / "out").values())

    # Both concepts are erased in the export: with no training between applications, two callbacks ship
    # exactly the two one-shot erasures in a row (neither callback's re-application re-edits the other's edit).
    run(tmp_path / "c", 2, lr=0.0)
    shipped = DiffusionPipeline.from_pretrained(tmp_path / "c" / "out")
    expected = build_tiny_pipeline("sd")
    ice_lightning.erase(expected, **STYLE)
    ice_lightning.erase(expected, spec=objects)
    layers = [n for n, _ in expected.unet.named_modules() if n.endswith(("attn2.to_k", "attn2.to_v"))]
    assert layers
    for n in layers:
        a, b = shipped.unet.get_submodule(n).weight, expected.unet.get_submodule(n).weight
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_resume_with_other_concepts_is_refused_before_training_and_nothing_is_edited_before_the_restore(
    tmp_path, monkeypatch
):
    def run(root, spec_kw, ckpt=None, epochs=2):
        seed_everything(0)
        module = ICEModule("tiny:sd", learning_rate=1e-3, cfg_dropout=0.0)
        ice = ICECallback(**spec_kw, every_n_epochs=1)
        ckpts = ModelCheckpoint(dirpath=root / "ckpt", every_n_epochs=1, save_top_k=-1)
        trainer = _trainer(root, [ice, ckpts], epochs=epochs, enable_checkpointing=True, limit_val_batches=0)
        trainer.fit(module, datamodule=_data(False, batch_size=8), ckpt_path=ckpt)
        return ice, trainer

    run(tmp_path / "a", STYLE)
    ckpt = str(sorted((tmp_path / "a" / "ckpt").glob("epoch=0-*.ckpt"))[0])
    applied = []
    real_apply = ice_lightning.core.plan.ErasurePlan.apply

    def counting_apply(self, *args, **kwargs):
        applied.append(kwargs.get("bases") is not None)  # True: a re-application
        return real_apply(self, *args, **kwargs)

    monkeypatch.setattr(ice_lightning.core.plan.ErasurePlan, "apply", counting_apply)
    ice, trainer = run(tmp_path / "b", STYLE, ckpt=ckpt)
    assert applied == [True, True]  # epoch 1 and fit end re-apply; nothing is applied before or at the restore
    assert [a["reason"] for a in ice.applications] == ["setup", "epoch_end", "epoch_end", "fit_end"]

    for other in ({"erase": ["Claude Monet"], "family": "style"}, {**STYLE, "preserve": ["Rembrandt"]}):
        applied.clear()
        with pytest.raises(ValueError, match="resume with the same|Resume with the same settings"):
            run(tmp_path / "c", other, ckpt=ckpt)
        assert applied == []  # refused before any edit or training step


def test_export_needs_the_protocol_and_a_whole_number_schedule(tmp_path):
    class HoldsPipe(LightningModule):
        def __init__(self):
            super().__init__()
            self.pipe = build_tiny_pipeline("sd")  # not `pipeline`: the protocol cannot find it

    ice = ICECallback(**STYLE, export=str(tmp_path / "out"))
    with pytest.raises(AttributeError, match="expose it as `self.pipeline`.*override get_pipeline"):
        ice.setup(types.SimpleNamespace(strategy=None, callbacks=[]), HoldsPipe(), "fit")
    assert not (tmp_path / "out").exists()
    user = tmp_path / "user-model"
    user.mkdir()
    (user / "model_index.json").write_text("{}")
    module = ICEModule("tiny:sd")
    with pytest.raises(FileExistsError, match="not an earlier ice-lightning export.*overwrite"):
        ICECallback(**STYLE, export=str(user)).setup(types.SimpleNamespace(strategy=None), module, "fit")
    assert [p.name for p in user.iterdir()] == ["model_index.json"] and (user / "model_index.json").read_text() == "{}"
    ICECallback(**STYLE, export=ExportOptions(str(user), overwrite=True)).setup(
        types.SimpleNamespace(strategy=None), module, "fit")  # asked for: accepted (replaced at the export)
    with pytest.raises(ValueError, match="every_n_epochs must be a whole number >= 1"):
        ICECallback(**STYLE, every_n_epochs=1.5)
    with pytest.raises(ValueError, match=r"rank_tol .* must lie in \(0, 1\)"):
        ICECallback(**STYLE, hparams={"rank_tol": float("nan")})


def test_a_checkpoint_resumes_its_own_state_and_refuses_foreign_ones():
    ice = ICECallback(**STYLE)
    ckpt = {"callbacks": {ice.state_key: ICECallback(**STYLE).state_dict()}}
    ice.on_load_checkpoint(types.SimpleNamespace(callbacks=[ice]), None, ckpt)
    ice.load_state_dict(ckpt["callbacks"][ice.state_key])
    other = ICECallback(erase=["dog"], family="object")
    with pytest.raises(ValueError, match=r"checkpoint holds the erasure of \[\"ICECallback\{'erase': \['Van Gogh'\]"):
        other.on_load_checkpoint(types.SimpleNamespace(callbacks=[other]), None, ckpt)
    # the bare key of an unreleased earlier layout is not migrated: it is an erasure no callback continues
    with pytest.raises(ValueError, match=r"checkpoint holds the erasure of \['ICECallback'\]"):
        ice.on_load_checkpoint(types.SimpleNamespace(callbacks=[ice]), None, {"callbacks": {"ICECallback": {}}})


@pytest.mark.slow
def test_each_application_logs_its_own_collateral_and_the_drift_apart_once_per_step(tmp_path):
    """Collateral at an application is that edit's own effect (just after against just before it), so training
    drift does not read as erasure damage; the drift is logged apart; every row carries its epoch; the fit-end
    application right after the last epoch-end one (an exact no-op) is recorded but not logged again."""
    from lightning.pytorch.loggers import CSVLogger

    seed_everything(0)
    module = ICEModule("tiny:sd-minilm", learning_rate=3e-3, cfg_dropout=0.0)
    ice = ICECallback(**STYLE, every_n_epochs=1)
    logger = CSVLogger(tmp_path, name="csv")
    _trainer(tmp_path, [ice], epochs=2, limit_val_batches=0, logger=logger).fit(module, datamodule=_data(False))
    apps = ice.applications
    assert [a["reason"] for a in apps] == ["setup", "epoch_end", "epoch_end", "fit_end"]
    setup, first, last, end = (a["metrics"] for a in apps)
    assert setup["drift_near"] == 0.0 and setup["collateral_near"] > 0
    assert first["drift_near"] > 0.05  # training moved the layers (3e-3)...
    assert first["collateral_near"] < first["drift_near"] / 2  # ...but the re-application itself moves little
    assert end["collateral_near"] == pytest.approx(0.0, abs=1e-9)
    assert end["collateral_far"] == pytest.approx(0.0, abs=1e-9)
    with open(Path(logger.log_dir) / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("ice/erasure")]
    assert len(rows) == 3  # setup and two epoch ends; fit end is the same step as the last epoch end
    assert len({r["step"] for r in rows}) == 3 and all(r["epoch"] != "" for r in rows)
    assert {k for k in rows[0] if k.startswith("ice/")} >= {"ice/collateral_near", "ice/drift_near", "ice/drift_far"}
