"""Draw the ground truth of a split as training sees it, after the training transforms, into
image grids: check that flips, crops and zoom-outs move the boxes right, and spot bad boxes.

    python tools/browse_dataset.py PATH [--format FORMAT] [--split S] [--classes-json FILE]
        [--year YEAR] [--augment POLICY] [--size N] [--epoch N] [--seed N]
        [--output-dir DIR] [--per-grid 16] [--max-images 64] [--cell-size 256] [--only-problems]

PATH, --format, --split, --classes-json and --year mean what --data-path, --dataset-format,
--train-split, --classes-json and --year mean for training. Each image is augmented exactly as
training epoch --epoch with --seed augments it (the same flips, crops, zoom-outs, jitters and
mosaics; --size is the training size lsj and mosaic work at), drawn into a cell of --cell-size
pixels with every box outlined in its class colour and named, and captioned with its id, box
count and the boxes augmentation dropped. --only-problems draws only the images tools/check_dataset.py flags,
with the kinds of problem in the caption. Grids are written to DIR/grid_000.png, grid_001.png, ...
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Optional, Sequence

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from PIL import Image, ImageDraw  # noqa: E402
from torchvision.transforms import functional as F  # noqa: E402

from tools.check_dataset import image_problems  # noqa: E402
from train_utils.data.catalog import build_dataset, format_names, get_format, layout_help  # noqa: E402
from train_utils.data.classes import AUTO_CLASSES  # noqa: E402
from train_utils.data.samplers import SeededSamples  # noqa: E402
from train_utils.data.mosaic import policy_dataset  # noqa: E402
from train_utils.data.transforms import DROPPED_KEY, augment_policy, get_transforms  # noqa: E402
from train_utils.flags import add_plugin_flag, import_plugins  # noqa: E402
from train_utils.progress import Progress  # noqa: E402
from train_utils.vis.draw import class_colour, draw_label, load_font, outline_pixels  # noqa: E402

GAP = 4  # pixels between cells
BACKGROUND = (40, 40, 40)
CAPTION_COLOUR = (235, 235, 235)
LINE_THICKNESS, FONT_SIZE = 2, 12


def caption_height(font_size: int = FONT_SIZE) -> int:
    """Pixels under each image for two caption lines."""
    return 2 * (font_size + 4)


def cell_scale(height: int, width: int, cell_size: int) -> float:
    """Factor fitting an image's longer side to ``cell_size``."""
    return cell_size / max(height, width)


def cell_origin(position: int, columns: int, cell_size: int) -> tuple[int, int]:
    """(x, y) of the top-left pixel of cell ``position`` (row-major) in a grid."""
    row, column = divmod(position, columns)
    return GAP + column * (cell_size + GAP), GAP + row * (cell_size + caption_height() + GAP)


def _fit(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> str:
    """``text`` shortened with '...' to fit ``width`` pixels."""
    while text and draw.textlength(text, font=font) > width:
        text = text[:-4] + "..." if len(text) > 4 else ""
    return text


def draw_cell(image: Image.Image, boxes: Sequence[Sequence[float]], labels: Sequence[int],
              class_names: Sequence[str], caption: Sequence[str], cell_size: int) -> Image.Image:
    """One grid cell: ``image`` scaled to fit ``cell_size`` (top left), the boxes [N, 4] xyxy in
    ``image`` pixels outlined in their class colour with the class name, and two caption lines."""
    scale = cell_scale(image.height, image.width, cell_size)
    scaled = image.convert("RGB").resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                                         Image.BILINEAR)
    cell = Image.new("RGB", (cell_size, cell_size + caption_height()), BACKGROUND)
    cell.paste(scaled, (0, 0))
    draw, font = ImageDraw.Draw(cell), load_font(FONT_SIZE)
    named = []
    for box, label in zip(boxes, labels):
        rect = outline_pixels([v * scale for v in box], *scaled.size)
        if rect is not None:
            draw.rectangle(rect, outline=class_colour(int(label)), width=LINE_THICKNESS)
            named.append((rect, int(label)))
    for rect, label in named:  # names last: no outline crosses them
        name = class_names[label - 1] if 1 <= label <= len(class_names) else f"class {label}"
        draw_label(draw, name, rect, class_colour(label), font, scaled.size)
    for line, text in enumerate(caption[:2]):
        draw.text((2, cell_size + 2 + line * (FONT_SIZE + 4)), _fit(draw, text, font, cell_size - 4),
                  fill=CAPTION_COLOUR, font=font)
    return cell


def make_grid(cells: Sequence[Image.Image], cell_size: int, columns: int) -> Image.Image:
    """The cells placed row-major, ``columns`` per row, GAP pixels apart."""
    rows = math.ceil(len(cells) / columns)
    width = GAP + min(len(cells), columns) * (cell_size + GAP)
    grid = Image.new("RGB", (width, GAP + rows * (cell_size + caption_height() + GAP)), BACKGROUND)
    for position, cell in enumerate(cells):
        grid.paste(cell, cell_origin(position, columns, cell_size))
    return grid


def choose_images(args: argparse.Namespace, ids: Sequence[str]) -> tuple[list[int], dict[str, list[str]]]:
    """(dataset indices to draw, problems per image id); with --only-problems the flagged images
    only (flagged images the training data leaves out are listed on stderr)."""
    if not args.only_problems:
        indices = list(range(len(ids)))
        return indices[:args.max_images] if args.max_images else indices, {}
    problems = image_problems(args.format, args.path, args.split, args.classes_json, args.year)
    left_out = sorted(set(problems) - set(ids))
    if left_out:
        print(f"not drawn, training leaves them out: {', '.join(f'{i} ({problems[i][0]})' for i in left_out)}",
              file=sys.stderr)
    indices = [index for index, image_id in enumerate(ids) if image_id in problems]
    return indices[:args.max_images] if args.max_images else indices, problems


def browse(args: argparse.Namespace) -> list[Path]:
    """Write the grids; returns their paths."""
    dataset = build_dataset(args.format, args.path, args.split, get_transforms(True, args.augment, args.size),
                            args.classes_json, args.year, skip_unknown_classes=args.skip_unknown_classes)
    indices, problems = choose_images(args, dataset.ids)
    # the augmentation training draws for (seed, epoch, image)
    samples = SeededSamples(policy_dataset(dataset, args.augment, args.size), args.seed)
    cells, names = [], []
    for index in Progress(indices, total=len(indices), desc="drawing", print_freq=50):
        image, target = samples[(args.epoch, index)]
        image_id = dataset.ids[index]
        if int(target["image_id"]) != index:  # undecodable: the dataset handed over the next image instead
            print(f"not drawn, cannot be decoded: {image_id}", file=sys.stderr)
            continue
        count, dropped = len(target["boxes"]), int(target[DROPPED_KEY])
        boxes = f"{count} box{'es' if count != 1 else ''}" + (f", {dropped} dropped" if dropped else "")
        caption = [f"{image_id}  ({boxes})", "; ".join(problems.get(image_id, []))]
        cells.append(draw_cell(F.to_pil_image(image), target["boxes"].tolist(), target["labels"].tolist(),
                               dataset.class_names, caption, args.cell_size))
        names.append(image_id)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    columns = math.ceil(math.sqrt(args.per_grid))
    written = []
    for number, start in enumerate(range(0, len(cells), args.per_grid)):
        path = out / f"grid_{number:03d}.png"
        make_grid(cells[start:start + args.per_grid], args.cell_size, columns).save(path, optimize=True)
        print(f"wrote {path}: {', '.join(names[start:start + args.per_grid])}")
        written.append(path)
    return written


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=layout_help())
    add_plugin_flag(parser)
    parser.add_argument("path", help="the dataset folder (what --data-path is for training)")
    parser.add_argument("--format", "--dataset-format", default="voc", choices=format_names())
    parser.add_argument("--split", default=None, help="split to draw (default: the format's training split)")
    parser.add_argument("--classes-json", default=None,
                        help=f"{{class name: id}} file, or '{AUTO_CLASSES}' (default: as for training)")
    parser.add_argument("--year", default=None, help="VOC year folder")
    parser.add_argument("--skip-unknown-classes", action="store_true",
                        help="leave out objects of classes not in the classes json instead of stopping")
    parser.add_argument("--augment", default="hflip", type=augment_policy, metavar="POLICY",
                        help="training augmentation policy, as training's --augment (e.g. hflip,lsj,photometric)")
    parser.add_argument("--size", type=int, default=800,
                        help="training size of lsj and mosaic: training's largest --min-size, at most --max-size")
    parser.add_argument("--epoch", type=int, default=0, help="draw the augmentation of this training epoch")
    parser.add_argument("--seed", type=int, default=0, help="training's --seed")
    parser.add_argument("--output-dir", default="browse", help="where the grids are written")
    parser.add_argument("--per-grid", type=int, default=16, help="images per grid")
    parser.add_argument("--max-images", type=int, default=64, help="images drawn in all (0: every one)")
    parser.add_argument("--cell-size", type=int, default=256, help="pixels of the longer image side in a cell")
    parser.add_argument("--only-problems", action="store_true",
                        help="only the images tools/check_dataset.py flags (every image of the split is decoded)")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    import_plugins(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.per_grid < 1 or args.max_images < 0 or args.cell_size < 32 or args.size < 1:
        parser.error("--per-grid must be at least 1, --max-images at least 0, --cell-size at least 32 and --size "
                     "at least 1")
    args.split = args.split or get_format(args.format).default_splits[0]
    try:
        written = browse(args)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if not written:
        print("no image to draw" + (": check_dataset.py flags none" if args.only_problems else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
