"""Write the train/val split files of a VOC folder (WZ's split_data.py, made safe and repeatable).

    python tools/split_data.py VOC_ROOT [--val-ratio 0.2] [--seed 0] [--year YEAR] [--force]

VOC_ROOT is the folder holding VOCdevkit, VOCdevkit itself or the VOC<year> folder. Every
``Annotations/*.xml`` that has an image in ``JPEGImages`` is assigned to
``ImageSets/Main/train.txt`` or ``val.txt`` (each sorted); the same seed always gives the same
split. Existing split files are only replaced with ``--force``.
"""
from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path
from typing import Optional, Sequence

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from train_utils.data.voc import resolve_voc_folder  # noqa: E402
from train_utils.data.dataset import index_images  # noqa: E402


def split_ids(ids: Sequence[str], val_ratio: float, seed: int) -> tuple[list[str], list[str]]:
    """(train ids, val ids), each sorted. round(n * val_ratio) ids go to val, at least one to
    each side when there are two or more."""
    ordered = sorted(ids)
    num_val = round(len(ordered) * val_ratio)
    if len(ordered) >= 2:
        num_val = min(max(num_val, 1), len(ordered) - 1)
    chosen = set(random.Random(seed).sample(ordered, num_val))
    return [i for i in ordered if i not in chosen], [i for i in ordered if i in chosen]


def write_split(voc_root: str, val_ratio: float = 0.2, seed: int = 0, year: Optional[str] = None,
                force: bool = False) -> tuple[Path, Path, int, int]:
    """Write train.txt and val.txt; returns (train path, val path, train count, val count)."""
    if not 0 < val_ratio < 1:
        raise ValueError(f"--val-ratio must be between 0 and 1 (exclusive), got {val_ratio}")
    voc_dir, _ = resolve_voc_folder(voc_root, year)
    annotations = voc_dir / "Annotations"
    if not annotations.is_dir():
        raise FileNotFoundError(f"annotation folder {annotations} does not exist")
    images = index_images(voc_dir / "JPEGImages", "split_data")
    stems = sorted(p.stem for p in annotations.glob("*.xml") if not p.name.startswith("."))
    ids = [stem for stem in stems if stem in images]
    if len(ids) < len(stems):
        print(f"skipping {len(stems) - len(ids)} annotations without an image in {voc_dir / 'JPEGImages'}")
    if not ids:
        raise ValueError(f"no annotation in {annotations} has an image")
    main = voc_dir / "ImageSets" / "Main"
    train_path, val_path = main / "train.txt", main / "val.txt"
    existing = [str(p) for p in (train_path, val_path) if p.exists()]
    if existing and not force:
        raise FileExistsError(f"refusing to overwrite {' and '.join(existing)}; pass --force to replace")
    train, val = split_ids(ids, val_ratio, seed)
    main.mkdir(parents=True, exist_ok=True)
    train_path.write_text("".join(f"{i}\n" for i in train))
    val_path.write_text("".join(f"{i}\n" for i in val))
    return train_path, val_path, len(train), len(val)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("voc_root", help="folder holding VOCdevkit, VOCdevkit itself or the VOC<year> folder")
    parser.add_argument("--val-ratio", type=float, default=0.2, help="fraction of the images put in val.txt")
    parser.add_argument("--seed", type=int, default=0, help="random seed; the same seed gives the same split")
    parser.add_argument("--year", default=None, help="VOC year folder (found automatically when only one exists)")
    parser.add_argument("--force", action="store_true", help="overwrite existing train.txt / val.txt")
    args = parser.parse_args(argv)
    try:
        train_path, val_path, num_train, num_val = write_split(args.voc_root, args.val_ratio, args.seed,
                                                               args.year, args.force)
    except (FileNotFoundError, FileExistsError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"wrote {train_path} ({num_train} ids) and {val_path} ({num_val} ids)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
