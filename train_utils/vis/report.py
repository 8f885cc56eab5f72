"""The evaluation report of ``validation.py --report DIR``: one static ``report.html`` (relative links,
no script, no network), ``report.json`` with every number, PNG figures (matplotlib, Agg) and CSVs.

The numbers come from :mod:`train_utils.evaluation.analysis` (matching, F1, confusion, TIDE) and
from pycocotools' accumulated COCOeval (the precision-recall curves and AP by object size).
"""
from __future__ import annotations

import csv
import html
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from train_utils.jsonl import read_jsonl  # noqa: E402
from train_utils.evaluation import COCO_STAT_NAMES, analysis as an  # noqa: E402
from train_utils.evaluation.validate import Validation  # noqa: E402
from train_utils.progress import Progress  # noqa: E402
from train_utils.vis.curves import plot_loss_and_lr, plot_map  # noqa: E402
from train_utils.vis.draw import draw_evaluation  # noqa: E402

DEFAULT_SCORE_THRESHOLD = 0.5  # when no threshold gives any true positive
TIDE_LABELS = {"cls": "Cls", "loc": "Loc", "both": "Both", "dupe": "Dupe", "bkg": "Bkg", "missed": "Missed"}
TIDE_HELP = {
    "cls": "right place, wrong class (IoU >= 0.5 with an object of another class)",
    "loc": "right class, box off (IoU 0.1-0.5 with an object of its class)",
    "both": "wrong class and box off (IoU 0.1-0.5 with an object of another class only)",
    "dupe": "second detection of an object already found",
    "bkg": "detection on background (IoU < 0.1 with every object)",
    "missed": "object that no detection comes near",
}
IMAGE_LONG_SIDE = 480  # drawn images are enlarged to at least this many pixels


@dataclass
class ReportInputs:
    """What validation.py has after its evaluation.

    record: validation.py's JSON record (``coco_stats``, ``per_class`` rows, ``voc_metric`` ...);
    coco_eval: the accumulated COCOeval; detections: image id -> COCO results; load_image: image
    id -> RGB image; image_names: image id -> name for captions; run_dir: the checkpoint's folder
    (training curves when it holds metrics.jsonl); score_threshold: None = best overall F1.
    """

    record: Mapping[str, Any]
    coco_eval: Any
    detections: Mapping[int, Sequence[Mapping]]
    class_names: Sequence[str]
    load_image: Callable[[int], Image.Image]
    image_names: Mapping[int, str]
    run_dir: Optional[Path] = None
    score_threshold: Optional[float] = None
    num_images: int = 8


@dataclass
class Analysis:
    """Every computed part of the report."""

    matching: an.Matching
    class_f1: dict[int, Optional[an.F1Point]]
    overall_f1: an.F1Point
    confusion: an.Confusion
    tide: an.Tide
    curves: dict[int, tuple[np.ndarray, np.ndarray]]
    sizes: dict[int, dict[str, Optional[float]]]
    worst: list[int]
    best: list[int]
    missed: np.ndarray  # bool [M]: TIDE's missed objects


def analyse(inputs: ReportInputs) -> Analysis:
    """Match, then every breakdown; the score threshold is the flag's or the best overall F1's."""
    coco_eval = inputs.coco_eval
    images = an.images_from_coco(coco_eval.cocoGt, inputs.detections, coco_eval.params.imgIds)
    class_ids = list(range(1, len(inputs.class_names) + 1))
    matching = an.match_detections(Progress(images, len(images), "report: matching", print_freq=500), class_ids)
    class_f1, overall = an.f1_table(matching)
    threshold = inputs.score_threshold
    if threshold is None:
        threshold = overall.threshold if overall.threshold is not None else DEFAULT_SCORE_THRESHOLD
    confusion = an.confusion_matrix(matching, threshold)
    worst, best = an.worst_and_best(confusion, inputs.num_images)
    return Analysis(matching, class_f1, overall, confusion, an.tide(matching), an.coco_curves(coco_eval),
                    an.coco_size_aps(coco_eval), worst, best, an.missed_objects(matching))


# ---------------------------------------------------------------------------------- figures
def _grid(count: int, columns: int, cell: tuple[float, float]) -> tuple[plt.Figure, list[plt.Axes]]:
    """A figure of ``count`` panels, ``columns`` per row, each ``cell`` (width, height) inches."""
    rows = math.ceil(count / columns)
    cols = min(columns, count)
    fig, axes = plt.subplots(rows, cols, figsize=(cell[0] * cols, cell[1] * rows), squeeze=False)
    for ax in axes.flat[count:]:
        ax.axis("off")
    return fig, list(axes.flat)


def plot_pr_curves(result: Analysis, names: Sequence[str], ap: Mapping[int, tuple], path: Path) -> None:
    """One panel per class (and a first one for the class mean): precision against recall at IoU
    0.5 and averaged over 0.5:0.95 (COCOeval's interpolated curves), AP in the legend, the best-F1
    operating point marked."""
    recall = an.RECALL_THRESHOLDS
    fig, axes = _grid(len(names) + 1, 4, (3.6, 3.3))
    panels = [("all classes (mean)", list(result.curves.values()), ap.get(0, (None, None)), None)]
    panels += [(name, [result.curves[c]] if c in result.curves else [], ap.get(c, (None, None)),
                result.class_f1.get(c)) for c, name in enumerate(names, start=1)]
    for ax, (title, curves, (ap50, ap_coco), f1) in zip(axes, panels):
        ax.set(xlim=(0, 1), ylim=(0, 1.02), xlabel="recall", ylabel="precision")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        if not curves:
            ax.text(0.5, 0.5, "no ground truth", ha="center", va="center", color="grey")
            continue
        ax.plot(recall, np.mean([c[0] for c in curves], axis=0), "-", color="tab:blue",
                label=f"IoU 0.5  AP {ap50:.3f}")
        ax.plot(recall, np.mean([c[1] for c in curves], axis=0), "--", color="tab:orange",
                label=f"IoU .5:.95  AP {ap_coco:.3f}")
        if f1 is not None and f1.threshold is not None:
            ax.plot([f1.recall], [f1.precision], "o", color="tab:red",
                    label=f"best F1 {f1.f1:.2f} @ {f1.threshold:.2f}")
        ax.legend(loc="best", fontsize=7.5)
    fig.suptitle("Precision-recall (COCOeval, 100 detections per image)", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=80, bbox_inches="tight")
    plt.close(fig)


def _annotate_matrix(ax, values: np.ndarray, shade: np.ndarray, text: Callable[[int, int], str], size: float) -> None:
    """Write ``text(row, col)`` in each cell of a [R, C] matrix, white on cells shaded above 0.55."""
    for row in range(values.shape[0]):
        for col in range(values.shape[1]):
            label = text(row, col)
            if label:
                ax.text(col, row, label, ha="center", va="center", fontsize=size,
                        color="white" if shade[row, col] > 0.55 else "black")


def plot_confusion(confusion: an.Confusion, names: Sequence[str], path: Path) -> None:
    """Counts and row-normalised matrix side by side (both shaded by the row share)."""
    share = confusion.normalised()
    side = max(5.5, 0.42 * len(names) + 3)
    size = 11 if len(names) <= 5 else 9 if len(names) <= 10 else 7
    fig, axes = plt.subplots(1, 2, figsize=(2 * side, side))
    texts = (lambda r, c: str(confusion.counts[r, c]) if confusion.counts[r, c] else "",
             lambda r, c: f"{share[r, c]:.2f}" if confusion.counts[r, c] else "")
    for ax, text, title in zip(axes, texts, ("counts", "row-normalised (share of each true class)")):
        ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
        _annotate_matrix(ax, confusion.counts, share, text, size)
        ax.set_xticks(range(len(names) + 1), list(names) + ["background\n(missed)"], rotation=45, ha="right",
                      fontsize=size)
        ax.set_yticks(range(len(names) + 1), list(names) + ["background\n(false det.)"], fontsize=size)
        ax.set_xlabel("predicted class")
        ax.set_ylabel("ground-truth class")
        ax.set_title(title, fontsize=10)
    fig.suptitle(f"Confusion at IoU 0.5, score >= {confusion.threshold:.3f}", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=80, bbox_inches="tight")
    plt.close(fig)


def plot_tide(tide: an.Tide, names: Sequence[str], path: Path) -> None:
    """Mean dAP@0.5 per error type (bars, with counts) and the per-class dAP (a shaded table)."""
    types = list(an.TIDE_TYPES)
    fig, (bars, grid) = plt.subplots(1, 2, figsize=(12, max(3.8, 0.35 * len(names) + 2)),
                                     gridspec_kw={"width_ratios": [1, 1.3]})
    values = [tide.delta[t] for t in types]
    colours = ["#d62728", "#ff7f0e", "#9467bd", "#8c564b", "#7f7f7f", "#1f77b4"]
    bars.barh(range(len(types))[::-1], values, color=colours)
    top = max(values + [0.01])
    for y, (t, v) in zip(range(len(types))[::-1], zip(types, values)):
        bars.text(v + 0.01 * top, y, f"{v:.3f}  ({tide.counts[t]})", va="center", fontsize=9)
    bars.set_yticks(range(len(types))[::-1], [TIDE_LABELS[t] for t in types])
    bars.set_xlim(0, top * 1.35)
    bars.set_xlabel("dAP@0.5 = AP@0.5 after fixing that error type alone - AP@0.5")
    ap_text = f"{tide.map:.3f}" if tide.map is not None else "-"
    bars.set_title(f"AP@0.5 {ap_text}; (n) = boxes of that type (objects for Missed)", fontsize=9)
    table = np.array([[tide.class_delta[t].get(c) if tide.class_delta[t].get(c) is not None else np.nan
                       for t in types] for c in range(1, len(names) + 1)], dtype=float).reshape(len(names), len(types))
    grid.imshow(np.nan_to_num(table), cmap="Reds", vmin=0, vmax=max(np.nanmax(table, initial=0), 1e-9), aspect="auto")
    _annotate_matrix(grid, table, np.nan_to_num(table) / max(np.nanmax(table, initial=0), 1e-9),
                     lambda r, c: "-" if np.isnan(table[r, c]) else f"{table[r, c]:.3f}", 8)
    grid.set_xticks(range(len(types)), [TIDE_LABELS[t] for t in types])
    grid.set_yticks(range(len(names)), names, fontsize=8 if len(names) > 10 else 9)
    grid.set_title("dAP@0.5 per class (- = no ground truth)", fontsize=9)
    fig.suptitle("TIDE error breakdown (Bolya et al., ECCV 2020), t_f = 0.5, t_b = 0.1", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=80, bbox_inches="tight")
    plt.close(fig)


def plot_training(run_dir: Optional[Path], out: Path) -> list[str]:
    """The run's loss/lr and AP@0.5 curves from ``run_dir/metrics.jsonl`` (file names written)."""
    records = read_jsonl(run_dir / "metrics.jsonl") if run_dir is not None else []
    records = [r for r in records if "loss" in r and "lr" in r]
    if not records:
        return []
    plot_loss_and_lr([r["epoch"] for r in records], [r["loss"] for r in records], [r["lr"] for r in records],
                     str(out / "training_loss_and_lr.png"))
    evaluated = [r for r in records if r.get("coco")]
    if not evaluated:
        return ["training_loss_and_lr.png"]
    plot_map([r["epoch"] for r in evaluated], [r["coco"][1] for r in evaluated], str(out / "training_map.png"))
    return ["training_loss_and_lr.png", "training_map.png"]


# ---------------------------------------------------------------------------------- example images
def _xyxy(box: np.ndarray) -> list[float]:
    """COCO [x, y, w, h] -> [x1, y1, x2, y2]."""
    x, y, w, h = (float(v) for v in box)
    return [x, y, x + w, y + h]


def draw_image(result: Analysis, index: int, names: Sequence[str], picture: Image.Image) -> Image.Image:
    """One image with its ground truth and the detections counted at the report threshold; wrong
    detections carry their TIDE type, objects no detection of their class finds read "not found"
    ("missed" for TIDE's missed objects: nothing comes near them)."""
    matching, confusion = result.matching, result.confusion
    image, match = matching.images[index], matching.matches[index]
    gt_lo, lo, hi = matching.gt_start[index], matching.det_start[index], matching.det_start[index + 1]
    gt_texts = [None if ignored or confusion.gt_found[gt_lo + g] else
                f"{'missed' if result.missed[gt_lo + g] else 'not found'} {names[int(label) - 1]}"
                for g, (label, ignored) in enumerate(zip(image.gt_labels, image.gt_ignore))]
    det_boxes, det_labels, det_texts = [], [], []
    for flat in range(lo, hi):
        if confusion.det_object[flat] == -2:
            continue
        label = int(matching.det_label[flat])
        error = an.ERROR_NAMES.get(int(matching.det_error[flat]))
        text = f"{names[label - 1]} {matching.det_score[flat]:.2f}"
        det_boxes.append(_xyxy(image.det_boxes[match.det_index[flat - lo]]))
        det_labels.append(label)
        det_texts.append(text + (f" {TIDE_LABELS[error]}" if error else ""))
    return draw_evaluation(picture, [_xyxy(b) for b in image.gt_boxes], gt_texts, list(image.gt_ignore),
                           det_boxes, det_labels, det_texts, min_long_side=IMAGE_LONG_SIDE)


def write_images(result: Analysis, inputs: ReportInputs, out: Path) -> dict[str, list[dict]]:
    """Draw the worst and best images into ``out/images``; their captions' facts per list."""
    folder = out / "images"
    folder.mkdir(parents=True, exist_ok=True)
    for stale in [*folder.glob("worst_*.jpg"), *folder.glob("best_*.jpg")]:  # from an earlier report here
        stale.unlink()
    f1 = an.image_f1(result.confusion)
    lists: dict[str, list[dict]] = {"worst": [], "best": []}
    for kind, indices in (("worst", result.worst), ("best", result.best)):
        for place, index in enumerate(indices, start=1):
            image_id = result.matching.images[index].image_id
            drawn = draw_image(result, index, inputs.class_names, inputs.load_image(image_id))
            name = f"images/{kind}_{place:02d}.jpg"
            drawn.save(out / name, quality=88)
            lists[kind].append({"image_id": image_id, "name": inputs.image_names.get(image_id, str(image_id)),
                                "file": name, "f1": float(f1[index]),
                                "tp": int(result.confusion.image_tp[index]),
                                "fp": int(result.confusion.image_fp[index]),
                                "fn": int(result.confusion.image_fn[index])})
    return lists


# ---------------------------------------------------------------------------------- tables and JSON
def class_rows(result: Analysis, record: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One row per class: validation.py's numbers, AP by size and the best-F1 point."""
    rows = []
    for row in record["per_class"]:
        class_id = int(row["category_id"])
        f1 = result.class_f1.get(class_id)
        rows.append({**row, **{f"ap_{size}": value for size, value in result.sizes.get(class_id, {}).items()},
                     "best_f1": asdict(f1) if f1 is not None else None,
                     "tide": {t: result.tide.class_delta[t].get(class_id) for t in an.TIDE_TYPES}})
    return rows


def write_confusion_csv(confusion: an.Confusion, names: Sequence[str], out: Path) -> list[str]:
    """confusion_counts.csv and confusion_normalised.csv (rows: ground truth, columns: predicted)."""
    labels = list(names) + ["background"]
    files = []
    for name, values, fmt in (("confusion_counts.csv", confusion.counts, "{:d}"),
                              ("confusion_normalised.csv", confusion.normalised(), "{:.4f}")):
        with open(out / name, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["ground truth \\ predicted"] + labels)
            for label, row in zip(labels, values):
                writer.writerow([label] + [fmt.format(v) for v in row.tolist()])
        files.append(name)
    return files


def report_record(result: Analysis, inputs: ReportInputs, images: dict, files: list[str]) -> dict[str, Any]:
    """Everything report.html shows, as JSON-ready values."""
    record = inputs.record
    labels = list(inputs.class_names) + ["background"]
    return {
        "weights": record.get("weights"), "data_path": record.get("data_path"), "split": record.get("split"),
        "num_images": record.get("num_images"), "iou_threshold": an.IOU_THRESHOLD,
        "score_threshold": result.confusion.threshold,
        "score_threshold_source": "--report-score-thresh" if inputs.score_threshold is not None else "best overall F1",
        "coco_stats": dict(zip(COCO_STAT_NAMES, record["coco_stats"])),
        "voc_metric": record.get("voc_metric"), "voc_map": record.get("voc_map"),
        "ap50": result.tide.map,
        "best_f1_overall": asdict(result.overall_f1),
        "per_class": class_rows(result, record),
        "confusion": {"labels": labels, "counts": result.confusion.counts.tolist(),
                      "normalised": result.confusion.normalised().round(6).tolist()},
        "tide": {"t_f": an.IOU_THRESHOLD, "t_b": an.BACKGROUND_IOU, "ap50": result.tide.map,
                 "delta": result.tide.delta, "counts": result.tide.counts},
        "images": images,
        "files": files,
    }


# ---------------------------------------------------------------------------------- HTML
STYLE = """body{font-family:sans-serif;max-width:1250px;margin:1em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.5em 0 1em}td,th{border:1px solid #ccc;padding:2px 8px;text-align:right}
th{background:#f0f0f0}td.t,th:first-child{text-align:left}img{max-width:100%;border:1px solid #ddd}
.figs{display:flex;flex-wrap:wrap;gap:10px}.figs figure{margin:0;width:380px}figcaption{font-size:12px}
code,pre{background:#f5f5f5;padding:1px 4px}nav a{margin-right:1em}.note{color:#555;font-size:14px}"""


def _number(value: Optional[float], digits: int = 3) -> str:
    """``value`` with ``digits`` decimals; "-" for None or NaN."""
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def _cell(value: Any) -> str:
    """A table cell: numbers (and "-") right-aligned, text left-aligned."""
    text = str(value)
    try:
        float(text)
        numeric = True
    except ValueError:
        numeric = text == "-"
    return f"<td>{html.escape(text)}</td>" if numeric else f"<td class='t'>{html.escape(text)}</td>"


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """An HTML table (values escaped)."""
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in headers)
    body = "".join("<tr>" + "".join(_cell(v) for v in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _voc_name(data: Mapping[str, Any]) -> str:
    """"VOC07" / "VOC12" after the rule used, "VOC" when VOC AP was skipped."""
    return f"VOC{data['voc_metric']}" if data.get("voc_metric") not in (None, "none") else "VOC"


def _class_table(data: Mapping[str, Any]) -> str:
    """The per-class table: counts, AP (COCO, VOC, by size) and the best-F1 point."""
    voc = f"{_voc_name(data)} AP50"
    rows = []
    for row in data["per_class"]:
        f1 = row["best_f1"] or {}
        rows.append([row["name"], row["num_objects"], row["num_difficult"], _number(row["coco_ap50"]),
                     _number(row["coco_ap"]), _number(row["voc_ap"]), _number(row.get("ap_small")),
                     _number(row.get("ap_medium")), _number(row.get("ap_large")), _number(f1.get("threshold")),
                     _number(f1.get("precision")), _number(f1.get("recall")), _number(f1.get("f1"))])
    return _table(["class", "objects", "difficult", "AP50", "AP[.5:.95]", voc, "AP small", "AP medium",
                   "AP large", "best-F1 score", "precision", "recall", "F1"], rows)


def _tide_section(data: Mapping[str, Any]) -> str:
    """The TIDE figure, how to read it, and its numbers overall and per class."""
    tide = data["tide"]
    overall = [[TIDE_LABELS[t], _number(tide["delta"][t]), tide["counts"][t], TIDE_HELP[t]] for t in an.TIDE_TYPES]
    per_class = [[row["name"]] + [_number(row["tide"][t]) for t in an.TIDE_TYPES] for row in data["per_class"]]
    return ("<h2 id='tide'>Where the AP@0.5 is lost (TIDE)</h2><img src='tide.png' alt='TIDE breakdown'>"
            "<p class='note'>Each false positive and each missed object gets one error type. dAP is how much "
            "AP@0.5 would rise if that type alone were fixed by an oracle (Cls: relabel the box; Loc: snap it "
            "to its object; Both, Dupe, Bkg: delete it; Missed: stop counting the object). The six gains "
            "overlap and do not add up to 1 - AP. Large Bkg: raise the score threshold or train with more "
            "background; large Loc: boxes are loose; large Cls: classes are confused (see the matrix); "
            "large Missed: objects are never proposed (anchors, sizes, recall).</p>"
            + _table(["type", "dAP@0.5", "count", "meaning"], overall)
            + _table(["class"] + [TIDE_LABELS[t] for t in an.TIDE_TYPES], per_class))


def _figures(items: Sequence[Mapping[str, Any]]) -> str:
    """The drawn images with their captions, each linking to the full-size file."""
    if not items:
        return "<p class='note'>no image with ground truth or detections</p>"
    cells = [f"<figure><a href='{html.escape(i['file'])}'><img src='{html.escape(i['file'])}' "
             f"alt='{html.escape(i['name'])}'></a><figcaption>{html.escape(i['name'])}: F1 {i['f1']:.2f} "
             f"(TP {i['tp']}, FP {i['fp']}, FN {i['fn']})</figcaption></figure>" for i in items]
    return "<div class='figs'>" + "".join(cells) + "</div>"


def _summary(data: Mapping[str, Any]) -> str:
    """The headline numbers at the top of the page."""
    stats = data["coco_stats"]
    best = data["best_f1_overall"]
    worst = max(an.TIDE_TYPES, key=lambda t: data["tide"]["delta"][t])
    lines = [["images", data["num_images"]], ["AP@[.5:.95] (COCO)", _number(stats["AP@[.5:.95]"])],
             ["AP@0.5 (COCO)", _number(stats["AP@.5"])],
             [f"{_voc_name(data)} mAP@0.5", _number(data["voc_map"])],
             ["best overall F1", f"{_number(best['f1'])} at score >= {_number(best['threshold'])} "
                                 f"(precision {_number(best['precision'])}, recall {_number(best['recall'])})"],
             ["report score threshold", f"{data['score_threshold']:.3f} ({data['score_threshold_source']})"],
             ["largest TIDE error", f"{TIDE_LABELS[worst]} (dAP {_number(data['tide']['delta'][worst])})"]]
    return _table(["", ""], lines)


def render_html(data: Mapping[str, Any], training: Sequence[str]) -> str:
    """The report page (static HTML, relative links only)."""
    best = data["best_f1_overall"]
    stats = [[name, _number(value) if value >= 0 else "- (no such object)"]
             for name, value in data["coco_stats"].items()]
    command = (f"python predict.py --weights {data['weights']} --score-thresh {best['threshold']:.3f} IMAGES"
               if best["threshold"] is not None else "no score threshold finds any object")
    parts = [
        f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>Evaluation report</title>"
        f"<style>{STYLE}</style></head><body><h1>Evaluation report</h1>",
        f"<p>{html.escape(str(data['weights']))} on {html.escape(str(data['data_path']))} "
        f"(split {html.escape(str(data['split']))})</p>",
        "<nav><a href='#classes'>classes</a><a href='#pr'>precision-recall</a><a href='#thresholds'>thresholds</a>"
        "<a href='#confusion'>confusion</a><a href='#tide'>TIDE</a><a href='#coco'>COCO numbers</a>"
        "<a href='#images'>images</a>" + ("<a href='#training'>training</a>" if training else "") +
        "<a href='report.json'>report.json</a></nav>",
        _summary(data),
        "<h2 id='classes'>Per class</h2>" + _class_table(data),
        "<h2 id='pr'>Precision-recall curves</h2><img src='pr_curves.png' alt='precision-recall curves'>",
        "<h2 id='thresholds'>Score thresholds</h2><p>Per class, the score threshold of best F1 at IoU 0.5 "
        "(table above, also in report.json). One threshold for all classes (best pooled F1):</p>"
        f"<pre>{html.escape(command)}</pre>",
        f"<h2 id='confusion'>Confusion matrix</h2><p class='note'>IoU 0.5, score &gt;= "
        f"{data['score_threshold']:.3f}. CSV: <a href='confusion_counts.csv'>counts</a>, "
        "<a href='confusion_normalised.csv'>row-normalised</a>.</p><img src='confusion.png' alt='confusion matrix'>",
        _tide_section(data),
        "<h2 id='coco'>COCO numbers</h2>" + _table(["metric", "value"], stats),
        f"<h2 id='images'>Worst images</h2><p class='note'>Lowest F1 at score &gt;= {data['score_threshold']:.3f}. "
        "Dashed black-and-white: ground truth (dotted grey-and-black: difficult/crowd, ignored); solid: "
        "predictions in their class colour, wrong ones labelled with their TIDE type; &quot;not found&quot;: "
        "an object no detection of its class finds (&quot;missed&quot;: no detection even comes near it).</p>"
        + _figures(data["images"]["worst"]),
        "<h2>Best images</h2>" + _figures(data["images"]["best"]),
    ]
    if training:
        parts.append("<h2 id='training'>Training curves</h2>"
                     + "".join(f"<img src='{name}' alt='{name}'>" for name in training))
    return "\n".join(parts) + "\n</body></html>\n"


def write_report(out: Path, inputs: ReportInputs) -> dict[str, Any]:
    """Write report.html, report.json, the figures, CSVs and images into ``out``; returns the JSON."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    result = analyse(inputs)
    stats = inputs.record["coco_stats"]
    ap = {0: (stats[1], stats[0])}
    ap.update({int(r["category_id"]): (r["coco_ap50"], r["coco_ap"]) for r in inputs.record["per_class"]})
    plot_pr_curves(result, inputs.class_names, ap, out / "pr_curves.png")
    plot_confusion(result.confusion, inputs.class_names, out / "confusion.png")
    plot_tide(result.tide, inputs.class_names, out / "tide.png")
    files = ["pr_curves.png", "confusion.png", "tide.png"]
    files += write_confusion_csv(result.confusion, inputs.class_names, out)
    training = plot_training(inputs.run_dir, out)
    images = write_images(result, inputs, out)
    files += training + [i["file"] for kind in images.values() for i in kind]
    data = report_record(result, inputs, images, files)
    (out / "report.json").write_text(json.dumps(data, indent=1) + "\n")
    (out / "report.html").write_text(render_html(data, training))
    return data


def write_validation_report(out: Path, validation: Validation, class_names: Sequence[str], weights_path: str,
                            score_threshold: Optional[float], num_images: int) -> None:
    """``validation.py --report DIR``: the error analysis of ``validation`` (image ids are dataset indices)."""
    dataset = validation.dataset

    def load_image(image_id: int) -> Image.Image:
        pixels = dataset[image_id][0].permute(1, 2, 0).numpy()  # float [H, W, 3] in 0..1 (ToTensor)
        return Image.fromarray(np.round(pixels * 255).astype(np.uint8))

    inputs = ReportInputs(validation.record, validation.evaluator.coco_eval["bbox"], validation.evaluator.detections,
                          class_names, load_image, dict(enumerate(dataset.ids)), Path(weights_path).parent,
                          score_threshold, num_images)
    write_report(Path(out), inputs)
    print(f"wrote the report {Path(out) / 'report.html'}")
