"""Compare training runs: their curves on one figure and each run's best epoch in a table.

    python tools/compare_runs.py RUN_DIR [RUN_DIR ...] [--output compare.png]
        [--metric AP@.5 AP@[.5:.95] ...] [--csv table.csv]

Each RUN_DIR is a training ``--output-dir`` holding ``metrics.jsonl`` (one record per epoch: the
loss terms, lr, epoch_time and, for evaluated epochs, the 12 COCO numbers). The figure has the
mean training loss and each ``--metric`` per epoch, one colour per run. The table gives each run's
best epoch, chosen as ``best.pth`` is: the first epoch with the highest COCO AP@0.5.
"""
from __future__ import annotations

import argparse
import csv
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from train_utils.evaluation import COCO_STAT_NAMES  # noqa: E402
from train_utils.jsonl import numbered_records  # noqa: E402

BEST_BY = "AP@.5"
TABLE_COLUMNS = ("AP@[.5:.95]", "AP@.5", "AP@.75", "AP small", "AP medium", "AP large", "AR@100", "loss")
DEFAULT_METRICS = ["AP@.5", "AP@[.5:.95]"]


@dataclass
class Run:
    """One run folder: ``label`` names it in the legend and the table; ``records`` are its epochs."""

    path: Path
    label: str
    records: List[Dict[str, Any]]


def read_metrics(run_dir: Path) -> List[Dict[str, Any]]:
    """The epoch records of ``run_dir/metrics.jsonl``; a ValueError names the file and the line of
    anything that is not a metrics record (a damaged line: see :mod:`train_utils.jsonl`)."""
    path = run_dir / "metrics.jsonl"
    if not run_dir.is_dir():
        raise ValueError(f"{run_dir}: no such folder")
    if not path.is_file():
        raise ValueError(f"{run_dir}: no metrics.jsonl (not a training --output-dir, or no epoch finished yet)")
    records = [check_record(record, f"{path} line {number}") for number, record in numbered_records(path)]
    if not records:
        raise ValueError(f"{path} holds no epoch yet")
    return records


def check_record(record: Any, where: str) -> Dict[str, Any]:
    """``record`` when it has an integer epoch, a numeric loss and, if any, 12 COCO numbers."""
    if not isinstance(record, dict) or not isinstance(record.get("epoch"), int) or \
            not isinstance(record.get("loss"), (int, float)):
        raise ValueError(f"{where}: not a metrics record (it needs an integer 'epoch' and a number 'loss')")
    coco = record.get("coco")
    if coco is not None and (not isinstance(coco, list) or len(coco) != len(COCO_STAT_NAMES)
                             or not all(isinstance(v, (int, float)) for v in coco)):
        raise ValueError(f"{where}: 'coco' is not a list of {len(COCO_STAT_NAMES)} numbers")
    return record


def metric_value(record: Dict[str, Any], name: str) -> Optional[float]:
    """A COCO number by its name (None when the epoch was not evaluated, or -1: no such objects)
    or any other numeric field of the record (loss terms, lr, epoch_time)."""
    if name in COCO_STAT_NAMES:
        coco = record.get("coco")
        value = coco[COCO_STAT_NAMES.index(name)] if coco is not None else None
        return None if value is None or value == -1 else float(value)
    value = record.get(name)
    return float(value) if isinstance(value, (int, float)) else None


def best_record(records: Sequence[Dict[str, Any]]) -> Optional[Dict[str, Any]]:
    """The first epoch with the highest AP@0.5 (best.pth's rule); None when none was evaluated."""
    best, best_value = None, -math.inf
    for record in records:
        value = metric_value(record, BEST_BY)
        if value is not None and value > best_value:
            best, best_value = record, value
    return best


def run_labels(paths: Sequence[Path]) -> List[str]:
    """The shortest trailing part of each folder's path that tells the runs apart."""
    parts = [path.resolve().parts for path in paths]
    for depth in range(1, max(len(p) for p in parts) + 1):
        labels = ["/".join(p[-depth:]) for p in parts]
        if len(set(labels)) == len(labels):
            return labels
    return [str(path) for path in paths]  # the same folder given twice


def check_metric_names(names: Sequence[str], runs: Sequence[Run]) -> None:
    """Every name is a COCO number or a numeric field some run logged."""
    fields = {k for run in runs for r in run.records for k, v in r.items()
              if isinstance(v, (int, float)) and k != "epoch"}
    known = list(COCO_STAT_NAMES) + sorted(fields)
    unknown = [name for name in names if name not in known]
    if unknown:
        raise ValueError(f"unknown --metric {', '.join(unknown)}; choose from {', '.join(known)}")


def plot_runs(runs: Sequence[Run], metrics: Sequence[str], path: str) -> None:
    """Mean training loss and each metric per epoch, one panel each and one colour per run; a star
    marks each run's best epoch (by AP@0.5)."""
    names = ["loss"] + [m for m in metrics if m != "loss"]
    fig, axes = plt.subplots(1, len(names), figsize=(4.6 * len(names), 4.0), squeeze=False)
    colours = plt.get_cmap("tab10").colors
    for index, run in enumerate(runs):
        colour, best = colours[index % len(colours)], best_record(run.records)
        for ax, name in zip(axes[0], names):
            points = [(r["epoch"], metric_value(r, name)) for r in run.records]
            points = [(e, v) for e, v in points if v is not None]
            ax.plot([e for e, _ in points], [v for _, v in points], "o-", color=colour, markersize=3,
                    label=run.label)
            if best is not None and metric_value(best, name) is not None:
                ax.plot([best["epoch"]], [metric_value(best, name)], "*", color=colour, markersize=12)
    for ax, name in zip(axes[0], names):
        ax.set_title("mean training loss" if name == "loss" else name if name not in COCO_STAT_NAMES
                     else f"COCO {name}")
        ax.set_xlabel("epoch")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize="small")
    fig.suptitle("star: best epoch by COCO AP@0.5", fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def table_rows(runs: Sequence[Run], columns: Sequence[str]) -> List[List[str]]:
    """Per run: label, epochs run, best epoch, then ``columns`` at the best epoch ('-': none)."""
    rows = []
    for run in runs:
        best = best_record(run.records)
        values = [metric_value(best, c) if best is not None else None for c in columns]
        rows.append([run.label, str(len(run.records)), str(best["epoch"]) if best is not None else "-",
                     *("-" if v is None else f"{v:.4f}" for v in values)])
    return rows


def format_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Plain-text columns: the first left-aligned, the others right-aligned."""
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = []
    for row in [header, ["-" * w for w in widths], *rows]:
        cells = [row[0].ljust(widths[0])] + [cell.rjust(width) for cell, width in zip(row[1:], widths[1:])]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def write_csv(runs: Sequence[Run], path: str) -> None:
    """Every run's best epoch with all 12 COCO numbers and every other logged field."""
    fields = [k for k in dict.fromkeys(k for run in runs for r in run.records for k in r)
              if k not in ("epoch", "coco", "weights")]  # weights: "raw" or "ema", not a number
    columns = list(COCO_STAT_NAMES) + fields
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["run", "path", "epochs", "best epoch", *columns])
        for run in runs:
            best = best_record(run.records)
            values = [metric_value(best, c) if best is not None else None for c in columns]
            writer.writerow([run.label, str(run.path), len(run.records), "" if best is None else best["epoch"],
                             *("" if v is None else repr(v) for v in values)])


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, metavar="RUN_DIR", help="training --output-dir folders")
    parser.add_argument("--output", default="compare.png", help="the figure (PNG)")
    parser.add_argument("--metric", nargs="+", default=DEFAULT_METRICS,
                        help=f"what to plot besides the loss: COCO numbers ({', '.join(COCO_STAT_NAMES)}) or "
                             "metrics.jsonl fields (loss_classifier, lr, epoch_time, ...)")
    parser.add_argument("--csv", default=None, metavar="PATH", help="also write the table, all columns, as CSV")
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    try:
        runs = [Run(path, label, read_metrics(path)) for path, label in zip(args.runs, run_labels(args.runs))]
        check_metric_names(args.metric, runs)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    columns = list(TABLE_COLUMNS) + [m for m in args.metric if m not in TABLE_COLUMNS]
    print(f"best epoch of each run (the first with the highest COCO {BEST_BY}, as best.pth; '-': not evaluated):")
    print(format_table(["run", "epochs", "best epoch", *columns], table_rows(runs, columns)))
    plot_runs(runs, args.metric, args.output)
    print(f"figure: {args.output}")
    if args.csv:
        write_csv(runs, args.csv)
        print(f"table: {args.csv}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
