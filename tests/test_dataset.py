"""VOCDataSet parsing, error reporting and skipping; aspect-ratio grouping; the demo generator."""
import colorsys
import importlib.util
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile
from torch.utils.data import ConcatDataset, SequentialSampler, Subset

from my_dataset import VOCDataSet, load_class_dict
from train_utils.data.images import decode_image
from train_utils.data.samplers import GroupedBatchSampler, compute_aspect_ratios, create_aspect_ratio_groups
from train_utils.data.transforms import Compose, ToTensor
from voc_factory import VocItem, VocObject, image_pixels, write_classes_json, write_voc

REPO = Path(__file__).resolve().parents[1]
VOC_JSON = REPO / "pascal_voc_classes.json"


def make_dataset(root, **kwargs):
    """VOCDataSet with the repository's 20 VOC classes."""
    return VOCDataSet(root, classes_json=VOC_JSON, **kwargs)


def test_voc_classes_json_is_wz_order():
    class_dict = load_class_dict(VOC_JSON)
    assert list(class_dict) == ["aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
                                "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant",
                                "sheep", "sofa", "train", "tvmonitor"]
    assert list(class_dict.values()) == list(range(1, 21))


def messy_items():
    return [
        VocItem("a", messy=True, encoding_declaration=True, filename="ñandú 画像.jpg", objects=[
            VocObject("dog", (1.5, 2.25, 30, 40.75), difficult=None, truncated=None, pose=None),
            VocObject("person", (3, 4, 20, 21), difficult=1),
        ]),
        VocItem("b", image_ext=".png", write_size=False, width=50, height=30, objects=[
            VocObject("cat", (-5, 3, 80, 47)),   # clipped to the 50x30 image
            VocObject("cat", (10, 10, 10, 20)),  # zero width: dropped
        ]),
        VocItem("c", image_ext=".JPG"),
        VocItem("d", image_ext=".jpeg", objects=[VocObject("car", (100, 100, 120, 120)),  # outside: dropped
                                                 VocObject("car", (0, 0, 64, 48))]),
    ]


def test_messy_folder_gives_exact_targets(tmp_path):
    items = messy_items()
    lines = ["a  1 ", "b -1", "", "   ", "c", "\td  0"]  # per-class list format, blanks, trailing spaces
    write_voc(tmp_path, items, splits={"train": lines}, crlf=True, stray_files=True)
    with pytest.warns(UserWarning) as record:
        dataset = make_dataset(tmp_path)
    assert len(record) == 1 and "dropped 2 degenerate boxes" in str(record[0].message)
    assert dataset.skipped == {"degenerate_boxes": 2, "unknown_class_objects": 0, "unreadable_images": 0,
                               "size_mismatch_images": 0}
    assert dataset.ids == ["a", "b", "c", "d"] and len(dataset) == 4
    assert dataset.year == "2012" and dataset.num_classes == 20 and dataset.class_names[11] == "dog"

    expected = [
        ([[1.5, 2.25, 30, 40.75], [3, 4, 20, 21]], [12, 15], [0, 1]),
        ([[0, 3, 50, 30]], [8], [0]),
        (np.zeros((0, 4)), [], []),
        ([[0, 0, 64, 48]], [7], [0]),
    ]
    for idx, (boxes, labels, crowd) in enumerate(expected):
        image, target = dataset[idx]
        assert set(target) == {"boxes", "labels", "image_id", "area", "iscrowd"}
        boxes = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)
        assert target["boxes"].dtype == torch.float32 and torch.equal(target["boxes"], boxes)
        assert target["labels"].dtype == torch.int64 and target["labels"].tolist() == labels
        assert target["iscrowd"].dtype == torch.int64 and target["iscrowd"].tolist() == crowd
        assert target["image_id"].dtype == torch.int64 and target["image_id"].shape == ()
        assert int(target["image_id"]) == idx
        area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
        assert target["area"].dtype == torch.float32 and torch.equal(target["area"], area)
        item = items[idx]
        assert image.mode == "RGB" and image.size == (item.width, item.height)
        pixels = np.asarray(image).astype(int)
        if item.image_ext == ".png":  # lossless: exact pixels
            assert np.array_equal(pixels, image_pixels(item))
        else:
            assert np.abs(pixels - image_pixels(item)).mean() < 4


def test_to_tensor_output_format(tmp_path):
    write_voc(tmp_path, messy_items()[:1])
    image, target = make_dataset(tmp_path, transforms=Compose([ToTensor()]))[0]
    assert image.dtype == torch.float32 and image.shape == (3, 48, 64)
    assert 0.0 <= float(image.min()) and float(image.max()) <= 1.0
    assert target["boxes"].shape == (2, 4)


def test_classes_json_resolution_and_custom_classes(tmp_path, monkeypatch):
    write_voc(tmp_path / "data", [VocItem("a", objects=[VocObject("kiwi", (1, 1, 9, 9)), VocObject("dog", (2, 2, 9, 9))])])
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="'kiwi'"):  # the default name falls back to the repository's VOC json
        VOCDataSet("data")
    write_classes_json(tmp_path / "pascal_voc_classes.json", ["kiwi", "dog"])  # now found in the working folder
    dataset = VOCDataSet("data")
    assert dataset.classes_json == Path("pascal_voc_classes.json") and dataset.class_names == ["kiwi", "dog"]
    assert dataset.num_classes == 2 and dataset.coco_index(0)[2]["labels"].tolist() == [1, 2]
    with pytest.raises(FileNotFoundError, match="classes json nowhere.json does not exist"):
        VOCDataSet("data", classes_json="nowhere.json")


def test_unknown_classes_fail_once_naming_each_class_and_a_file(tmp_path):
    write_voc(tmp_path, [
        VocItem("x", objects=[VocObject("dragon", (1, 1, 9, 9)), VocObject("dog", (1, 1, 9, 9))]),
        VocItem("y", objects=[VocObject("unicorn", (1, 1, 9, 9)), VocObject("dragon", (2, 2, 8, 8))]),
    ])
    with pytest.raises(ValueError) as error:
        make_dataset(tmp_path)
    message = str(error.value)
    assert "'dragon'" in message and "x.xml" in message and "'unicorn'" in message and "y.xml" in message
    assert str(VOC_JSON) in message and "pass --skip-unknown-classes" in message

    with pytest.warns(UserWarning, match="skipped 3 objects of unknown classes"):
        dataset = make_dataset(tmp_path, skip_unknown_classes=True)
    assert dataset.skipped["unknown_class_objects"] == 3
    assert dataset.coco_index(0)[2]["labels"].tolist() == [12] and dataset.coco_index(1)[2]["labels"].numel() == 0


def test_missing_files_reported_in_one_error(tmp_path):
    write_voc(tmp_path, [VocItem("ok"), VocItem("no_xml", xml="missing"), VocItem("no_img", image="missing"),
                         VocItem("neither", xml="missing", image="missing")])
    with pytest.raises(FileNotFoundError) as error:
        make_dataset(tmp_path)
    message = str(error.value)
    assert "4 annotation/image files" in message
    assert "no_xml.xml" in message and "no_img.(jpg" in message and "neither.xml" in message
    assert "ok.xml" not in message


def test_invalid_annotation_names_the_file(tmp_path):
    write_voc(tmp_path, [VocItem("good"), VocItem("bad", objects=[VocObject("dog", ("abc", 1, 2, 3))])])
    (tmp_path / "VOCdevkit/VOC2012/Annotations/broken.xml").write_text("<annotation><object>")
    (tmp_path / "VOCdevkit/VOC2012/JPEGImages/broken.jpg").write_bytes(b"")
    (tmp_path / "VOCdevkit/VOC2012/ImageSets/Main/train.txt").write_text("good\nbad\nbroken\n")
    with pytest.raises(ValueError) as error:
        make_dataset(tmp_path)
    message = str(error.value)
    assert "2 invalid annotation files" in message and "bad.xml" in message and "'abc'" in message
    assert "broken.xml: not well-formed XML" in message


@pytest.mark.parametrize("content, fragment", [
    ('{"cat": 1, "dog": 3}', "ids must be 1..2"),
    ('{"cat": 1, "cat": 2}', "class names repeated: ['cat']"),
    ('{"cat": "1"}', "integer id"),
    ('["cat"]', "non-empty object"),
    ("{not json", "not valid UTF-8 JSON"),
])
def test_invalid_classes_json_names_the_file(tmp_path, content, fragment):
    write_voc(tmp_path, [VocItem("a")])
    path = tmp_path / "my_classes.json"
    path.write_text(content)
    with pytest.raises(ValueError) as error:
        VOCDataSet(tmp_path, classes_json=path)
    assert str(path) in str(error.value) and fragment in str(error.value)


def test_missing_split_file_lists_available(tmp_path):
    write_voc(tmp_path, [VocItem("a")], splits={"train": ["a"], "val": ["a"]})
    with pytest.raises(FileNotFoundError) as error:
        make_dataset(tmp_path, txt_name="test.txt")
    assert "test.txt" in str(error.value) and "'train.txt', 'val.txt'" in str(error.value)


def test_truncated_image_is_skipped_at_load_time(tmp_path):
    write_voc(tmp_path, [VocItem("a", objects=[VocObject("dog", (1, 1, 9, 9))]), VocItem("broken", image="truncated"),
                         VocItem("c", objects=[VocObject("cat", (2, 2, 8, 8))])])
    dataset = make_dataset(tmp_path)  # the header is fine: nothing to report yet
    assert len(dataset) == 3
    with pytest.warns(UserWarning, match=r"broken\.jpg"):
        image, target = dataset[1]
    assert int(target["image_id"]) == 2 and target["labels"].tolist() == [8]  # the next readable image
    assert dataset.skipped["unreadable_images"] == 1 and [p.name for p in dataset.unreadable] == ["broken.jpg"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # reported once only
        assert int(dataset[1][1]["image_id"]) == 2
    assert dataset.skipped["unreadable_images"] == 1


def test_undecodable_and_size_mismatched_images_dropped_at_construction(tmp_path):
    write_voc(tmp_path, [VocItem("a"), VocItem("junk", image="corrupt"), VocItem("resized", xml_size=(128, 96)),
                         VocItem("b")])
    with pytest.warns(UserWarning) as record:
        dataset = make_dataset(tmp_path)
    assert len(record) == 1
    message = str(record[0].message)
    assert "skipped 1 unreadable images: junk.jpg" in message
    assert "resized.xml says 128x96, resized.jpg is 64x48" in message
    assert dataset.ids == ["a", "b"] and [int(dataset[i][1]["image_id"]) for i in range(2)] == [0, 1]
    assert dataset.skipped["unreadable_images"] == 1 and dataset.skipped["size_mismatch_images"] == 1


def test_no_readable_image_is_an_error(tmp_path):
    write_voc(tmp_path, [VocItem("junk", image="corrupt")])
    with pytest.raises(ValueError, match="no usable image .*junk.jpg"):
        make_dataset(tmp_path)
    write_voc(tmp_path / "t", [VocItem("half", image="truncated")])
    dataset = make_dataset(tmp_path / "t")
    with pytest.warns(UserWarning), pytest.raises(RuntimeError, match="none of the 1 images"):
        dataset[0]


def test_decompression_bomb_is_a_counted_skip(tmp_path, monkeypatch):
    write_voc(tmp_path, [VocItem("small", width=32, height=24, objects=[VocObject("dog", (1, 1, 9, 9))]),
                         VocItem("big", width=128, height=96, objects=[VocObject("cat", (2, 2, 80, 60))]),
                         VocItem("last", width=32, height=24, objects=[VocObject("cat", (3, 3, 9, 9))])])
    loaded = make_dataset(tmp_path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 2000)  # 128 x 96 is over twice that: PIL refuses it
    with pytest.warns(UserWarning, match=r"skipping unreadable image .*big\.jpg \(.*decompression bomb"):
        _, target = loaded[1]
    assert int(target["image_id"]) == 2 and loaded.skipped["unreadable_images"] == 1  # the next image
    with pytest.warns(UserWarning, match=r"skipped 1 unreadable images: big\.jpg: cannot open: .*decompression bomb"):
        dataset = make_dataset(tmp_path)
    assert dataset.ids == ["small", "last"] and dataset.skipped["unreadable_images"] == 1


def test_decode_image_gives_rgb_and_transposes_on_request(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 256, (12, 20, 3), dtype=np.uint8)
    palette = Image.fromarray(pixels).quantize(16)
    palette.save(tmp_path / "palette.png", transparency=0)
    lookup = np.array(palette.getpalette(), dtype=np.uint8).reshape(-1, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # palette transparency goes through RGBA, without PIL's warning
        decoded = decode_image(tmp_path / "palette.png", exif_transpose=False)
    assert decoded.mode == "RGB" and np.array_equal(np.asarray(decoded), lookup[np.asarray(palette)])
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(pixels).save(tmp_path / "rotated.jpg", exif=exif.tobytes())
    stored = decode_image(tmp_path / "rotated.jpg", exif_transpose=False)
    upright = decode_image(tmp_path / "rotated.jpg", exif_transpose=True)
    assert stored.size == (20, 12) and upright.size == (12, 20)
    assert np.array_equal(np.asarray(upright), np.rot90(np.asarray(stored), k=-1))


@pytest.mark.parametrize("form", ["parent", "devkit", "year"])
def test_root_forms_and_year_detection(tmp_path, form):
    voc_dir = write_voc(tmp_path, [VocItem("a", objects=[VocObject("dog", (1, 1, 9, 9))])], year="2007")
    root = {"parent": tmp_path, "devkit": voc_dir.parent, "year": voc_dir}[form]
    dataset = make_dataset(root)
    assert dataset.root == voc_dir and dataset.year == "2007" and len(dataset) == 1
    assert make_dataset(root, year="2007").root == voc_dir
    with pytest.raises((FileNotFoundError, ValueError)) as error:
        make_dataset(root, year="2012")
    assert "2012" in str(error.value) and "VOC2007" in str(error.value)


def test_several_years_need_an_explicit_year(tmp_path):
    write_voc(tmp_path, [VocItem("a")], year="2007")
    write_voc(tmp_path, [VocItem("b"), VocItem("c")], year="2012")
    with pytest.raises(ValueError, match=r"\['VOC2007', 'VOC2012'\].*--year"):
        make_dataset(tmp_path)
    assert make_dataset(tmp_path, year="2012").ids == ["b", "c"]
    assert make_dataset(tmp_path, year=2007).ids == ["a"]
    with pytest.raises(FileNotFoundError, match="no VOC20xx folder"):
        make_dataset(tmp_path / "VOCdevkit" / "VOC2012" / "ImageSets")


def test_exif_rotation_follows_the_annotated_size(tmp_path):
    write_voc(tmp_path, [
        # stored 40x60 with "rotate 90" EXIF, annotated upright as 60x40: transpose on load
        VocItem("upright", width=40, height=60, xml_size=(60, 40), exif_orientation=6,
                objects=[VocObject("dog", (0, 0, 55, 35))]),
        # annotated on the stored pixels (labelImg): EXIF is ignored
        VocItem("stored", width=40, height=60, exif_orientation=6, objects=[VocObject("dog", (0, 0, 35, 55))]),
    ])
    dataset = make_dataset(tmp_path)
    assert dataset.get_height_and_width(0) == (40, 60) and dataset[0][0].size == (60, 40)
    assert dataset.get_height_and_width(1) == (60, 40) and dataset[1][0].size == (40, 60)
    stored = Image.open(tmp_path / "VOCdevkit/VOC2012/JPEGImages/upright.jpg").convert("RGB")
    assert np.array_equal(np.asarray(dataset[0][0]), np.asarray(stored.transpose(Image.Transpose.ROTATE_270)))


@pytest.fixture
def no_pixel_decoding(monkeypatch):
    """Make any pixel decode fail (headers can still be read)."""

    def refuse(self):
        raise AssertionError(f"pixels of {getattr(self, 'filename', self)} were decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", refuse)


def sized_items():
    return [VocItem("wide", width=64, height=32), VocItem("tall", width=30, height=60, write_size=False),
            VocItem("square", width=40, height=40, image_ext=".png"), VocItem("panorama", width=96, height=24)]


def test_sizes_and_groups_need_no_decoding(tmp_path, no_pixel_decoding):
    write_voc(tmp_path, sized_items())
    dataset = make_dataset(tmp_path)
    assert [dataset.get_height_and_width(i) for i in range(4)] == [(32, 64), (60, 30), (40, 40), (24, 96)]
    assert create_aspect_ratio_groups(dataset, k=0) == [1, 0, 1, 1]
    # k=1 edges: 0.5, 1, 2 -> ratios 2, 0.5, 1, 4
    assert create_aspect_ratio_groups(dataset, k=1) == [3, 1, 2, 3]
    subset = Subset(Subset(dataset, [3, 1, 2]), [2, 0])
    assert compute_aspect_ratios(subset) == [1.0, 4.0]
    assert compute_aspect_ratios(ConcatDataset([dataset, subset])) == [2.0, 0.5, 1.0, 4.0, 1.0, 4.0]
    assert [dataset.coco_index(i)[:2] for i in range(4)] == [(32, 64), (60, 30), (40, 40), (24, 96)]
    with pytest.raises(AssertionError, match="decoded"):
        dataset[0]


def test_coco_index_equals_dataset_targets(tmp_path):
    write_voc(tmp_path, messy_items())
    with pytest.warns(UserWarning):
        dataset = make_dataset(tmp_path)
    for idx in range(len(dataset)):
        image, target = dataset[idx]
        height, width, coco_target = dataset.coco_index(idx)
        assert (height, width) == (image.height, image.width)
        assert coco_target.keys() == target.keys()
        assert all(torch.equal(coco_target[k], target[k]) for k in target)


def test_collate_fn_transposes_batch():
    batch = [("img0", {"t": 0}), ("img1", {"t": 1})]
    assert VOCDataSet.collate_fn(batch) == (("img0", "img1"), ({"t": 0}, {"t": 1}))


def test_grouped_batch_sampler_matches_reference_semantics():
    def batches(group_ids, batch_size):
        sampler = GroupedBatchSampler(SequentialSampler(range(len(group_ids))), group_ids, batch_size)
        result = list(sampler)
        assert len(result) == len(sampler) == len(group_ids) // batch_size
        return result

    # a batch leaves as soon as its group has 3; len() = 10 // 3 = 3 asks for one leftover batch:
    # groups 0 [6, 9] and 1 [7, 8] tie, the group whose buffer restarted first wins and is
    # completed with the first index of its group seen this epoch
    assert batches([0, 0, 1, 1, 0, 1, 0, 1, 1, 0], 3) == [[0, 1, 4], [2, 3, 5], [6, 9, 0]]
    # the fuller leftover buffer is completed first
    assert batches([0, 1, 1], 3) == [[1, 2, 1]]
    # enough full batches: leftovers (index 6) wait for another epoch
    assert batches([0, 1, 1, 0, 1, 1, 2], 2) == [[1, 2], [0, 3], [4, 5]]


def test_grouped_batch_sampler_with_random_sampler_keeps_groups_and_length():
    generator = torch.Generator().manual_seed(0)
    group_ids = [i % 3 for i in range(50)]
    sampler = GroupedBatchSampler(torch.utils.data.RandomSampler(range(50), generator=generator), group_ids, 4)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 12
    assert all(len(b) == 4 and len({group_ids[i] for i in b}) == 1 for b in batches)
    full_batches = [b for b in batches if len(set(b)) == 4]
    assert len(set(sum(full_batches, []))) == 4 * len(full_batches)  # no index repeated across full batches


def load_demo_module():
    spec = importlib.util.spec_from_file_location("make_demo_voc", REPO / "tools" / "make_demo_voc.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while executing it
    spec.loader.exec_module(module)
    return module


def test_demo_generator_is_deterministic_and_loads(tmp_path):
    demo = load_demo_module()
    stats = demo.make_demo_voc(tmp_path / "one", num_images=10, seed=3, size=64)
    demo.make_demo_voc(tmp_path / "two", num_images=10, seed=3, size=64)
    files = sorted(p.relative_to(tmp_path / "one") for p in (tmp_path / "one").rglob("*") if p.is_file())
    assert len(files) == 10 + 10 + 2 + 1
    for rel in files:
        assert (tmp_path / "one" / rel).read_bytes() == (tmp_path / "two" / rel).read_bytes(), rel
    demo.make_demo_voc(tmp_path / "other", num_images=10, seed=4, size=64)
    first_image = Path("VOCdevkit/VOC2012/JPEGImages/demo_00000.jpg")
    assert (tmp_path / "other" / first_image).read_bytes() != (tmp_path / "one" / first_image).read_bytes()

    classes = tmp_path / "one" / "classes.json"
    train = VOCDataSet(tmp_path / "one", txt_name="train.txt", classes_json=classes)
    val = VOCDataSet(tmp_path / "one", txt_name="val.txt", classes_json=classes)
    assert train.class_names == ["circle", "square", "triangle"]
    assert (len(train), len(val)) == (8, 2) and not set(train.ids) & set(val.ids)
    counts = dict.fromkeys(train.class_names, 0)
    for dataset in (train, val):
        for idx in range(len(dataset)):
            height, width, target = dataset.coco_index(idx)
            assert (height, width) == (64, 64)
            boxes = target["boxes"]
            assert bool((boxes[:, 2:] > boxes[:, :2]).all()) and bool(((boxes >= 0) & (boxes <= 64)).all())
            for label in target["labels"].tolist():
                counts[dataset.class_names[label - 1]] += 1
    assert counts == {name: stats[name] for name in counts}


def test_demo_recipe_sets_object_sizes_counts_and_colours(capsys, monkeypatch):
    demo = load_demo_module()
    dense = demo.Recipe(size_range=(0.10, 0.15), objects=(5, 6))
    assert dense.small_chance == 0.0  # no 10-14% "small" objects among 10-15% ones
    assert demo.Recipe().small_chance == demo.SMALL_PROBABILITY
    assert demo.Recipe(size_range=(0.10, 0.15), small_probability=0.5).small_chance == 0.5  # asked for: kept
    images = [demo.draw_image(7, i, 128, dense)[1] for i in range(20)]
    assert {len(objects) for objects in images} <= {0, 5, 6} and sum(map(len, images)) >= 5 * 18
    sides = [max(o.box[2] - o.box[0], o.box[3] - o.box[1]) for objects in images for o in objects
             if not o.truncated and not o.difficult]
    assert sides and 0.10 * 128 - 2 <= min(sides) and max(sides) <= 0.15 * 128 + 2  # PIL fills both end pixels

    def circle_hues(recipe):
        hues = []
        for i in range(30):
            for o in demo.draw_image(7, i, 128, recipe)[1]:
                if o.name == "circle":
                    hue = colorsys.rgb_to_hsv(*(c / 255 for c in o.colour))[0]
                    hues.append(min(hue, 1 - hue))  # distance from red
        return hues

    assert max(circle_hues(demo.Recipe())) <= 0.05 + 0.01  # red family (rounded to whole RGB)
    assert max(circle_hues(demo.Recipe(one_colour=True))) > 0.2
    bad = [({"size_range": (0.5, 0.2)}, "--object-size LOW HIGH must satisfy 0 < LOW <= HIGH <= 1, got 0.5 0.2"),
           ({"size_range": (0.0, 0.2)}, "--object-size LOW HIGH must satisfy 0 < LOW <= HIGH <= 1, got 0 0.2"),
           ({"objects": (3, 2)}, "--objects LOW HIGH must satisfy 1 <= LOW <= HIGH, got 3 2"),
           ({"objects": (0, 2)}, "--objects LOW HIGH must satisfy 1 <= LOW <= HIGH, got 0 2"),
           ({"small_probability": 1.5}, "the small-object probability must lie in [0, 1], got 1.5")]
    for kwargs, message in bad:
        with pytest.raises(ValueError) as raised:
            demo.Recipe(**kwargs)
        assert str(raised.value) == message
    monkeypatch.setattr(sys, "argv", ["make_demo_voc.py", "--objects", "3", "2"])
    with pytest.raises(SystemExit):
        demo.main()
    assert capsys.readouterr().err.splitlines()[-1] == (
        "make_demo_voc.py: error: --objects LOW HIGH must satisfy 1 <= LOW <= HIGH, got 3 2")


def test_demo_boxes_are_tight_around_visible_pixels():
    demo = load_demo_module()
    image, objects = demo.draw_image(seed=0, index=1, size=96)
    pixels = np.asarray(image)
    assert len(objects) >= 2
    for obj in objects:
        rows, cols = np.nonzero((pixels == obj.colour).all(axis=-1))
        assert obj.box == (cols.min(), rows.min(), cols.max() + 1, rows.max() + 1)
        assert obj.name in demo.CLASSES and obj.difficult in (0, 1) and obj.truncated in (0, 1)
