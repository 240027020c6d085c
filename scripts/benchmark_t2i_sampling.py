"""Text-to-image sampling benchmark: ERG vs CFG on an MMDiT with real text encoders, in the shared sampler.

    python scripts/benchmark_t2i_sampling.py                  # MMDiT-B/2 at 256px (32x32x16), batch 128, 50 steps, bf16
    python scripts/benchmark_t2i_sampling.py --text-encoder llama3_t5      # the paper's encoders ($ERG_WEIGHTS)
    python scripts/benchmark_t2i_sampling.py --out docs/benchmarks/sampling_t2i_<gpu>.md --json t2i.json
    python scripts/benchmark_t2i_sampling.py --device cpu --arch MMDiT-d2 --input-size 8 --channels 4 \
        --batch-size 2 --steps 2 --max-length 8 --no-bf16 --methods cfg erg     # smoke

ERG must cost what CFG costs (the issue's target: ERG / CFG wall time <= 1.05): two rows per image and one
batched forward per step, and C-ERG's weak prompt encoding happens once per sampling run, not per step.
For each method (configs/guidance/; erg = erg_mmdit, Table 7's text-to-image row) and mode: one untimed
run (compilation, warm-up), then `--repeats` timed runs of the full sampler from prompts to latents
(text encoding included, no VAE decode). Reported per method: NFE per step, img/s, ms per step, the text
encoders' forward passes per run (counted with forward hooks: CFG 1, C-ERG / ERG 2, whatever the
number of steps), the seconds spent encoding, and the ERG / CFG wall-time ratio. Random MMDiT weights
(the cost does not depend on them); the text encoders are the configured ones (default: the offline
MiniLM, so the script runs anywhere; its C-ERG ranges are all its layers). I-ERG's block ranges are
rescaled from 28 blocks to other depths.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from erg.guidance import build_guidance
from erg.sampler import GuidedSampler, SamplerConfig
from scripts.benchmark import setup_device, write_results
from scripts.benchmark_sampling import method_config, ratios, sync

# table name -> configs/guidance/ config of the text-to-image MMDiT
METHODS = {
    "none": "none", "cfg": "cfg", "apg": "apg", "cads": "cads", "i_erg": "i_erg", "c_erg": "c_erg",
    "erg": "erg_mmdit", "erg_apg": "erg_mmdit_apg", "erg_cads": "erg_mmdit_cads",
}  # fmt: skip
PROMPTS = [
    "a photo of a cat sitting on a windowsill",
    "a red double-decker bus on a city street",
    "a bowl of fruit on a wooden table",
    "a mountain lake at sunrise with mist over the water",
]


class EncoderCalls:
    """Counts forward passes of every text encoder (a forward hook on each transformers model)."""

    def __init__(self, conditioner: torch.nn.Module):
        self.count = 0
        self.handles = [enc.model.register_forward_hook(self._hook) for enc in conditioner.encoders.values()]

    def _hook(self, *args: object) -> None:
        self.count += 1

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def text_config(name: str, depth: int, conditioner: torch.nn.Module) -> dict:
    """The method's config; C-ERG ranges renamed to the benchmark's encoders (all their layers) if they differ."""
    cfg = method_config(name, depth)
    text = cfg.get("text")
    if isinstance(text, dict) and set(text["layers"]) != set(conditioner.encoders):
        text["layers"] = {n: [0, enc.num_layers] for n, enc in conditioner.encoders.items()}
    return cfg


def bench_method(args, table_name: str, mode: str, model, conditioning, conditioner, device) -> dict:
    guidance = build_guidance(text_config(METHODS[table_name], model.depth, conditioner))
    config = SamplerConfig(steps=args.steps, bf16=args.bf16, compile=mode == "compile")
    sampler = GuidedSampler(guidance, model, {"main": conditioning}, config=config)
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.batch_size)]
    indices = range(args.batch_size)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    sampler.sample_indices(indices, prompts)  # compilation / warm-up
    sync(device)
    warmup_s = time.perf_counter() - t0
    times, calls = [], []
    for _ in range(args.repeats):
        counter = EncoderCalls(conditioner)
        t0 = time.perf_counter()
        sampler.sample_indices(indices, prompts)
        sync(device)
        times.append(time.perf_counter() - t0)
        counter.remove()
        calls.append(counter.count)
    t0 = time.perf_counter()
    sampler.encode(prompts)  # the run's text encoding alone
    sync(device)
    encode_s = time.perf_counter() - t0
    seconds = min(times)
    return {
        "method": table_name,
        "config": METHODS[table_name],
        "mode": mode,
        "nfe_per_step": guidance.nfe,
        "encoder_forwards_per_run": calls[0] // len(conditioner.encoders),
        "encode_s": round(encode_s, 4),
        "img_per_s": round(args.batch_size / seconds, 3),
        "image_steps_per_s": round(args.batch_size * args.steps / seconds, 1),
        "ms_per_step": round(1000 * seconds / args.steps, 2),
        "seconds": round(seconds, 3),
        "warmup_s": round(warmup_s, 1),
        "peak_mem_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None,
    }


def markdown(results: list[dict], args, device_name: str, encoders: str) -> str:
    lines = [
        f"Text-to-image sampling, {args.arch} ({args.channels}x{args.input_size}x{args.input_size}) with text "
        f"encoders `{encoders}`, batch {args.batch_size}, {args.steps} Euler steps, "
        f"{'bf16 autocast' if args.bf16 else 'fp32'}, on **{device_name}** (torch {torch.__version__}); best of "
        f"{args.repeats} timed run(s) after one warm-up run; text encoding included.",
        "",
        "| method | config | mode | NFE / step | encoder forwards / run | encode (s) | img/s | image-steps/s | "
        "ms / step | peak memory (GiB) |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    keys = ("method", "config", "mode", "nfe_per_step", "encoder_forwards_per_run", "encode_s", "img_per_s",
            "image_steps_per_s", "ms_per_step")  # fmt: skip
    for r in results:
        mem = r["peak_mem_gib"] if r["peak_mem_gib"] is not None else "n/a"
        lines.append("| " + " | ".join(str(c) for c in (*(r[k] for k in keys), mem)) + " |")
    for mode, ratio in ratios(results).items():
        lines.append(f"\nERG / CFG wall time ({mode}): {ratio}")
    return "\n".join(lines) + "\n"


def build_conditioner(args, device: torch.device) -> torch.nn.Module:
    from hydra.utils import instantiate

    from scripts.quickstart_t2i import compose

    overrides = [f"text_encoder={args.text_encoder}", "text_encoder.context_dim=null", "text_encoder.pooled_dim=null"]
    cfg = compose("train", overrides)
    node = cfg.text_encoder
    for name in node.encoders:
        node.encoders[name].device = str(device)
        if args.max_length:
            node.encoders[name].max_length = args.max_length
    return instantiate(node)


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="MMDiT-B/2")
    p.add_argument("--input-size", type=int, default=32, help="latent size (256px / 8)")
    p.add_argument("--channels", type=int, default=16, help="SD3 VAE latents")
    p.add_argument("--text-encoder", default="minilm", help="configs/text_encoder/ config (weights: $ERG_WEIGHTS)")
    p.add_argument("--max-length", type=int, default=None, help="tokens per encoder (default: the config's)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--modes", nargs="+", default=["eager", "compile"], choices=["eager", "compile"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--no-bf16", dest="bf16", action="store_false")
    p.add_argument("--out", type=Path, default=None, help="write the markdown table here")
    p.add_argument("--json", type=Path, default=None, help="write the raw results here")
    args = p.parse_args(argv)

    from models.generation import prompts_conditioning
    from models.mmdit import build_mmdit

    device, device_name = setup_device(args.device)
    conditioner = build_conditioner(args, device).to(device)
    torch.manual_seed(0)
    model = build_mmdit(args.arch, input_size=args.input_size, in_channels=args.channels,
                        context_dim=conditioner.context_dim, pooled_dim=conditioner.pooled_dim)  # fmt: skip
    model = model.to(device).eval().requires_grad_(False)
    conditioning = prompts_conditioning(conditioner)
    results = []
    for mode in args.modes:
        for name in args.methods:
            r = bench_method(args, name, mode, model, conditioning, conditioner, device)
            print(json.dumps(r), flush=True)
            results.append(r)
    table = markdown(results, args, device_name, args.text_encoder)
    print(table)
    write_results(args.out, args.json, table, {"device": device_name, "ratios": ratios(results), "results": results})
    return results


if __name__ == "__main__":
    main()
