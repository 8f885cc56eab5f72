"""Detect objects in images, folders, globs, videos, cameras and streams; draw and write the results.

    python predict.py --weights save_weights/best.pth photo.jpg holiday/ "scans/*.png"
    python predict.py --weights save_weights/best.pth clip.mp4 --every 2      # annotated clip.mp4 + clip.jsonl
    python predict.py --weights save_weights/best.pth --source 0             # camera 0; rtsp://... for a stream
    python predict.py --weights save_weights/best.pth new_photos/ --save-voc prelabels/   # labelImg-ready
    python predict.py --onnx model.onnx photo.jpg      # a tools/export_onnx.py export, on onnxruntime

Each readable image is written to ``--output-dir`` with its boxes drawn, under its own name
(``.jpg``/``.jpeg`` keep their extension, everything else becomes ``.png``); ``--save-json`` also
writes every image detection as a COCO results file (image ids from ``--coco-gt``, or listed in
``<name>_images.json``; see train_utils/inference/coco_results.py). A video or stream becomes an
annotated ``<name>.mp4`` (same size and frame rate, H.264) and ``<name>.jsonl``, one line per
processed frame. ``--save-voc``/``--save-yolo`` write the detections as annotations to correct in
labelImg and train on (train_utils/inference/annotations.py). Unreadable files are reported and
skipped; the exit code is non-zero only when nothing could be processed.

Images are read upright (EXIF orientation applied) and converted to RGB (alpha is dropped as in
training), so boxes refer to the image a viewer shows. Decoding runs in DataLoader workers (a
thread for videos), images of one size go through the model ``--batch-size`` at a time, and
drawing and writing run in a thread while the model works on the next batch. The work is done by
train_utils/inference/predict.py.
"""
from __future__ import annotations

import sys
from typing import Optional, Sequence

from train_utils.flags import import_plugins
from train_utils.inference.predict import predict, predict_parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Script entry: exit code 1 when nothing could be processed or on a setup error; 130 after Ctrl-C
    (what was processed so far is written)."""
    import_plugins(argv)
    args = predict_parser(__doc__.split("\n")[0]).parse_args(argv)
    try:
        processed = predict(args)
    except (OSError, ValueError, ImportError) as exc:  # OSError: an output folder or disk that fails
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: the results so far are written", file=sys.stderr)
        return 130
    if processed == 0:
        print("error: no image could be processed", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
