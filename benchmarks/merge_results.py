"""Merge results files fetched from a device run into ``benchmarks/results/``.

    python benchmarks/merge_results.py /work/.device/5/experts_h100_80gb_hbm3.csv
    python benchmarks/merge_results.py --relabel hetermoe=hetermoe@v2.23-code /work/.device/5/old/experts_*.csv

A device run writes its CSVs under ``$OUT`` holding only that run's rows. Each one is appended here to the results
file of the same name (atomically, every earlier row and column kept: ``bench_experts.append_rows``); a row equal
to one already there on every column both have is skipped, so merging a file twice adds nothing. ``--relabel``
renames providers first (the old code's rows of an A/B, which must never be read as today's). Experts files get their
plot redrawn; run ``python benchmarks/update_readme.py`` afterwards for the README's table.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def merge(src: Path, dest_dir: Path = RESULTS, relabel: dict[str, str] | None = None) -> int:
    """Append ``src``'s new rows to ``dest_dir / src.name``; returns how many were added."""
    from bench_experts import append_rows  # this directory

    with open(src, newline="") as f:
        reader = csv.DictReader(f)
        rows, fields = list(reader), list(reader.fieldnames or [])
    if not fields:
        raise SystemExit(f"{src}: no CSV header; is it a results file?")
    for row in rows:
        if relabel and row.get("provider") in relabel:
            row["provider"] = relabel[row["provider"]]
    dest = dest_dir / src.name
    if dest.exists():
        with open(dest, newline="") as f:
            reader = csv.DictReader(f)
            common = [c for c in fields if c in (reader.fieldnames or [])]
            seen = {tuple(r.get(c, "") for c in common) for r in reader}
        rows = [r for r in rows if tuple(r.get(c, "") for c in common) not in seen]
    if rows:
        append_rows(dest, rows, fields)
    return len(rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("files", nargs="+", type=Path, help="CSVs written by a device run")
    parser.add_argument(
        "--relabel", action="append", default=[], metavar="OLD=NEW", help="rename a provider first (repeatable)"
    )
    parser.add_argument("--results", type=Path, default=RESULTS, help="the results directory (default: this one)")
    args = parser.parse_args(argv)
    relabel = {}
    for item in args.relabel:
        old, sep, new = item.partition("=")
        if not sep or not old or not new:
            parser.error(f"--relabel {item!r}: write it OLD=NEW, e.g. hetermoe=hetermoe@old-code")
        relabel[old] = new
    if not args.results.is_dir():
        parser.error(f"--results {args.results}: no such directory")
    missing = [str(p) for p in args.files if not p.is_file()]
    if missing:
        parser.error(f"no such file: {', '.join(missing)}")
    for src in args.files:
        added = merge(src, args.results, relabel)
        dest = args.results / src.name
        print(f"{src} -> {dest}: {added} new rows")
        if added and "experts_" in src.name:
            from bench_experts import plot

            plot(dest, dest.with_suffix(".png"))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    main()
