"""predict.py at scale: batched inference, videos and streams, predictions written back as
Pascal VOC / YOLO annotations (train_utils/inference/{pipeline,video,annotations}.py)."""
import functools
import http.server
import json
import signal
import subprocess
import sys
import threading
import time
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from lxml import etree
from PIL import Image, ImageOps

from backbone import read_weight_file
from train_utils.data.voc import read_voc_split
from train_utils.data.yolo import read_yolo
from train_utils.inference.annotations import pixel_boxes
from train_utils.loading import load_model
from train_utils.inference.onnx_export import match_detections
from train_utils.inference.pipeline import batches_by_size, detect_each, torch_batch_detect, Timings

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ["circle", "square", "triangle"]


@pytest.fixture(scope="module")
def lively_checkpoint(trained_run, tmp_path_factory) -> Path:
    """The trained tiny checkpoint with a random box classifier scaled to the spread of the box
    features on a test scene, so detections of several classes get scores that depend on the
    pixels (no ties) and every image gets some."""
    checkpoint = read_weight_file(str(trained_run / "best.pth"))
    model = load_model(str(trained_run / "best.pth"))
    features = []
    model.roi_heads.box_head.register_forward_hook(lambda module, inputs, output: features.append(output))
    with torch.no_grad():
        model([torch.from_numpy(scene(128, 160, 0)).permute(2, 0, 1).float() / 255])
    mean, spread = features[0].mean(0), features[0].std(0).norm()
    weight = torch.randn((4, mean.numel()), generator=torch.Generator().manual_seed(3)) * 1.5 / spread
    checkpoint["model"]["roi_heads.box_predictor.cls_score.weight"].copy_(weight)
    checkpoint["model"]["roi_heads.box_predictor.cls_score.bias"].copy_(torch.tensor([0.0, 2.0, 2.0, 2.0]) - weight @ mean)
    checkpoint["model_config"]["box_detections_per_img"] = 6
    path = tmp_path_factory.mktemp("lively") / "lively.pth"
    torch.save(checkpoint, path)
    return path


def scene(height: int, width: int, step: int, seed: int = 0) -> np.ndarray:
    """A noisy background with two bright shapes that move with ``step``."""
    image = np.random.default_rng(seed + step).integers(0, 90, (height, width, 3), dtype=np.uint8)
    x = 10 + 4 * step
    image[20:60, x:x + 40] = (230, 40, 40)
    yy, xx = np.mgrid[:height, :width]
    image[(yy - 85) ** 2 + (xx - (width - 40 - 3 * step)) ** 2 < 22 ** 2] = (40, 200, 60)
    return image


def write_video(path: Path, frames: int, size=(128, 160), fps: int = 10, codec: str = "libx264") -> list:
    """Encode ``frames`` scenes; returns the frames as decoded back (what any reader sees)."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.height, stream.width = size
        stream.pix_fmt = "yuv420p"
        for step in range(frames):
            frame = av.VideoFrame.from_ndarray(scene(*size, step), format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    with av.open(str(path)) as container:
        return [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]


def video_facts(path: Path) -> tuple[int, Fraction, int, int]:
    """(decoded frame count, average frame rate, width, height) of a video file."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        count = sum(1 for _ in container.decode(stream))
        return count, stream.average_rate, stream.codec_context.width, stream.codec_context.height


def run_predict(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "predict.py"), "--device", "cpu", "--workers", "1", *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)


def read_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def as_detections(records: list[dict]) -> dict[str, torch.Tensor]:
    """COCO results or JSON-lines detections of one image as a detections dict (xyxy boxes)."""
    if records and "bbox" in records[0]:
        boxes = [[x, y, x + w, y + h] for x, y, w, h in (r["bbox"] for r in records)]
        labels = [r["category_id"] for r in records]
    else:
        boxes, labels = [r["box"] for r in records], [r["class_id"] for r in records]
    return {"boxes": torch.tensor(boxes, dtype=torch.float64).reshape(-1, 4),
            "labels": torch.tensor(labels, dtype=torch.int64),
            "scores": torch.tensor([r["score"] for r in records], dtype=torch.float64)}


# ------------------------------------------------------------------------------ batching
def test_batches_hold_one_size_and_bounded_waiting():
    sizes = ["a", "b", "a", "a", "b", "c", "a", "b", "b"]
    groups = list(batches_by_size(enumerate(sizes), lambda item: item[1], batch_size=2))
    assert [[i for i, _ in g] for g in groups] == [[0, 2], [1, 4], [3, 6], [7, 8], [5]]
    # With more than 3 waiting, the fullest group leaves before it is full.
    groups = list(batches_by_size(enumerate("abacd"), lambda item: item[1], 3, max_waiting=3))
    assert [[i for i, _ in g] for g in groups] == [[0, 2], [1], [3], [4]]


def test_batched_detections_equal_one_at_a_time(lively_checkpoint):
    model = load_model(str(lively_checkpoint))
    detect = torch_batch_detect(model, torch.device("cpu"))
    images = [torch.from_numpy(scene(128, 160, step)).permute(2, 0, 1) for step in range(4)]
    images += [torch.from_numpy(scene(150, 110, step, seed=9)[:150, :110].copy()).permute(2, 0, 1) for step in range(2)]
    single = [detect_each(detect, [image], Timings(), torch.device("cpu"))[0] for image in images]
    shape = lambda item: tuple(item[1].shape)  # noqa: E731
    batched = {}
    for group in batches_by_size(enumerate(images), shape, batch_size=4):
        assert len({tuple(image.shape) for _, image in group}) == 1
        outputs = detect_each(detect, [image for _, image in group], Timings(), torch.device("cpu"))
        batched.update({index: output for (index, _), output in zip(group, outputs)})
    assert sorted(batched) == list(range(6))
    total = 0
    for index, expected in enumerate(single):
        box_error, score_error = match_detections(expected, batched[index])
        assert box_error < 1e-4 and score_error < 1e-5, index
        total += len(expected["scores"])
    assert total >= 12 and len({int(label) for out in single for label in out["labels"]}) >= 2


def test_predict_batched_equals_one_at_a_time(lively_checkpoint, tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for step in range(5):
        Image.fromarray(scene(128, 160, step)).save(folder / f"a{step}.png")
    Image.fromarray(scene(160, 128, 0)[:160, :128].copy()).save(folder / "tall.png")
    runs = {}
    for batch in ("1", "3"):
        out = tmp_path / f"out{batch}"
        done = run_predict("--weights", str(lively_checkpoint), str(folder), "--output-dir", str(out),
                           "--batch-size", batch, "--score-thresh", "0.3", "--save-json")
        assert done.returncode == 0, done.stderr
        assert "6 images processed, 0 skipped" in done.stdout
        assert "throughput: 6 images in" in done.stdout and "model" in done.stdout and "decode" in done.stdout
        runs[batch] = json.loads((out / "predictions.json").read_text())
    for image in sorted({r["image"] for r in runs["1"]}):
        one = as_detections([r for r in runs["1"] if r["image"] == image])
        three = as_detections([r for r in runs["3"] if r["image"] == image])
        box_error, score_error = match_detections(one, three)
        assert box_error < 1e-4 and score_error < 2e-5  # the results file rounds scores to 5 decimals
    assert {r["image"] for r in runs["1"]} == {r["image"] for r in runs["3"]}
    assert len(runs["1"]) >= 12


# ------------------------------------------------------------------------------ videos and streams
def test_video_gives_annotated_video_and_json_lines_equal_to_the_frames(lively_checkpoint, tmp_path):
    frames = write_video(tmp_path / "clip.mkv", 12)
    out = tmp_path / "out"
    done = run_predict("--weights", str(lively_checkpoint), str(tmp_path / "clip.mkv"), "--output-dir", str(out),
                       "--batch-size", "2", "--score-thresh", "0.3")
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr and "warning" not in done.stderr
    assert video_facts(out / "clip.mp4") == (12, Fraction(10), 160, 128)
    lines = read_lines(out / "clip.jsonl")
    assert [line["frame"] for line in lines] == list(range(12))
    assert [line["time"] for line in lines] == pytest.approx([i / 10 for i in range(12)])
    assert "12 images processed" in done.stdout

    extracted = tmp_path / "frames"  # the same frames as images, through the image path of predict.py
    extracted.mkdir()
    for index, frame in enumerate(frames):
        Image.fromarray(frame).save(extracted / f"f{index:03d}.png")
    done = run_predict("--weights", str(lively_checkpoint), str(extracted), "--output-dir", str(tmp_path / "png"),
                       "--score-thresh", "0.3", "--save-json", "--no-draw")
    assert done.returncode == 0, done.stderr
    records = json.loads((tmp_path / "png" / "predictions.json").read_text())
    total = 0
    for index, line in enumerate(lines):
        expected = as_detections([r for r in records if r["image"].endswith(f"f{index:03d}.png")])
        box_error, score_error = match_detections(expected, as_detections(line["detections"]))
        assert box_error < 1e-4 and score_error < 2e-5, index
        total += len(line["detections"])
    assert total >= 24


def test_video_every_max_frames_and_prelabelling(lively_checkpoint, tmp_path):
    write_video(tmp_path / "walk.mp4", 10)
    out, voc = tmp_path / "out", tmp_path / "voc"
    done = run_predict("--weights", str(lively_checkpoint), str(tmp_path / "walk.mp4"), "--output-dir", str(out),
                       "--every", "3", "--max-frames", "7", "--score-thresh", "0.3", "--save-voc", str(voc))
    assert done.returncode == 0, done.stderr
    assert video_facts(out / "walk.mp4")[:2] == (7, Fraction(10))  # every frame read is in the video
    lines = read_lines(out / "walk.jsonl")
    assert [line["frame"] for line in lines] == [0, 3, 6]
    ids = (voc / "ImageSets" / "Main" / "predicted.txt").read_text().split()
    assert ids == ["walk_000000", "walk_000003", "walk_000006"]
    annotations = read_voc_split(voc, "predicted.txt")
    for image, line in zip(annotations.images, lines):
        assert image.image_path.name == f"{image.id}.jpg" and image.declared_size == (128, 160)
        expected = pixel_boxes(torch.tensor([d["box"] for d in line["detections"]]).reshape(-1, 4), 160, 128)
        assert [obj.box for obj in image.objects] == [tuple(float(v) for v in box) for box in expected]
        assert [obj.name for obj in image.objects] == [d["label"] for d in line["detections"]]


def test_a_truncated_video_gives_one_line_and_keeps_the_frames(lively_checkpoint, tmp_path):
    write_video(tmp_path / "long.mkv", 40)
    data = (tmp_path / "long.mkv").read_bytes()
    (tmp_path / "cut.mkv").write_bytes(data[: len(data) // 2])
    out = tmp_path / "out"
    done = run_predict("--weights", str(lively_checkpoint), str(tmp_path / "cut.mkv"), "--output-dir", str(out),
                       "--batch-size", "4", "--score-thresh", "0.3")
    assert done.returncode == 0, done.stderr
    problems = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(problems) == 1 and "cut.mkv: the video ends early after" in problems[0], done.stderr
    kept = int(problems[0].split("after ")[1].split()[0])
    assert 5 <= kept < 40
    assert video_facts(out / "cut.mp4")[0] == kept
    assert len(read_lines(out / "cut.jsonl")) == kept

    write_video(tmp_path / "whole.mp4", 20)  # an MP4's index comes last: half a file cannot be opened
    data = (tmp_path / "whole.mp4").read_bytes()
    (tmp_path / "cut.mp4").write_bytes(data[: len(data) // 2])
    done = run_predict("--weights", str(lively_checkpoint), str(tmp_path / "cut.mp4"), "--output-dir", str(out),
                       "--score-thresh", "0.3")
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    assert f"skipped {tmp_path / 'cut.mp4'}: cannot open the video" in done.stderr


def test_a_stream_url_and_a_missing_camera(lively_checkpoint, tmp_path):
    write_video(tmp_path / "live.mkv", 8)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/live.mkv"
        out = tmp_path / "out"
        done = run_predict("--weights", str(lively_checkpoint), "--source", url, "--output-dir", str(out),
                           "--max-frames", "5", "--score-thresh", "0.3")
    finally:
        server.shutdown()
    assert done.returncode == 0, done.stderr
    assert video_facts(out / "stream1.mp4")[:2] == (5, Fraction(10))
    assert [line["source"] for line in read_lines(out / "stream1.jsonl")] == [url] * 5

    done = run_predict("--weights", str(lively_checkpoint), "--source", "9", "--output-dir", str(out))
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert "skipped camera 9 (/dev/video9): cannot open the video" in done.stderr


# ------------------------------------------------------------------------------ predictions as annotations
LABELIMG_FIELDS = ["folder", "filename", "path", "source/database", "size/width", "size/height", "size/depth",
                   "segmented"]
EXIF_ORIENTATION = 0x0112


def prelabel_folder(folder: Path) -> dict[str, np.ndarray]:
    """Images a user might pre-label: JPEG, PNG, a name with spaces, an EXIF-rotated photo and a
    WebP (a format the readers do not take); returns the upright pixels by file name."""
    folder.mkdir()
    shown = {}
    for name, step in (("a.jpg", 0), ("b.png", 2), ("my photo.png", 4)):
        Image.fromarray(scene(128, 160, step)).save(folder / name, quality=95)
        shown[name] = np.asarray(Image.open(folder / name).convert("RGB"))
    stored = np.ascontiguousarray(np.rot90(scene(128, 160, 6), k=1))  # [160, 128], shown rotated back
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = 8  # a rotating orientation: viewers show the [160, 128] pixels as [128, 160]
    Image.fromarray(stored).save(folder / "turned.jpg", quality=95, exif=exif)
    with Image.open(folder / "turned.jpg") as image:
        shown["turned.jpg"] = np.asarray(ImageOps.exif_transpose(image).convert("RGB"))
    Image.fromarray(scene(128, 160, 8)).save(folder / "c.webp", lossless=True)
    shown["c.webp"] = scene(128, 160, 8)
    return shown


def test_save_voc_round_trip_through_our_reader_and_lxml(lively_checkpoint, tmp_path):
    from train_utils.data.voc import VOCDataSet

    shown = prelabel_folder(tmp_path / "new")
    voc, out = tmp_path / "voc", tmp_path / "out"
    done = run_predict("--weights", str(lively_checkpoint), str(tmp_path / "new"), "--output-dir", str(out),
                       "--score-thresh", "0.3", "--save-voc", str(voc), "--save-json", "--no-draw")
    assert done.returncode == 0, done.stderr
    assert f"5 images annotated as Pascal VOC XML in {voc}" in done.stdout
    ids = (voc / "ImageSets" / "Main" / "predicted.txt").read_text().split()
    assert sorted(ids) == ["a", "b", "c", "my_photo", "turned"]
    assert {p.name for p in (voc / "JPEGImages").iterdir()} == {"a.jpg", "b.png", "my_photo.png", "turned.jpg",
                                                                 "c.jpg"}
    assert (voc / "JPEGImages" / "a.jpg").read_bytes() == (tmp_path / "new" / "a.jpg").read_bytes()
    assert json.loads((voc / "classes.json").read_text()) == {"circle": 1, "square": 2, "triangle": 3}
    assert (voc / "classes.txt").read_text().split() == CLASSES

    strict = etree.XMLParser(recover=False, resolve_entities=False)
    records = json.loads((out / "predictions.json").read_text())
    dataset = VOCDataSet(voc, txt_name="predicted.txt", classes_json=voc / "classes.json")
    total = 0
    for index, image_id in enumerate(dataset.ids):
        source = next(name for name in shown if name.replace(" ", "_").rsplit(".", 1)[0] == image_id)
        root = etree.fromstring((voc / "Annotations" / f"{image_id}.xml").read_bytes(), strict)
        assert all(root.find(field) is not None for field in LABELIMG_FIELDS)
        height, width = shown[source].shape[:2]
        assert (int(root.findtext("size/width")), int(root.findtext("size/height"))) == (width, height)
        mine = [r for r in records if Path(r["image"]).name == source]
        expected = pixel_boxes(torch.tensor([[x, y, x + w, y + h] for x, y, w, h in (r["bbox"] for r in mine)])
                               .reshape(-1, 4), width, height)
        image, target = dataset[index]
        assert np.array_equal(np.asarray(image), np.asarray(Image.open(dataset_image(voc, image_id)).convert("RGB")))
        assert image.size == (width, height), image_id
        assert target["boxes"].tolist() == [list(map(float, box)) for box in expected], image_id
        assert target["labels"].tolist() == [r["category_id"] for r in mine]
        assert [obj.findtext("difficult") for obj in root.findall("object")] == ["0"] * len(mine)
        total += len(mine)
    assert total >= 10


def dataset_image(voc: Path, image_id: str) -> Path:
    return next((voc / "JPEGImages").glob(f"{image_id}.*"))


def test_save_voc_keeps_corrected_annotations_and_yolo_round_trip(lively_checkpoint, tmp_path):
    prelabel_folder(tmp_path / "new")
    voc, yolo = tmp_path / "voc", tmp_path / "yolo"
    args = ["--weights", str(lively_checkpoint), str(tmp_path / "new"), "--output-dir", str(tmp_path / "out"),
            "--score-thresh", "0.3", "--no-draw"]
    assert run_predict(*args, "--save-voc", str(voc), "--save-yolo", str(yolo), "--save-json").returncode == 0
    corrected = b"<annotation><filename>a.jpg</filename><object><name>square</name><bndbox><xmin>1</xmin>" \
                b"<ymin>2</ymin><xmax>30</xmax><ymax>40</ymax></bndbox></object></annotation>"
    (voc / "Annotations" / "a.xml").write_bytes(corrected)
    done = run_predict(*args, "--save-voc", str(voc))
    assert done.returncode == 0, done.stderr
    assert (voc / "Annotations" / "a.xml").read_bytes() == corrected
    assert "5 images already annotated" in done.stdout and "--overwrite-labels" in done.stdout
    assert sorted((voc / "ImageSets" / "Main" / "predicted.txt").read_text().split()) == \
        ["a", "b", "c", "my_photo", "turned"]
    assert run_predict(*args, "--save-voc", str(voc), "--overwrite-labels").returncode == 0
    assert (voc / "Annotations" / "a.xml").read_bytes() != corrected

    records = json.loads((tmp_path / "out" / "predictions.json").read_text())
    annotations = read_yolo(yolo, "predicted")
    assert (yolo / "classes.txt").read_text().split() == CLASSES
    assert sorted(image.id for image in annotations.images) == ["a", "b", "c", "my_photo", "turned"]
    for image in annotations.images:
        mine = [r for r in records if Path(r["image"]).stem.replace(" ", "_") == image.id]
        height, width = 128, 160  # as shown (turned.jpg is stored upright)
        boxes = [[x1 * width, y1 * height, x2 * width, y2 * height] for x1, y1, x2, y2 in (o.box for o in image.objects)]
        expected = [[max(x, 0), max(y, 0), min(x + w, width), min(y + h, height)] for x, y, w, h in
                    (r["bbox"] for r in mine)]
        assert np.allclose(boxes, expected, atol=2e-3), image.id
        assert [o.name for o in image.objects] == [r["category_name"] for r in mine]

    (yolo / "classes.txt").write_text("dog\ncat\n")
    done = run_predict(*args, "--save-yolo", str(yolo))
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert "classes.txt lists other classes than the model" in done.stderr


def default_sigint() -> None:
    """Popen ``preexec_fn``: the child gets SIGINT's default disposition. A process that starts
    with SIGINT ignored keeps ignoring it (Python installs no KeyboardInterrupt handler), and an
    ignored SIGINT is inherited: an earlier in-process test of this worker may have left one."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_closes_the_video_and_json_lines(lively_checkpoint, tmp_path):
    frames = 1500  # long enough that a loaded machine cannot finish it before the signal arrives
    write_video(tmp_path / "long.mkv", frames)
    out = tmp_path / "out"
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "predict.py"), "--device", "cpu", "--weights", str(lively_checkpoint),
         str(tmp_path / "long.mkv"), "--output-dir", str(out), "--score-thresh", "0.3"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=default_sigint)
    lines = out / "long.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (lines.exists() and len(lines.read_text().splitlines()) >= 3):
        time.sleep(0.1)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    assert "interrupted: the results so far are written" in stderr and "Traceback" not in stderr
    assert "ends early" not in stderr  # a stopped read is not a damaged file
    records = read_lines(lines)
    assert 3 <= len(records) < frames and [r["frame"] for r in records] == list(range(len(records)))
    assert video_facts(out / "long.mp4")[0] == len(records)


def test_voc_objects_keep_their_class_when_a_box_rounds_to_nothing(tmp_path):
    from train_utils.inference.annotations import VocWriter

    writer = VocWriter(tmp_path / "voc", ["cat", "dog"], "predicted")
    pixels = torch.zeros(3, 80, 100, dtype=torch.uint8)
    boxes = torch.tensor([[10.2, 10.0, 10.4, 50.0], [20.0, 20.0, 60.0, 60.0], [99.7, 5.0, 120.0, 30.0]])
    writer.add("frame", None, pixels, boxes, torch.tensor([1, 2, 1]))
    writer.close()
    root = etree.fromstring((tmp_path / "voc" / "Annotations" / "frame.xml").read_bytes())
    objects = [(o.findtext("name"), [int(o.findtext(f"bndbox/{t}")) for t in ("xmin", "ymin", "xmax", "ymax")])
               for o in root.findall("object")]
    assert objects == [("dog", [20, 20, 60, 60])]  # the sub-pixel box and the one outside the image are dropped


def test_a_new_picture_with_a_known_name_gets_its_own_id(tmp_path):
    from train_utils.inference.annotations import VocWriter

    first, second = tmp_path / "a" / "photo.png", tmp_path / "b" / "photo.png"
    for path, step in ((first, 0), (second, 5)):
        path.parent.mkdir()
        Image.fromarray(scene(128, 160, step)).save(path)
    box, label = torch.tensor([[20.0, 20.0, 60.0, 60.0]]), torch.tensor([1])
    for source in (first, second, first):  # the third is a re-run on the first picture: kept
        writer = VocWriter(tmp_path / "voc", CLASSES, "predicted")
        writer.add(source.stem, source, torch.from_numpy(np.array(Image.open(source))).permute(2, 0, 1), box, label)
        writer.close()
    assert (tmp_path / "voc" / "ImageSets" / "Main" / "predicted.txt").read_text().split() == ["photo", "photo_1"]
    assert (tmp_path / "voc" / "JPEGImages" / "photo_1.png").read_bytes() == second.read_bytes()
    assert writer.kept == ["photo"]
