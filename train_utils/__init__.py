"""Training utilities: VOC transforms, aspect-ratio batching and COCO-style evaluation."""
