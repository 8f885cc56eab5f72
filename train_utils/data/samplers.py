"""How training batches are formed and keyed.

- Aspect-ratio grouping, as torchvision's detection references do (less padding in a batch):
  ratios come from ``dataset.get_height_and_width(idx)`` (no image is decoded); ``Subset`` and
  ``ConcatDataset`` wrappers are looked through.
- :class:`ResumableBatches` and :class:`SeededSamples`: batches keyed ``(epoch, index)`` whose
  augmentation is seeded per image, and an epoch that can start after its first batches (a resume
  inside the epoch).
"""
from __future__ import annotations

import bisect
import itertools
from collections import defaultdict
from collections.abc import Iterable, Iterator, Sized

import numpy as np
import torch
from torch.utils.data import ConcatDataset, Dataset, Subset


def compute_aspect_ratios(dataset, indices: list[int] | None = None) -> list[float]:
    """width / height of every item (or of ``indices``) of ``dataset``."""
    if indices is None:
        indices = list(range(len(dataset)))
    if isinstance(dataset, Subset):
        return compute_aspect_ratios(dataset.dataset, [int(dataset.indices[i]) for i in indices])
    if isinstance(dataset, ConcatDataset):
        ratios = []
        for i in indices:
            part = bisect.bisect_right(dataset.cumulative_sizes, i)
            offset = dataset.cumulative_sizes[part - 1] if part > 0 else 0
            ratios += compute_aspect_ratios(dataset.datasets[part], [i - offset])
        return ratios
    if not hasattr(dataset, "get_height_and_width"):
        raise TypeError(f"{type(dataset).__name__} has no get_height_and_width(idx); "
                        "aspect-ratio grouping needs it to avoid decoding every image")
    ratios = []
    for i in indices:
        height, width = dataset.get_height_and_width(i)
        ratios.append(float(width) / float(height))
    return ratios


def create_aspect_ratio_groups(dataset, k: int = 0) -> list[int]:
    """Group id per item: aspect ratios quantised with bins ``2 ** linspace(-1, 1, 2k + 1)``
    (k=0: the single bin edge 1.0, i.e. portrait vs landscape/square). Group g holds ratios in
    [edge[g-1], edge[g]) with edge[-1] = 0 and edge[len] = inf.
    """
    edges = (2 ** np.linspace(-1, 1, 2 * k + 1)).tolist() if k > 0 else [1.0]
    groups = [bisect.bisect_right(edges, ratio) for ratio in compute_aspect_ratios(dataset)]
    counts = np.bincount(groups, minlength=len(edges) + 1).tolist()
    print(f"Using {[0.0] + edges + [float('inf')]} as bins for aspect ratio quantization")
    print(f"Count of instances per bin: {counts}")
    return groups


class GroupedBatchSampler:
    """Wrap ``sampler`` into batches whose indices all share a group id.

    Indices are buffered per group and a batch is emitted when a buffer reaches ``batch_size``.
    An epoch has exactly ``len(sampler) // batch_size`` batches, as in torchvision's references:
    if the full batches fall short, the fullest leftover buffers are completed with indices of the
    same group already seen this epoch (repeated cyclically) and emitted. Leftover indices beyond
    that count are not emitted in this epoch.
    """

    def __init__(self, sampler: Iterable[int], group_ids: list[int], batch_size: int) -> None:
        if not isinstance(sampler, Sized):
            raise TypeError("GroupedBatchSampler: sampler must have a length")
        if batch_size < 1:
            raise ValueError(f"GroupedBatchSampler: batch_size must be >= 1, got {batch_size}")
        self.sampler = sampler
        self.group_ids = list(group_ids)
        self.batch_size = batch_size

    def __iter__(self) -> Iterator[list[int]]:
        buffers: dict[int, list[int]] = defaultdict(list)
        seen: dict[int, list[int]] = defaultdict(list)
        emitted = 0
        for idx in self.sampler:
            group = self.group_ids[idx]
            buffers[group].append(idx)
            seen[group].append(idx)
            if len(buffers[group]) == self.batch_size:
                batch = buffers.pop(group)
                buffers[group] = []  # re-insert now: ties among leftovers rank as in torchvision
                yield batch
                emitted += 1
        leftovers = sorted((b for b in buffers.items() if b[1]), key=lambda item: len(item[1]), reverse=True)
        for group, batch in leftovers[: len(self) - emitted]:
            missing = self.batch_size - len(batch)
            pool = seen[group]
            yield batch + [pool[i % len(pool)] for i in range(missing)]

    def __len__(self) -> int:
        return len(self.sampler) // self.batch_size


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The augmentation seed of dataset item ``index`` in ``epoch`` of a run seeded with ``seed``."""
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(1, np.uint64)[0] >> 1)


class SeededSamples(Dataset):
    """``dataset`` read with keys ``(epoch, index)``: each item's transforms draw from torch's
    generator seeded by :func:`sample_seed`, so augmentation is a function of (seed, epoch, image)
    only: the same with 0 or 8 DataLoader workers, after a resume at any iteration, and on any
    rank. The caller's random state is left untouched."""

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset = dataset
        self.seed = seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]):
        epoch, index = key
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(sample_seed(self.seed, epoch, index))  # the CPU one only
            return self.dataset[index]


class ResumableBatches:
    """A batch sampler over ``batches`` (a batch sampler of dataset indices) that yields
    ``[(epoch, index), ...]`` for :class:`SeededSamples` and can start an epoch after its first
    ``skip`` batches (a resume inside the epoch). ``epoch_source`` is the sampler whose
    ``set_epoch`` orders the epoch; :meth:`set_epoch` sets both."""

    def __init__(self, batches: Iterable[list[int]], epoch_source) -> None:
        self.batches = batches
        self.epoch_source = epoch_source
        self.epoch = 0
        self.skip = 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.epoch_source.set_epoch(epoch)
        self.epoch, self.skip = epoch, skip

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for batch in itertools.islice(iter(self.batches), self.skip, None):
            yield [(self.epoch, index) for index in batch]

    def __len__(self) -> int:
        return max(len(self.batches) - self.skip, 0)

    @property
    def full_length(self) -> int:
        """Batches in a whole epoch."""
        return len(self.batches)
