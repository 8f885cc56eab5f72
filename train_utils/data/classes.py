"""Class lists: classes json files ``{"name": id}`` (ids 1..K), the names a format defines, and
``--classes-json auto`` (the names the data uses, sorted)."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional, Sequence, Union

from train_utils.data.records import Annotations

_REPO_DIR = Path(__file__).resolve().parents[2]


def resolve_classes_json(json_path: Union[str, Path]) -> Path:
    """The classes json path; a relative path missing from the working folder is tried in the repo."""
    path = Path(json_path)
    if not path.is_file() and not path.is_absolute() and (_REPO_DIR / path).is_file():
        return _REPO_DIR / path
    return path


def load_class_dict(json_path: Union[str, Path]) -> dict[str, int]:
    """Read a WZ-style classes json ``{"aeroplane": 1, ...}`` and check ids are exactly 1..K."""
    path = resolve_classes_json(json_path)
    if not path.is_file():
        raise FileNotFoundError(f"classes json {path} does not exist")

    def no_duplicates(pairs: list[tuple[str, object]]) -> dict[str, object]:
        names = [name for name, _ in pairs]
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise ValueError(f"classes json {path}: class names repeated: {repeated}")
        return dict(pairs)

    try:
        data = json.loads(path.read_bytes().decode("utf-8"), object_pairs_hook=no_duplicates)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"classes json {path} is not valid UTF-8 JSON: {err}") from None
    if not isinstance(data, dict) or not data:
        raise ValueError(f"classes json {path} must be a non-empty object {{name: id}}")
    bad = [name for name, cid in data.items() if not name.strip() or type(cid) is not int]
    if bad:
        raise ValueError(f"classes json {path}: entries need a non-empty name and an integer id: {bad}")
    ids = sorted(data.values())
    if ids != list(range(1, len(data) + 1)):
        raise ValueError(f"classes json {path}: ids must be 1..{len(data)} without gaps or repeats, got {ids}")
    return dict(data)


def write_classes_json(path: Union[str, Path], names: Sequence[str]) -> None:
    """Write ``names`` as a classes json ``{name: id}`` (ids 1..K in order), atomically: a reader
    never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(json.dumps({name: i for i, name in enumerate(names, start=1)}, indent=2) + "\n")
    os.replace(partial, path)


def load_class_names(json_path: Union[str, Path]) -> list[str]:
    """The class names of a classes json in id order: label i is ``names[i - 1]``."""
    class_dict = load_class_dict(json_path)
    return sorted(class_dict, key=class_dict.__getitem__)


# --classes-json value: the class names found in the data, sorted (labels 1..K in that order).
AUTO_CLASSES = "auto"
# Where a class list given as names (not a file) comes from, in messages: the training split's names
# (--classes-json auto) or, in validation.py, the checkpoint's.
NAMES_SOURCE = "the class names of the training run"
ClassesArg = Union[str, Path, Sequence[str]]


def names_in_data(annotations: Annotations) -> list[str]:
    """The class names the objects of ``annotations`` use, sorted (the order of ``--classes-json auto``)."""
    names = sorted({obj.name for raw in annotations.images for obj in raw.objects})
    if not names:
        raise ValueError(f"{annotations.split_file}: no object in the data, so --classes-json {AUTO_CLASSES} finds "
                         "no class; pass a classes json")
    return names


def choose_classes(own_names: Optional[Sequence[str]], classes_json: Optional[ClassesArg],
                   own_source: Path) -> tuple[dict[str, int], Union[Path, str]]:
    """(class dict, where it comes from): ``classes_json`` when given (a json file, or the class
    names themselves in label order: ``--classes-json auto``), else the format's own class list
    ``own_names`` numbered 1..K. The source is a path, or NAMES_SOURCE for a list of names."""
    if isinstance(classes_json, (list, tuple)):
        return {name: i for i, name in enumerate(classes_json, start=1)}, NAMES_SOURCE
    if classes_json is not None:
        path = resolve_classes_json(classes_json)
        return load_class_dict(path), path
    if not own_names:
        raise ValueError(f"{own_source} defines no classes; pass a classes json")
    return {name: i for i, name in enumerate(own_names, start=1)}, own_source
