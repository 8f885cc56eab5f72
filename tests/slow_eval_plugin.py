"""A test plugin (``--plugin slow_eval_plugin`` with tests/ on PYTHONPATH): every image the
evaluation scores takes ``SLOW_EVAL_SECONDS`` (default 2) longer, so that a test can send a
stop signal while a run evaluates."""
import os
import time

from train_utils.evaluation.coco_eval import CocoEvaluator

_update = CocoEvaluator.update


def _slow_update(self, predictions):
    time.sleep(float(os.environ.get("SLOW_EVAL_SECONDS", "2")))
    return _update(self, predictions)


CocoEvaluator.update = _slow_update
