"""The catalog of dataset formats: from (format, --data-path, split) to a dataset, for the training
scripts, validation.py and tools/check_dataset.py.

A format is one reader ``read(data_path, split, **options) -> Annotations`` registered under a
name, with its default splits and a line of layout help. The dataset is then built from the
reader's :class:`Annotations` the same way for every format, so adding a format is one module::

    from train_utils.data.catalog import register_format
    from train_utils.data.records import Annotations

    @register_format("csv", default_splits=("train.csv", "val.csv"),
                     layout="--data-path holds the csv files and a split is one of them")
    def read_csv(data_path, split) -> Annotations:
        ...

The built-in formats (voc, coco, yolo, labelme) register themselves in their own modules, which
``train_utils/data/__init__.py`` imports; Python runs it before any module of the package, this one
included, so the catalog is never seen without them.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

from train_utils.data.dataset import DetectionDataSet
from train_utils.data.records import Annotations

PathLike = Union[str, Path]
Reader = Callable[..., Annotations]


@dataclass(frozen=True)
class DatasetFormat:
    """One annotation format of the catalog.

    read: ``read(data_path, split, **options) -> Annotations``; split is as the user typed it
    (e.g. "train.txt" or "val") and each format interprets it. default_splits: the (train, val)
    splits used when none is named. layout: what ``data_path`` and a split are, for ``--help``.
    options: the extra keyword options ``read`` accepts (e.g. ``("year",)``). default_classes_json:
    the classes json used when none is given (None: the class names of the data). dataset_type:
    the dataset class built from the annotations (its name and wording appear in its errors).
    """

    name: str
    read: Reader
    default_splits: tuple[str, str]
    layout: str
    options: tuple[str, ...] = ()
    default_classes_json: Optional[str] = None
    dataset_type: type[DetectionDataSet] = DetectionDataSet


_FORMATS: dict[str, DatasetFormat] = {}  # in registration order (the order of --help and errors)


def _reader_name(read: Reader) -> str:
    """``module.qualname`` of a reader, for messages."""
    return f"{getattr(read, '__module__', '?')}.{getattr(read, '__qualname__', repr(read))}"


def _check_entry(entry: DatasetFormat) -> None:
    """Raise a one-line ValueError naming the format when an entry is malformed."""
    problem = None
    if not isinstance(entry.name, str) or not entry.name or entry.name != entry.name.strip():
        problem = "the name must be a non-empty string without surrounding spaces"
    elif not callable(entry.read):
        problem = f"the reader {entry.read!r} is not callable"
    elif len(entry.default_splits) != 2 or not all(isinstance(s, str) for s in entry.default_splits):
        problem = f"default_splits must be (train, val) strings, got {entry.default_splits!r}"
    elif not all(isinstance(o, str) and o.isidentifier() for o in entry.options):
        problem = f"options must be keyword names, got {entry.options!r}"
    elif not (isinstance(entry.dataset_type, type) and issubclass(entry.dataset_type, DetectionDataSet)):
        problem = f"dataset_type must be a DetectionDataSet subclass, got {entry.dataset_type!r}"
    if problem:
        raise ValueError(f"dataset format {entry.name!r}: {problem}")


def register_format(name: str, read: Optional[Reader] = None, *, default_splits: Sequence[str], layout: str,
                    options: Sequence[str] = (), default_classes_json: Optional[str] = None,
                    dataset_type: type[DetectionDataSet] = DetectionDataSet,
                    replace: bool = False) -> Union[Reader, Callable[[Reader], Reader]]:
    """Register ``read`` as the reader of format ``name`` and return it; without ``read``, return a
    decorator doing so. A name already registered is an error unless ``replace`` is True."""

    def add(reader: Reader) -> Reader:
        entry = DatasetFormat(name, reader, tuple(default_splits), layout, tuple(options), default_classes_json,
                              dataset_type)
        _check_entry(entry)
        if name in _FORMATS and not replace:
            raise ValueError(f"dataset format {name!r} is already registered (reader "
                             f"{_reader_name(_FORMATS[name].read)}); register_format(..., replace) replaces it")
        _FORMATS[name] = entry
        return reader

    return add if read is None else add(read)


def unregister_format(name: str) -> DatasetFormat:
    """Remove format ``name`` from the catalog and return its entry."""
    entry = get_format(name)
    del _FORMATS[name]
    return entry


def get_format(name: str) -> DatasetFormat:
    """The entry of format ``name``; ValueError listing the registered names when unknown."""
    if name not in _FORMATS:
        raise ValueError(f"unknown dataset format {name!r}; choose one of {', '.join(_FORMATS) or 'none registered'}")
    return _FORMATS[name]


def format_names() -> tuple[str, ...]:
    """The registered format names in registration order."""
    return tuple(_FORMATS)


def layout_help() -> str:
    """``--help`` text on what --data-path, a split and --classes-json mean for each format."""
    layouts = "; ".join(f"{entry.name}: {entry.layout}" for entry in _FORMATS.values())
    defaults = [f"{entry.default_classes_json} for {entry.name}" for entry in _FORMATS.values()
                if entry.default_classes_json]
    classes = (f"--classes-json defaults to {', '.join(defaults)}; the other formats" if defaults
               else "Without --classes-json the formats")
    return (f"{layouts}. SPLIT is the split name without .txt (train.txt -> train). "
            f"{classes} take their class names from the data")


def _read(entry: DatasetFormat, data_path: PathLike, split: str, year: Optional[str]) -> Annotations:
    """Call the entry's reader with the options given (None = not given); an option the format
    does not declare is a ValueError naming the formats that take it."""
    options = {key: value for key, value in {"year": year}.items() if value is not None}
    for key, value in options.items():
        if key not in entry.options:
            owners = [other.name for other in _FORMATS.values() if key in other.options]
            where = f"the {' and '.join(owners)} format{'s' if len(owners) > 1 else ''}" if owners else "no format"
            raise ValueError(f"a {key} ({value}) only applies to {where}, not {entry.name}")
    annotations = entry.read(data_path, split, **options)
    if not isinstance(annotations, Annotations):
        raise TypeError(f"the {entry.name} reader {_reader_name(entry.read)} returned "
                        f"{type(annotations).__name__}, not Annotations")
    return annotations


def build_dataset(
    fmt: str,
    data_path: PathLike,
    split: str,
    transforms: Optional[Callable],
    classes_json: Optional[PathLike] = None,
    year: Optional[str] = None,
    skip_unknown_classes: bool = False,
    expected_class_names: Optional[Sequence[str]] = None,
) -> DetectionDataSet:
    """The dataset of ``split`` in ``data_path`` read as format ``fmt`` (see :func:`layout_help`).

    classes_json: a file imposing names and labels (None = the format's default_classes_json, else
    the class names of the data). expected_class_names: the class list the dataset must end up with
    (e.g. the training split's), checked so labels always agree.
    """
    entry = get_format(fmt)
    annotations = _read(entry, data_path, split, year)
    dataset = entry.dataset_type.from_annotations(annotations, transforms, classes_json or entry.default_classes_json,
                                                  skip_unknown_classes)
    if expected_class_names is not None and list(dataset.class_names) != list(expected_class_names):
        raise ValueError(f"{dataset.split_file} has classes {dataset.class_names} but {list(expected_class_names)} "
                         f"were expected (the training split's); give every split the same classes or pass "
                         f"a classes json")
    return dataset


def read_annotations(fmt: str, data_path: PathLike, split: str, year: Optional[str] = None) -> Annotations:
    """What the dataset of the same arguments would read, problems included (nothing is raised
    for missing images or invalid annotations; they are listed)."""
    return _read(get_format(fmt), data_path, split, year)
