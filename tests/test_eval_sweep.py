"""Sweeps (eval/sweep.py, scripts/sweep.py): the grid's points and names, overrides Hydra reads back as
written, and a real 2 x 2 sweep (sample.py's body on a tiny checkpoint, evaluate.py's body on digit
features) interrupted and rerun: it finishes only the missing shards and evaluations, and ends with the
same files as an uninterrupted sweep."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from data.sample_store import SampleStore
from eval.digits_net import DigitsFeatureNet, save_digits_net
from eval.records import read_records
from eval.sweep import Point, expand_grid, override_value, point_name, run, run_point, to_overrides
from models.runtime import ConfigError
from tests.conftest import CONFIGS, ROOT, compose
from tests.tiny_checkpoint import fake_checkpoint

GRID = {"cfg": {"scale": [2.0, 3.0]}, "erg": {"scale": [2.0, 3.0], "image": {"layers": [[1, 3]], "kappa": 0.2}}}
POINTS = [
    "cfg__scale-2.0",
    "cfg__scale-3.0",
    "erg__image.layers-1_3__scale-2.0",
    "erg__image.layers-1_3__scale-3.0",
]


# --- the grid --------------------------------------------------------------------------------------
def test_grid_points_are_the_product_of_each_methods_lists():
    points = expand_grid({
        "none": {},
        "cads": {"scale": [2.0, 4.0], "cads": {"tau1": [0.6, 0.8], "noise_scale": 0.25}},
        "erg": {"image": {"layers": [[2, 4], [1, 5]], "tau": 0.01}},
    })  # fmt: skip
    assert [p.name for p in points] == [
        "none",
        "cads__cads.tau1-0.6__scale-2.0", "cads__cads.tau1-0.8__scale-2.0",
        "cads__cads.tau1-0.6__scale-4.0", "cads__cads.tau1-0.8__scale-4.0",
        "erg__image.layers-2_4", "erg__image.layers-1_5",
    ]  # fmt: skip
    # fixed values go to every point of the method but not into its name
    assert points[1] == Point(
        "cads__cads.tau1-0.6__scale-2.0", "cads", {"cads.noise_scale": 0.25, "scale": 2.0, "cads.tau1": 0.6}
    )
    assert points[-1].settings == {"image.tau": 0.01, "image.layers": [1, 5]}
    # names do not depend on the order of the keys, and are Hydra-safe
    assert point_name("erg", {"scale": 2, "image.tau": 0.1}) == point_name("erg", {"image.tau": 0.1, "scale": 2})
    assert not any(c in p.name for p in points for c in "=, []")
    long = point_name("erg", {f"key{i}": "x" * 20 for i in range(10)})
    assert len(long) <= 150 and long != point_name("erg", {f"key{i}": "y" * 20 for i in range(10)})
    assert [p.name for p in expand_grid(GRID, ["erg"])] == POINTS[2:]


def test_grid_errors_name_the_fix():
    with pytest.raises(ConfigError, match="grid is empty"):
        expand_grid({})
    with pytest.raises(ConfigError, match=r"grid\.cfg\.scale is an empty list"):
        expand_grid({"cfg": {"scale": []}})
    with pytest.raises(ConfigError, match=r"grid\.ergg: no guidance config configs/guidance/ergg\.yaml"):
        expand_grid({"ergg": {"scale": [2.0]}})
    with pytest.raises(ConfigError, match=r"\['pag'\] not in the grid"):
        expand_grid(GRID, ["cfg", "pag"])
    with pytest.raises(ConfigError, match="same folder name"):
        expand_grid({"cfg": {"scale": [2.0, 2.0]}})


@pytest.mark.parametrize(
    "value", ["plain", "with space", "it's", "1.0", "true", "null", "a=b,c", "runs/x/last.ckpt", "/abs/p-1.ckpt",
              1, -2.5, 1e-3, True, None, float("inf"), [1, [2, 3]], [], ["a b", 0.5]],
)  # fmt: skip
def test_override_values_read_back_as_written(value):
    from hydra.core.override_parser.overrides_parser import OverridesParser

    (override,) = OverridesParser.create().parse_overrides([f"key={override_value(value)}"])
    assert override.value() == value
    assert type(override.value()) is type(value)


def test_overrides_flatten_nested_settings():
    assert to_overrides({"sampler": {"steps": 16}, "per_class": 2, "features.weights": "/w x.pt"}) == [
        "sampler.steps=16", "per_class=2", "features.weights='/w x.pt'",
    ]  # fmt: skip
    assert to_overrides({"layers": [2, 4]}, "guidance.") == ["guidance.layers=[2,4]"]


# --- a real sweep ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep_assets")
    torch.manual_seed(0)
    weights = save_digits_net(root / "net.pt", DigitsFeatureNet(width=8, feature_dim=8), {})
    return {"ckpt": fake_checkpoint(root / "tiny.ckpt"), "weights": weights, "cache": root / "cache"}


def sweep_overrides(assets, sweep_dir, *extra):
    """A 2 x 2 sweep on the tiny checkpoint (3 classes x 2 samples, shards of 4, 2 Euler steps)."""
    return [
        f"sweep_dir={sweep_dir}",
        f"sample.checkpoint={assets['ckpt']}", "sample.per_class=2", "sample.shard_size=4", "sample.batch_size=4",
        "sample.sampler.steps=2",
        f"evaluate.features.weights={assets['weights']}", f"+evaluate.cache_dir={assets['cache']}",
        "grid.cfg.scale=[2.0,3.0]", "grid.erg.scale=[2.0,3.0]", "grid.erg.image.layers=[[1,3]]",
        "+grid.erg.image.kappa=0.2", "report.grid=3",
        *(extra if any(e.startswith("methods=") for e in extra) else ["methods=[cfg,erg]", *extra]),
    ]  # fmt: skip


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted((folder / "shards").rglob("*")) if p.is_file()}


def test_interrupted_sweep_reruns_only_the_missing_work(assets, tmp_path, monkeypatch):
    straight = run(compose("sweep", sweep_overrides(assets, tmp_path / "straight")))
    assert list(straight["points"]) == POINTS
    assert all(r["sampled"] and r["evaluated"] for r in straight["points"].values())

    # Killed while writing the third point's second shard (after 2 + 2 + 1 shards).
    sweep = tmp_path / "sweep"
    real_write = SampleStore.write_shard
    written: list[tuple[str, int]] = []

    def write_then_die(self, shard, *args):
        if len(written) == 5:
            raise KeyboardInterrupt("simulated preemption")
        written.append((self.root.name, shard))
        return real_write(self, shard, *args)

    monkeypatch.setattr(SampleStore, "write_shard", write_then_die)
    with pytest.raises(KeyboardInterrupt):
        run(compose("sweep", sweep_overrides(assets, sweep)))
    assert written[-1] == (POINTS[2], 0)
    assert sorted(p.parent.name for p in sweep.glob("*/metrics.json")) == POINTS[:2]

    # The same command again: the third point's missing shard, the fourth point, two evaluations.
    written.clear()
    rerun = run(compose("sweep", sweep_overrides(assets, sweep)))
    assert written == [(POINTS[2], 1), (POINTS[3], 0), (POINTS[3], 1)]
    assert [(r["sampled"], r["evaluated"]) for r in rerun["points"].values()] == [
        (False, False), (False, False), (True, True), (True, True),
    ]  # fmt: skip
    for name in POINTS:  # the same samples and numbers as without the interruption
        assert _files(sweep / name) == _files(tmp_path / "straight" / name)
        assert rerun["points"][name]["metrics"] == pytest.approx(straight["points"][name]["metrics"])
        assert "nfe: 2" in (sweep / name / "config.yaml").read_text()  # written by sample.py's body

    # Nothing left: a third run only writes the report, which ranks both methods in the paper's layout.
    written.clear()
    third = run(compose("sweep", sweep_overrides(assets, sweep)))
    assert written == [] and not any(r["sampled"] or r["evaluated"] for r in third["points"].values())
    assert {row.label for row in third["report"].rows} == {"CFG", "ERG"}
    assert "NFE (↓)" in third["report"].markdown
    assert {p.name for p in third["paths"].values()} >= {"table.md", "table.tex", "pareto.png", "grid.png"}


def test_changed_settings_are_refused_new_evaluation_settings_evaluate_again(assets, tmp_path):
    sweep = tmp_path / "sweep"
    run(compose("sweep", sweep_overrides(assets, sweep, "methods=[cfg]")))
    with pytest.raises(ConfigError, match=r"already holds samples made with other settings:\n  sampler\.steps"):
        run(compose("sweep", sweep_overrides(assets, sweep, "methods=[cfg]", "sample.sampler.steps=3")))
    again = run(compose("sweep", sweep_overrides(assets, sweep, "methods=[cfg]", "+evaluate.prdc.k=2")))
    assert [(r["sampled"], r["evaluated"]) for r in again["points"].values()] == [(False, True), (False, True)]
    records = read_records(sweep / POINTS[0] / "metrics.json")
    assert sorted(r["prdc_k"] for r in records.values()) == [2, 3]  # a record per protocol, nothing overwritten
    assert again["report"].protocols["precision"].endswith("__k2")  # the table: the current settings' records
    assert again["report"].protocols["fid"] == next(iter(records.values()))["protocols"]["fid"]


def test_one_point_alone_and_bad_sweep_configs(assets, tmp_path):
    sweep = tmp_path / "sweep"
    one = run(compose("sweep", sweep_overrides(assets, sweep, f"point={POINTS[3]}")))
    assert list(one["points"]) == [POINTS[3]] and "report" not in one
    assert not (sweep / POINTS[0]).exists()
    with pytest.raises(ConfigError, match=r"point=erg__nope is not in the grid"):
        run(compose("sweep", sweep_overrides(assets, sweep, "point=erg__nope")))
    with pytest.raises(ConfigError, match=r"sample\.out_dir is set per point by the sweep"):
        run(compose("sweep", sweep_overrides(assets, sweep, "+sample.out_dir=x")))
    with pytest.raises(
        ConfigError, match=r"point erg__imag\.tau-0\.1__.*guidance\.imag \(did you mean guidance\.image\?"
    ):
        run(compose("sweep", sweep_overrides(assets, sweep, "+grid.erg.imag.tau=[0.1]")))
    assert not (sweep / POINTS[0]).exists()  # every point is checked before any runs


def test_run_point_refuses_a_folder_of_other_settings(tmp_path):
    (tmp_path / "config.yaml").write_text("seed: 0\nguidance: {name: cfg, scale: 2.0}\n")

    def never(*args):
        raise AssertionError("must not run")

    with pytest.raises(ConfigError, match="other settings"):
        run_point(tmp_path, {"seed": 0, "guidance": {"name": "cfg", "scale": 3.0}}, never, never)


def test_multirun_runs_one_job_per_point_then_the_report(assets, tmp_path):
    """`python scripts/sweep.py -m`: Hydra's sweeper gets the points from the grid, one job each (the basic
    launcher runs them in turn), and the report follows the last job."""
    sweep = tmp_path / "sweep"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, str(ROOT / "scripts" / "sweep.py"), "-m", *sweep_overrides(assets, sweep, "methods=[erg]")]
    out = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"#0 : point={POINTS[2]}" in out.stdout + out.stderr and f"#1 : point={POINTS[3]}" in out.stdout + out.stderr
    assert all((sweep / name / "metrics.json").is_file() for name in POINTS[2:])
    assert (sweep / "report" / "table.md").is_file() and "| ERG |" in out.stdout


def test_a_job_that_stops_on_a_config_error_fails_the_multirun_with_that_error(tmp_path):
    """A sweep job whose entry point stops on a config error (a missing checkpoint) through submitit's
    launcher (submitit_local here; SLURM arrays: tests/test_slurm_cluster.py): the sweep fails with that
    error in one line, no traceback. The job used to sys.exit: submitit got no result file (locally: a
    traceback about it; on SLURM without sacct: the launching process polled forever)."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    missing = tmp_path / "no_such.ckpt"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("HYDRA_FULL_ERROR", None)
    cmd = [sys.executable, str(ROOT / "scripts" / "sweep.py"), "-m", "hydra/launcher=submitit_local",
           "hydra.launcher.timeout_min=5", f"sweep_dir={tmp_path / 'sweep'}", f"sample.checkpoint={missing}",
           "methods=[cfg]", "grid.cfg.scale=[2.0]"]  # fmt: skip
    out = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode != 0
    assert "Error executing job with overrides: ['point=cfg__scale-2.0'" in out.stderr
    assert f"{missing}: checkpoint file not found" in out.stderr
    assert "Traceback" not in out.stderr and "has not produced any output" not in out.stderr
    assert not (tmp_path / "sweep" / "report").exists()


def test_slurm_array_launcher_composes():
    """hydra/launcher=submitit_slurm_1gpu: one GPU and one task per job (a point per array task)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from eval.sweep import register_resolvers

    register_resolvers()
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = hydra_compose(
            "sweep", ["hydra/launcher=submitit_slurm_1gpu", "hydra.launcher.partition=gpu", "methods=[cfg,erg]"],
            return_hydra_config=True,
        )  # fmt: skip
    launcher = cfg.hydra.launcher
    assert (launcher.gpus_per_node, launcher.tasks_per_node, launcher.partition) == (1, 1, "gpu")
    assert launcher._target_.endswith("SlurmLauncher")
    points = cfg.hydra.sweeper.params.point.split(",")
    assert points == [p.name for p in expand_grid(compose("sweep").grid, ["cfg", "erg"])]


CLASS_CONDITIONAL = ["imagenet256", "quickstart"]  # the text-to-image tables: tests/test_paper_protocol.py


def test_every_sweep_setting_is_tested():
    assert {p.stem for p in (CONFIGS / "sweeps").glob("*.yaml")} == {
        *CLASS_CONDITIONAL,
        "table1_t2i",
        "table2_uncond",
        "table5_ablation",
    }


@pytest.mark.parametrize("setting", CLASS_CONDITIONAL)
def test_every_sweep_setting_composes_and_its_points_pass_their_checks(setting, tmp_path):
    """configs/sweeps/*: every point's sample.py and evaluate.py configs compose and pass their own checks."""
    from eval.sweep import check_point, point_configs, validate

    required = [
        "sample.model.checkpoint=/w/SiT-XL-2-256x256.pt", "sample.autoencoder.path=/w/sd-vae-ft-ema",
        "evaluate.reference.path=/d/VIRTUAL_imagenet256_labeled.npz", "evaluate.features.weights=/w/inception.pth",
        "grid.autoguidance.checkpoint=/w/weak.ckpt",
    ]  # fmt: skip
    extra = required if setting == "imagenet256" else []
    if extra:
        with pytest.raises(ConfigError, match=r"missing required .*sample\.model\.checkpoint.*`python scripts/sweep"):
            validate(compose("sweep", [f"sweeps={setting}"]))
    cfg = compose("sweep", [f"sweeps={setting}", f"sweep_dir={tmp_path}", *extra])
    points = validate(cfg)
    assert {p.method for p in points} >= {"none", "cfg", "apg", "cads", "pag", "sag", "seg", "autoguidance",
                                          "erg", "erg_null", "erg_apg", "erg_cads"}  # fmt: skip
    # both readings of ERG on a class model (erg_null: CFG's null-class negative); i_erg would repeat erg
    assert "i_erg" not in {p.method for p in points}
    for point in points:
        container = check_point(point, *point_configs(cfg, point))
        assert container["guidance"]["name"] == point.method
