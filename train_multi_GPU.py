"""Distributed Faster R-CNN training with PyTorch's own launcher (DistributedDataParallel).

    torchrun --nproc_per_node=4 train_multi_GPU.py --backbone resnet50_fpn --data-path /data/VOCdevkit
    torchrun --nnodes=2 --node_rank=0 --nproc_per_node=8 --rdzv-endpoint=HOST:29500 train_multi_GPU.py ...

Also runs as plain `python train_multi_GPU.py` (world size 1) and under SLURM (srun). NCCL on
GPUs, gloo on CPU. Only rank 0 prints and writes files.
"""
from train_utils.engine.args import parse_training_args
from train_utils.engine.trainer import main

DEFAULTS = dict(backbone="resnet50_fpn", lr=0.02, batch_size=2, epochs=26, lr_steps=[16, 22])

if __name__ == "__main__":
    main(parse_training_args("Distributed Faster R-CNN training", DEFAULTS, distributed=True), distributed=True)
