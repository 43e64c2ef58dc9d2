"""Mean and spread of final-epoch metrics over run folders (e.g. seeds of one config).

    python scripts/summarize_runs.py runs/usps-s0 runs/usps-s1 runs/usps-s2
"""

import argparse
import statistics
import sys
from pathlib import Path

from sddecc_dist.run_folder import RunFolder, RunFolderError

FIELDS = ("acc", "nmi", "ari", "seconds", "peak_memory_mib")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path)
    args = parser.parse_args()
    rows = []
    for run in args.runs:
        try:
            rows.append(RunFolder(run).read_metrics())
        except RunFolderError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
    print("| run | " + " | ".join(FIELDS) + " |")
    print("|---" * (len(FIELDS) + 1) + "|")
    for run, row in zip(args.runs, rows):
        print(f"| {run} | " + " | ".join(f"{row.get(f, float('nan')):.4g}" for f in FIELDS) + " |")
    cells = []
    for field in FIELDS:
        values = [row[field] for row in rows if field in row]
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        cells.append(f"{statistics.mean(values):.4g} ± {spread:.2g}" if values else "-")
    print(f"| mean ± std ({len(rows)} runs) | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
