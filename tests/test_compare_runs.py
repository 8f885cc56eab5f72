"""tools/compare_runs.py: each run's best epoch (best.pth's rule) with its metrics, as text and CSV,
the figure, and one-line errors for folders and lines that are not metrics."""
import csv
import json
from pathlib import Path

import pytest
from PIL import Image

from conftest import metrics
from tools.compare_runs import main, run_labels

COCO_A1 = [0.30, 0.50, 0.25, -1, 0.31, -1, 0.20, 0.40, 0.45, -1, 0.46, -1]
COCO_A3 = [0.40, 0.70, 0.35, -1, 0.41, 0.90, 0.30, 0.50, 0.55, -1, 0.56, 0.95]
COCO_A4 = [0.45, 0.70, 0.36, -1, 0.42, 0.91, 0.31, 0.51, 0.56, -1, 0.57, 0.96]


def write_run(folder: Path, records: list) -> Path:
    folder.mkdir(parents=True)
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return folder


@pytest.fixture
def hand_runs(tmp_path):
    """Run a: evaluated at epochs 1, 3, 4 (AP@0.5 0.5, 0.7, 0.7: the best is epoch 3, the first of
    the tie); run b: never evaluated."""
    a = write_run(tmp_path / "a", [
        {"epoch": 0, "loss_classifier": 0.9, "loss": 2.0, "lr": 0.01},
        {"epoch": 1, "loss_classifier": 0.7, "loss": 1.5, "lr": 0.01, "coco": COCO_A1},
        {"epoch": 2, "loss_classifier": 0.6, "loss": 1.2, "lr": 0.01},
        {"epoch": 3, "loss_classifier": 0.5, "loss": 1.0, "lr": 0.001, "coco": COCO_A3},
        {"epoch": 4, "loss_classifier": 0.4, "loss": 0.9, "lr": 0.001, "coco": COCO_A4},
    ])
    b = write_run(tmp_path / "b", [{"epoch": 0, "loss_classifier": 1.1, "loss": 3.0, "lr": 0.02}])
    return a, b


def test_a_hand_written_run_gives_its_known_best_epoch(hand_runs, tmp_path, capsys):
    a, b = hand_runs
    assert main([str(a), str(b), "--output", str(tmp_path / "c.png"), "--csv", str(tmp_path / "c.csv")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1:5] == [
        "run  epochs  best epoch  AP@[.5:.95]   AP@.5  AP@.75  AP small  AP medium  AP large  AR@100    loss",
        "---  ------  ----------  -----------  ------  ------  --------  ---------  --------  ------  ------",
        "a         5           3       0.4000  0.7000  0.3500         -     0.4100    0.9000  0.5500  1.0000",
        "b         1           -            -       -       -         -          -         -       -       -",
    ]
    with open(tmp_path / "c.csv", newline="") as handle:
        rows = list(csv.reader(handle))
    assert rows == [
        ["run", "path", "epochs", "best epoch", "AP@[.5:.95]", "AP@.5", "AP@.75", "AP small", "AP medium", "AP large",
         "AR@1", "AR@10", "AR@100", "AR small", "AR medium", "AR large", "loss_classifier", "loss", "lr"],
        ["a", str(a), "5", "3", "0.4", "0.7", "0.35", "", "0.41", "0.9", "0.3", "0.5", "0.55", "", "0.56", "0.95",
         "0.5", "1.0", "0.001"],
        ["b", str(b), "1", "", "", "", "", "", "", "", "", "", "", "", "", "", "", "", ""],
    ]
    assert Image.open(tmp_path / "c.png").size == (1104, 320)  # loss + 2 metric panels of 4.6 x 4 in at 80 dpi


def test_extra_metrics_become_panels_and_columns(hand_runs, tmp_path, capsys):
    a, b = hand_runs
    assert main([str(a), str(b), "--output", str(tmp_path / "c.png"), "--metric", "AR@1", "loss_classifier"]) == 0
    header, _, row_a, _ = capsys.readouterr().out.splitlines()[1:5]
    assert header.split()[-2:] == ["AR@1", "loss_classifier"] and row_a.split()[-2:] == ["0.3000", "0.5000"]
    assert Image.open(tmp_path / "c.png").size == (1104, 320)


def best_by_ap50(records: list) -> dict:
    evaluated = [r for r in records if r.get("coco")]
    top = max(r["coco"][1] for r in evaluated)
    return next(r for r in evaluated if r["coco"][1] == top)


def test_two_real_runs(trained_run, uninterrupted, tmp_path, capsys):
    assert main([str(trained_run), str(uninterrupted), "--output", str(tmp_path / "c.png"),
                 "--csv", str(tmp_path / "c.csv")]) == 0
    printed = capsys.readouterr().out.splitlines()
    with open(tmp_path / "c.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    for run, row, line in zip((trained_run, uninterrupted), rows, printed[3:5]):
        records = metrics(run)
        best = best_by_ap50(records)
        assert row["run"] == run.name and int(row["epochs"]) == len(records) and int(row["best epoch"]) == best["epoch"]
        assert [float(row[k]) if row[k] else -1.0 for k in list(row)[4:16]] == best["coco"]
        assert all(float(row[k]) == best[k] for k in ("loss", "loss_classifier", "lr"))
        ap = [f"{v:.4f}" if v != -1 else "-" for v in best["coco"][:6]]
        assert line.split() == [run.name, str(len(records)), str(best["epoch"]), *ap, f"{best['coco'][8]:.4f}",
                                f"{best['loss']:.4f}"]
    assert Image.open(tmp_path / "c.png").size == (1104, 320)


@pytest.mark.parametrize("content, line, problem", [
    ('{"epoch": 1, "loss": 0.', 2, "damaged, not a JSON record (Expecting ',' delimiter)"),
    ('{"epoch": 1}', 2, "not a metrics record (it needs an integer 'epoch' and a number 'loss')"),
    ('{"epoch": 1, "loss": 0.5, "coco": [0.1, 0.2]}', 2, "'coco' is not a list of 12 numbers"),
])
def test_a_damaged_line_is_one_error_naming_the_file_and_line(content, line, problem, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"epoch": 0, "loss": 1.0}\n' + content + "\n")
    assert main([str(run), "--output", str(tmp_path / "c.png")]) == 1
    assert capsys.readouterr().err == f"error: {run / 'metrics.jsonl'} line {line}: {problem}\n"
    assert not (tmp_path / "c.png").exists()


def test_folders_without_metrics_and_unknown_metrics(hand_runs, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main([str(hand_runs[0]), str(tmp_path / "empty")]) == 1
    assert capsys.readouterr().err == (f"error: {tmp_path / 'empty'}: no metrics.jsonl (not a training --output-dir, "
                                       "or no epoch finished yet)\n")
    assert main([str(hand_runs[0]), "--metric", "AP@.6"]) == 1
    assert capsys.readouterr().err.startswith("error: unknown --metric AP@.6; choose from AP@[.5:.95], AP@.5, ")


def test_run_labels_tell_runs_apart():
    assert run_labels([Path("/x/lr0.01"), Path("/y/lr0.02")]) == ["lr0.01", "lr0.02"]
    assert run_labels([Path("/x/a/run"), Path("/y/a/run")]) == ["x/a/run", "y/a/run"]


def test_one_rule_for_a_damaged_line_in_every_reader(tmp_path):
    """train_utils.jsonl's rule, shared by compare_runs, the run log and the report: a last line
    without its newline (an append cut short) is skipped; a damaged complete line is an error."""
    from train_utils.engine.run_log import RunLog
    from train_utils.jsonl import read_jsonl

    run = tmp_path / "run"
    run.mkdir()
    path = run / "metrics.jsonl"
    path.write_text('{"epoch": 0, "loss": 1.0, "lr": 0.01}\n{"epoch": 1, "loss": 0.5, "lr": 0.01}\n{"epoch": 2, "lo')
    assert read_jsonl(path) == [{"epoch": 0, "loss": 1.0, "lr": 0.01}, {"epoch": 1, "loss": 0.5, "lr": 0.01}]
    assert main([str(run), "--output", str(tmp_path / "c.png")]) == 0
    assert [r["epoch"] for r in RunLog(str(run), start_epoch=2).history] == [0, 1]
    assert path.read_text().endswith('"lr": 0.01}\n')  # the resumed log drops the cut line

    path.write_text('{"epoch": 0, "loss": 1.0, "lr": 0.01}\n{"epoch": 1, "lo\n{"epoch": 2, "loss": 0.4, "lr": 0.01}\n')
    for read in (read_jsonl, lambda p: RunLog(str(p.parent), start_epoch=3)):
        with pytest.raises(ValueError, match=r"metrics.jsonl line 2: damaged, not a JSON record"):
            read(path)
    path.write_text('{"epoch": 0, "loss": 1.0}\n[1, 2]\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl line 2: damaged, not a JSON record \(a list\)"):
        read_jsonl(path)
