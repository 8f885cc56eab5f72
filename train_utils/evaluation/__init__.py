"""Scoring detections: COCO evaluation (pycocotools), VOC AP and the evaluation loop."""

# pycocotools' 12 summary numbers, in the order of COCOeval.stats (metrics.jsonl "coco").
COCO_STAT_NAMES = (
    "AP@[.5:.95]", "AP@.5", "AP@.75", "AP small", "AP medium", "AP large",
    "AR@1", "AR@10", "AR@100", "AR small", "AR medium", "AR large",
)
