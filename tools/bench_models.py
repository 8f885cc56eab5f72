"""The model pairs the benchmarks time: torchvision's Faster R-CNN and ours with the same weights,
their inputs and one training or inference step. Shared by ``tools/benchmark.py`` (CPU cases) and
``tools/bench_cuda.py`` (``--device cuda``)."""
import sys
import tempfile
from pathlib import Path
from typing import Callable, Tuple

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torchvision  # noqa: E402
from torchvision.models.detection import FasterRCNN as TVFasterRCNN  # noqa: E402
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone  # noqa: E402
from torchvision.models.detection.anchor_utils import AnchorGenerator as TVAnchorGenerator  # noqa: E402

from backbone import mobilenet_v2_backbone, resnet50_fpn_backbone  # noqa: E402
from network_files import AnchorsGenerator, FasterRCNN, MultiScaleRoIAlign  # noqa: E402

VOC_SIZE = (375, 500)  # a typical Pascal VOC image (height, width)


def randomize_frozen_bn(model: torch.nn.Module) -> None:
    """Non-trivial frozen statistics so folding or skipping them would show."""
    for module in model.modules():
        if isinstance(module, torchvision.ops.FrozenBatchNorm2d):
            module.weight.uniform_(0.5, 1.5)
            module.bias.normal_(0, 0.1)
            module.running_mean.normal_(0, 0.1)
            module.running_var.uniform_(0.5, 1.5)


# How the models' frozen statistics and the targets are chosen (--regime).
REGIMES = {
    "random": "randomised frozen BatchNorm, 4 boxes of 16 px + up to 35% of the image side per image",
    "plain": "identity frozen BatchNorm (as built without weight files; MobileNetV2 trains its BatchNorm in "
             "every regime), 2 boxes of 10% of the image side per image",
    "trained": "the weights of a ResNet50-FPN checkpoint of this project (--weights), demo images and their boxes",
}


def torchvision_r50(num_classes: int) -> torch.nn.Module:
    """torchvision's ResNet50-FPN detector as its recipe builds it from ImageNet weights (what
    fasterrcnn_resnet50_fpn(weights_backbone=...) does): frozen BatchNorm, layers 2-4 trainable,
    like ours. Without backbone weights it would switch to trainable BatchNorm and all five
    layers, another training computation."""
    backbone = resnet_fpn_backbone(backbone_name="resnet50", weights=None,
                                   norm_layer=torchvision.ops.FrozenBatchNorm2d, trainable_layers=3)
    return TVFasterRCNN(backbone, num_classes=num_classes)


@torch.no_grad()
def build_pair(arch: str, regime: str = "random") -> Tuple[torch.nn.Module, torch.nn.Module]:
    """(ours, torchvision's) with identical random weights."""
    torch.manual_seed(0)
    if arch == "r50":
        theirs = torchvision_r50(91)
        if regime == "random":
            randomize_frozen_bn(theirs)
        ours = FasterRCNN(resnet50_fpn_backbone(), num_classes=91)
    else:
        features = torchvision.models.mobilenet_v2().features
        features.out_channels = 1280
        theirs = TVFasterRCNN(
            features, num_classes=21,
            rpn_anchor_generator=TVAnchorGenerator(((32, 64, 128, 256, 512),), ((0.5, 1.0, 2.0),)),
            box_roi_pool=torchvision.ops.MultiScaleRoIAlign(["0"], 7, 2),
        )
        ours = FasterRCNN(
            mobilenet_v2_backbone(), num_classes=21,
            rpn_anchor_generator=AnchorsGenerator(((32, 64, 128, 256, 512),), ((0.5, 1.0, 2.0),)),
            box_roi_pool=MultiScaleRoIAlign(["0"], 7, 2),
        )
    ours.load_state_dict(theirs.state_dict(), strict=True)
    return ours, theirs


def trained_pair(arch: str, path: str) -> Tuple[torch.nn.Module, torch.nn.Module]:
    """Our ResNet50-FPN and torchvision's, both holding a checkpoint's weights (any class count)."""
    from train_utils.checkpoint import read_checkpoint

    checkpoint = read_checkpoint(path)
    if arch != "r50" or checkpoint.config is None or checkpoint.config.backbone != "resnet50_fpn":
        raise SystemExit(f"--regime trained: {path} is not a resnet50_fpn checkpoint of this project "
                         "(and only the ResNet50-FPN cases take one; only its weights are used, the "
                         "case keeps the default detector settings)")
    classes = checkpoint.config.num_classes
    ours, theirs = FasterRCNN(resnet50_fpn_backbone(), num_classes=classes), torchvision_r50(classes)
    for model in (ours, theirs):
        model.load_state_dict(checkpoint.model, strict=True)
    return ours, theirs


def demo_inputs(batch: int, size: Tuple[int, int], num_classes: int):
    """``batch`` demo images (tools/make_demo_voc.py: shapes on gradients) resized to ``size`` and
    their boxes, labels below ``num_classes``."""
    from tools.make_demo_voc import make_demo_voc
    from train_utils.data.transforms import get_transforms
    from my_dataset import VOCDataSet

    with tempfile.TemporaryDirectory() as folder:
        make_demo_voc(Path(folder), num_images=batch * 4, seed=0, size=max(size))
        dataset = VOCDataSet(folder, transforms=get_transforms(False), txt_name="train.txt",
                             classes_json=str(Path(folder) / "classes.json"))
        samples = [dataset[i] for i in range(len(dataset))]
    samples = [(image, target) for image, target in samples if len(target["boxes"])][:batch]
    assert len(samples) == batch, "too few demo images with boxes"
    scale = torch.tensor([size[1], size[0], size[1], size[0]]) / max(size)
    images = [torch.nn.functional.interpolate(image[None], size=size, mode="bilinear")[0] for image, _ in samples]
    targets = [{"boxes": target["boxes"] * scale, "labels": target["labels"].clamp(max=num_classes - 1)}
               for _, target in samples]
    return images, targets


def make_inputs(batch: int, size: Tuple[int, int], seed: int = 0, regime: str = "random"):
    """``batch`` noise images [3, H, W] and their targets, boxes as REGIMES[regime] says."""
    generator = torch.Generator().manual_seed(seed)
    images = [torch.rand(3, *size, generator=generator) for _ in range(batch)]
    extent = torch.tensor([size[1], size[0]], dtype=torch.float32)
    count = 4 if regime == "random" else 2
    targets = []
    for _ in range(batch):
        xy = torch.rand(count, 2, generator=generator) * extent * 0.6
        if regime == "random":
            wh = torch.rand(count, 2, generator=generator) * extent * 0.35 + 16
        else:
            wh = extent.expand(count, 2) * 0.1
        targets.append({"boxes": torch.cat([xy, xy + wh], dim=1),
                        "labels": torch.randint(1, 20, (count,), generator=generator)})
    return images, targets


def infer_step(model, images, targets) -> Callable[[], None]:
    model.eval()

    def run():
        with torch.inference_mode():
            model(images)
    return run


def train_step(model, images, targets) -> Callable[[], None]:
    model.train()

    def run():
        torch.manual_seed(0)
        losses = model(images, targets)
        sum(losses.values()).backward()
        model.zero_grad(set_to_none=True)
    return run


# name -> (architecture, step kind, batch size, image size, description); the models resize to
# --min-size 800 --max-size 1333 unless RESIZE names the case.
