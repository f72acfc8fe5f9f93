"""Speed and memory of ICE at real model sizes (random weights from the published configs, no download).

Cases:
- ``sd15``: the SD 1.5 UNet (860M) with a CLIP-L-size text encoder (123M), a full diffusers pipeline, so
  the end-to-end ``ice_lightning.erase`` call (layer search with its forward-hook check, encoding, solve,
  edit) is timed as a user runs it; plus the zero-inference-overhead check (parameter count, hooks,
  forward time of the edited against the original UNet).
- ``sdxl``: SDXL's 140 ``attn2.to_k/to_v`` layers (2048-d input) built alone from the UNet's published
  config (the 2.6B UNet is instantiated on the meta device only to read their shapes) and its two text
  encoders at real size (CLIP-L + OpenCLIP bigG, penultimate states concatenated).
- ``wan``: Wan 2.1 1.3B's text layer ``condition_embedder.text_embedder.linear_1`` (4096 -> 1536) built
  alone; its UMT5-XXL encoder (5.7B) does not fit this benchmark, so the states are random 4096-d rows in
  the number a real encoding gives, and encoding is not timed.

For 1, 10 and 100 concepts: medians over ``--repeats`` runs of encode, solve, apply and total time, the
peak extra resident memory (VmHWM after resetting it, Linux), and the same for UCE's dense closed form
(``uce_dense_edit``, one d x d solve per layer, as published) in the same process.

    python benchmarks/speed.py [--tiny] [--cases sd15 sdxl wan] [--repeats 3] [--out benchmarks/results] [--update]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import ADVERSARY_BUDGET, FIXED, OUTPUT_METRIC, PLAIN, RESULTS, median_time, table, write_report  # noqa: E402

from ice_lightning.core.concepts import ConceptSpec  # noqa: E402
from ice_lightning.core.editing import apply_edits, edit_form, undo_edits  # noqa: E402
from ice_lightning.core.encoders import EmbeddingSpace, FeatureConcatSource, SequenceSource  # noqa: E402
from ice_lightning.core.export import erasure_lora  # noqa: E402
from ice_lightning.core.solver import build_operator, compress_states, uce_dense_edit  # noqa: E402
from ice_lightning.evaluation.devset import MANY_ARTISTS, dev_concepts  # noqa: E402

SD15_UNET = {
    "block_out_channels": [320, 640, 1280, 1280],
    "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
    "layers_per_block": 2,
    "sample_size": 64,
}
SDXL_UNET = {
    "block_out_channels": [320, 640, 1280],
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "transformer_layers_per_block": [1, 2, 10],
    "attention_head_dim": [5, 10, 20],
    "cross_attention_dim": 2048,
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,
    "sample_size": 128,
}
CLIP_L = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12}
CLIP_BIGG = {"hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32, "num_attention_heads": 20}
WAN_TEXT_LAYER = (4096, 1536)


def concept_names(n: int) -> list[str]:
    names = list(MANY_ARTISTS) + [c.name for c in dev_concepts()] + [x for c in dev_concepts() for x in c.nearby]
    names = list(dict.fromkeys(names))
    if n > len(names):
        raise ValueError(f"only {len(names)} concept names available")
    return names[:n]


def spec_for(n: int) -> ConceptSpec:
    return ConceptSpec(erase=concept_names(n), family="style")


def _tokenizer(max_length: int = 77):
    from ice_lightning.demos.tiny_parts import default_vocabulary, word_tokenizer

    extra = " ".join(concept_names(100))
    return word_tokenizer(default_vocabulary([extra]), style="clip", max_length=max_length)


def _clip_encoder(tok, size: dict, projection: bool = False, tiny: bool = False):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    if tiny:
        size = {"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2, "num_attention_heads": 4}
    cfg = CLIPTextConfig(
        vocab_size=len(tok),
        max_position_embeddings=77,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        projection_dim=size["hidden_size"],
        **size,
    )
    torch.manual_seed(0)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg).eval()


def _tiny_unet(cfg: dict) -> dict:
    """The same block structure at toy width (for --tiny)."""
    n = len(cfg["block_out_channels"])
    return {**cfg, "block_out_channels": [32] * n, "attention_head_dim": 2, "norm_num_groups": 8,
            "cross_attention_dim": 32, "transformer_layers_per_block": 1, "sample_size": 8,
            "projection_class_embeddings_input_dim": 32 + 6 * 4, "addition_time_embed_dim": 4}  # fmt: skip


def rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return -1


def peak_extra_mib(fn) -> float:
    """Peak resident memory above the current level while ``fn()`` runs (MiB), or NaN if unsupported.

    glibc keeps freed blocks resident, and new tensors would reuse them without raising the resident set;
    ``malloc_trim(0)`` first hands every free page back, so what ``fn`` allocates shows in ``VmHWM`` (reset
    just before, Linux ``clear_refs``)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    except (OSError, AttributeError):
        fn()
        return float("nan")
    base = rss_kib("VmRSS")
    fn()
    return (rss_kib("VmHWM") - base) / 1024


def measure(space: EmbeddingSpace, targets: list[tuple[str, torch.nn.Linear]], n: int, repeats: int,
            states=None) -> dict:  # fmt: skip
    """Encode / solve / apply / total medians and peak memory for ICE's solve from states alone (its defaults, the
    broad preserve base included: encoded once per encoder, timed apart as ``base_s``; no Gram matrix, so without the
    default's hardening, whose cost the end-to-end lines give); the dense UCE edit for comparison."""
    spec = spec_for(n)
    reps = repeats if n < 100 else 1  # 100 concepts: one run (minutes of encoding at SDXL size otherwise)

    def encode():
        space.clear_cache()
        e = space.token_states(spec.erase_prompts())
        p = space.token_states(spec.preserve_prompts())
        return e, p

    if states is None:
        t_encode, (E_e, E_p) = median_time(encode, reps)
        with cache_off():  # the base's one-time cost, as the first erase with a new encoder pays it
            t = time.perf_counter()
            E_b = space.base_states(spec.base_prompts())
            t_base = time.perf_counter() - t
    else:
        t_encode, t_base, (E_e, E_p, E_b) = float("nan"), float("nan"), states(spec)

    def solve():
        return build_operator("ice", E_e, E_p, concepts=n, E_base=E_b)

    t_solve, op = median_time(solve, repeats)

    def timed_apply(keep_undo: bool) -> float:
        times = []
        for _ in range(repeats):  # the original weights are restored between runs, outside the timing
            originals = None if keep_undo else [m.weight.detach().clone() for _, m in targets]
            t = time.perf_counter()
            edits = apply_edits([(name, m, op) for name, m in targets], keep_undo=keep_undo)
            times.append(time.perf_counter() - t)
            if keep_undo:
                undo_edits(edits)  # exact, bit for bit
            else:  # no undo record: from the copies
                with torch.no_grad():
                    for (_, m), w in zip(targets, originals, strict=True):
                        m.weight.copy_(w)
        return statistics.median(times)

    t_apply = timed_apply(True)
    t_apply_lean = timed_apply(False) if n == 1 else float("nan")
    held: list = []

    def solve_and_apply():
        fresh = solve()
        held.append(apply_edits([(nm, m, fresh) for nm, m in targets]))

    mem_ice = peak_extra_mib(solve_and_apply)
    undo_edits(held.pop())

    def uce_dense():
        return [uce_dense_edit(m.weight, E_e, E_p, lam=10.0) for _, m in targets]

    uce_times: list[float] = []

    def timed_uce():
        t = time.perf_counter()
        uce_dense()
        uce_times.append(time.perf_counter() - t)

    mem_uce = peak_extra_mib(timed_uce)  # the dense solves are slow: time the same runs
    for _ in range((1 if len(targets) > 50 else repeats) - 1):
        timed_uce()
    t_uce = statistics.median(uce_times)
    edit = t_solve + t_apply
    return {
        "concepts": n,
        "erase_tokens": E_e.shape[0],
        "preserve_tokens": E_p.shape[0],
        "rank": op.rank,
        "two_sided": op.V is not None,
        "apply_form": edit_form(op, [m.out_features for _, m in targets]),
        "base_s": t_base,
        "encode_s": t_encode,
        "solve_s": t_solve,
        "apply_s": t_apply,
        "apply_no_undo_s": t_apply_lean,
        "edit_s": edit,
        "total_s": (0.0 if states is not None else t_encode) + edit,
        "peak_extra_mib": mem_ice,
        "uce_dense_edit_s": t_uce,
        "uce_dense_peak_extra_mib": mem_uce,
        "uce_over_ice_edit": t_uce / edit,
    }


class cache_off:
    """Within the block, ``ice_lightning``'s on-disk cache is off (what a first erase with a new encoder pays)."""

    def __enter__(self):
        self.old = os.environ.get("ICE_LIGHTNING_CACHE")
        os.environ["ICE_LIGHTNING_CACHE"] = "off"

    def __exit__(self, *exc):
        if self.old is None:
            os.environ.pop("ICE_LIGHTNING_CACHE", None)
        else:
            os.environ["ICE_LIGHTNING_CACHE"] = self.old


def sd15_pipeline(tiny: bool):
    """The SD 1.5 pipeline at real size (random weights), or its toy-width twin."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    from ice_lightning.demos.tiny_parts import tiny_vae

    tok = _tokenizer()
    text_encoder = _clip_encoder(tok, CLIP_L, tiny=tiny)
    torch.manual_seed(0)
    unet_cfg = _tiny_unet(SD15_UNET) if tiny else SD15_UNET
    unet_cfg = {k: v for k, v in unet_cfg.items() if k not in ("transformer_layers_per_block",
                "projection_class_embeddings_input_dim", "addition_time_embed_dim")}  # fmt: skip
    unet = UNet2DConditionModel(**unet_cfg).eval()
    pipe = StableDiffusionPipeline(
        vae=tiny_vae(), text_encoder=text_encoder, tokenizer=tok, unet=unet,
        scheduler=DDIMScheduler(clip_sample=False, set_alpha_to_one=False), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    return pipe


def cold_child(tiny: bool) -> None:
    """Run in a fresh process: build the pipeline, then time the first ``erase()`` of the process."""
    import ice_lightning

    pipe = sd15_pipeline(tiny)
    t = time.perf_counter()
    result = ice_lightning.erase(pipe, erase=["Van Gogh"], family="style")
    seconds = time.perf_counter() - t
    print("COLD " + json.dumps({"seconds": seconds, "timings": result.timings}))


def cold_starts(tiny: bool, runs: int = 3) -> dict:
    """The first ``erase()`` in fresh processes sharing a new cache folder: the very first one with this encoder
    and denoiser (empty cache), then ``runs`` more (what every later fresh process pays; the median run)."""
    out, later = {}, []
    with tempfile.TemporaryDirectory() as folder:
        env = {**os.environ, "ICE_LIGHTNING_CACHE": folder}
        for i in range(1 + runs):
            cmd = [sys.executable, __file__, "--cold-child"] + (["--tiny"] if tiny else [])
            run = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
            line = next(x for x in run.stdout.splitlines() if x.startswith("COLD "))
            if i == 0:
                out["empty_cache"] = json.loads(line[5:])
            else:
                later.append(json.loads(line[5:]))
    later.sort(key=lambda r: r["seconds"])
    out["warm_cache"] = later[len(later) // 2]
    out["warm_cache_all_s"] = [r["seconds"] for r in later]
    return out


def case_sd15(tiny: bool, counts: list[int], repeats: int) -> dict:
    import ice_lightning
    from ice_lightning.core.parts import pipeline_spaces, resolve_layer

    cold = cold_starts(tiny, runs=1 if tiny else 3)  # --tiny: two fresh processes, the second finds the cache
    t = time.perf_counter()
    pipe = sd15_pipeline(tiny)
    build_s = time.perf_counter() - t
    unet, tok, text_encoder = pipe.unet, pipe.tokenizer, pipe.text_encoder
    n_params = sum(p.numel() for p in unet.parameters())

    # End to end, as a user calls it (fresh encoding cache each time), at the default, without its hardening ("plain":
    # the ratios' reference) and at the robust settings of docs/method.md, section 9 (hardened, the output metric, the
    # output-metric adversary within a collateral budget).
    def end_to_end(**hparams):
        pipeline_spaces(pipe)["text"].clear_cache()
        result = ice_lightning.erase(pipe, erase=["Van Gogh"], family="style", **hparams)
        timings = dict(result.timings)
        result.undo()
        return timings

    e2e_s, timings = median_time(end_to_end, repeats)
    variants = {key: median_time(lambda kw=kw: end_to_end(**kw), repeats)
                for key, kw in VARIANTS.items()}  # fmt: skip

    # Zero inference overhead: same parameters, no hooks, same forward time.
    latent = 8 if tiny else 32
    x = torch.randn(1, 4, latent, latent, generator=torch.Generator().manual_seed(0))
    ehs = pipeline_spaces(pipe)["text"].sources[0].encoder(tok(["a photo"], return_tensors="pt").input_ids)[0]

    @torch.no_grad()
    def forward():
        return unet(x, torch.tensor([10]), encoder_hidden_states=ehs).sample

    t_orig, _ = median_time(forward, repeats)
    result = ice_lightning.erase(pipe, erase=["Van Gogh"], family="style")
    hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in unet.modules())
    t_edit, _ = median_time(forward, repeats)
    overhead = {
        "parameters_before": n_params,
        "parameters_after": sum(p.numel() for p in unet.parameters()),
        "hooks_left": hooks,
        "forward_s_original": t_orig,
        "forward_s_edited": t_edit,
        "forward_ratio": t_edit / t_orig,
        "latent": latent,
    }
    # The LoRA export of this erasure against the merged export (every module's weights, float32)
    lora = erasure_lora(pipe, [result])
    export_sizes = {
        "lora_bytes": sum(t.numel() * t.element_size() for t in lora.values()),
        "lora_rank": int(next(iter(lora.values())).shape[0]),
        "merged_bytes": sum(t.numel() * t.element_size() for c in pipe.components.values()
                            if isinstance(c, torch.nn.Module) for t in c.state_dict().values()),  # fmt: skip
    }
    result.undo()
    targets = [(n, resolve_layer(pipe, n)) for n in result.layers]
    rows = [measure(pipeline_spaces(pipe)["text"], targets, n, repeats) for n in counts]
    return {
        "case": "sd15",
        "unet_parameters": n_params,
        "text_encoder_parameters": sum(p.numel() for p in text_encoder.parameters()),
        "layers": len(targets),
        "unet_build_s": build_s,
        "cold": cold,
        "end_to_end_s": e2e_s,
        "end_to_end_timings": timings,
        "default_over_plain": e2e_s / variants["plain"][0],
        **{k: v for key, (sec, t) in variants.items()
           for k, v in ((f"end_to_end_{key}_s", sec), (f"end_to_end_{key}_timings", t),
                        (f"{key}_over_plain", sec / variants["plain"][0]))},  # fmt: skip
        "overhead": overhead,
        "export_sizes": export_sizes,
        "rows": rows,
    }


def case_sdxl(tiny: bool, counts: list[int], repeats: int) -> dict:
    from diffusers import UNet2DConditionModel

    cfg = _tiny_unet(SDXL_UNET) if tiny else SDXL_UNET
    with torch.device("meta"):
        meta = UNet2DConditionModel(**cfg)
    torch.manual_seed(0)
    targets = [
        (name, torch.nn.Linear(m.in_features, m.out_features, bias=m.bias is not None))
        for name, m in meta.named_modules()
        if name.endswith(("attn2.to_k", "attn2.to_v"))
    ]
    unet_params = sum(p.numel() for p in meta.parameters())
    del meta
    tok = _tokenizer()
    enc_l = _clip_encoder(tok, CLIP_L, tiny=tiny)
    enc_g = _clip_encoder(tok, CLIP_BIGG, projection=True, tiny=tiny)
    width = enc_l.config.hidden_size + enc_g.config.hidden_size
    if tiny:  # the toy layers read the toy encoders' width
        targets = [(n, torch.nn.Linear(width, m.out_features)) for n, m in targets]
    source = FeatureConcatSource([SequenceSource(tok, enc_l, 77, -2), SequenceSource(tok, enc_g, 77, -2)])
    space = EmbeddingSpace("text", [source])
    rows = [measure(space, targets, n, repeats) for n in counts]
    return {
        "case": "sdxl",
        "unet_parameters": unet_params,
        "text_encoder_parameters": sum(p.numel() for e in (enc_l, enc_g) for p in e.parameters()),
        "layers": len(targets),
        "rows": rows,
    }


def case_wan(tiny: bool, counts: list[int], repeats: int) -> dict:
    d_in, d_out = (64, 48) if tiny else WAN_TEXT_LAYER
    torch.manual_seed(0)
    targets = [("transformer.condition_embedder.text_embedder.linear_1", torch.nn.Linear(d_in, d_out))]
    g = torch.Generator().manual_seed(0)

    offset = torch.randn(d_in, generator=g)
    # the broad preserve base: ~10 tokens per everyday prompt, compressed once (as base_states keeps it)
    base = compress_states(torch.randn(10 * len(ConceptSpec(erase=["x"]).base_prompts()), d_in, generator=g) + offset)

    def states(spec: ConceptSpec):
        # ~3 tokens per concept name, as the SD case measures; rows with a shared offset like real states
        n_e, n_p = 3 * len(spec.erase_prompts()), 3 * len(spec.preserve_prompts())
        return (torch.randn(n_e, d_in, generator=g) + offset, torch.randn(n_p, d_in, generator=g) + offset, base)

    rows = [measure(None, targets, n, repeats, states=states) for n in counts]
    return {"case": "wan", "layers": 1, "text_dim": d_in, "rows": rows}


CASES = {"sd15": case_sd15, "sdxl": case_sdxl, "wan": case_wan}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="toy widths, 1 and 3 concepts (tests)")
    ap.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--update", action="store_true",
                    help="replace only these cases in the report already in --out, keep the others")  # fmt: skip
    ap.add_argument("--cold-child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.cold_child:
        cold_child(args.tiny)
        return {}
    with tempfile.TemporaryDirectory() as folder:  # this run's own on-disk cache: no earlier run's entries
        os.environ["ICE_LIGHTNING_CACHE"] = folder
        return report(args)


#: The erase variants timed beside the default at SD 1.5 size (``end_to_end_<key>_s``, ``<key>_over_plain``).
VARIANTS = {"plain": PLAIN, "hardened": {"harden_rounds": 3, **FIXED}, "output_metric": OUTPUT_METRIC,
            "adversary_budget": ADVERSARY_BUDGET}


def _variant_line(r: dict, key: str, label: str) -> list[str]:
    """The warm end-to-end line of an erase variant, if this case's run measured it (reports kept by ``--update``
    may predate a variant)."""
    if f"end_to_end_{key}_s" not in r:
        return []
    return [f"{label}, warm: {r[f'end_to_end_{key}_s']:.2f} s ({r[f'{key}_over_plain']:.2f}x the plain erase); "
            "stages: " + ", ".join(f"{k} {v:.3f}" for k, v in r[f"end_to_end_{key}_timings"].items()), ""]  # fmt: skip


def report(args) -> dict:
    counts = [1, 3] if args.tiny else [1, 10, 100]
    results = [CASES[c](args.tiny, counts, args.repeats) for c in args.cases]
    name = "speed_tiny" if args.tiny else "speed"
    if args.update and (args.out / f"{name}.json").exists():  # the other cases as the last full run left them
        fresh = {r["case"]: r for r in results}
        last = json.loads((args.out / f"{name}.json").read_text())
        for r in last["results"]:
            r.setdefault("measured", last["environment"]["date"])
        results = [fresh.pop(r["case"], r) for r in last["results"]] + list(fresh.values())
    md = [f"# Speed and memory ({'tiny' if args.tiny else 'real sizes'}, {torch.get_num_threads()} threads)", ""]
    cols = ["concepts", "erase_tokens", "rank", "apply_form", "base_s", "encode_s", "solve_s", "apply_s",
            "apply_no_undo_s", "edit_s", "total_s", "peak_extra_mib", "uce_dense_edit_s", "uce_dense_peak_extra_mib",
            "uce_over_ice_edit"]  # fmt: skip
    for r in results:
        r.setdefault("measured", time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
        md += [f"## {r['case']}: {r['layers']} edited layers (measured {r['measured']})", ""]
        md += table(cols, [[row[c] for c in cols] for row in r["rows"]])
        if "end_to_end_s" in r:
            o, cold = r["overhead"], r["cold"]
            md += [
                "",
                "First `ice_lightning.erase(pipe, erase=['Van Gogh'], family='style')` in a fresh process (pipeline "
                f"loaded): {cold['empty_cache']['seconds']:.2f} s with an empty cache (the first ever with this "
                f"encoder), {cold['warm_cache']['seconds']:.2f} s in the later ones (median of "
                f"{', '.join(f'{x:.2f}' for x in cold['warm_cache_all_s'])} s); stages of the median run: "
                + ", ".join(f"{k} {v:.3f}" for k, v in cold["warm_cache"]["timings"].items()),
                "",
                f"Warm (median, same process): {r['end_to_end_s']:.2f} s"
                + (f" ({r['default_over_plain']:.2f}x the plain erase)" if "default_over_plain" in r else "")
                + "; stages of the last run: " + ", ".join(f"{k} {v:.3f}" for k, v in r["end_to_end_timings"].items()),
                "",
                *_variant_line(r, "plain", "Without the default's hardening (`harden_rounds=0`)"),
                *_variant_line(r, "hardened", "Hardened (`harden_rounds=3`, token states, fixed strength)"),
                *_variant_line(r, "output_metric", "Output metric + one hardening round"),
                *_variant_line(r, "adversary_budget", "Output-metric adversary within a collateral budget "
                               "(`harden_budget=0.01`)"),
                f"Inference overhead: parameters {o['parameters_before']} -> {o['parameters_after']}, hooks left "
                f"{o['hooks_left']}, UNet forward ({o['latent']}x{o['latent']} latent) "
                f"{o['forward_s_original']:.3f} s -> {o['forward_s_edited']:.3f} s (ratio {o['forward_ratio']:.3f})",
                "",
                f"Export sizes: the erasure as a LoRA (`format='lora'`, rank {r['export_sizes']['lora_rank']}) "
                f"{r['export_sizes']['lora_bytes'] / 2**20:.1f} MiB; the merged pipeline "
                f"{r['export_sizes']['merged_bytes'] / 2**30:.2f} GiB",
            ]
        md.append("")
    write_report(args.out, name, {"results": results}, md)
    return {"results": results}


if __name__ == "__main__":
    main()
