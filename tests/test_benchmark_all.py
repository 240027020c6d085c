"""scripts/benchmark_all.py: the budgeted runner of every GPU figure.

The CPU rehearsal runs the real command (every stage, tiny sizes) in a subprocess where wandb and
tensorboard cannot be imported, as on the GPU machine, so the GPU run cannot fail on a typo. The
runner's own rules (isolation, deadlines, skips, kept stages, bad input) are checked with fake stages.
The GPU figures themselves are not measured here.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from scripts import benchmark
from scripts.benchmark import Budget, TrainBench, compare_outputs
from scripts.benchmark_all import STAGES, Stage, allowances, main, stage_configs
from scripts.benchmark_sampling import METHODS

ROOT = Path(__file__).resolve().parents[1]


# --- the rehearsal ---------------------------------------------------------------------------------------
def test_cpu_rehearsal_runs_every_stage_without_wandb_or_tensorboard(tmp_path):
    shim = tmp_path / "shim"
    for name in ("wandb", "tensorboard"):
        (shim / name).mkdir(parents=True)
        (shim / name / "__init__.py").write_text(f"raise ImportError('{name} is not on the GPU machine (test shim)')\n")
    env = {**os.environ, "PYTHONPATH": f"{shim}{os.pathsep}{ROOT}"}
    probe = subprocess.run([sys.executable, "-c", "import wandb"], env=env, capture_output=True, text=True)
    assert probe.returncode != 0 and "test shim" in probe.stderr  # the shim does block the import

    out = tmp_path / "bench"
    cmd = [sys.executable, str(ROOT / "scripts/benchmark_all.py"), "--preset", "cpu", "--budget-s", "600",
           "--out", str(out)]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ["cpu.json", "cpu.md"]  # nothing half-written left
    doc = json.loads((out / "cpu.json").read_text())
    stages = doc["stages"]
    assert list(stages) == [s.name for s in STAGES]
    assert {name: e["status"] for name, e in stages.items()} == {s.name: "ok" for s in STAGES}
    assert doc["env"]["torch"] == torch.__version__ and doc["preset"] == "cpu"

    train = stages["train_dit"]["result"]["results"]
    assert [r["mode"] for r in train] == ["eager", "compile"] and train[1]["compiled_matches_eager"]
    assert train[1]["graphs_compiled"] >= 1 and not train[1]["check_recompiled"]  # the check reuses training's graph
    sampling = stages["sampling"]["result"]
    measured = [(r["mode"], r["method"]) for r in sampling["results"] if "image_steps_per_s" in r]
    assert measured == [("eager", m) for m in STAGES[1].cpu["methods"]] + [("compile", "cfg"), ("compile", "erg")]
    assert set(sampling["ratios"]) == {"eager", "compile"}
    graphs = {r["method"]: r["graphs_compiled"] for r in sampling["results"] if r["mode"] == "compile"}
    assert graphs["cfg"] >= 1 and graphs["erg"] >= 2  # ERG: plain steps before the kickoff, rectified after
    inception = stages["inception"]["result"]
    assert [r["source"] for r in inception["inception"]] == ["host", "device"] and inception["inception_random_weights"]
    features = stages["prdc_fid"]["result"]
    assert features["fid"]["sqrtm_value"] == pytest.approx(features["fid"]["eigh_value"], rel=1e-9)
    assert 0 <= features["prdc"]["coverage"] <= 1
    mmdit = stages["mmdit"]["result"]["results"]
    assert [r["mode"] for r in mmdit] == ["eager", "compile"] and mmdit[1]["compiled_matches_eager"]
    assert not mmdit[1]["check_recompiled"]
    loader = stages["loader"]["result"]
    assert loader["results"][0]["samples_per_s"] > 0
    assert loader["train"]["img_per_s"] == max(r["img_per_s"] for r in train)  # the rate measured in this run
    diffusers = stages["diffusers"]["result"]
    assert [(r["method"], r["forwards_per_step"], r["rows_per_forward"]) for r in diffusers["results"]] == [
        ("cfg", 1.0, 4), ("erg", 1.0, 4)]  # fmt: skip
    assert diffusers["erg_over_cfg"] > 0

    md = (out / "cpu.md").read_text()
    assert md.startswith("# Benchmarks: CPU") and f"torch {torch.__version__}" in md
    for stage in STAGES:
        assert f"## {stage.title}" in md
    assert "ERG / CFG wall time (compile)" in md and "| PRDC (k = 3) |" in md
    assert "| MMDiT-d2 | 2 x 128 |" in proc.stdout  # the tables are printed too


# --- the runner's rules, with fake stages ------------------------------------------------------------------
@dataclass(frozen=True)
class Fake:
    behave: str = "ok"  # ok | raise | sleep | crash
    seconds: float = 0.0


def fake_run(cfg: Fake, ctx) -> dict:
    ctx.report({"rows": ["first"]})
    if cfg.behave == "raise":
        raise ValueError("bad size\nsecond line of the message")
    if cfg.behave == "sleep":
        time.sleep(cfg.seconds)
    if cfg.behave == "crash":
        os.kill(os.getpid(), signal.SIGKILL)  # as the kernel's OOM killer would
    return {"rows": ["first", "second"], "left": ctx.budget.left(), "earlier": sorted(ctx.earlier)}


def fake_table(result: dict, cfg: Fake, device: str) -> str:
    return "| rows |\n|---|\n" + "".join(f"| {r} |\n" for r in result["rows"])


def fake(name: str, share: float = 1.0, min_s: float = 0.0, **sizes) -> Stage:
    return Stage(name, f"Fake {name}", Fake, share, min_s, gpu={}, cpu=sizes, run=fake_run, table=fake_table)


def run_fake(stages: list[Stage], out: Path, *args: str) -> tuple[int, dict, str]:
    code = main(["--preset", "cpu", "--out", str(out), "--name", "fake", *args], stages=stages)
    return code, json.loads((out / "fake.json").read_text()), (out / "fake.md").read_text()


def test_a_failing_or_crashing_stage_is_recorded_and_the_next_one_runs(tmp_path):
    stages = [fake("a"), fake("b", behave="raise"), fake("c", behave="crash"), fake("d")]
    code, doc, md = run_fake(stages, tmp_path, "--budget-s", "60")
    e = doc["stages"]
    assert code == 1
    assert [e[n]["status"] for n in "abcd"] == ["ok", "failed", "failed", "ok"]
    assert e["b"]["note"] == "ValueError: bad size"  # one line
    assert e["b"]["result"] == {"rows": ["first"]} and "| first |" in e["b"]["table"]  # what it had reported
    assert e["c"]["note"] == f"the stage's process died of signal {int(signal.SIGKILL)}"
    assert e["d"]["result"]["earlier"] == ["a", "b", "c"]
    assert "**failed**: ValueError: bad size" in md and "| second |" in md


def test_a_stage_past_its_deadline_is_stopped_and_keeps_what_it_measured(tmp_path):
    """8 s, two stages of equal shares: the first may use ~4 s, and is stopped at 1.5 x that unless
    it would eat into the 2 s (+ 1 s to start) that the second needs at least: at ~5 s."""
    stages = [fake("slow", behave="sleep", seconds=60), fake("after", min_s=2)]
    start = time.monotonic()
    code, doc, md = run_fake(stages, tmp_path, "--budget-s", "8")
    assert time.monotonic() - start < 20
    slow, after = doc["stages"]["slow"], doc["stages"]["after"]
    assert code == 1 and slow["status"] == "killed" and slow["result"] == {"rows": ["first"]}
    assert slow["allowance_s"] == 4 and slow["deadline_s"] == 5 and 4.5 < slow["seconds"] < 7
    assert after["status"] == "ok" and 2 <= after["result"]["left"] <= 3.1
    assert "**killed**: stopped at its deadline" in md


def test_a_stage_that_would_not_fit_is_skipped_with_a_line(tmp_path):
    code, doc, md = run_fake([fake("big", min_s=1000), fake("small")], tmp_path, "--budget-s", "30")
    big = doc["stages"]["big"]
    assert code == 0 and big["status"] == "skipped" and big["note"].startswith("skipped: needs at least 1000 s, ")
    assert doc["stages"]["small"]["status"] == "ok"
    assert "| big | skipped |" in md


def test_a_run_of_some_stages_keeps_the_others(tmp_path, capsys):
    stages = [fake("a"), fake("b")]
    run_fake(stages, tmp_path, "--budget-s", "30")
    first = json.loads((tmp_path / "fake.json").read_text())["stages"]
    capsys.readouterr()
    code, doc, md = run_fake(stages, tmp_path, "--budget-s", "30", "--stages", "b")
    printed = capsys.readouterr().out
    assert md.rstrip() in printed  # the printout is the file: the kept stage a included
    assert code == 0 and list(doc["stages"]) == ["a", "b"]
    assert doc["stages"]["a"]["result"] == first["a"]["result"] and doc["stages"]["a"]["kept"]
    assert "kept" not in doc["stages"]["b"]
    assert "(kept from the run of" in md.split("## Fake a")[1].split("## Fake b")[0]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--set", "train_dit.stepz=3"], "stage train_dit has no size 'stepz'"),
        (["--set", "trane.steps=3"], "no stage 'trane'"),
        (["--set", "sampling.methods=cfg,erk"], "unknown guidance method(s) ['erk']"),
        (["--set", "steps"], "write --set STAGE.KEY=VALUE"),
        (["--stages", "train", "--budget-s", "10"], "--stages: no stage ['train']"),
        (["--budget-s", "0"], "--budget-s must be > 0"),
    ],
)
def test_bad_input_is_one_line_and_status_2(args, message, capsys, tmp_path):
    assert main(["--preset", "cpu", "--out", str(tmp_path), *args]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not any(tmp_path.iterdir())  # nothing ran, nothing written


def test_set_overrides_reach_the_stage_configs():
    configs = stage_configs(STAGES, "gpu", ["sampling.methods=cfg,erg", "train_dit.steps=20", "sampling.modes=eager"])
    assert configs["sampling"].methods == ("cfg", "erg") and configs["sampling"].modes == ("eager",)
    assert configs["train_dit"].steps == 20 and configs["train_dit"].batch_sizes == (128,)


def test_gpu_sizes_are_the_issues():
    """The GPU run measures what issue 13 names: DiT-XL/2 at 256 px (32x32 latents), batch 128, bf16, eager
    and compiled; every sampling method compiled, CFG and ERG first; Inception at 299 px from host uint8
    images; 50k x 50k 2048-d features; MMDiT depth 12 and 16."""
    cfg = stage_configs(STAGES, "gpu", [])
    t = cfg["train_dit"]
    assert (t.arch, t.depth, t.input_size, t.channels, t.batch_sizes, t.modes) == (
        "DiT-XL/2", None, 32, 4, (128,), ("eager", "compile"))  # fmt: skip
    assert t.bf16 and t.compile_backend == "inductor"
    s = cfg["sampling"]
    assert (s.arch, s.batch_size, s.modes, s.compile_methods, s.bf16) == ("DiT-XL/2", 128, ("compile",), None, True)
    assert s.methods[:2] == ("cfg", "erg") and sorted(s.methods) == sorted(METHODS)
    assert (cfg["inception"].image_size, cfg["inception"].sources[0]) == (299, "host")
    assert (cfg["prdc_fid"].prdc_n, cfg["prdc_fid"].prdc_dim) == (50_000, 2048)
    assert cfg["mmdit"].archs == ("MMDiT-d12", "MMDiT-d16") and cfg["mmdit"].batch_size == 128
    assert sum(st.share for st in STAGES) == pytest.approx(1.0)


def test_allowances_share_what_is_left_and_keep_the_later_minimums():
    a, b, c = fake("a", share=0.5, min_s=10), fake("b", share=0.25, min_s=30), fake("c", share=0.25, min_s=9)
    assert allowances(100, a, [b, c]) == (50, 59)  # 1.5 x 50 = 75, but b and c need 30 + 9 (+ 1 s each)
    assert allowances(100, b, [c]) == (50, 75)
    assert allowances(40, b, [c]) == (30, 30)  # its own minimum, before c's
    assert allowances(20, b, [c]) == (20, 20)  # never past the end
    assert allowances(100, c, []) == (100, 100)


# --- the pieces the stages share ----------------------------------------------------------------------------
def test_compare_outputs_is_relative_and_never_passes_zeros_or_nans():
    e = torch.randn(4, 8, dtype=torch.float64)
    r = compare_outputs(e * 1.01, e, tol=0.02)
    assert r["compiled_vs_eager_rel_l2"] == pytest.approx(0.01, rel=1e-5) and r["compiled_matches_eager"]
    assert not compare_outputs(e * 1.03, e, tol=0.02)["compiled_matches_eager"]
    assert not compare_outputs(torch.zeros(3), torch.zeros(3), tol=1.0)["compiled_matches_eager"]
    assert not compare_outputs(torch.full((3,), float("nan")), torch.ones(3), tol=1.0)["compiled_matches_eager"]


def test_an_item_that_would_not_fit_is_skipped_inside_a_stage():
    """The compiled item's estimate (compile_s) does not fit: it becomes a row saying so; eager is measured."""
    cfg = TrainBench(arch="DiT-S/8", depth=1, input_size=16, num_classes=10, batch_sizes=(2,), steps=1, warmup=0,
                     bf16=False, compile_s=1e6)  # fmt: skip
    rows = benchmark.run(cfg, "cpu", Budget(600))
    assert rows[0]["mode"] == "eager" and rows[0]["img_per_s"] > 0
    assert rows[1]["mode"] == "compile" and rows[1]["skipped"].startswith("skipped: needs ~1000")
    assert "compile ~1000000 s" in rows[1]["skipped"]
    assert "| 2 | compile | skipped: needs ~" in benchmark.markdown(rows, cfg, "CPU")


def test_the_cuda_branch_of_the_probe_and_the_header(monkeypatch):
    """What only the GPU run executes, with torch.cuda answering as the H200 would: the environment, the
    file name, the header of the tables and the bf16 peak used for MFU."""
    from types import SimpleNamespace

    from scripts import benchmark_all

    props = SimpleNamespace(name="NVIDIA H200", total_memory=143771 * 2**20, major=9, minor=0)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: props)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: props.name)
    monkeypatch.setattr(torch.backends.cudnn, "version", lambda: 91002)
    monkeypatch.setattr(benchmark_all, "_driver_version", lambda: "580.159.04")
    env = benchmark_all.probe("cuda")
    assert (env["device"], env["gpu_memory_gib"], env["capability"], env["cudnn"]) == (
        "NVIDIA H200",
        140.4,
        "9.0",
        91002,
    )
    assert benchmark_all.slug(env["device"]) == "nvidia-h200"
    doc = {"name": "nvidia-h200", "preset": "gpu", "command": "python scripts/benchmark_all.py", "budget_s": 380,
           "started": "2026-12-01T00:00:00+00:00", "spent_s": 12.0, "env": env, "stages": {}}  # fmt: skip
    head = benchmark_all.render(doc).splitlines()[2]
    assert "**NVIDIA H200** (140.4 GiB, compute capability 9.0, driver 580.159.04)" in head
    assert f"torch {torch.__version__}, CUDA {torch.version.cuda}, cuDNN 91002" in head
    assert benchmark.peak_tflops(torch.device("cuda"), None) == 989.4
