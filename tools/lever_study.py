"""Ablation runner: train every (dataset, variant, seed), evaluate, and tabulate mean ± std.

    python tools/lever_study.py --out studies/levers --data scenes=data/scenes --data hard=data/hard \\
        --seeds 0 1 2 --base="--backbone-weights none --epochs 6 --workers 2" \\
        --variant baseline="" --variant lsj="--augment hflip,lsj" --variant ema="--ema" \\
        [--eval-variant tta="--tta"] [--script train_mobilenet.py]

Each training run is ``python SCRIPT BASE VARIANT --data-path DIR [--classes-json DIR/classes.json]
--seed SEED --output-dir OUT/DATA/VARIANT/SEED --resume auto``, run one after the other with its
output in ``train.log`` beside it (``--classes-json`` is added when DIR holds a classes.json and
the flags name none). Each ``--eval-variant`` then evaluates every run's ``best.pth`` with
``validation.py`` and its flags into ``OUT/DATA/VARIANT/SEED/eval/NAME``.

A finished run leaves ``study_run.json`` (its command and duration) and is skipped when the study
is started again, so an interrupted study resumes (an interrupted training run continues from its
``last.pth``); a run finished with a different command is an error. Training runs are scored at
their best epoch, as ``best.pth`` is chosen (the first with the highest COCO AP@0.5), evaluations
by validation.py's numbers.

Writes ``OUT/results.csv`` (one row per run) and ``OUT/summary.md``: per dataset, each variant's
AP@0.5 and AP (COCO AP@[.5:.95]) as mean ± sample standard deviation over the seeds, and the
difference to the first variant (mean ± std of the per-seed differences), then every command.
Flag strings that start with ``-`` are passed as ``--base="--amp"`` (argparse reads a lone
``--amp`` as a flag of its own).
"""
from __future__ import annotations

import argparse
import csv
import json
import re
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tools.compare_runs import best_record, metric_value, read_metrics  # noqa: E402

MARKER = "study_run.json"
NAME = re.compile(r"^[A-Za-z0-9_.+-]+$")  # a name becomes a folder
CSV_COLUMNS = ("data", "variant", "eval", "seed", "status", "epochs", "best_epoch", "ap50", "ap",
               "last_ap50", "last_ap", "seconds", "folder")


@dataclass
class Study:
    """What to run: named datasets, seeds, the flags shared by every training run (``base``), the
    training variants (the first is the baseline) and the evaluation variants, as flag lists."""

    out: Path
    datasets: list[tuple[str, Path]]
    seeds: list[int]
    base: list[str]
    variants: list[tuple[str, list[str]]]
    eval_base: list[str] = field(default_factory=list)
    eval_variants: list[tuple[str, list[str]]] = field(default_factory=list)
    script: str = "train_mobilenet.py"
    eval_script: str = "validation.py"
    python: str = sys.executable


@dataclass
class Job:
    """One training run (``eval`` empty) or one evaluation of a training run's best.pth."""

    data: str
    variant: str
    eval: str
    seed: int
    folder: Path
    command: list[str]

    @property
    def label(self) -> str:
        return row_label(self.variant, self.eval)

    @property
    def train_folder(self) -> Path:
        return self.folder.parent.parent if self.eval else self.folder


def row_label(variant: str, evaluation: str) -> str:
    """How tables name a run: the training variant, ``+ EVAL`` for an evaluation variant."""
    return f"{variant} + {evaluation}" if evaluation else variant


# ---------------------------------------------------------------------------- the plan
def named(text: str, flag: str, split_flags: bool = True) -> tuple[str, Any]:
    """``NAME=VALUE`` -> (NAME, VALUE as a flag list when ``split_flags``, else a Path)."""
    name, sep, value = text.partition("=")
    if not sep or not NAME.match(name):
        raise ValueError(f"{flag} takes NAME=VALUE with NAME of letters, digits, '_', '.', '+' or '-', got {text!r}")
    try:
        return name, (shlex.split(value) if split_flags else Path(value))
    except ValueError as exc:
        raise ValueError(f"{flag} {name}: cannot split {value!r} into flags ({exc})") from None


def script_path(script: str) -> str:
    """``script`` as given when it exists from here, else the repository's file of that name."""
    return script if Path(script).exists() else str(ROOT / script)


def train_command(study: Study, data: Path, flags: list[str], seed: int, folder: Path) -> list[str]:
    """The training command of one run (the per-run flags last, so they win)."""
    extra = list(flags)
    if (data / "classes.json").is_file() and "--classes-json" not in study.base + flags:
        extra += ["--classes-json", str(data / "classes.json")]
    return [study.python, script_path(study.script), *study.base, *extra, "--data-path", str(data),
            "--seed", str(seed), "--output-dir", str(folder), "--resume", "auto"]


def eval_command(study: Study, data: Path, flags: list[str], run: Path, folder: Path) -> list[str]:
    """validation.py on the ``run`` folder's best.pth, its record written into ``folder``."""
    return [study.python, script_path(study.eval_script), "--weights-path", str(run / "best.pth"),
            "--data-path", str(data), "--output", str(folder / "record_mAP.txt"), *study.eval_base, *flags]


def plan(study: Study) -> list[Job]:
    """Every job in the order it runs: per dataset, variant and seed, the training run then its
    evaluations."""
    jobs = []
    for data_name, data in study.datasets:
        for variant, flags in study.variants:
            for seed in study.seeds:
                run = study.out / data_name / variant / str(seed)
                jobs.append(Job(data_name, variant, "", seed, run, train_command(study, data, flags, seed, run)))
                for name, eval_flags in study.eval_variants:
                    folder = run / "eval" / name
                    command = eval_command(study, data, eval_flags, run, folder)
                    jobs.append(Job(data_name, variant, name, seed, folder, command))
    return jobs


# ---------------------------------------------------------------------------- running
def finished(job: Job) -> bool:
    """True when the job's marker records this command (the interpreter aside); a marker of
    another command is a ValueError."""
    marker = job.folder / MARKER
    if not marker.is_file():
        return False
    recorded = json.loads(marker.read_text()).get("command", [])
    if recorded[1:] != job.command[1:]:
        raise ValueError(f"{job.folder} was run with another command ({shlex.join(recorded[1:])}); "
                         "remove the folder or choose another --out")
    return True


def execute(job: Job) -> tuple[bool, float]:
    """Run the job's command with its output appended to ``train.log`` / ``eval.log`` in its
    folder; (success, seconds). Success writes the marker."""
    job.folder.mkdir(parents=True, exist_ok=True)
    log = job.folder / ("eval.log" if job.eval else "train.log")
    start = time.perf_counter()
    with open(log, "a") as handle:
        handle.write(f"$ {shlex.join(job.command)}\n")
        handle.flush()
        code = subprocess.call(job.command, stdout=handle, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - start
    if code == 0:
        record = {"command": job.command, "seconds": round(seconds, 1)}
        tmp = job.folder / f"{MARKER}.tmp"
        tmp.write_text(json.dumps(record, indent=2) + "\n")
        tmp.replace(job.folder / MARKER)
    else:
        tail = log.read_text(errors="replace").splitlines()[-5:]
        print(f"    failed with exit code {code}; the end of {log}:\n      " + "\n      ".join(tail), flush=True)
    return code == 0, seconds


def score(job: Job) -> dict[str, Any]:
    """The job's numbers: a training run's best epoch (best.pth's rule) and last epoch from
    metrics.jsonl, an evaluation's from validation.py's JSON record."""
    if job.eval:
        record = json.loads((job.folder / "record_mAP.json").read_text())
        return {"ap50": record["coco_map50"], "ap": record["coco_map"]}
    records = read_metrics(job.folder)
    best = best_record(records)
    last = next((r for r in reversed(records) if "coco" in r), None)
    if best is None or last is None:
        raise ValueError(f"{job.folder / 'metrics.jsonl'}: no evaluated epoch")
    return {"epochs": len(records), "best_epoch": best["epoch"],
            "ap50": metric_value(best, "AP@.5"), "ap": metric_value(best, "AP@[.5:.95]"),
            "last_ap50": metric_value(last, "AP@.5"), "last_ap": metric_value(last, "AP@[.5:.95]")}


def clock(seconds: float) -> str:
    """H:MM:SS."""
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


def eta(pending: Sequence[Job], durations: dict[bool, list[float]]) -> str:
    """Time left for the ``pending`` jobs at the mean duration of the jobs of their kind run so
    far ('?' while a kind has none)."""
    left = 0.0
    for job in pending:
        measured = durations[bool(job.eval)]
        if not measured:
            return "?"
        left += statistics.fmean(measured)
    return clock(left)


def run_job(job: Job, earlier: bool, durations: dict[bool, list[float]]) -> dict[str, Any]:
    """Run the job unless it finished earlier, then read its numbers: its result row."""
    row: dict[str, Any] = {"data": job.data, "variant": job.variant, "eval": job.eval, "seed": job.seed,
                           "folder": str(job.folder)}
    if earlier:
        status, seconds = "done (earlier)", json.loads((job.folder / MARKER).read_text()).get("seconds")
    else:
        ok, seconds = execute(job)
        seconds = round(seconds, 1)
        durations[bool(job.eval)].append(seconds)
        status = "done" if ok else "failed"
    row.update(status=status, seconds=seconds)
    if ok_status(row):
        try:
            row.update(score(job))
        except (ValueError, KeyError, OSError) as exc:
            row["status"] = f"failed: {exc}"
    return row


def ok_status(row: dict[str, Any]) -> bool:
    """Whether a result row has numbers (finished now or earlier)."""
    return str(row["status"]).startswith("done")


def run_all(jobs: Sequence[Job]) -> list[dict[str, Any]]:
    """Run (or skip, when finished earlier) every job in order with progress lines; one result
    row per job. A run without numbers leaves its evaluations out."""
    rows, failed_runs = [], set()
    earlier = [finished(job) for job in jobs]  # checks every marker before anything runs
    durations: dict[bool, list[float]] = {False: [], True: []}
    start = time.perf_counter()
    for index, job in enumerate(jobs):
        head = f"[{index + 1}/{len(jobs)}] {job.data} / {job.label} / seed {job.seed}"
        if job.eval and job.train_folder in failed_runs:
            rows.append({"data": job.data, "variant": job.variant, "eval": job.eval, "seed": job.seed,
                         "folder": str(job.folder), "status": "skipped: training failed"})
            print(f"{head}: skipped, its training failed", flush=True)
            continue
        if not earlier[index]:
            print(f"{head}: {'evaluating' if job.eval else 'training'} in {job.folder}", flush=True)
        row = run_job(job, earlier[index], durations)
        if not ok_status(row):
            failed_runs.add(job.folder)
        rows.append(row)
        numbers = ", ".join(f"{name} {row[key]:.4f}" for name, key in (("AP@0.5", "ap50"), ("AP", "ap"))
                            if row.get(key) is not None)
        pending = [j for j, e in zip(jobs[index + 1:], earlier[index + 1:]) if not e]
        print(f"{head}: {row['status']}{', ' + numbers if numbers else ''} | elapsed "
              f"{clock(time.perf_counter() - start)}, ETA {eta(pending, durations)}", flush=True)
    return rows


# ---------------------------------------------------------------------------- the tables
def mean_std(values: Sequence[float], signed: bool = False) -> str:
    """``mean ± sample std`` (the mean alone for one value, '-' for none), 4 decimals."""
    if not values:
        return "-"
    text = f"{statistics.fmean(values):+.4f}" if signed else f"{statistics.fmean(values):.4f}"
    return text + (f" ± {statistics.stdev(values):.4f}" if len(values) > 1 else "")


def per_seed(rows: Sequence[dict[str, Any]], data: str, label: str, key: str) -> dict[int, float]:
    """{seed: value of ``key``} of the finished runs of one dataset and row label."""
    return {row["seed"]: row[key] for row in rows
            if row["data"] == data and key in row and row_label(row["variant"], row["eval"]) == label}


def dataset_table(rows: Sequence[dict[str, Any]], data: str, labels: Sequence[str]) -> list[str]:
    """Markdown table lines for one dataset: a row per label, differences to ``labels[0]``."""
    lines = ["| variant | seeds | AP@0.5 | AP | Δ AP@0.5 | Δ AP |", "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for label in labels:
        cells = [label]
        for key in ("ap50", "ap"):
            values = per_seed(rows, data, label, key)
            cells.append(mean_std(list(values.values())))
        cells.insert(1, str(len(per_seed(rows, data, label, "ap50"))))
        for key in ("ap50", "ap"):
            values, baseline = per_seed(rows, data, label, key), per_seed(rows, data, labels[0], key)
            common = sorted(set(values) & set(baseline))
            cells.append("-" if label == labels[0] else mean_std([values[s] - baseline[s] for s in common], True))
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def summary_markdown(study: Study, jobs: Sequence[Job], rows: Sequence[dict[str, Any]], argv: Sequence[str]) -> str:
    """OUT/summary.md: the study's command, a table per dataset, problems, every command."""
    labels = [row_label(v, e) for v, _ in study.variants for e in ["", *(n for n, _ in study.eval_variants)]]
    lines = ["# Lever study", "", "```bash", shlex.join(["python", "tools/lever_study.py", *argv]), "```", "",
             "AP@0.5 and AP (COCO AP@[.5:.95]) of each training run at its best epoch (the first with the "
             "highest AP@0.5, as best.pth), or of validation.py on that best.pth (`VARIANT + EVAL` rows): "
             "mean ± sample standard deviation over the seeds. Δ: mean ± std of the per-seed differences "
             f"to `{labels[0]}`.", ""]
    for name, path in study.datasets:
        lines += [f"## {name} (`{path}`)", "", *dataset_table(rows, name, labels), ""]
    problems = [row for row in rows if not ok_status(row)]
    if problems:
        lines += ["## Runs without numbers", ""]
        lines += [f"- {r['data']} / {row_label(r['variant'], r['eval'])} / seed {r['seed']}: {r['status']} "
                  f"(`{r['folder']}`)" for r in problems] + [""]
    lines += ["## Commands", "", "```bash", *(shlex.join(job.command[1:]) for job in jobs), "```", ""]
    return "\n".join(lines)


def write_results(study: Study, jobs: Sequence[Job], rows: Sequence[dict[str, Any]], argv: Sequence[str]) -> None:
    """OUT/results.csv and OUT/summary.md."""
    study.out.mkdir(parents=True, exist_ok=True)
    with open(study.out / "results.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({key: row.get(key, "") for key in CSV_COLUMNS})
    (study.out / "summary.md").write_text(summary_markdown(study, jobs, rows, argv))


# ---------------------------------------------------------------------------- command line
def parse_args(argv: Optional[Sequence[str]] = None) -> tuple[Study, bool]:
    """The study the flags describe and whether it is a dry run; a bad flag is one
    ``parser.error`` line naming it."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("lever_study"), help="where runs and tables go")
    parser.add_argument("--data", action="append", required=True, metavar="NAME=DIR",
                        help="a dataset folder (training's --data-path) and its name; repeatable")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds")
    parser.add_argument("--base", default="", metavar="FLAGS", help="training flags of every run")
    parser.add_argument("--variant", action="append", default=[], metavar='NAME="FLAGS"',
                        help="training flags added to --base; repeatable, the first is the baseline "
                             "(default: one variant, baseline, without extra flags)")
    parser.add_argument("--eval-base", default="", metavar="FLAGS", help="validation.py flags of every evaluation")
    parser.add_argument("--eval-variant", action="append", default=[], metavar='NAME="FLAGS"',
                        help="validation.py flags (with --eval-base) to evaluate each run's best.pth with; repeatable")
    parser.add_argument("--script", default="train_mobilenet.py", help="the training script")
    parser.add_argument("--eval-script", default="validation.py", help="the evaluation script")
    parser.add_argument("--dry-run", action="store_true", help="print the commands and exit")
    args = parser.parse_args(argv)
    try:
        study = Study(args.out, [named(text, "--data", split_flags=False) for text in args.data], args.seeds,
                      shlex.split(args.base), [named(t, "--variant") for t in args.variant] or [("baseline", [])],
                      shlex.split(args.eval_base), [named(t, "--eval-variant") for t in args.eval_variant],
                      args.script, args.eval_script)
    except ValueError as exc:
        parser.error(str(exc))
    for flag, names in (("--data", [n for n, _ in study.datasets]), ("--variant", [n for n, _ in study.variants]),
                        ("--eval-variant", [n for n, _ in study.eval_variants]), ("--seeds", study.seeds)):
        if len(set(names)) < len(names):
            parser.error(f"{flag}: a name is given twice: {' '.join(map(str, names))}")
    missing = [str(path) for _, path in study.datasets if not path.is_dir()]
    if missing:
        parser.error(f"--data: no such folder: {', '.join(missing)}")
    return study, args.dry_run


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    study, dry_run = parse_args(argv)
    jobs = plan(study)
    if dry_run:
        print("\n".join(shlex.join(job.command) for job in jobs))
        return 0
    runs = sum(not job.eval for job in jobs)
    print(f"{runs} training runs and {len(jobs) - runs} evaluations into {study.out}", flush=True)
    try:
        rows = run_all(jobs)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    write_results(study, jobs, rows, argv)
    print(f"wrote {study.out / 'results.csv'} and {study.out / 'summary.md'}")
    return int(not all(ok_status(row) for row in rows))


if __name__ == "__main__":
    sys.exit(main())
