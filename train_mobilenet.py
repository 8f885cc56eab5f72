"""Train a MobileNetV2 Faster R-CNN on a Pascal-VOC folder (single device: CPU or one GPU).

    python train_mobilenet.py --data-path /data/VOCdevkit --epochs 20

See `--help` for every flag; the engine lives in train_utils/engine/trainer.py.
"""
from train_utils.engine.args import parse_training_args
from train_utils.engine.trainer import main

DEFAULTS = dict(backbone="mobilenet_v2", lr=0.005, batch_size=8, epochs=20, lr_steps=[14, 18])

if __name__ == "__main__":
    main(parse_training_args("Faster R-CNN with a MobileNetV2 backbone", DEFAULTS))
