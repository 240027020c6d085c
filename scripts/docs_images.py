"""The README's pictures: what the two quickstarts draw, copied small into docs/images/ (`make docs-images`
runs both quickstarts first; they are resumable, so a rerun only copies).

    python scripts/docs_images.py          # after `make quickstart` and `make quickstart-t2i`

    docs/images/quickstart_grid.png     the method grid: the same seeds and labels for every method (report/grid.png)
    docs/images/quickstart_pareto.png   density vs coverage of every setting, Pareto fronts (report/pareto.png)
    docs/images/t2i_grid.png            the text-to-image grid: none, CFG, C-ERG, I-ERG, ERG (guidance_grid/grid.png)

Each is at most --max-width pixels wide and --max-kb kilobytes (colours reduced to a palette if
needed), written atomically.
"""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from models.cli import reported  # noqa: E402
from models.io import atomic_write_bytes  # noqa: E402
from models.runtime import ConfigError  # noqa: E402

IMAGES = {  # README picture -> what a quickstart writes (and the command that writes it)
    "quickstart_grid.png": ("runs/quickstart_sweep/report/grid.png", "make quickstart"),
    "quickstart_pareto.png": ("runs/quickstart_sweep/report/pareto.png", "make quickstart"),
    "t2i_grid.png": ("runs/t2i_quickstart/guidance_grid/grid.png", "make quickstart-t2i"),
}


def small_png(path: Path, max_width: int, max_kb: int) -> bytes:
    """The image as PNG bytes, at most max_width wide (Lanczos) and max_kb large (a palette if needed)."""
    with Image.open(path) as img:
        img = img.convert("RGB")
    if img.width > max_width:
        img = img.resize((max_width, round(img.height * max_width / img.width)), Image.Resampling.LANCZOS)
    for colours in (None, 256, 64):
        shown = img if colours is None else img.quantize(colors=colours, method=Image.Quantize.MEDIANCUT)
        buf = io.BytesIO()
        shown.save(buf, format="PNG", optimize=True)
        if buf.tell() <= max_kb * 1024:
            return buf.getvalue()
    raise ConfigError(f"{path} does not fit in --max-kb {max_kb} even with 64 colours: lower --max-width")


def main(argv: list[str] | None = None) -> dict[str, Path]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=Path, default=ROOT, help="folder holding runs/ (default: the repository)")
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "images")
    p.add_argument("--max-width", type=int, default=900)
    p.add_argument("--max-kb", type=int, default=200)
    args = p.parse_args(argv)
    written = {}
    for name, (source, command) in IMAGES.items():
        path = args.runs / source
        if not path.is_file():
            raise ConfigError(f"{path} does not exist: run `{command}` first (or `make docs-images`, which runs both)")
        data = small_png(path, args.max_width, args.max_kb)
        written[name] = atomic_write_bytes(args.out / name, data)
        print(f"{written[name]}: {len(data) / 1024:.0f} KB (from {source})")
    return written


if __name__ == "__main__":
    with reported(writes="--out <folder>"):
        main()
