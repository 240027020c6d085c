"""The offline text-to-image quickstart, one command (`make quickstart-t2i`):

    1. train a small MMDiT on the handwritten digits with captions and the real all-MiniLM-L6-v2 text
       encoder (`python train.py experiment=t2i_digits`; resumable: a rerun continues or is instant);
    2. write a prompt file (one prompt per digit) next to the run;
    3. sample it with no guidance, CFG, C-ERG, I-ERG and ERG through `sample.py` (mode=grid: the same
       seeds and prompts in every row) and write the grid image.

    python scripts/quickstart_t2i.py                         # the defaults of experiment=t2i_digits
    python scripts/quickstart_t2i.py --steps 300 trainer.max_steps=300 ...    # Hydra overrides pass through

Everything runs on CPU with no network: the digits ship with scikit-learn and MiniLM with its package.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from data.digit_captions import WORDS  # noqa: E402

log = logging.getLogger("erg.quickstart_t2i")

# Rows of the grid: sample.py guidance configs (with overrides for the quickstart's 6-block model).
METHODS = ("none", "cfg", "c_erg_minilm", "i_erg image.layers=[2,4] image.kappa=0.4", "erg_minilm")
PROMPTS = tuple(f"a handwritten {word}" for word in WORDS)


def compose(config_name: str, overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from models.runtime import composition_error

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
            return hydra_compose(config_name=config_name, overrides=overrides)
    except Exception as err:  # a misspelled override: one line naming its closest key
        raise composition_error(err) from err


def train(overrides: list[str]) -> dict:
    from models.training import run

    return run(compose("train", ["experiment=t2i_digits", *overrides]))


def sample_grid(checkpoint: str, out_dir: Path, methods: list[str], steps: int, scale: float, seed: int) -> dict:
    """sample.py mode=grid with the prompt file: rows = methods, columns = one sample per prompt."""
    from models.generation import run
    from models.io import atomic_write_text

    prompts = out_dir / "prompts.txt"
    atomic_write_text(prompts, "\n".join(PROMPTS) + "\n")
    # every method at the same guidance scale (the configs' default is 3.0; only a change is written out)
    quoted = ",".join(f'"{m} scale={scale:g}"' if m != "none" and scale != 3.0 else f'"{m}"' for m in methods)
    return run(
        compose(
            "sample",
            [
                f"checkpoint={checkpoint}",
                f"prompts={prompts}",
                "mode=grid",
                f"grid.methods=[{quoted}]",
                f"grid.per_row={len(PROMPTS)}",
                f"grid.path={out_dir / 'grid.png'}",
                f"sampler.steps={steps}",
                f"seed={seed}",
                f"out_dir={out_dir}",
                "progress=false",
            ],
        )
    )


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sample-steps", type=int, default=25, help="Euler steps of the grid (default 25)")
    parser.add_argument("--scale", type=float, default=3.0, help="guidance scale w of every method (default 3)")
    parser.add_argument("--seed", type=int, default=0, help="base seed of the grid's noises")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for train.py (e.g. trainer.max_steps=300)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    start = time.perf_counter()
    summary = train(args.overrides)
    trained = time.perf_counter()
    checkpoint = summary["last_checkpoint"]
    if checkpoint is None:
        raise SystemExit(f"training wrote no checkpoint in {summary['run_dir']}")
    out_dir = Path(summary["run_dir"]) / "guidance_grid"
    grid = sample_grid(checkpoint, out_dir, list(METHODS), args.sample_steps, args.scale, args.seed)
    done = time.perf_counter()
    print(
        f"\nText-to-image quickstart done in {done - start:.0f} s (training {trained - start:.0f} s, "
        f"sampling {done - trained:.0f} s).\n"
        f"  model: {checkpoint} (MMDiT + all-MiniLM-L6-v2, step {summary['step']})\n"
        f"  training grids (CFG {args.scale}, a row per prompt): {summary['samples']}\n"
        f"  guidance grid: {grid['grid']}\n"
        f"    rows: {', '.join(grid['methods'])}; columns: {', '.join(repr(p) for p in PROMPTS)}; "
        f"the same noises in every row; w = {args.scale}, {args.sample_steps} Euler steps"
    )
    return {"train": summary, "grid": grid, "seconds": done - start}


if __name__ == "__main__":
    from models.cli import reported

    with reported(writes="run_dir=<folder> (a Hydra override)"):
        main()
