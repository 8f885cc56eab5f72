"""Scoring detections: COCO evaluation (pycocotools), VOC AP and the evaluation loop."""
