"""WZ's import path for the datasets: ``from my_dataset import VOCDataSet``.

The readers live in ``train_utils/data/`` (one module per annotation format, registered in
``train_utils.data.catalog``); this file only re-exports them for scripts written against WZ's
project.
"""
from train_utils.data.coco import CocoDataSet
from train_utils.data.dataset import DetectionDataSet
from train_utils.data.classes import load_class_dict, load_class_names
from train_utils.data.labelme import LabelmeDataSet
from train_utils.data.voc import VOCDataSet
from train_utils.data.yolo import YoloDataSet

__all__ = [
    "CocoDataSet",
    "DetectionDataSet",
    "LabelmeDataSet",
    "VOCDataSet",
    "YoloDataSet",
    "load_class_dict",
    "load_class_names",
]
