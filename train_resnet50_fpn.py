"""Train a ResNet50-FPN Faster R-CNN on a Pascal-VOC folder (single device: CPU or one GPU).

    python train_resnet50_fpn.py --data-path /data/VOCdevkit --epochs 20

By default the ImageNet backbone weights are read from backbone/resnet50.pth; fine-tune the COCO
detector with --weights backbone/fasterrcnn_resnet50_fpn_coco.pth instead.
"""
from train_utils.engine.args import parse_training_args
from train_utils.engine.trainer import main

DEFAULTS = dict(backbone="resnet50_fpn", lr=0.01, batch_size=4, epochs=20, lr_steps=[14, 18])

if __name__ == "__main__":
    main(parse_training_args("Faster R-CNN with a ResNet50-FPN backbone", DEFAULTS))
