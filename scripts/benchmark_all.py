"""Every GPU figure of the project from one budgeted command (`make bench-gpu`).

    python scripts/benchmark_all.py --budget-s 380                       # GPU: docs/benchmarks/<gpu>.md and .json
    python scripts/benchmark_all.py --budget-s 380 --out $OUT/docs/benchmarks       # on the lent GPU machine
    python scripts/benchmark_all.py --preset cpu --budget-s 240 --out /tmp/rehearsal  # the CPU rehearsal
    python scripts/benchmark_all.py --stages sampling --set sampling.methods=pag,seg,sag    # a follow-up run

The stages run in the order of `STAGES`, each within its share of the budget:
  train_dit   DiT-XL/2 training step, 256 px, batch 128, bf16, eager and compiled (scripts/benchmark.py)
  sampling    the shared sampler on DiT-XL/2, batch 128, every method compiled (scripts/benchmark_sampling.py)
  inception   Inception-v3 features at 299 px, random weights, from uint8 images (scripts/benchmark_eval.py)
  prdc_fid    PRDC and FID statistics of 50k x 50k random 2048-d features (scripts/benchmark_eval.py)
  mmdit       MMDiT depth 12 and 16 training steps (scripts/benchmark_mmdit.py)
  loader      the latent-shard loader vs the training step rate (scripts/benchmark_loader.py)
  diffusers   ERG vs CFG, Flux.1-dev's real transformer (random weights), 1024 px (scripts/benchmark_diffusers.py)

Budget. A stage starting with L seconds left gets L x its share / the shares of the stages still to
run (time a stage leaves unused goes to the next ones), at least its `min_s`. Inside a stage, each
item (a mode, a method, a worker count) is estimated before it starts and skipped with a line if it
would not fit; the estimates count torch.compile's cost (`compile_s` of each stage's sizes: tens of
seconds per graph of DiT-XL/2 on an H100 / H200) until a compilation has been measured. A stage that
runs past 1.5 x its allowance (never past the budget's end, nor into the minimum the stages after
it need) is stopped; a stage left less than its `min_s` is skipped with a line.

Isolation. Each stage runs in a child process forked from this one (the imports are paid once; this
process never touches CUDA, so each child initialises it cleanly) and leads its own process group,
so a stage that is stopped takes its compile workers and loader workers with it. An error, an
out-of-memory or a crash is recorded for that stage and the next one runs. The child reports after
every item, and the JSON and the tables are rewritten (atomically) every few seconds and after every
stage, so a run killed from outside keeps everything measured up to then.

Output: <out>/<name>.json (environment, every stage's sizes, status, seconds and results) and
<out>/<name>.md (the GPU, torch and CUDA versions, the date, one table per figure), printed too.
<name> is the GPU's name in lower case (`nvidia-h200`), or `cpu`. A run of some stages (--stages)
keeps the other stages of an existing file as they were. The CPU rehearsal (--preset cpu) runs the
same stages with tiny sizes and torch.compile's `eager` backend (dynamo traces the same graphs,
without generating code), so that the GPU run cannot fail on a typo; it never writes into docs/.

To add a benchmark (e.g. scripts/benchmark_diffusers.py): give its script a config dataclass, a
`run(config, device, budget, report)` and a `markdown(...)`, as the others have, then add one
`Stage` entry to `STAGES` with its sizes for the GPU run and for the rehearsal.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as dt
import importlib.metadata
import json
import multiprocessing
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# This process forks one child per stage and must leave CUDA untouched: with this, a library that asks
# torch.cuda.is_available() while being imported asks NVML instead of initialising the CUDA driver,
# which a forked child could not use any more.
os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.io import atomic_write_text
from scripts import (
    benchmark,
    benchmark_diffusers,
    benchmark_eval,
    benchmark_loader,
    benchmark_mmdit,
    benchmark_sampling,
)
from scripts.benchmark import Budget

ROOT = Path(__file__).resolve().parents[1]

SCHEMA = 1
OVERRUN = 1.5  # a stage is stopped at this multiple of its allowance
POLL_S = 5.0  # how often the parent rewrites the files while a stage runs
START_S = 1.0  # kept free per later stage on top of its min_s: forking it, writing the files


@dataclass
class Context:
    """What a stage's run function gets: the device, its budget, the results of the stages that ran
    before it in this run (by name), and `report(partial)` to call after every item."""

    device: str
    budget: Budget
    earlier: dict[str, dict]
    report: Callable[[dict], None]


@dataclass(frozen=True)
class Stage:
    """One benchmark of the run. `config` is its script's sizes dataclass; `gpu` and `cpu` are the sizes
    of the GPU run and of the CPU rehearsal (the rest are the dataclass's defaults). `run(config, ctx)`
    returns a JSON-able result; `table(result, config, device_name)` renders it (also a partial one)."""

    name: str
    title: str
    config: type
    share: float
    min_s: float
    gpu: dict[str, Any]
    cpu: dict[str, Any]
    run: Callable[[Any, Context], dict]
    table: Callable[[dict, Any, str], str]


# --- the stages: thin adapters over the scripts' run / markdown functions -------------------------------
def _rows(ctx: Context) -> Callable[[list[dict]], None]:
    return lambda rows: ctx.report({"results": rows})


def run_train_dit(cfg: benchmark.TrainBench, ctx: Context) -> dict:
    return {"results": benchmark.run(cfg, ctx.device, ctx.budget, _rows(ctx))}


def run_sampling(cfg: benchmark_sampling.SamplingBench, ctx: Context) -> dict:
    results = benchmark_sampling.run(cfg, ctx.device, ctx.budget, _rows(ctx))
    return {"results": results, "ratios": benchmark_sampling.ratios(results)}


def run_inception(cfg: benchmark_eval.EvalBench, ctx: Context) -> dict:
    return benchmark_eval.run(cfg, ctx.device, ctx.budget, ctx.report, parts=("inception",))


def run_prdc_fid(cfg: benchmark_eval.EvalBench, ctx: Context) -> dict:
    return benchmark_eval.run(cfg, ctx.device, ctx.budget, ctx.report, parts=("prdc", "fid"))


def run_mmdit(cfg: benchmark_mmdit.MMDiTBench, ctx: Context) -> dict:
    return {"results": benchmark_mmdit.run(cfg, ctx.device, ctx.budget, _rows(ctx))}


def training_rate(earlier: dict[str, dict]) -> dict | None:
    """The fastest DiT training step measured earlier in this run (what the loader must keep up with)."""
    return benchmark_loader.fastest(earlier.get("train_dit", {}).get("results", []), "the train_dit stage of this run")


def run_loader(cfg: benchmark_loader.LoaderBench, ctx: Context) -> dict:
    train = training_rate(ctx.earlier)
    report = lambda rows: ctx.report({"results": rows, "train": train})
    return {"results": benchmark_loader.run(cfg, ctx.budget, report), "train": train}


def run_diffusers(cfg: benchmark_diffusers.DiffusersBench, ctx: Context) -> dict:
    results = benchmark_diffusers.run(cfg, ctx.device, ctx.budget, _rows(ctx))
    return {"results": results, "erg_over_cfg": benchmark_diffusers.ratio(results)}


def _list_table(markdown: Callable) -> Callable[[dict, Any, str], str]:
    return lambda result, cfg, device: markdown(result.get("results", []), cfg, device)


def _eval_table(result: dict, cfg: Any, device: str) -> str:
    return benchmark_eval.markdown({"device": device, "torch": torch.__version__, **result})


def _loader_table(result: dict, cfg: Any, device: str) -> str:
    return benchmark_loader.markdown(result.get("results", []), cfg, result.get("train"))


# Sizes of the GPU run (the figures) and of the CPU rehearsal. The compile_s values are
# estimates, not measurements (tens of seconds per DiT-XL/2 graph on an H100 / H200 for inductor,
# forward + backward about twice a forward): they only decide whether the first compiled item of a
# stage is started; later ones use the compilation time measured before them. The first GPU run's
# warm-up columns give the real figures: update these from them. Shares sum to 1; the sampling stage
# gets the most because each method compiles its own graphs.
# Methods in the order they are worth the budget: CFG and ERG first (their ratio is a target).
SAMPLING_ORDER = ("cfg", "erg", "none", "i_erg", "c_erg", "apg", "cads", "pag", "seg", "sag", "autoguidance",
                  "erg_apg", "erg_cads")  # fmt: skip
assert sorted(SAMPLING_ORDER) == sorted(benchmark_sampling.METHODS)
TINY_DIT = {"arch": "DiT-S/8", "depth": 2, "input_size": 16, "num_classes": 10, "bf16": False}
TINY_COMPILE = {"compile_backend": "eager", "compile_s": 0.0}

STAGES: list[Stage] = [
    Stage(
        "train_dit", "DiT-XL/2 training step, 256 px, batch 128, bf16", benchmark.TrainBench, share=0.30, min_s=20,
        gpu={"arch": "DiT-XL/2", "batch_sizes": (128,), "modes": ("eager", "compile"), "steps": 12, "warmup": 3,
             "compile_s": 60.0},
        cpu={**TINY_DIT, **TINY_COMPILE, "batch_sizes": (2,), "steps": 1, "warmup": 0},
        run=run_train_dit, table=_list_table(benchmark.markdown),
    ),
    Stage(
        "sampling", "Sampling DiT-XL/2, batch 128, every guidance method, compiled", benchmark_sampling.SamplingBench,
        share=0.28, min_s=40,
        gpu={"arch": "DiT-XL/2", "batch_size": 128, "steps": 20, "repeats": 2, "methods": SAMPLING_ORDER,
             "modes": ("compile",), "compile_s": 30.0},
        cpu={**TINY_DIT, **TINY_COMPILE, "batch_size": 2, "steps": 2, "repeats": 1, "methods": SAMPLING_ORDER,
             "compile_methods": ("cfg", "erg"), "modes": ("eager", "compile")},
        run=run_sampling, table=_list_table(benchmark_sampling.markdown),
    ),
    Stage(
        "inception", "Inception-v3 features at 299 px (random weights), from uint8 images", benchmark_eval.EvalBench,
        share=0.05, min_s=10,
        gpu={"image_size": 299, "batch_size": 500, "inception_images": 10_000, "warmup": 2,
             "sources": ("host", "device")},
        cpu={"image_size": 32, "batch_size": 2, "inception_images": 2, "warmup": 0, "sources": ("host", "device")},
        run=run_inception, table=_eval_table,
    ),
    Stage(
        "prdc_fid", "PRDC and FID statistics, 50k x 50k random 2048-d features", benchmark_eval.EvalBench,
        share=0.10, min_s=15,
        gpu={"prdc_n": 50_000, "prdc_dim": 2048, "chunk_size": 8192, "fid_batch": 10_000},
        cpu={"prdc_n": 64, "prdc_dim": 16, "chunk_size": 20, "fid_batch": 24},
        run=run_prdc_fid, table=_eval_table,
    ),
    Stage(
        "mmdit", "MMDiT training step, depth 12 and 16, 256 px, batch 128, bf16", benchmark_mmdit.MMDiTBench,
        share=0.15, min_s=15,
        gpu={"archs": ("MMDiT-d12", "MMDiT-d16"), "batch_size": 128, "steps": 10, "warmup": 3,
             "modes": ("eager", "compile"), "compile_s": 45.0},
        cpu={**TINY_COMPILE, "archs": ("MMDiT-d2",), "input_size": 8, "channels": 4, "context_tokens": 4,
             "context_dim": 16, "pooled_dim": 8, "batch_size": 2, "steps": 1, "warmup": 0, "bf16": False},
        run=run_mmdit, table=_list_table(benchmark_mmdit.markdown),
    ),
    Stage(
        "loader", "Latent-shard loader vs the training step rate", benchmark_loader.LoaderBench, share=0.06, min_s=10,
        gpu={"synthetic_samples": 8192, "samples_per_shard": 512, "shape": (4, 32, 32), "workers": (8, 16),
             "batch_size": 128, "shuffle_buffer": 5000, "batches": 100, "warmup": 10},
        cpu={"synthetic_samples": 64, "samples_per_shard": 16, "shape": (4, 8, 8), "workers": (1,), "batch_size": 4,
             "shuffle_buffer": 8, "batches": 3, "warmup": 1},
        run=run_loader, table=_loader_table,
    ),
    Stage(  # last: it gets what the others leave; 8 steps keep a 12B forward per step affordable
        "diffusers", "Sampling Flux.1-dev (real transformer, random weights), 1024 px: ERG vs CFG",
        benchmark_diffusers.DiffusersBench, share=0.06, min_s=40,
        gpu={"family": "flux_dev", "size": "real", "methods": ("cfg", "erg"), "steps": 8, "batch_size": 1,
             "repeats": 1},
        cpu={"family": "flux_dev", "size": "tiny", "methods": ("cfg", "erg"), "steps": 2, "batch_size": 2,
             "repeats": 1},
        run=run_diffusers, table=_list_table(benchmark_diffusers.markdown),
    ),
]  # fmt: skip


# --- configuration ---------------------------------------------------------------------------------------
class UsageError(ValueError):
    """Bad command-line input: printed as one line, exit status 2."""


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        if "," in text:
            return [_parse_value(v) for v in text.split(",") if v]
        return text


def stage_configs(stages: list[Stage], preset: str, overrides: list[str]) -> dict[str, Any]:
    """Each stage's config: its preset's sizes, then `--set stage.key=value` overrides, validated here
    (before anything runs) by the config dataclass itself."""
    sizes = {s.name: dict(getattr(s, preset)) for s in stages}
    by_name = {s.name: s for s in stages}
    for item in overrides:
        key, eq, text = item.partition("=")
        stage, dot, field = key.partition(".")
        if not (eq and dot):
            raise UsageError(f"--set {item}: write --set STAGE.KEY=VALUE, e.g. --set sampling.steps=50")
        if stage not in by_name:
            raise UsageError(f"--set {item}: no stage {stage!r}; stages: {', '.join(by_name)}")
        names = {f.name: f for f in dataclasses.fields(by_name[stage].config)}
        if field not in names:
            raise UsageError(f"--set {item}: stage {stage} has no size {field!r}; sizes: {', '.join(names)}")
        value = _parse_value(text)
        default = names[field].default
        if isinstance(default, tuple) or isinstance(sizes[stage].get(field), tuple):
            value = tuple(value) if isinstance(value, list) else (value,)
        sizes[stage][field] = value
    configs = {}
    for s in stages:
        try:
            configs[s.name] = s.config(**sizes[s.name])
        except (TypeError, ValueError) as err:
            raise UsageError(f"stage {s.name}: {err}") from err
    return configs


def slug(name: str) -> str:
    """A file name for a device name: 'NVIDIA H200' -> 'nvidia-h200'."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "device"


# --- environment -------------------------------------------------------------------------------------------
def probe(device: str) -> dict:
    """Where the figures come from (runs in a child: it initialises CUDA)."""
    env: dict[str, Any] = {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "host": platform.node(),
        "cpu_cores": os.cpu_count(),
        "packages": {},
    }
    for pkg in ("lightning", "triton", "numpy", "scipy", "torch-fidelity", "transformers"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            env["packages"][pkg] = importlib.metadata.version(pkg)
    if device == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("no CUDA device is visible: the GPU run needs one (the CPU rehearsal: --preset cpu)")
        props = torch.cuda.get_device_properties(0)
        env.update(
            device=props.name,
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
            capability=f"{props.major}.{props.minor}",
            cudnn=torch.backends.cudnn.version(),
            driver=_driver_version(),
        )
    else:
        env["device"] = benchmark.setup_device("cpu")[1]
    return env


def _driver_version() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20, check=True)  # fmt: skip
        return out.stdout.strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        return None


# --- running a stage in a child process ---------------------------------------------------------------------
def _child(fn: Callable[[Callable[[dict], None]], dict], result_file: Path) -> None:
    """Runs in the forked child: fn(report) with every partial result and the outcome written to `result_file`."""
    os.setpgrp()  # its own process group: the parent stops compile / loader workers with it
    state: dict[str, Any] = {}

    def report(partial: dict) -> None:
        state["result"] = partial
        atomic_write_text(result_file, json.dumps(state))

    try:
        state["result"] = fn(report)
        state["done"] = True
        atomic_write_text(result_file, json.dumps(state))
    except BaseException as err:
        traceback.print_exc()
        if isinstance(err, torch.cuda.OutOfMemoryError):
            state["error"] = "out of GPU memory"
        else:
            first = (str(err).strip().splitlines() or [""])[0][:400]
            state["error"] = f"{type(err).__name__}: {first}"
        atomic_write_text(result_file, json.dumps(state))
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)


def _kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, signal.SIGKILL)


def run_isolated(
    fn: Callable[[Callable[[dict], None]], dict],
    deadline_s: float,
    workdir: Path,
    on_progress: Callable[[dict], None] | None = None,
) -> dict:
    """fn(report) in a forked child, stopped after `deadline_s`. Returns {"status": ok | failed | killed,
    "note", "seconds", "result"} with whatever the child reported last; `on_progress(partial)` is called
    (at most every POLL_S seconds) when the child has reported something new."""
    result_file = workdir / f"result-{time.monotonic_ns()}.json"
    ctx = multiprocessing.get_context("fork")
    proc = ctx.Process(target=_child, args=(fn, result_file), daemon=False)
    start = time.monotonic()
    proc.start()
    seen = None
    try:
        while proc.is_alive() and time.monotonic() - start < deadline_s:
            proc.join(min(POLL_S, max(deadline_s - (time.monotonic() - start), 0.01)))
            stamp = result_file.stat().st_mtime_ns if result_file.exists() else None
            if on_progress and stamp != seen and proc.is_alive():
                seen = stamp
                on_progress(_read(result_file).get("result") or {})
    except BaseException:  # interrupted (Ctrl-C, SIGTERM): the child leads its own group, stop it too
        _kill_group(proc.pid)
        raise
    killed = proc.is_alive()
    if killed:
        _kill_group(proc.pid)
        proc.join()
    _kill_group(proc.pid)  # whatever the child left behind (compile workers, loader workers)
    seconds = time.monotonic() - start
    state = _read(result_file)
    result_file.unlink(missing_ok=True)
    out = {"seconds": round(seconds, 1), "result": state.get("result") or {}}
    if killed:
        return {**out, "status": "killed", "note": f"stopped at its deadline after {seconds:.0f} s; what it had "
                                                   "measured is kept"}  # fmt: skip
    if state.get("done") and proc.exitcode == 0:
        return {**out, "status": "ok", "note": ""}
    code = proc.exitcode
    died = f"died of signal {-code}" if code is not None and code < 0 else f"exited with status {code}"
    return {**out, "status": "failed", "note": state.get("error") or f"the stage's process {died}"}


def _read(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


# --- the run ---------------------------------------------------------------------------------------------------
def now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def allowances(left: float, stage: Stage, later: list[Stage]) -> tuple[float, float]:
    """(allowance, deadline) of a stage that starts with `left` seconds, `later` stages to come: its share
    of what is left, but not what the later stages need at least (their min_s, plus a second each for
    starting), unless its own minimum needs it; it is stopped at 1.5 x that, within the same limits."""
    share = stage.share / (stage.share + sum(s.share for s in later))
    reserve = sum(s.min_s + START_S for s in later)
    allowance = max(min(left * share, left - reserve), min(stage.min_s, left))
    deadline = max(allowance, min(OVERRUN * allowance, left - reserve))
    return allowance, deadline


def render(doc: dict) -> str:
    """The markdown file: the environment, a summary of the stages, then one section per stage."""
    env = doc["env"]
    gpu = ""
    if env.get("gpu_memory_gib"):
        gpu = f" ({env['gpu_memory_gib']} GiB, compute capability {env['capability']}, driver {env.get('driver')})"
    cudnn = f", cuDNN {env['cudnn']}" if env.get("cudnn") else ""
    lines = [
        f"# Benchmarks: {env['device']}",
        "",
        f"Measured {doc['started']} (UTC) by `{doc['command']}` (preset {doc['preset']}): **{env['device']}**{gpu}, "
        f"torch {env['torch']}, CUDA {env['cuda']}{cudnn}, Python {env['python']}, {env['cpu_cores']} CPU cores. "
        f"Budget {doc['budget_s']:.0f} s, spent {doc.get('spent_s', 0):.0f} s. Random weights and synthetic data: "
        "the figures are speed and memory only. Raw results: the JSON file beside this one.",
        "",
        "| stage | status | seconds | allowed (s) | note |",
        "|---|---|---:|---:|---|",
    ]
    for name, e in doc["stages"].items():
        note = e.get("note", "").replace("|", "/")
        lines.append(f"| {name} | {e['status']} | {e.get('seconds', 0)} | {e.get('allowance_s', '')} | {note} |")
    for e in doc["stages"].values():
        lines += ["", f"## {e['title']}", ""]
        if e.get("kept"):
            lines += [f"(kept from the run of {e.get('measured_at')}, torch {e.get('torch')}: not run this time)", ""]
        if e["status"] != "ok":
            lines += [f"**{e['status']}**{': ' + e['note'] if e.get('note') else ''}", ""]
        if e.get("table"):
            lines.append(e["table"].rstrip())
    return "\n".join(lines) + "\n"


def write_outputs(doc: dict, out_dir: Path) -> tuple[Path, Path]:
    """<out>/<name>.json, then <out>/<name>.md, each written atomically."""
    json_path, md_path = out_dir / f"{doc['name']}.json", out_dir / f"{doc['name']}.md"
    atomic_write_text(json_path, json.dumps(doc, indent=2))
    atomic_write_text(md_path, render(doc))
    return json_path, md_path


def run_all(
    stages: list[Stage],
    configs: dict[str, Any],
    preset: str,
    budget_s: float,
    out_dir: Path | None,
    name: str | None,
    command: str,
) -> int:
    """Probe the environment, run the stages, write and print the files. Exit status: 0 if every stage
    ran or was skipped for the budget, 1 if one failed or was stopped, 2 if nothing could run."""
    start = time.monotonic()
    end = start + budget_s
    device = "cuda" if preset == "gpu" else "cpu"
    if torch.cuda.is_initialized():
        raise RuntimeError("CUDA was initialised before the stages were forked: their CUDA calls would fail")
    with tempfile.TemporaryDirectory(prefix="benchmark_all_") as tmp:
        workdir = Path(tmp)
        probed = run_isolated(lambda report: probe(device), min(60.0, budget_s), workdir)
        if probed["status"] != "ok":
            print(f"benchmark_all: cannot start: {probed['note']}", file=sys.stderr)
            return 2
        env = probed["result"]
        name = name or ("cpu" if preset == "cpu" else slug(env["device"]))
        if out_dir is None:
            out_dir = ROOT / ("docs/benchmarks" if preset == "gpu" else "runs/bench-cpu")
        doc = {"schema": SCHEMA, "name": name, "preset": preset, "command": command, "budget_s": budget_s,
               "started": now(), "env": env, "stages": {}}  # fmt: skip
        kept = _earlier_stages(out_dir / f"{name}.json", {s.name for s in stages})
        print(f"benchmark_all: {env['device']}, torch {env['torch']}, budget {budget_s:.0f} s, writing {out_dir}/"
              f"{name}.{{md,json}}", flush=True)  # fmt: skip
        earlier: dict[str, dict] = {}
        failed = False
        for i, stage in enumerate(stages):
            cfg = configs[stage.name]
            entry = {"title": stage.title, "status": "skipped", "note": "", "seconds": 0.0,
                     "sizes": dataclasses.asdict(cfg), "measured_at": now(), "torch": env["torch"]}  # fmt: skip
            doc["stages"][stage.name] = entry
            left = end - time.monotonic()
            if left <= max(stage.min_s, 0.0):
                entry["note"] = f"skipped: needs at least {stage.min_s:.0f} s, {max(left, 0):.0f} s left"
            else:
                allowance, deadline = allowances(left, stage, stages[i + 1 :])
                entry.update(allowance_s=round(allowance), deadline_s=round(deadline), status="running")
                print(f"\n== {stage.name}: {stage.title} (allowed {allowance:.0f} s, stopped at {deadline:.0f} s)",
                      flush=True)  # fmt: skip

                def progress(partial: dict, entry: dict = entry, stage: Stage = stage, cfg: Any = cfg) -> None:
                    entry.update(result=partial, table=_table(stage, partial, cfg, env["device"]))
                    _finish(doc, kept, start, out_dir)

                def fn(report, stage=stage, cfg=cfg, allowance=allowance) -> dict:
                    if preset == "cpu":  # tiny sizes: one thread beats two that wait for each other on a busy CPU
                        torch.set_num_threads(1)
                    return stage.run(cfg, Context(device, Budget(allowance), earlier, report))

                outcome = run_isolated(fn, deadline, workdir, progress)
                entry.update(outcome)
                failed |= outcome["status"] in ("failed", "killed")
                earlier[stage.name] = outcome["result"]
            entry["table"] = _table(stage, entry.get("result") or {}, cfg, env["device"])
            _finish(doc, kept, start, out_dir)
            print(f"-- {stage.name}: {entry['status']} after {entry['seconds']} s {entry['note']}".rstrip(), flush=True)
            if entry["table"]:
                print(entry["table"], flush=True)
        doc["finished"] = now()
        full, json_path, md_path = _finish(doc, kept, start, out_dir)
    print("\n" + render(full))  # the kept stages too, as the files
    print(f"benchmark_all: wrote {md_path} and {json_path}", flush=True)
    return 1 if failed else 0


def _table(stage: Stage, result: dict, cfg: Any, device_name: str) -> str:
    if not result:
        return ""
    try:
        return stage.table(result, cfg, device_name)
    except Exception as err:  # a partial result the table cannot show yet must not stop the run
        return f"(no table: {type(err).__name__}: {err})"


def _earlier_stages(path: Path, running: set[str]) -> dict[str, dict]:
    """Stages of an existing results file that this run does not run (kept as they were)."""
    old = _read(path)
    if old.get("schema") != SCHEMA:
        return {}
    return {k: {**v, "kept": True} for k, v in old.get("stages", {}).items() if k not in running}


def _finish(doc: dict, kept: dict, start: float, out_dir: Path) -> tuple[dict, Path, Path]:
    """Write the files: this run's stages and the kept ones, in the order of STAGES. Returns that merged
    document (what the files hold; `doc` itself keeps only this run's stages) and the two paths."""
    doc["spent_s"] = round(time.monotonic() - start, 1)
    merged = {**kept, **doc["stages"]}
    order = [s.name for s in STAGES]
    full = {**doc, "stages": dict(sorted(merged.items(), key=lambda kv: order.index(kv[0]) if kv[0] in order
                                         else len(order)))}  # fmt: skip
    return (full, *write_outputs(full, out_dir))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budget-s", type=float, default=380.0, help="seconds for the probe and every stage")
    p.add_argument("--preset", choices=["gpu", "cpu"], default="gpu", help="gpu: the real sizes; cpu: the rehearsal")
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="folder of <name>.md and <name>.json (default: docs/benchmarks, or runs/bench-cpu for cpu)",
    )
    p.add_argument("--name", default=None, help="file name without extension (default: the GPU's name, or cpu)")
    p.add_argument("--stages", nargs="+", default=None, help=f"run only these ({', '.join(s.name for s in STAGES)})")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="STAGE.KEY=VALUE",
                   help="change a stage's size, e.g. --set sampling.steps=50 (lists: comma-separated)")  # fmt: skip
    return p.parse_args(argv)


def main(argv: list[str] | None = None, stages: list[Stage] | None = None) -> int:
    args = parse_args(argv)
    stages = STAGES if stages is None else stages
    try:
        if not args.budget_s > 0:
            raise UsageError(f"--budget-s must be > 0, got {args.budget_s}")
        configs = stage_configs(stages, args.preset, args.overrides)
        if args.stages is not None:
            unknown = sorted(set(args.stages) - {s.name for s in stages})
            if unknown:
                raise UsageError(f"--stages: no stage {unknown}; stages: {', '.join(s.name for s in stages)}")
            stages = [s for s in stages if s.name in args.stages]
    except UsageError as err:
        print(f"benchmark_all: {err}", file=sys.stderr)
        return 2
    command = "python scripts/benchmark_all.py " + " ".join(sys.argv[1:] if argv is None else argv)
    return run_all(stages, configs, args.preset, args.budget_s, args.out, args.name, command.strip())


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a stopped run stops the running stage too
    sys.exit(main())
