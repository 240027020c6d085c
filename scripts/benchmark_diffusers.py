"""Sampling benchmark of the public diffusers families (SD3, SD3.5, Flux.1, PixArt-Sigma, Wan) in the shared sampler:
ERG vs CFG.

    python scripts/benchmark_diffusers.py --family flux_dev                   # GPU: Flux.1-dev's real transformer
    python scripts/benchmark_diffusers.py --family sd35_large --out docs/benchmarks/diffusers_sd35_large_<gpu>.md
    python scripts/benchmark_diffusers.py --family flux_dev --size tiny --device cpu     # CPU smoke, seconds
    python scripts/benchmark_diffusers.py --family wan2_1_t2v_1_3b                 # 480 x 832, 81 frames, 10 steps

ERG must cost what CFG costs (target: ERG / CFG wall time <= 1.05): two rows per image and ONE transformer
forward per step (diffusers' guiders and FluxPipeline's true CFG run one forward per branch), the weak prompt
encoded once per run. Weights are random (the cost does not depend on them): `--size real` builds the family's
real transformer config (as built from those configs: Flux.1 19 + 38 blocks of 3072, 11.9B parameters;
SD3.5-large 38 x 2432, 8.06B; SD3.5-medium 24 x 1536 with 13 dual blocks, 2.24B; SD3-medium 24 x 1536, 2.03B;
PixArt-Sigma-XL 28 x 1152, 0.61B; Wan 2.1 1.3B 30 x 1536, 1.42B, at 480 x 832 and 81 frames: 32,760 video tokens)
in bf16 on the device at 1024px with thin random text encoders of the real output widths and layer counts (so
Table 7's C-ERG ranges apply; their cost is a small part of a run), and a thin VAE (no decoding is timed).
`--size tiny` is the tests' tiny pipeline shapes (CPU), with a word-level tokenizer built in code (no files).

For each method (sample.py's configs with the family's presets: erg = Table 7's SD3 row scaled to the model) one
untimed run (warm-up), then `--repeats` timed runs of the full sampler from prompts to latents (encoding
included, no decode). Reported: NFE per step, transformer forwards per step and rows per forward (counted),
img/s, ms per step, peak memory, ERG / CFG wall time. `run(DiffusersBench(...), device, budget, report)` is the
stage scripts/benchmark_all.py calls (`diffusers`): a method whose runs would not fit the budget is skipped with
a line.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scripts.benchmark import Budget, Report, config_from_args, guarded, setup_device, sync, write_results

FAMILIES = ("sd3_medium", "sd35_large", "sd35_medium", "flux_dev", "flux_schnell", "pixart_sigma", "wan2_1_t2v_1_3b")
METHODS = ("none", "cfg", "erg", "pag", "seg")
PROMPTS = [
    "a photo of a cat sitting on a windowsill",
    "a red double-decker bus on a city street",
    "a bowl of fruit on a wooden table",
    "a mountain lake at sunrise with mist over the water",
]

# The real transformers' configs (diffusers' config.json of each release), and the tiny ones of the tests.
REAL = {
    "sd3_medium": dict(sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64,
                       num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
                       pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=192),
    "sd35_large": dict(sample_size=128, patch_size=2, in_channels=16, num_layers=38, attention_head_dim=64,
                       num_attention_heads=38, joint_attention_dim=4096, caption_projection_dim=2432,
                       pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=192, qk_norm="rms_norm"),
    "sd35_medium": dict(sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64,
                        num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
                        pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=384, qk_norm="rms_norm",
                        dual_attention_layers=tuple(range(13))),
    "flux_dev": dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                     num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                     axes_dims_rope=(16, 56, 56)),
}  # fmt: skip
REAL["flux_schnell"] = {**REAL["flux_dev"], "guidance_embeds": False}
REAL["pixart_sigma"] = dict(sample_size=128, num_layers=28, patch_size=2, attention_head_dim=72, num_attention_heads=16,
                            caption_channels=4096, in_channels=4, cross_attention_dim=1152, out_channels=8,
                            use_additional_conditions=False)  # fmt: skip
REAL["wan2_1_t2v_1_3b"] = dict(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128,
                               in_channels=16, out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=8960,
                               num_layers=30, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
                               rope_max_seq_len=1024)  # fmt: skip
TINY = {
    "sd3_medium": dict(sample_size=8, patch_size=2, in_channels=4, num_layers=8, attention_head_dim=8,
                       num_attention_heads=2, joint_attention_dim=24, caption_projection_dim=16,
                       pooled_projection_dim=20, out_channels=4, pos_embed_max_size=8),
    "flux_dev": dict(patch_size=1, in_channels=16, num_layers=2, num_single_layers=3, attention_head_dim=8,
                     num_attention_heads=2, joint_attention_dim=24, pooled_projection_dim=8, guidance_embeds=True,
                     axes_dims_rope=(2, 2, 4)),
}  # fmt: skip
TINY["sd35_large"] = {**TINY["sd3_medium"], "qk_norm": "rms_norm"}
TINY["sd35_medium"] = {**TINY["sd35_large"], "dual_attention_layers": (0, 1, 2, 3)}
TINY["flux_schnell"] = {**TINY["flux_dev"], "guidance_embeds": False}
TINY["pixart_sigma"] = dict(sample_size=8, num_layers=28, patch_size=2, attention_head_dim=8, num_attention_heads=2,
                            caption_channels=24, in_channels=4, cross_attention_dim=16, out_channels=8,
                            use_additional_conditions=False)  # fmt: skip
TINY["wan2_1_t2v_1_3b"] = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4,
                               out_channels=4, text_dim=24, freq_dim=32, ffn_dim=32, num_layers=30,
                               cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=32)  # fmt: skip
# size -> (resolution, VAE blocks (factor 2 ** (n - 1)), VAE latent channels, CLIP-L / OpenCLIP-G / T5 widths)
SIZES = {"tiny": (16, 2, 4, (8, 12, 24)), "real": (1024, 4, 16, (768, 1280, 4096))}
VIDEO = {"tiny": (64, 64, 5), "real": (480, 832, 81)}  # Wan: height, width, frames (Wan 2.1 1.3B's 480p)


# --- random pipelines of a size ----------------------------------------------------------------------------
def _tokenizer(max_length: int) -> Any:
    """A word-level tokenizer over the benchmark's prompts (no tokenizer files needed): pad 0, unk 1, bos 2, eos 3."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = sorted({w for p in PROMPTS for w in p.split()})
    vocab = {"[PAD]": 0, "[UNK]": 1, "[BOS]": 2, "[EOS]": 3, **{w: i + 4 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    specials = [("[BOS]", 2), ("[EOS]", 3)]
    tok.post_processor = processors.TemplateProcessing(single="[BOS] $A [EOS]", special_tokens=specials)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", bos_token="[BOS]",
                                   eos_token="[EOS]", model_max_length=max_length)  # fmt: skip


VOCAB = 4 + len({w for p in PROMPTS for w in p.split()})


def _clip(layers: int, width: int, projection: bool) -> Any:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(vocab_size=VOCAB, hidden_size=width, intermediate_size=256, num_hidden_layers=layers,
                            num_attention_heads=2, max_position_embeddings=77, projection_dim=width, pad_token_id=0,
                            bos_token_id=2, eos_token_id=3)  # fmt: skip
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config).eval()


def _t5(width: int) -> Any:
    from transformers import T5Config, T5EncoderModel

    config = T5Config(vocab_size=VOCAB, d_model=width, d_kv=32, d_ff=256, num_layers=24, num_heads=2)
    return T5EncoderModel(config).eval()


def _umt5(width: int) -> Any:
    from transformers import UMT5Config, UMT5EncoderModel

    config = UMT5Config(vocab_size=VOCAB, d_model=width, d_kv=32, d_ff=256, num_layers=24, num_heads=2)
    return UMT5EncoderModel(config).eval()


def _scheduler(family: str) -> Any:
    """The family's scheduler, built on the CPU as from_pretrained builds it (outside the device context: it keeps
    its sigmas on the CPU, and a meta-device build, tests/test_benchmark_diffusers.py, could not copy them there)."""
    import diffusers

    if family == "pixart_sigma":
        return diffusers.DPMSolverMultistepScheduler(beta_schedule="linear")
    if family.startswith("wan"):
        return diffusers.UniPCMultistepScheduler(
            prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0
        )
    if family == "flux_dev":
        return diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True)
    return diffusers.FlowMatchEulerDiscreteScheduler(shift=1.0 if family == "flux_schnell" else 3.0)


def _cross_attention_pipeline(family: str, config: dict, vae_blocks: int, w_t5: int, scheduler: Any) -> Any:
    """PixArt-Sigma (T5, its DPM-Solver) or Wan (UMT5, its UniPC on flow sigmas), with a thin VAE."""
    import diffusers

    if family == "pixart_sigma":
        vae = diffusers.AutoencoderKL(
            in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * vae_blocks,
            up_block_types=("UpDecoderBlock2D",) * vae_blocks, block_out_channels=(8,) * vae_blocks,
            latent_channels=config["in_channels"], layers_per_block=1, norm_num_groups=4,
        )  # fmt: skip
        return diffusers.PixArtSigmaPipeline(
            tokenizer=_tokenizer(300), text_encoder=_t5(config["caption_channels"]), vae=vae,
            transformer=diffusers.PixArtTransformer2DModel(**config), scheduler=scheduler,
        )  # fmt: skip
    z = config["in_channels"]  # a thin Wan VAE: 8x in space, 4x in time, as Wan 2.1's
    vae = diffusers.AutoencoderKLWan(base_dim=8, z_dim=z, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                                     latents_mean=[0.0] * z, latents_std=[1.0] * z)  # fmt: skip
    return diffusers.WanPipeline(tokenizer=_tokenizer(512), text_encoder=_umt5(config["text_dim"]), vae=vae,
                                 scheduler=scheduler,
                                 transformer=diffusers.WanTransformer3DModel(**config))  # fmt: skip


def build_pipeline(family: str, size: str, device: torch.device, dtype: torch.dtype, seed: int = 0) -> Any:
    """The family's diffusers pipeline at `size` with random weights, built on `device` in `dtype`."""
    import diffusers

    resolution, vae_blocks, latent, (w_l, w_g, w_t5) = SIZES[size]
    config = (REAL if size == "real" else TINY)[family]
    torch.manual_seed(seed)
    scheduler = _scheduler(family)
    if family in ("pixart_sigma", "wan2_1_t2v_1_3b"):
        with torch.device(device):
            pipe = _cross_attention_pipeline(family, config, vae_blocks, w_t5, scheduler)
        for module in (pipe.transformer, pipe.vae, pipe.text_encoder):
            module.to(dtype=dtype).eval().requires_grad_(False)
        pipe.set_progress_bar_config(disable=True)
        return pipe
    with torch.device(device):
        vae = diffusers.AutoencoderKL(
            in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * vae_blocks,
            up_block_types=("UpDecoderBlock2D",) * vae_blocks, block_out_channels=(8,) * vae_blocks,
            latent_channels=latent, layers_per_block=1, norm_num_groups=4, sample_size=resolution,
        )  # fmt: skip
        t5 = _t5(w_t5)
        clip_l = _clip(12, w_l, projection=not family.startswith("flux"))
        if family.startswith("flux"):
            transformer = diffusers.FluxTransformer2DModel(**config)
            pipe = diffusers.FluxPipeline(
                scheduler=scheduler, vae=vae, text_encoder=clip_l, tokenizer=_tokenizer(77), text_encoder_2=t5,
                tokenizer_2=_tokenizer(512), transformer=transformer,
            )  # fmt: skip
        else:
            transformer = diffusers.SD3Transformer2DModel(**config)
            pipe = diffusers.StableDiffusion3Pipeline(
                transformer=transformer, scheduler=scheduler, vae=vae,
                text_encoder=clip_l, tokenizer=_tokenizer(77), text_encoder_2=_clip(32, w_g, projection=True),
                tokenizer_2=_tokenizer(77), text_encoder_3=t5, tokenizer_3=_tokenizer(512),
            )  # fmt: skip
    for name in ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3"):
        module = getattr(pipe, name, None)
        if module is not None:
            module.to(dtype=dtype).eval().requires_grad_(False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def build_model(family: str, size: str, device: torch.device, dtype: torch.dtype, offload: bool = False) -> Any:
    """The family's adapter (erg/integrations/) around a random pipeline of `size`."""
    pipe = build_pipeline(family, size, torch.device("cpu") if offload else device, dtype)
    resolution = SIZES[size][0]
    tokens = 16 if size == "tiny" else 512 if family == "flux_dev" else 256
    if family == "pixart_sigma":
        from erg.integrations.pixart import PixArtDenoiser

        model = PixArtDenoiser(pipe, resolution=resolution, max_sequence_length=16 if size == "tiny" else 300,
                               clean_caption=False, offload=offload)  # fmt: skip
    elif family.startswith("wan"):
        from erg.integrations.wan import WanDenoiser

        height, width, frames = VIDEO[size]
        model = WanDenoiser(pipe, height=height, width=width, num_frames=frames,
                            max_sequence_length=16 if size == "tiny" else 512, offload=offload)  # fmt: skip
    elif family.startswith("flux"):
        from erg.integrations.flux import FluxDenoiser

        g = 3.5 if family == "flux_dev" else None
        model = FluxDenoiser(pipe, resolution=resolution, max_sequence_length=tokens, distilled_guidance=g,
                             offload=offload)  # fmt: skip
    else:
        from erg.integrations.sd3 import SD3Denoiser
        from erg.integrations.sd35 import SD35Denoiser

        cls = SD35Denoiser if family.startswith("sd35") else SD3Denoiser
        model = cls(pipe, resolution=resolution, max_sequence_length=tokens, offload=offload)
    return model.to(device)


# --- the measurement ---------------------------------------------------------------------------------------
def method_config(family: str, method: str, num_layers: int) -> dict:
    """sample.py's config of `method` for `model=<family>` (its presets); layer ranges that do not fit a tiny
    model are rescaled by the presets' rule ([round(n / 4), round(n / 3)), Table 7's SD3 row)."""
    from models.generation import compose_guidance

    _, cfg = compose_guidance(method, model=family)
    lo = round(num_layers / 4)
    fitted = [lo, max(round(num_layers / 3), lo + 1)]
    for holder in (cfg.get("image"), cfg):
        layers = holder.get("layers") if isinstance(holder, dict) else None
        if isinstance(layers, list) and max(layers) > num_layers:
            holder["layers"] = fitted
    return cfg


@dataclass(frozen=True)
class DiffusersBench:
    """Sizes of the diffusers benchmark. family: one of FAMILIES;
    size: real (the release's transformer, random weights) | tiny (the tests' shapes); steps / batch_size: None
    is the family's step count (28; SD3.5-medium 40; schnell 4; PixArt-Sigma 20; Wan 10 of its 50) and batch 1
    (real) or 2 steps, batch 2 (tiny);
    offload: components on the CPU, one group on the device at a time; dtype: auto (bf16 on GPU) | bfloat16 |
    float32."""

    family: str = "flux_dev"
    size: str = "real"
    methods: tuple[str, ...] = METHODS
    steps: int | None = None
    batch_size: int | None = None
    repeats: int = 1
    offload: bool = False
    dtype: str = "auto"

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"unknown family {self.family!r}; choose from {FAMILIES}")
        if self.size not in SIZES:
            raise ValueError(f"unknown size {self.size!r}; choose tiny or real")
        if self.dtype not in ("auto", "bfloat16", "float32"):
            raise ValueError(f"dtype must be auto, bfloat16 or float32, got {self.dtype!r}")

    @property
    def run_steps(self) -> int:
        # Wan: 10 of its 50 steps (the ERG / CFG ratio is per step; a full 81-frame run per method would not fit)
        defaults = {"flux_schnell": 4, "sd35_medium": 40, "pixart_sigma": 20, "wan2_1_t2v_1_3b": 10}
        return self.steps or (2 if self.size == "tiny" else defaults.get(self.family, 28))

    @property
    def resolution(self) -> str:
        if self.family.startswith("wan"):
            return "{}x{}, {} frames".format(*VIDEO[self.size])
        return f"{SIZES[self.size][0]}px"

    @property
    def run_batch(self) -> int:
        return self.batch_size or (2 if self.size == "tiny" else 1)


def _time_method(cfg: DiffusersBench, model: Any, method: str, guidance: Any, device: torch.device) -> dict:
    """One method: a warm-up run, then the best of `cfg.repeats` runs; the transformer's forwards counted."""
    from erg.sampler import GuidedSampler, SamplerConfig

    steps, batch = cfg.run_steps, cfg.run_batch
    sampler = GuidedSampler(guidance, model, config=SamplerConfig(steps=steps, schedule="pipeline"))
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(batch)]
    rows: list[int] = []
    hook = model.transformer.register_forward_pre_hook(
        lambda m, a, kw: rows.append(kw["hidden_states"].shape[0]), with_kwargs=True
    )
    try:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        sampler.sample_indices(range(batch), prompts)  # warm-up
        sync(device)
        warmup_s = time.perf_counter() - t0
        forwards = len(rows)
        times = []
        for _ in range(cfg.repeats):
            t0 = time.perf_counter()
            sampler.sample_indices(range(batch), prompts)
            sync(device)
            times.append(time.perf_counter() - t0)
    finally:
        hook.remove()
    seconds = min(times)
    return {
        "method": method,
        "config": guidance.name,
        "nfe_per_step": guidance.nfe,
        "forwards_per_step": round(forwards / steps, 3),
        "rows_per_forward": max(rows[:forwards]),
        "img_per_s": round(batch / seconds, 4),
        "ms_per_step": round(1000 * seconds / steps, 2),
        "seconds": round(seconds, 3),
        "warmup_s": round(warmup_s, 2),
        "peak_mem_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None,
    }


def run(cfg: DiffusersBench, device: str = "cuda", budget: Budget | None = None, report: Report | None = None,
        ) -> list[dict]:  # fmt: skip
    """Every method of `cfg` that fits `budget`, in order (cfg and erg first: their ratio is the target). The
    estimate for a method: 1 + repeats runs at the last measured run time (scaled by NFE); the first method is
    started whatever its cost (nothing is known before it). Each row also says the model's size."""
    from erg.guidance import build_guidance

    dev, _ = setup_device(device)
    budget = budget or Budget()
    torch_dtype = {"auto": torch.bfloat16 if dev.type == "cuda" else torch.float32, "bfloat16": torch.bfloat16,
                   "float32": torch.float32}[cfg.dtype]  # fmt: skip
    model = build_model(cfg.family, cfg.size, dev, torch_dtype, offload=cfg.offload)
    about = {"family": cfg.family, "size": cfg.size, "dtype": str(torch_dtype).removeprefix("torch."),
             "transformer_params_b": sum(p.numel() for p in model.transformer.parameters()) / 1e9,
             "resolution": cfg.resolution, "steps": cfg.run_steps, "batch_size": cfg.run_batch}  # fmt: skip
    results: list[dict] = []
    last: tuple[int, float] | None = None  # (NFE per step, seconds per run) of the last measured method
    for method in cfg.methods:
        guidance = build_guidance(method_config(cfg.family, method, model.num_attention_layers))
        est = last[1] * guidance.nfe / last[0] if last else 0.0
        row = {"method": method, "config": guidance.name, "nfe_per_step": guidance.nfe, **about}
        reason = budget.skip_reason((1 + cfg.repeats) * est, f"{1 + cfg.repeats} runs at ~{est:.1f} s")
        if reason:
            r = {**row, "skipped": reason}
        else:
            r = {**about, **guarded(lambda m=method, g=guidance: _time_method(cfg, model, m, g, dev), row, dev)}
            if "seconds" in r:
                last = (r["nfe_per_step"], r["seconds"])
        print(json.dumps(r), flush=True)
        results.append(r)
        if report:
            report(results)
    return results


def ratio(results: list[dict]) -> float | None:
    """ERG / CFG wall time (None until both are measured)."""
    by = {r["method"]: r for r in results if "seconds" in r}
    return round(by["erg"]["seconds"] / by["cfg"]["seconds"], 3) if "erg" in by and "cfg" in by else None


def markdown(results: list[dict], cfg: DiffusersBench, device_name: str) -> str:
    first = results[0] if results else {}
    params = first.get("transformer_params_b")
    what = f"a {params:.3g}B-parameter transformer" if params else "its transformer"
    lines = [
        f"Sampling {cfg.family} ({cfg.size} size: {what}"
        f", random weights, {first.get('dtype', cfg.dtype)}{', CPU offload' if cfg.offload else ''}) at "
        f"{cfg.resolution}, batch {cfg.run_batch}, {cfg.run_steps} Euler steps on the pipeline's grid, on "
        f"**{device_name}** (torch {torch.__version__}); best of {cfg.repeats} timed run(s) after one warm-up run, "
        "prompt encoding included, no decoding.",
        "",
        "| method | config | NFE / step | forwards / step | rows / forward | img/s | ms / step | peak memory (GiB) |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        if "seconds" not in r:
            why = r.get("skipped") or r.get("error", "not measured")
            lines.append(f"| {r['method']} | {r.get('config', '')} | {r.get('nfe_per_step', '')} | {why} |||||")
            continue
        keys = ("method", "config", "nfe_per_step", "forwards_per_step", "rows_per_forward", "img_per_s", "ms_per_step")
        cells = [r.get(k, "") for k in keys] + [r.get("peak_mem_gib") or "n/a"]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    if ratio(results) is not None:
        lines.append(f"\nERG / CFG wall time: {ratio(results)} (target <= 1.05)")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--family", default="flux_dev", choices=FAMILIES)
    p.add_argument("--size", default="real", choices=sorted(SIZES))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--methods", nargs="+", default=list(METHODS))
    p.add_argument("--steps", type=int, default=None, help="default: the family's (28; SD3.5-medium 40; schnell 4)")
    p.add_argument("--batch-size", type=int, default=None, help="default: 1 (real), 2 (tiny)")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--budget-s", type=float, default=None, help="skip the methods that would not fit (a line each)")
    p.add_argument("--offload", action="store_true", help="components on the CPU, one group on the device at a time")
    p.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32"])
    p.add_argument("--out", type=Path, default=None, help="write the markdown table here")
    p.add_argument("--json", type=Path, default=None, help="write the raw results here")
    args = p.parse_args(argv)
    cfg = config_from_args(DiffusersBench, args)
    results = run(cfg, args.device, Budget(args.budget_s))
    device_name = setup_device(args.device)[1]
    table = markdown(results, cfg, device_name)
    print(table)
    summary = {"device": device_name, "config": dataclasses.asdict(cfg), "erg_over_cfg": ratio(results),
               "results": results}  # fmt: skip
    write_results(args.out, args.json, table, summary)
    return results


if __name__ == "__main__":
    main()
