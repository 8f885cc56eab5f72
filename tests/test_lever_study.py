"""tools/lever_study.py: the flags, the commands it runs, the summary's arithmetic on made-up run
folders, resuming (finished runs skipped), failures, and a tiny real study (slow)."""
from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tools import lever_study as study_tool
from tools.make_demo_voc import make_demo_voc

ROOT = Path(__file__).resolve().parents[1]

# Made-up best-epoch numbers, (AP@0.5, AP) per seed.
BASELINE = {0: (0.40, 0.10), 1: (0.44, 0.12), 2: (0.48, 0.11)}
LSJ = {0: (0.50, 0.13), 1: (0.50, 0.12), 2: (0.56, 0.16)}


def coco(ap50: float, ap: float) -> list[float]:
    return [ap, ap50] + [0.0] * 10


def fake_run(folder: Path, epochs: list[tuple[float, float]], command: list[str]) -> None:
    """A finished training run: one evaluated epoch record per (AP@0.5, AP), best.pth, the marker."""
    folder.mkdir(parents=True)
    records = [{"epoch": e, "loss": 1.0 - 0.1 * e, "lr": 0.01, "coco": coco(*v)} for e, v in enumerate(epochs)]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (folder / "best.pth").write_bytes(b"")
    (folder / study_tool.MARKER).write_text(json.dumps({"command": command, "seconds": 60.0}))


def test_flags_make_a_study(tmp_path, capsys):
    (tmp_path / "hard").mkdir()
    study, dry_run = study_tool.parse_args([
        "--data", f"demo={tmp_path / 'hard'}", "--seeds", "3", "4", "--base=--epochs 6 --amp",
        "--variant", "baseline=", "--variant", "lsj=--augment hflip,lsj --min-size '256,320'",
        "--eval-variant", "tta=--tta", "--out", str(tmp_path / "out")])
    assert study.datasets == [("demo", tmp_path / "hard")] and study.seeds == [3, 4] and not dry_run
    assert study.base == ["--epochs", "6", "--amp"]
    assert study.variants == [("baseline", []), ("lsj", ["--augment", "hflip,lsj", "--min-size", "256,320"])]
    assert study.eval_variants == [("tta", ["--tta"])] and study.script == "train_mobilenet.py"
    assert study_tool.parse_args(["--data", f"x={tmp_path}"])[0].variants == [("baseline", [])]
    bad = [(["--data", str(tmp_path)], "--data takes NAME=VALUE with NAME of letters, digits, '_', '.', '+' or "
                                       f"'-', got {str(tmp_path)!r}"),
           (["--data", f"a={tmp_path}", "--data", f"a={tmp_path}"], "--data: a name is given twice: a a"),
           (["--data", f"a={tmp_path / 'none'}"], f"--data: no such folder: {tmp_path / 'none'}"),
           (["--data", f"a={tmp_path}", "--variant", "x=--lr '0.1"],
            "--variant x: cannot split \"--lr '0.1\" into flags (No closing quotation)"),
           (["--data", f"a={tmp_path}", "--variant", "x/y=--ema"], "--variant takes NAME=VALUE with NAME of letters, "
                                                                  "digits, '_', '.', '+' or '-', got 'x/y=--ema'"),
           (["--data", f"a={tmp_path}", "--seeds", "1", "1"], "--seeds: a name is given twice: 1 1")]
    for argv, message in bad:
        with pytest.raises(SystemExit):
            study_tool.parse_args(argv)
        assert capsys.readouterr().err.splitlines()[-1].endswith(f": error: {message}")


def test_commands_in_order(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the scripts are found in the repository
    data, other = tmp_path / "scenes", tmp_path / "own"
    data.mkdir()
    other.mkdir()
    (data / "classes.json").write_text("{}")
    study = study_tool.Study(tmp_path / "out", [("s", data), ("o", other)], [0, 1], ["--epochs", "2"],
                             [("base", []), ("ema", ["--ema"])], ["--workers", "0"], [("tta", ["--tta"])])
    jobs = study_tool.plan(study)
    assert [(j.data, j.label, j.seed) for j in jobs][:6] == [
        ("s", "base", 0), ("s", "base + tta", 0), ("s", "base", 1), ("s", "base + tta", 1),
        ("s", "ema", 0), ("s", "ema + tta", 0)]
    assert len(jobs) == 2 * 2 * 2 * 2
    run = tmp_path / "out" / "s" / "ema" / "1"
    assert jobs[6].folder == run and jobs[7].folder == run / "eval" / "tta"
    assert jobs[6].command == [sys.executable, str(ROOT / "train_mobilenet.py"), "--epochs", "2", "--ema",
                               "--classes-json", str(data / "classes.json"), "--data-path", str(data),
                               "--seed", "1", "--output-dir", str(run), "--resume", "auto"]
    assert jobs[7].command == [sys.executable, str(ROOT / "validation.py"), "--weights-path", str(run / "best.pth"),
                               "--data-path", str(data), "--output", str(run / "eval" / "tta" / "record_mAP.txt"),
                               "--workers", "0", "--tta"]
    assert "--classes-json" not in jobs[8].command  # no classes.json in that folder
    study.base += ["--classes-json", "auto"]
    assert study_tool.plan(study)[0].command.count("--classes-json") == 1


def test_summary_arithmetic_on_made_up_runs(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    study = study_tool.Study(tmp_path / "out", [("demo", data)], [0, 1, 2], [], [("baseline", []), ("lsj", ["--lsj"])])
    jobs = study_tool.plan(study)
    for job in jobs:
        best = (BASELINE if job.variant == "baseline" else LSJ)[job.seed]
        # epoch 1 is worse: the best epoch (0) is scored, the last one goes to last_ap50/last_ap
        fake_run(job.folder, [best, (best[0] - 0.05, best[1] + 0.01)], job.command)
    rows = study_tool.run_all(jobs)
    assert [(r["status"], r["best_epoch"], r["epochs"]) for r in rows] == [("done (earlier)", 0, 2)] * 6
    assert (rows[4]["ap50"], rows[4]["ap"], rows[4]["last_ap50"], rows[4]["last_ap"]) == (0.50, 0.12, 0.45, 0.13)
    table = study_tool.dataset_table(rows, "demo", ["baseline", "lsj"])
    # baseline AP@0.5 0.40 0.44 0.48: mean 0.44, sample std 0.04; AP 0.10 0.12 0.11: 0.11 ± 0.01
    # lsj AP@0.5 0.50 0.50 0.56: 0.52 ± 0.034641; AP 0.13 0.12 0.16: 0.13667 ± 0.020817
    # paired differences AP@0.5 0.10 0.06 0.08: +0.08 ± 0.02; AP 0.03 0.00 0.05: +0.02667 ± 0.025166
    assert table[2:] == ["| baseline | 3 | 0.4400 ± 0.0400 | 0.1100 ± 0.0100 | - | - |",
                         "| lsj | 3 | 0.5200 ± 0.0346 | 0.1367 ± 0.0208 | +0.0800 ± 0.0200 | +0.0267 ± 0.0252 |"]
    study_tool.write_results(study, jobs, rows, ["--data", f"demo={data}"])
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert "\n".join(table) in summary and f"## demo (`{data}`)" in summary
    assert summary.count("--output-dir") == 6 and "Runs without numbers" not in summary
    with open(tmp_path / "out" / "results.csv") as handle:
        csv_rows = list(csv.DictReader(handle))
    assert [(r["variant"], r["seed"], float(r["ap50"]), float(r["ap"])) for r in csv_rows] == \
        [("baseline", str(s), *BASELINE[s]) for s in range(3)] + [("lsj", str(s), *LSJ[s]) for s in range(3)]


FAKE_TRAIN = """
import argparse, json, sys
from pathlib import Path
parser = argparse.ArgumentParser()
parser.add_argument("--output-dir")
parser.add_argument("--seed", type=int)
parser.add_argument("--bonus", type=float, default=0.0)
parser.add_argument("--fail-seed", type=int, default=-1)
args, _ = parser.parse_known_args()
out = Path(args.output_dir)
out.mkdir(parents=True, exist_ok=True)
with open(out.parents[2] / "calls.txt", "a") as handle:
    handle.write("train " + " ".join(sys.argv[1:]) + "\\n")
if args.seed == args.fail_seed:
    print("something broke")
    sys.exit(3)
coco = [0.1 + args.bonus, 0.4 + 0.1 * args.seed + args.bonus] + [0.0] * 10
(out / "metrics.jsonl").write_text(json.dumps({"epoch": 0, "loss": 1.0, "coco": coco}) + "\\n")
(out / "best.pth").write_bytes(b"")
"""

FAKE_EVAL = """
import argparse, json, sys
from pathlib import Path
parser = argparse.ArgumentParser()
parser.add_argument("--weights-path")
parser.add_argument("--output")
parser.add_argument("--plus", type=float, default=0.0)
args, _ = parser.parse_known_args()
run = Path(args.weights_path).parent
with open(run.parents[2] / "calls.txt", "a") as handle:
    handle.write("eval " + " ".join(sys.argv[1:]) + "\\n")
best = json.loads((run / "metrics.jsonl").read_text())["coco"]
Path(args.output).parent.mkdir(parents=True, exist_ok=True)
record = {"coco_map": best[0] + args.plus, "coco_map50": best[1] + args.plus}
Path(args.output).with_suffix(".json").write_text(json.dumps(record))
"""


def test_a_study_resumes_and_reports_failures(tmp_path, capsys):
    (tmp_path / "train.py").write_text(FAKE_TRAIN)
    (tmp_path / "eval.py").write_text(FAKE_EVAL)
    data, out = tmp_path / "data", tmp_path / "out"
    data.mkdir()
    argv = ["--data", f"d={data}", "--seeds", "0", "1", "--variant", "base=", "--variant", "more=--bonus 0.2",
            "--eval-variant", "plus=--plus 0.05", "--script", str(tmp_path / "train.py"),
            "--eval-script", str(tmp_path / "eval.py"), "--out", str(out)]
    assert study_tool.main(argv) == 0
    calls = (out / "calls.txt").read_text().splitlines()
    assert [line.split()[0] for line in calls] == ["train", "eval"] * 4
    printed = capsys.readouterr().out
    assert "[8/8] d / more + plus / seed 1: done, AP@0.5 0.7500, AP 0.3500 | elapsed 0:00:" in printed
    assert "[1/8] d / base / seed 0: done, AP@0.5 0.4000, AP 0.1000 | elapsed 0:00:0" in printed
    assert "ETA ?" in printed  # no evaluation measured yet after the first run
    table = (out / "summary.md").read_text().split("## d (")[1]
    # base 0.4 0.5; more 0.6 0.7; evaluations +0.05 on each
    assert "| base | 2 | 0.4500 ± 0.0707 | 0.1000 ± 0.0000 | - | - |" in table
    assert "| more + plus | 2 | 0.7000 ± 0.0707 | 0.3500 ± 0.0000 | +0.2500 ± 0.0000 | +0.2500 ± 0.0000 |" in table

    summary = (out / "summary.md").read_text()
    assert study_tool.main(argv) == 0  # everything finished: nothing runs again
    assert (out / "calls.txt").read_text().splitlines() == calls
    assert capsys.readouterr().out.count("done (earlier)") == 8
    assert (out / "summary.md").read_text() == summary

    shutil_marker = out / "d" / "more" / "1" / "eval" / "plus" / study_tool.MARKER
    shutil_marker.unlink()  # an evaluation that did not finish: only it runs again
    assert study_tool.main(argv) == 0
    assert (out / "calls.txt").read_text().splitlines()[len(calls):] == [calls[-1]]

    assert study_tool.main(argv[:-2] + ["--out", str(out), "--base=--lr 0.5"]) == 1  # other flags, same folders
    assert capsys.readouterr().err.startswith(f"error: {out / 'd' / 'base' / '0'} was run with another command")


def test_a_failed_run_is_reported_and_its_evaluations_skipped(tmp_path, capsys):
    (tmp_path / "train.py").write_text(FAKE_TRAIN)
    (tmp_path / "eval.py").write_text(FAKE_EVAL)
    data, out = tmp_path / "data", tmp_path / "out"
    data.mkdir()
    argv = ["--data", f"d={data}", "--seeds", "0", "1", "--base=--fail-seed 1", "--eval-variant", "plus=",
            "--script", str(tmp_path / "train.py"), "--eval-script", str(tmp_path / "eval.py"), "--out", str(out)]
    assert study_tool.main(argv) == 1
    printed = capsys.readouterr().out
    assert "failed with exit code 3; the end of" in printed and "something broke" in printed
    assert "[4/4] d / baseline + plus / seed 1: skipped, its training failed" in printed
    with open(out / "results.csv") as handle:
        assert [r["status"] for r in csv.DictReader(handle)] == ["done", "done", "failed", "skipped: training failed"]
    summary = (out / "summary.md").read_text()
    assert "| baseline | 1 | 0.4000 | 0.1000 | - | - |" in summary
    assert f"- d / baseline / seed 1: failed (`{out / 'd' / 'baseline' / '1'}`)" in summary
    assert not (out / "d" / "baseline" / "1" / study_tool.MARKER).exists()


@pytest.mark.slow
def test_a_tiny_real_study(tmp_path):
    """Two one-epoch train_mobilenet.py runs of a tiny detector and an evaluation of each by
    validation.py; the tables hold the numbers the runs wrote."""
    make_demo_voc(tmp_path / "demo", num_images=12, seed=0, size=96)
    base = ("--backbone-weights none --representation-size 32 --min-size 96 --max-size 96 -b 4 --workers 0 "
            "--anchor-sizes 32,64 --box-batch-size-per-image 16 --rpn-pre-nms-top-n-train 100 "
            "--rpn-post-nms-top-n-train 50 --rpn-pre-nms-top-n-test 50 --rpn-post-nms-top-n-test 20 --epochs 1")
    out = tmp_path / "study"
    command = [sys.executable, str(ROOT / "tools" / "lever_study.py"), "--data", f"demo={tmp_path / 'demo'}",
               "--seeds", "0", f"--base={base}", "--variant", "hflip=", "--variant", "none=--augment none",
               "--eval-variant", "b2=--batch-size 2 --workers 0", "--out", str(out)]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    with open(out / "results.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["variant"], r["eval"], r["status"]) for r in rows] == [
        ("hflip", "", "done"), ("hflip", "b2", "done"), ("none", "", "done"), ("none", "b2", "done")]
    for row in rows:
        folder = Path(row["folder"])
        if row["eval"]:
            record = json.loads((folder / "record_mAP.json").read_text())
            assert (float(row["ap50"]), float(row["ap"])) == (record["coco_map50"], record["coco_map"])
        else:
            coco = json.loads((folder / "metrics.jsonl").read_text().splitlines()[0])["coco"]
            assert (float(row["ap50"]), float(row["ap"])) == (coco[1], coco[0])
            assert "--augment none" in (folder / "train.log").read_text().splitlines()[0] or row["variant"] == "hflip"
    assert "| none + b2 | 1 |" in (out / "summary.md").read_text()
