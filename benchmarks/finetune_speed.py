"""Fine-tuning throughput: ``ICEModule`` under a Lightning ``Trainer`` against the training loop of diffusers'
``train_text_to_image.py`` (its step written out as the script has it: VAE latents sampled and scaled, uniform
timesteps, ``add_noise``, the text encoder's last hidden state, epsilon MSE, AdamW with the script's defaults), on
the same pipeline, data, batch and precision (float32, CPU); and what one ``ICECallback`` application costs there.

Cases:
- ``small``: a small UNet (3 levels, 64-128 channels, 256-d text) at 256 px, batch 2;
- ``sd15``: the SD 1.5 UNet (860M) with a CLIP-L-size text encoder (123M) at 512 px, batch 1.
Both use a narrow VAE with SD's 8x downsampling (the same in both loops; a full VAE only adds the same seconds to
both), random weights from the configs, and random images with captions.

Each loop runs in its own process (its peak resident memory is its own): ``--steps`` timed steps after one warm-up
step; a step is timed from the batch in hand to the optimizer step done (data loading excluded in both). In the
``ICEModule`` run an ``ICECallback`` (Van Gogh, style) applies at setup (solve + edit) and at the end of every
epoch (re-application, what each epoch costs); its time is measured around each application, and its extra
memory is what it holds: the weights after the last application, the undo records and the operators.

    python benchmarks/finetune_speed.py [--tiny] [--cases small sd15] [--steps 4] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import RESULTS, table, write_report  # noqa: E402

SMALL_UNET = {"block_out_channels": [64, 128, 128], "down_block_types": ["CrossAttnDownBlock2D"] * 2 + ["DownBlock2D"],
              "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 2, "cross_attention_dim": 256,
              "attention_head_dim": 8, "layers_per_block": 1, "sample_size": 32}  # fmt: skip
SMALL_TEXT = {"hidden_size": 256, "intermediate_size": 1024, "num_hidden_layers": 2, "num_attention_heads": 4}
CASES = {"small": (SMALL_UNET, SMALL_TEXT, 256, 2), "sd15": (None, None, 512, 1), "sdxl_lora": (None, None, 512, 1)}
#: The SDXL case is a LoRA fine-tune (rank 4, train_text_to_image_lora_sdxl.py's default, gradient checkpointing)
#: measured for the callback's cost only: no diffusers loop beside it.
LORA = {"lora_rank": 4, "gradient_checkpointing": True}


def _vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(block_out_channels=[8, 8, 8, 8], down_block_types=["DownEncoderBlock2D"] * 4,
                         up_block_types=["UpDecoderBlock2D"] * 4, latent_channels=4, norm_num_groups=4,
                         layers_per_block=1)  # fmt: skip


def _sdxl_pipeline(tiny: bool):
    """SDXL's UNet (2.6B) and its two text encoders (CLIP-L, OpenCLIP bigG) at real size, random weights."""
    import speed
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    tok = speed._tokenizer()
    enc_l = speed._clip_encoder(tok, speed.CLIP_L, tiny=tiny)
    enc_g = speed._clip_encoder(tok, speed.CLIP_BIGG, projection=True, tiny=tiny)
    torch.manual_seed(0)
    cfg = speed._tiny_unet(speed.SDXL_UNET) if tiny else dict(speed.SDXL_UNET)
    cfg["cross_attention_dim"] = enc_l.config.hidden_size + enc_g.config.hidden_size
    cfg["projection_class_embeddings_input_dim"] = enc_g.config.projection_dim + 6 * cfg["addition_time_embed_dim"]
    return StableDiffusionXLPipeline(vae=_vae(), text_encoder=enc_l, text_encoder_2=enc_g, tokenizer=tok,
                                     tokenizer_2=tok, unet=UNet2DConditionModel(**cfg),
                                     scheduler=EulerDiscreteScheduler())  # fmt: skip


def _pipeline(case: str, tiny: bool):
    import speed
    from diffusers import DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    if case == "sdxl_lora":
        return _sdxl_pipeline(tiny)

    unet_cfg, text_cfg, _, _ = CASES[case]
    tok = speed._tokenizer()
    text_encoder = speed._clip_encoder(tok, text_cfg or speed.CLIP_L, tiny=tiny)
    torch.manual_seed(0)
    unet_cfg = speed._tiny_unet(unet_cfg or speed.SD15_UNET) if tiny else (unet_cfg or speed.SD15_UNET)
    unet_cfg = {k: v for k, v in unet_cfg.items() if k not in ("transformer_layers_per_block",
                "projection_class_embeddings_input_dim", "addition_time_embed_dim")}  # fmt: skip
    unet_cfg["cross_attention_dim"] = text_encoder.config.hidden_size
    return StableDiffusionPipeline(vae=_vae(), text_encoder=text_encoder, tokenizer=tok,
                                   unet=UNet2DConditionModel(**unet_cfg), scheduler=DDPMScheduler(),
                                   safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)  # fmt: skip


def _data(folder: Path, resolution: int, n: int = 8) -> Path:
    from PIL import Image


    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    words = ["a house", "a tree by a river", "a red car", "a city street", "a cat on a sofa", "mountains at dawn",
             "a bowl of fruit", "a portrait of a woman"]  # fmt: skip
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (resolution, resolution, 3), dtype=np.uint8)).save(folder / f"{i:03d}.png")
        (folder / f"{i:03d}.txt").write_text(words[i % len(words)])
    return folder


def _peak_mib() -> float:
    """This process's peak resident memory (``VmHWM``), MiB; NaN where ``/proc`` does not say."""
    import speed

    kib = speed.rss_kib("VmHWM")
    return kib / 1024 if kib >= 0 else float("nan")


def run_diffusers(pipe_dir: str, data_dir: str, resolution: int, batch: int, steps: int) -> dict:
    """The training step of ``train_text_to_image.py`` (no EMA, no SNR weighting, fp32), timed per step."""
    import torch.nn.functional as F
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, PreTrainedTokenizerFast

    from ice_lightning.lightning.data import CaptionedImageFolder, collate

    noise_scheduler = DDPMScheduler.from_pretrained(pipe_dir, subfolder="scheduler")
    tokenizer = PreTrainedTokenizerFast.from_pretrained(pipe_dir, subfolder="tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(pipe_dir, subfolder="text_encoder")
    vae = AutoencoderKL.from_pretrained(pipe_dir, subfolder="vae")
    unet = UNet2DConditionModel.from_pretrained(pipe_dir, subfolder="unet")
    vae.requires_grad_(False)
    text_encoder.requires_grad_(False)
    unet.train()
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-4, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
    loader = torch.utils.data.DataLoader(CaptionedImageFolder(data_dir, resolution), batch_size=batch, shuffle=True,
                                         collate_fn=collate)  # fmt: skip
    times: list[float] = []
    while len(times) < steps + 1:
        for b in loader:
            t0 = time.perf_counter()
            input_ids = tokenizer(b["captions"], max_length=tokenizer.model_max_length, padding="max_length",
                                  truncation=True, return_tensors="pt").input_ids  # fmt: skip
            latents = vae.encode(b["pixel_values"]).latent_dist.sample() * vae.config.scaling_factor
            noise = torch.randn_like(latents)
            timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],)).long()
            noisy = noise_scheduler.add_noise(latents, noise, timesteps)
            encoder_hidden_states = text_encoder(input_ids, return_dict=False)[0]
            model_pred = unet(noisy, timesteps, encoder_hidden_states, return_dict=False)[0]
            loss = F.mse_loss(model_pred.float(), noise.float(), reduction="mean")
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            times.append(time.perf_counter() - t0)
            if len(times) == steps + 1:
                break
    return {"step_s": statistics.median(times[1:]), "peak_mib": _peak_mib()}


def run_ice(pipe_dir: str, data_dir: str, resolution: int, batch: int, steps: int, lora: bool = False) -> dict:
    """``ICEModule`` with ``ICECallback`` under a ``Trainer``; per-step times from batch start to batch end."""
    from lightning.pytorch import Callback, Trainer

    from ice_lightning import ICECallback, ICEModule
    from ice_lightning.lightning.data import CaptionFolderDataModule

    class Timer(Callback):
        def __init__(self):
            self.steps, self.applications, self.held_mib = [], [], None

        def on_train_batch_start(self, *_):
            self.t0 = time.perf_counter()

        def on_train_batch_end(self, *_):
            self.steps.append(time.perf_counter() - self.t0)

    timer = Timer()
    ice = ICECallback(erase=["Van Gogh"], family="style", every_n_epochs=1, at_fit_end=False, log=False)
    apply = ice.apply

    def timed_apply(trainer, pl_module, reason, epoch=None):
        t = time.perf_counter()
        apply(trainer, pl_module, reason, epoch=epoch)
        timer.applications.append({"reason": reason, "s": time.perf_counter() - t})
        timer.held_mib = _held_mib(ice)

    ice.apply = timed_apply
    per_epoch = 2
    module = ICEModule(pipe_dir, learning_rate=1e-4, cfg_dropout=0.0, text_cache_size=0, seed=None,
                       **(LORA if lora else {}))  # fmt: skip
    trainer = Trainer(max_steps=steps + 1, limit_train_batches=per_epoch, limit_val_batches=0, logger=False,
                      callbacks=[timer, ice], enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, accelerator="cpu", num_sanity_val_steps=0)  # fmt: skip
    data = CaptionFolderDataModule(data_dir, resolution=resolution, batch_size=batch, val_fraction=0.0)
    trainer.fit(module, datamodule=data)
    return {"step_s": statistics.median(timer.steps[1:]), "peak_mib": _peak_mib(),
            "applications": timer.applications, "callback_held_mib": timer.held_mib}  # fmt: skip


def _held_mib(ice) -> float:
    """What the callback holds beside the model: the weights after the last application (one copy per edited
    layer), the undo records of its erasures and its operators."""
    from ice_lightning.core.parts import history_of
    from ice_lightning.lightning.callback_state import _AFTER_LAST_APPLICATION

    seen: set[int] = set()
    total = 0

    def add(t):
        nonlocal total
        if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in seen:
            seen.add(t.untyped_storage().data_ptr())
            total += t.untyped_storage().nbytes()

    for m in ice._plan.modules().values():
        add(_AFTER_LAST_APPLICATION.get(m))
    for r in history_of(ice._plan._history_key):
        for e in r.edits:
            for v in vars(e).values():
                add(v)
    for op in (ice.state.operators or {}).values():
        add(op.U), add(op.M), add(op.V)
    return total / 2**20


def worker(args) -> None:
    if args.worker == "build":  # the SDXL pipeline is built and saved in a process of its own (its memory too)
        _pipeline(args.case, args.tiny).save_pretrained(args.pipe_dir)
        print("RESULT {}")
        return
    if args.worker == "diffusers":
        result = run_diffusers(args.pipe_dir, args.data_dir, args.resolution, args.batch, args.steps)
    else:
        lora = args.case == "sdxl_lora"
        result = run_ice(args.pipe_dir, args.data_dir, args.resolution, args.batch, args.steps, lora)
    print("RESULT " + json.dumps(result))


def _child(*argv: str) -> dict:
    done = subprocess.run([sys.executable, __file__, *argv], capture_output=True, text=True, check=False)
    line = next((x for x in done.stdout.splitlines() if x.startswith("RESULT ")), None)
    if line is None:
        raise RuntimeError(f"{argv[:2]} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return json.loads(line.removeprefix("RESULT "))


def measure(case: str, tiny: bool, steps: int) -> dict:
    _, _, resolution, batch = CASES[case]
    resolution = 64 if tiny else resolution
    lora = case == "sdxl_lora"
    with tempfile.TemporaryDirectory() as tmp:
        pipe_dir, data_dir = Path(tmp) / "pipe", _data(Path(tmp) / "data", resolution)
        common = ["--pipe-dir", str(pipe_dir), "--data-dir", str(data_dir), "--resolution", str(resolution),
                  "--batch", str(batch), "--steps", str(steps), "--case", case, *(["--tiny"] if tiny else [])]
        if lora and not tiny:
            _child("--worker", "build", *common)
        else:
            _pipeline(case, tiny).save_pretrained(pipe_dir)
        out = {"case": case, "resolution": resolution, "batch": batch, "steps": steps}
        for loop in ("ice",) if lora else ("diffusers", "ice"):
            if tiny:  # CI's smoke run: in this process (its peak memory is then the whole run's, not the loop's)
                out[loop] = (run_ice(str(pipe_dir), str(data_dir), resolution, batch, steps, lora) if loop == "ice"
                             else run_diffusers(str(pipe_dir), str(data_dir), resolution, batch, steps))  # fmt: skip
            else:
                out[loop] = _child("--worker", loop, *common)
    i = out["ice"]
    d = out.setdefault("diffusers", {"step_s": float("nan"), "peak_mib": float("nan")})  # sdxl_lora: none
    reapply = [a["s"] for a in i["applications"] if a["reason"] != "setup"]
    out.update(steps_per_s_ratio=d["step_s"] / i["step_s"], peak_ratio=i["peak_mib"] / d["peak_mib"],
               first_application_s=next(a["s"] for a in i["applications"] if a["reason"] == "setup"),
               reapplication_s=statistics.median(reapply) if reapply else float("nan"))  # fmt: skip
    out["reapplication_over_step"] = out["reapplication_s"] / i["step_s"]
    out["held_over_peak"] = i["callback_held_mib"] / i["peak_mib"]
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true", help="toy widths at 64 px, both loops in this process (CI)")
    p.add_argument("--cases", nargs="+", default=["small", "sd15"], choices=list(CASES),
                   help="sdxl_lora: the callback's cost in an SDXL-size LoRA fine-tune (needs about 20 GB)")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--worker", choices=["build", "diffusers", "ice"], help=argparse.SUPPRESS)
    p.add_argument("--case", help=argparse.SUPPRESS)
    for flag in ("--pipe-dir", "--data-dir"):
        p.add_argument(flag, help=argparse.SUPPRESS)
    p.add_argument("--resolution", type=int, help=argparse.SUPPRESS)
    p.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args)
        return {}
    name = "finetune_speed_tiny" if args.tiny else "finetune_speed"
    saved = Path(args.out) / f"{name}.json"
    kept = [r for r in json.loads(saved.read_text())["rows"] if r["case"] not in args.cases] if saved.exists() else []
    rows = kept + [measure(c, args.tiny, args.steps) for c in args.cases]  # the cases not rerun are kept
    rows.sort(key=lambda r: list(CASES).index(r["case"]))
    md = [f"# Fine-tuning speed: ICEModule vs diffusers' train_text_to_image.py loop ({time.strftime('%Y-%m-%d')})",
          "", *table(["case", "px", "batch", "diffusers step s", "ICEModule step s", "steps/s ratio (ICE / diffusers)",
                      "diffusers peak MiB", "ICEModule peak MiB", "peak ratio", "first application s",
                      "re-application s", "re-application / step", "callback holds MiB", "held / peak"],
                     [[r["case"], r["resolution"], r["batch"], r["diffusers"]["step_s"], r["ice"]["step_s"],
                       r["steps_per_s_ratio"], r["diffusers"]["peak_mib"], r["ice"]["peak_mib"], r["peak_ratio"],
                       r["first_application_s"], r["reapplication_s"], r["reapplication_over_step"],
                       r["ice"]["callback_held_mib"], r["held_over_peak"]] for r in rows])]  # fmt: skip
    write_report(Path(args.out), name, {"rows": rows}, md)
    return {"rows": rows}


if __name__ == "__main__":
    main()
