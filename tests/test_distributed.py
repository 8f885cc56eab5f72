"""Distributed training and evaluation on the CPU (gloo): torchrun with two processes."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils.data import DataLoader, DistributedSampler

from conftest import ROOT, TINY_TRAIN_FLAGS, free_port

import validation
from my_dataset import VOCDataSet
from train_utils.checkpoint import read_checkpoint
from train_utils.evaluation.coco_api import get_coco_api_from_dataset
from train_utils.loading import load_model
from train_utils.evaluation.loop import evaluate
from train_utils.data.transforms import get_transforms


@pytest.mark.slow
def test_torchrun_two_processes(demo_voc, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", str(ROOT / "train_multi_GPU.py"), "--backbone", "mobilenet_v2",
           "--data-path", str(demo_voc), "--classes-json", str(demo_voc / "classes.json"),
           "--output-dir", str(out), "--epochs", "1", *TINY_TRAIN_FLAGS, "-b", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, f"{done.stdout[-2000:]}\n{done.stderr[-3000:]}"

    # Rank 0 alone reports and writes: one set of outputs, one model line.
    assert done.stdout.count("world size 2") == 1, done.stdout
    assert done.stdout.count("IoU metric: bbox") == 1
    assert sorted(p.name for p in out.iterdir() if p.suffix == ".pth") == ["best.pth", "last.pth", "model-0.pth"]
    assert len(list(out.glob("results*.txt"))) == 1
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1

    ckpt = read_checkpoint(str(out / "last.pth"))
    assert not any(key.startswith("module.") for key in ckpt.model), "the unwrapped model is saved"
    # 19 training images shard to 10 per process (the sampler pads); 2 per step -> 5 steps.
    assert ckpt.lr_scheduler["last_epoch"] == 5

    # The checkpoint loads in validation.py and gives exactly the COCO numbers of the distributed run.
    record_path = tmp_path / "record_mAP.txt"
    assert validation.main(["--weights-path", str(out / "last.pth"), "--data-path", str(demo_voc),
                            "--output", str(record_path), "--workers", "0"]) == 0
    record = json.loads(record_path.with_suffix(".json").read_text())
    assert record["num_images"] == 5
    assert record["coco_stats"] == pytest.approx(ckpt.coco_stats, abs=1e-9)


def _evaluate_shard(rank: int, world_size: int, port: int, checkpoint: str, data: str, result_file: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        model = load_model(checkpoint)
        dataset = VOCDataSet(data, transforms=get_transforms(False), txt_name="val.txt",
                             classes_json=str(Path(data) / "classes.json"))
        sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=False)
        loader = DataLoader(dataset, batch_size=1, sampler=sampler, collate_fn=VOCDataSet.collate_fn)
        evaluator = evaluate(model, loader, torch.device("cpu"), get_coco_api_from_dataset(dataset))
        if rank == 0:
            Path(result_file).write_text(json.dumps({
                "shard_sizes": len(sampler), "image_ids": sorted(evaluator.detections),
                "stats": evaluator.stats}))
    finally:
        dist.destroy_process_group()


def test_uneven_dataset_is_evaluated_without_duplicates(trained_run, demo_voc, tmp_path):
    # 5 validation images over 2 processes: the sampler pads rank 1's shard with a repeat of image 0.
    result_file = tmp_path / "dist.json"
    mp.start_processes(_evaluate_shard, args=(2, free_port(), str(trained_run / "last.pth"), str(demo_voc),
                                              str(result_file)), nprocs=2, start_method="fork")
    distributed = json.loads(result_file.read_text())
    assert distributed["shard_sizes"] == 3  # 6 slots for 5 images
    assert distributed["image_ids"] == [0, 1, 2, 3, 4]

    model = load_model(str(trained_run / "last.pth"))
    dataset = VOCDataSet(demo_voc, transforms=get_transforms(False), txt_name="val.txt",
                         classes_json=str(demo_voc / "classes.json"))
    loader = DataLoader(dataset, batch_size=1, collate_fn=VOCDataSet.collate_fn)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the shards: oneDNN's sums may round differently with other thread counts
    try:
        single = evaluate(model, loader, torch.device("cpu"), get_coco_api_from_dataset(dataset))
    finally:
        torch.set_num_threads(threads)
    assert distributed["stats"] == pytest.approx(single.stats, abs=1e-12)


@pytest.mark.slow
def test_torchrun_with_a_frozen_backbone_first(demo_voc, tmp_path):
    """--freeze-backbone-epochs under DDP: DDP covers the parameters that train (wrapped again when
    the backbone thaws), so no find_unused_parameters search is needed and both phases train."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", str(ROOT / "train_multi_GPU.py"), "--backbone", "mobilenet_v2",
           "--data-path", str(demo_voc), "--classes-json", str(demo_voc / "classes.json"),
           "--output-dir", str(out), "--epochs", "2", "--freeze-backbone-epochs", "1", *TINY_TRAIN_FLAGS, "-b", "2"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, f"{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    first, second = (read_checkpoint(str(out / f"model-{epoch}.pth")).model for epoch in (0, 1))
    backbone = [key for key in first if key.startswith("backbone.") and key.endswith("weight")]
    heads = [key for key in first if key.startswith("roi_heads.") and key.endswith("weight")]
    assert any(not torch.equal(first[key], second[key]) for key in backbone), "the backbone trains in epoch 1"
    assert any(not torch.equal(first[key], second[key]) for key in heads)
