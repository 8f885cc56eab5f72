"""Detection transforms: exact box geometry on crafted cases, random variants, empty targets."""
import numpy as np
import pytest
import torch
from PIL import Image

from train_utils.data.transforms import (
    AUGMENT_POLICIES, Compose, RandomHorizontalFlip, RandomIoUCrop, RandomPhotometricDistort,
    RandomZoomOut, ToTensor, crop, get_transforms, hflip, zoom_out,
)


def coordinate_image(height: int, width: int) -> torch.Tensor:
    """[3, H, W] float image whose channel 0 holds x and channel 1 holds y of each pixel."""
    ys, xs = torch.meshgrid(torch.arange(height, dtype=torch.float32), torch.arange(width, dtype=torch.float32),
                            indexing="ij")
    return torch.stack([xs, ys, torch.zeros_like(xs)])


def make_target(boxes) -> dict:
    boxes = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    n = boxes.shape[0]
    return {"boxes": boxes, "labels": torch.arange(1, n + 1), "image_id": torch.tensor(7),
            "area": (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]),
            "iscrowd": torch.tensor([i % 2 for i in range(n)])}


def rgb_array(height: int, width: int) -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (height, width, 3), dtype=np.uint8)


def test_to_tensor_exact():
    array = rgb_array(5, 7)
    image, target = ToTensor()(Image.fromarray(array), {"boxes": torch.zeros(0, 4)})
    assert image.dtype == torch.float32 and image.shape == (3, 5, 7)
    assert torch.equal(image, torch.from_numpy(array).permute(2, 0, 1).float() / 255)
    assert target["boxes"].shape == (0, 4)


def test_hflip_exact_on_tensor_and_pil():
    image = coordinate_image(4, 6)
    target = make_target([[1, 0, 3, 2], [0, 1, 6, 4], [2.5, 1, 4, 3.5]])
    original = {k: v.clone() for k, v in target.items()}
    flipped, out = hflip(image, target)
    assert torch.equal(out["boxes"], torch.tensor([[3, 0, 5, 2], [0, 1, 6, 4], [2, 1, 3.5, 3.5]]))
    assert torch.equal(flipped, image.flip(-1))
    for key in ("labels", "area", "iscrowd", "image_id"):
        assert torch.equal(out[key], original[key])
    assert all(torch.equal(target[k], original[k]) for k in target)  # input untouched

    array = rgb_array(4, 6)
    pil_flipped, pil_out = hflip(Image.fromarray(array), target)
    assert np.array_equal(np.asarray(pil_flipped), array[:, ::-1])
    assert torch.equal(pil_out["boxes"], out["boxes"])

    assert torch.equal(RandomHorizontalFlip(1.0)(image, target)[1]["boxes"], out["boxes"])
    same_image, same_target = RandomHorizontalFlip(0.0)(image, target)
    assert same_image is image and same_target is target


def test_zoom_out_exact_on_tensor_and_pil():
    image = coordinate_image(2, 3) + 0.5
    target = make_target([[0, 0, 3, 2], [1, 0.5, 2, 1.5]])
    canvas, out = zoom_out(image, target, canvas_width=7, canvas_height=5, left=2, top=1, fill=(0.1, 0.2, 0.3))
    assert canvas.shape == (3, 5, 7)
    assert torch.equal(out["boxes"], torch.tensor([[2, 1, 5, 3], [3, 1.5, 4, 2.5]]))
    assert torch.equal(out["area"], target["area"]) and torch.equal(out["labels"], target["labels"])
    assert torch.equal(canvas[:, 1:3, 2:5], image)
    outside = torch.ones(5, 7, dtype=torch.bool)
    outside[1:3, 2:5] = False
    for channel, value in enumerate((0.1, 0.2, 0.3)):
        assert bool((canvas[channel][outside] == torch.tensor(value)).all())

    array = rgb_array(2, 3)
    pil_canvas, pil_out = zoom_out(Image.fromarray(array), target, 7, 5, 2, 1)
    pixels = np.asarray(pil_canvas)
    assert pil_canvas.size == (7, 5) and np.array_equal(pixels[1:3, 2:5], array)
    assert tuple(pixels[0, 0]) == (124, 116, 104)  # round(255 * IMAGENET_MEAN)
    assert torch.equal(pil_out["boxes"], out["boxes"])
    with pytest.raises(ValueError, match="does not fit"):
        zoom_out(image, target, 4, 5, 2, 1)


def test_crop_exact_keeps_boxes_by_centre():
    image = coordinate_image(8, 10)
    target = make_target([
        [3, 3, 5, 5],    # inside the window
        [1, 2, 5, 6],    # centre (3, 4) inside, sticks out left: clipped
        [0, 0, 2, 2],    # centre (1, 1) outside: removed
        [6, 2, 10, 6],   # centre x = 8 on the window's right edge: removed (strictly inside only)
        [4, 4, 12, 9],   # centre (8, 6.5): on the right edge as well: removed
        [3, 5, 7, 9],    # centre (5, 7) inside, sticks out right and bottom: clipped
    ])
    out_image, out = crop(image, target, left=2, top=1, width=6, height=7)
    assert torch.equal(out_image, image[:, 1:8, 2:8])
    assert torch.equal(out["boxes"], torch.tensor([[1, 2, 3, 4], [0, 1, 3, 5], [1, 4, 5, 7]], dtype=torch.float32))
    assert out["labels"].tolist() == [1, 2, 6]
    assert out["iscrowd"].tolist() == [0, 1, 1]
    assert out["area"].tolist() == [4.0, 12.0, 12.0]  # recomputed after clipping
    assert int(out["image_id"]) == 7

    pil_image, pil_out = crop(Image.fromarray(rgb_array(8, 10)), target, 2, 1, 6, 7)
    assert pil_image.size == (6, 7) and torch.equal(pil_out["boxes"], out["boxes"])


def test_random_zoom_out_places_image_where_boxes_say():
    image = coordinate_image(6, 8) + 1.0  # strictly positive, unlike the zero fill below
    target = make_target([[1, 1, 4, 5], [5, 0, 8, 6]])
    transform = RandomZoomOut(fill=(0.0, 0.0, 0.0), side_range=(1.5, 3.0), p=1.0)
    torch.manual_seed(0)
    for _ in range(10):
        canvas, out = transform(image, target)
        height, width = canvas.shape[-2:]
        assert 1.5 * 6 - 1 <= height <= 3 * 6 and 1.5 * 8 - 1 <= width <= 3 * 8
        left, top = (out["boxes"][0, :2] - target["boxes"][0, :2]).int().tolist()
        assert torch.equal(out["boxes"], target["boxes"] + torch.tensor([left, top, left, top]))
        assert torch.equal(canvas[:, top:top + 6, left:left + 8], image)
        assert float(canvas.sum()) == float(image.sum())  # the rest is fill
    same_image, same_target = RandomZoomOut(p=0.0)(image, target)
    assert same_image is image and same_target is target
    with pytest.raises(ValueError, match="side_range"):
        RandomZoomOut(side_range=(0.5, 2.0))


def test_random_iou_crop_window_matches_crop_kernel():
    image = coordinate_image(40, 60)
    target = make_target([[5, 5, 25, 30], [30, 10, 55, 38], [20, 20, 30, 25]])
    transform = RandomIoUCrop()
    torch.manual_seed(0)
    cropped_count = 0
    for _ in range(30):
        out_image, out = transform(image, target)
        if out_image is image:
            assert out is target
            continue
        cropped_count += 1
        left, top = int(out_image[0, 0, 0]), int(out_image[1, 0, 0])  # the coordinates of the window corner
        height, width = out_image.shape[-2:]
        assert 0.3 * 40 - 1 <= height <= 40 and 0.3 * 60 - 1 <= width <= 60 and 0.5 <= width / height <= 2
        expected_image, expected = crop(image, target, left, top, width, height)
        assert torch.equal(out_image, expected_image)
        assert all(torch.equal(out[k], expected[k]) for k in expected)
        assert out["boxes"].shape[0] >= 1
    assert 5 <= cropped_count < 30  # both branches happen


def test_random_iou_crop_honours_min_iou():
    image = coordinate_image(40, 60)
    target = make_target([[10, 5, 45, 35]])
    transform = RandomIoUCrop(sampler_options=[0.7])
    torch.manual_seed(1)
    for _ in range(10):
        out_image, out = transform(image, target)
        left, top = int(out_image[0, 0, 0]), int(out_image[1, 0, 0])
        height, width = out_image.shape[-2:]
        window = torch.tensor([left, top, left + width, top + height], dtype=torch.float32)
        box = target["boxes"][0]
        inter = (torch.min(box[2:], window[2:]) - torch.max(box[:2], window[:2])).clamp(min=0).prod()
        union = (box[2:] - box[:2]).prod() + (window[2:] - window[:2]).prod() - inter
        assert float(inter / union) >= 0.7


@pytest.mark.parametrize("transform", [
    ToTensor(), RandomHorizontalFlip(1.0), RandomPhotometricDistort(p=1.0), RandomZoomOut(p=1.0),
    RandomIoUCrop(), Compose([RandomZoomOut(p=1.0), RandomIoUCrop(), RandomHorizontalFlip(1.0), ToTensor()]),
])
def test_empty_targets(transform):
    torch.manual_seed(0)
    image = Image.fromarray(rgb_array(12, 16))
    target = make_target(np.zeros((0, 4)))
    out_image, out = transform(image, target)
    assert out["boxes"].shape == (0, 4) and out["boxes"].dtype == torch.float32
    assert out["labels"].shape == (0,) and out["area"].shape == (0,) and out["iscrowd"].shape == (0,)
    assert out_image is not None


@pytest.mark.parametrize("as_tensor", [False, True])
def test_photometric_distort_changes_colours_only(as_tensor):
    array = rgb_array(10, 12)
    image = ToTensor()(Image.fromarray(array), {})[0] if as_tensor else Image.fromarray(array)
    target = make_target([[1, 1, 5, 5]])
    same_image, same_target = RandomPhotometricDistort(p=0.0)(image, target)
    assert same_image is image and same_target is target
    torch.manual_seed(0)
    out_image, out = RandomPhotometricDistort(p=1.0)(image, target)
    assert out is target
    if as_tensor:
        assert out_image.shape == image.shape and 0 <= float(out_image.min()) and float(out_image.max()) <= 1
        assert not torch.equal(out_image, image)
    else:
        assert out_image.size == image.size and not np.array_equal(np.asarray(out_image), array)


def test_get_transforms_policies():
    array = rgb_array(24, 32)
    target = make_target([[2, 2, 20, 14], [10, 8, 30, 22]])
    evaluation = get_transforms(train=False, augment="full")
    image, out = evaluation(Image.fromarray(array), target)
    assert torch.equal(image, ToTensor()(Image.fromarray(array), {})[0]) and out is target
    torch.manual_seed(0)
    for policy in AUGMENT_POLICIES:
        for _ in range(5):
            image, out = get_transforms(train=True, augment=policy)(Image.fromarray(array), target)
            assert isinstance(image, torch.Tensor) and image.dtype == torch.float32 and image.shape[0] == 3
            height, width = image.shape[-2:]
            boxes = out["boxes"]
            assert boxes.shape[0] == out["labels"].shape[0] == out["area"].shape[0] == out["iscrowd"].shape[0]
            assert bool((boxes[:, 0::2] >= 0).all() and (boxes[:, 0::2] <= width).all())
            assert bool((boxes[:, 1::2] >= 0).all() and (boxes[:, 1::2] <= height).all())
    assert [type(t).__name__ for t in get_transforms(True, "hflip").transforms] == [
        "ToTensor", "RandomHorizontalFlip", "DropDegenerateBoxes"]
    with pytest.raises(ValueError, match="unknown augmentation element 'cutout'"):
        get_transforms(True, "cutout")
