"""Tables, Pareto fronts and image grids of a sweep folder (one evaluated run per sub-folder).

    python scripts/make_tables.py runs/sweeps/quickstart                    # Tables 1/2 layout
    python scripts/make_tables.py SWEEP --group-by data.image_size          # Table 3 (one pool per resolution)
    python scripts/make_tables.py SWEEP --layout ablation \
        --params guidance.text.tau guidance.image.tau guidance.image.alpha   # Table 5 (transposed)
    python scripts/make_tables.py SWEEP --match inception                   # choose among protocols

Prints the ranked runs and the paper-style table (best run per method by mean rank, appendix A.1),
and writes table.md, table.tex, ranking.md, ranks.csv, summary.json, pareto.png and grid.png to
--out (default: <sweep>/report). Numbers computed under different protocols (feature extractor,
weights, preprocessing, reference) are never put in one table: that is an error.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from eval.records import ProtocolMismatch
from eval.report import ReportOptions, build_report, write_report


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sweep", help="folder with one sub-folder (config.yaml + metrics.json) per run")
    p.add_argument("--out", help="output folder (default: <sweep>/report)")
    p.add_argument("--metrics", nargs="+", help="metrics to rank and show (default: all shared ones)")
    p.add_argument("--match", help="keep only protocols containing this text (e.g. inception, dinov2)")
    p.add_argument("--method-key", default="guidance.name", help="config key naming a run's guidance method")
    p.add_argument("--scale-key", default="guidance.scale", help="config key of the guidance scale (Pareto colours)")
    p.add_argument("--group-by", help="config key splitting the pool (Table 3: data.image_size)")
    p.add_argument("--group-name", default="Res.", help="column title of the groups")
    p.add_argument("--pool", choices=["all", "method"], default="all", help="rank within the whole sweep or per method")
    p.add_argument("--layout", choices=["methods", "ablation"], default="methods")
    p.add_argument("--params", nargs="*", default=[], help="config keys shown as rows (ablation layout)")
    p.add_argument("--nfe", nargs="*", default=[], metavar="METHOD=N", help="NFE per step where configs lack it")
    p.add_argument("--no-nfe", action="store_true", help="leave out the NFE column")
    p.add_argument("--grid", type=int, default=8, help="samples per method in grid.png (0: no grid)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None):
    args = parse_args(argv)
    try:
        nfe = {k: int(v) for k, v in (item.split("=", 1) for item in args.nfe)}
    except ValueError:
        sys.exit(f"error: --nfe takes METHOD=N pairs, got {args.nfe}")
    opts = ReportOptions(
        metrics=args.metrics, match=args.match, method_key=args.method_key, scale_key=args.scale_key,
        group_by=args.group_by, group_name=args.group_name, pool=args.pool, layout=args.layout, params=args.params,
        nfe=nfe, nfe_column=not args.no_nfe,
    )  # fmt: skip
    try:
        report = build_report(args.sweep, opts)
    except (ProtocolMismatch, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    out = Path(args.out) if args.out else Path(args.sweep) / "report"
    paths = write_report(report, out, scale_key=args.scale_key, grid=args.grid)
    print("## All runs, by mean rank (value (rank))\n")
    print(report.ranking_markdown)
    print("\n## Best setting per method (rank scoring, appendix A.1)\n")
    print(report.markdown)
    print("\nprotocols: " + "; ".join(f"{m}: {p}" for m, p in report.protocols.items()))
    print("written: " + ", ".join(str(p) for p in paths.values()))
    return report, paths


if __name__ == "__main__":
    main()
