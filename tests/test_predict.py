"""predict.py and train_utils/vis/draw.py: mixed image folders, drawn boxes where the JSON says,
output naming, skipping unreadable files, checkpoint and bare-state-dict loading."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import predict
from backbone import read_weight_file
from train_utils.inference.files import find_inputs, output_names
from train_utils.vis.draw import class_colour, draw_detections, outline_pixels, text_colour
from train_utils.loading import load_model
from train_utils.model.config import ModelConfig

ROOT = Path(__file__).resolve().parents[1]
TINY_ARCH = ["--backbone", "mobilenet_v2", "--width-mult", "0.5", "--feature-stride", "16",
             "--representation-size", "64", "--anchor-sizes", "32,64,128", "--min-size", "128", "--max-size", "128"]
EXIF_ORIENTATION = 0x0112


def noise(height: int, width: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def write_mixed_folder(folder: Path) -> dict[str, np.ndarray]:
    """Every kind of input; returns the upright RGB pixels the model must see, per readable file."""
    folder.mkdir(parents=True)
    expected = {}
    rgb = noise(96, 128, 0)
    Image.fromarray(rgb).save(folder / "rgb.jpg", quality=95)
    expected["rgb.jpg"] = np.asarray(Image.open(folder / "rgb.jpg").convert("RGB"))
    Image.fromarray(noise(96, 120, 1)).save(folder / "rgb.png")
    expected["rgb.png"] = noise(96, 120, 1)
    gray = noise(100, 128, 2)[..., 0]
    Image.fromarray(gray, "L").save(folder / "gray.png")
    expected["gray.png"] = np.repeat(gray[..., None], 3, axis=2)
    rgba = np.concatenate([noise(96, 128, 3), noise(96, 128, 4)[..., :1]], axis=2)
    Image.fromarray(rgba, "RGBA").save(folder / "rgba.png")
    expected["rgba.png"] = rgba[..., :3]  # alpha dropped, as in training
    palette = Image.fromarray(noise(96, 128, 5)).quantize(64)
    palette.save(folder / "palette.png", transparency=0)
    lookup = np.array(palette.getpalette(), dtype=np.uint8).reshape(-1, 3)
    expected["palette.png"] = lookup[np.asarray(palette)]
    Image.fromarray(noise(96, 128, 6)).convert("CMYK").save(folder / "cmyk.jpg", quality=95)
    expected["cmyk.jpg"] = np.asarray(Image.open(folder / "cmyk.jpg").convert("RGB"))
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = 6  # stored sideways: a viewer turns it 90 degrees clockwise
    Image.fromarray(noise(128, 96, 7)).save(folder / "rotated.jpg", quality=95, exif=exif.tobytes())
    stored = np.asarray(Image.open(folder / "rotated.jpg").convert("RGB"))
    expected["rotated.jpg"] = np.rot90(stored, k=-1)
    (folder / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0" + bytes(range(256)) * 4)
    (folder / "notes.txt").write_text("not an image\n")
    return expected


def detect(model, pixels: np.ndarray) -> dict:
    image = torch.from_numpy(np.array(pixels)).permute(2, 0, 1).float().div(255)
    with torch.inference_mode():
        return model([image])[0]


def border_samples(image: np.ndarray, bbox) -> np.ndarray:
    """Pixels along the middle of a 3-pixel outline drawn for ``bbox`` [x, y, w, h] -> [P, 3]."""
    x, y, w, h = bbox
    left, top, right, bottom = outline_pixels((x, y, x + w, y + h), image.shape[1], image.shape[0])
    rows = np.arange(top + 1, bottom)
    cols = np.arange(left + 1, right)
    return np.concatenate([image[top + 1, cols], image[bottom - 1, cols], image[rows, left + 1],
                           image[rows, right - 1]])


def test_predict_on_a_mixed_folder(confident_checkpoint, tmp_path):
    folder = tmp_path / "inputs"
    expected = write_mixed_folder(folder)
    other = tmp_path / "other"
    other.mkdir()
    Image.fromarray(noise(96, 128, 8)).save(other / "rgb.jpg", quality=95)
    expected["rgb_1.jpg"] = np.asarray(Image.open(other / "rgb.jpg").convert("RGB"))
    out = tmp_path / "out"

    done = subprocess.run(
        [sys.executable, str(ROOT / "predict.py"), "--weights", str(confident_checkpoint), str(folder),
         str(other / "rgb.jpg"), "--output-dir", str(out), "--save-json", "--line-thickness", "3",
         "--workers", "1", "--device", "cpu"],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "corrupt.jpg" in done.stderr and "notes.txt" in done.stderr
    assert "8 images processed, 2 skipped, 24 detections" in done.stdout
    assert "images/s" in done.stdout

    names = {"rgb.jpg", "rgb.png", "gray.png", "rgba.png", "palette.png", "cmyk.jpg", "rotated.jpg", "rgb_1.jpg"}
    assert {p.name for p in out.iterdir()} == names | {"predictions.json", "predictions_images.json"}
    records = json.loads((out / "predictions.json").read_text())
    source = {name: str(folder / name) for name in names - {"rgb_1.jpg"}} | {"rgb_1.jpg": str(other / "rgb.jpg")}
    assert {r["image"] for r in records} == set(source.values())

    model = load_model(str(confident_checkpoint))
    colour = np.array(class_colour(1))
    for name in sorted(names):
        mine = [r for r in records if r["image"] == source[name]]
        reference = detect(model, expected[name])
        assert len(mine) == len(reference["scores"]) == 3, name
        for record, box, score in zip(mine, reference["boxes"].tolist(), reference["scores"].tolist()):
            assert (record["category_id"], record["category_name"]) == (1, "circle")
            assert record["score"] == pytest.approx(score, abs=1e-5)
            x1, y1, x2, y2 = box
            assert record["bbox"] == pytest.approx([x1, y1, x2 - x1, y2 - y1], abs=1e-3)

        drawn = np.asarray(Image.open(out / name).convert("RGB")).astype(int)
        assert drawn.shape == expected[name].shape, name  # upright size, also for the EXIF-rotated file
        tolerance = 0 if name.endswith(".png") else 40  # JPEG output is lossy
        for record in mine:
            samples = border_samples(drawn, record["bbox"])
            on_colour = (np.abs(samples - colour) <= tolerance).all(axis=1).mean()
            assert on_colour >= 0.8, (name, record["bbox"], on_colour)
            before = border_samples(expected[name].astype(int), record["bbox"])
            assert (np.abs(before - colour) <= tolerance).all(axis=1).mean() < 0.2


def test_predict_fails_when_nothing_is_readable(confident_checkpoint, tmp_path, capsys):
    folder = tmp_path / "junk"
    folder.mkdir()
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    (folder / "readme.md").write_text("# nothing here\n")
    out = tmp_path / "out"
    code = predict.main(["--weights", str(confident_checkpoint), str(folder), str(tmp_path / "missing" / "*.jpg"),
                         "--output-dir", str(out), "--workers", "1"])
    err = capsys.readouterr().err
    assert code == 1
    assert "broken.png" in err and "readme.md" in err and "missing" in err
    assert err.strip().splitlines()[-1] == "error: no image could be processed"
    assert not list(out.glob("*.png"))


def test_predict_with_bare_state_dict(confident_checkpoint, tmp_path):
    checkpoint = read_weight_file(str(confident_checkpoint))
    checkpoint["model_config"].update({key: None for key in ModelConfig(num_classes=2).detector_kwargs()})
    torch.save(checkpoint, tmp_path / "full.pth")
    torch.save(checkpoint["model"], tmp_path / "bare.pth")
    classes = tmp_path / "classes.json"
    classes.write_text(json.dumps({name: i for i, name in enumerate(checkpoint["class_names"], start=1)}))
    for seed in (0, 1):
        Image.fromarray(noise(96, 128, seed)).save(tmp_path / f"img{seed}.png")
    images = [str(tmp_path / "img0.png"), str(tmp_path / "img1.png")]

    common = ["--no-draw", "--workers", "1", "--score-thresh", "0.5"]
    assert predict.main(["--weights", str(tmp_path / "full.pth"), *images, *common,
                         "--save-json", str(tmp_path / "full.json")]) == 0
    assert predict.main(["--weights", str(tmp_path / "bare.pth"), *images, *common, *TINY_ARCH,
                         "--classes-json", str(classes), "--save-json", str(tmp_path / "bare.json")]) == 0
    full = json.loads((tmp_path / "full.json").read_text())
    assert len(full) > 6  # default settings keep up to 100 detections per image
    assert json.loads((tmp_path / "bare.json").read_text()) == full


def test_predict_bare_state_dict_needs_backbone(confident_checkpoint, tmp_path, capsys):
    torch.save(read_weight_file(str(confident_checkpoint))["model"], tmp_path / "bare.pth")
    Image.fromarray(noise(32, 32, 0)).save(tmp_path / "a.png")
    assert predict.main(["--weights", str(tmp_path / "bare.pth"), str(tmp_path / "a.png")]) == 1
    assert "pass --backbone and --classes-json" in capsys.readouterr().err


# ------------------------------------------------------------------------------ helpers
def test_score_threshold_goes_through_the_model_config(confident_checkpoint):
    """--score-thresh lowers the detector's box_score_thresh in its config (never raises it), so
    the model built from that config keeps the low scores."""
    import argparse

    from train_utils.cli import add_model_arguments
    from train_utils.loading import load_detector

    parser = argparse.ArgumentParser()
    add_model_arguments(parser)
    args = parser.parse_args(["--device", "cpu", "--box-score-thresh", "0.3"])
    for asked, kept in ((0.01, 0.01), (0.6, 0.3), (None, 0.3)):
        detector = load_detector(args, str(confident_checkpoint), score_thresh=asked)
        assert detector.config.box_score_thresh == kept
        assert detector.model.roi_heads.score_thresh == kept


def test_output_names_never_overwrite_inputs(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    inputs = [a / "x.jpg", b / "x.jpg", a / "x.png", a / "y.bmp", b / "z.JPEG"]
    names = output_names(inputs, a)  # writing into an input folder
    assert [names[p] for p in inputs] == [a / "x_1.jpg", a / "x_2.jpg", a / "x_1.png", a / "y.png", a / "z.JPEG"]
    names = output_names(inputs, tmp_path / "out")
    assert [names[p].name for p in inputs] == ["x.jpg", "x_1.jpg", "x.png", "y.png", "z.JPEG"]


def test_find_inputs_folders_files_and_globs(tmp_path):
    for name in ("b.jpg", "a.png", ".hidden.jpg"):
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.jpg").write_bytes(b"")
    files, problems = find_inputs([str(tmp_path), str(tmp_path / "*.jpg"), str(tmp_path / "sub" / "c.jpg"),
                                   str(tmp_path / "none*.gif")])
    assert files == [tmp_path / "a.png", tmp_path / "b.jpg", tmp_path / "sub" / "c.jpg"]
    assert problems == [f"{tmp_path / 'none*.gif'}: no such file, or no file in it"]


def test_draw_detections_colours_outline_and_label():
    image = Image.new("RGB", (80, 60), (128, 128, 128))
    drawn = np.asarray(draw_detections(image, [[20.4, 30.0, 60.0, 55.5]], [2], [0.876], ["cat", "dog"],
                                       line_thickness=2, font_size=12))
    colour = class_colour(2)
    # Outline on columns 20..59 and rows 30..55, two pixels wide, growing inwards.
    for row, col in [(31, 40), (55, 40), (54, 40), (45, 20), (45, 21), (45, 59), (45, 58)]:
        assert tuple(drawn[row, col]) == colour, (row, col)
    assert tuple(drawn[45, 22]) == (128, 128, 128) and tuple(drawn[52, 40]) == (128, 128, 128)
    # The label "dog 0.88" sits above the box: a filled block of the class colour with text in the
    # contrasting colour, touching the outline's top row.
    label = drawn[:30, 20:]
    assert (label == colour).all(axis=2).sum() > 50
    near_text = (np.abs(label.astype(int) - text_colour(colour)) <= 60).all(axis=2)  # anti-aliased glyphs
    assert near_text.sum() > 20
    assert tuple(drawn[29, 21]) == colour
    assert tuple(np.asarray(image)[0, 0]) == (128, 128, 128)  # the input is left untouched


def test_class_colours_are_distinct_and_text_contrasts():
    colours = [class_colour(label) for label in range(1, 21)]
    assert len(set(colours)) == 20
    for first in range(20):
        for second in range(first + 1, 20):
            assert np.abs(np.subtract(colours[first], colours[second])).sum() > 30
    assert text_colour((255, 255, 0)) == (0, 0, 0)
    assert text_colour((0, 0, 160)) == (255, 255, 255)


@pytest.mark.slow
def test_predict_loads_neither_pycocotools_nor_matplotlib():
    """`import predict` and `predict.py --help` stay light: evaluation and plotting are not imported."""
    probe = ("import runpy, sys\n"
             "sys.argv = ['predict.py', '--help']\n"
             "try:\n    runpy.run_path('predict.py', run_name='__main__')\nexcept SystemExit:\n    pass\n"
             "import predict\n"
             "print(sorted({m.split('.')[0] for m in sys.modules} & {'pycocotools', 'matplotlib'}))")
    done = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "--weights" in done.stdout and done.stdout.strip().splitlines()[-1] == "[]"
