"""RoIAlign on CPU as a sparse interpolation matrix applied to channels-last features.

Every RoIAlign output bin is a fixed linear combination of feature pixels: the average of the
bilinear samples on a regular grid inside the bin. The sample weights factor into a row part and a
column part, so for each bin we merge the taps along each axis and take their outer product. This
gives a sparse matrix S (one row per output bin, a handful of non-zeros each). Pooling is
``S @ X`` and the input gradient is ``S^T @ dY``, where X is the feature map flattened to
[pixels, C]. Both are sparse CSR matrix products, which are vectorised and multi-threaded,
whereas torchvision's CPU kernels are single-threaded scatter loops. The matrix is built with
tensor operations only, without a Python loop over RoIs.

Several pyramid levels are handled as one matrix over the concatenated pixels of all levels, so
multi-scale pooling needs no per-level merge.

``pyramid_roi_align_linear`` also applies the box head's first linear layer, chunk by chunk, so the
pooled features (the largest tensor of a training step) and their gradient are never stored.

Semantics follow torchvision's CPU kernel: sample positions are computed in the same
floating-point order, samples outside [-1, size] are dropped, positions are clamped at the border
and each bin is divided by its sample count. Half and bfloat16 inputs are computed in float32 and
returned in their own dtype (torchvision's autocast rule). Inputs that are not on the CPU, are
quantized or have a non-floating dtype go to ``torchvision.ops.roi_align``.
"""

from __future__ import annotations

import warnings
from typing import Iterator, Optional, Union

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor

from .syncs import allowed_sync
from .tracing import is_tracing

BoxesArg = Union[Tensor, list[Tensor]]
SizeArg = Union[int, tuple[int, int], list[int]]

_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# Values per chunk of output bins: bounds the reusable [bins, C] buffer (8 MB in float32).
_CHUNK_ELEMENTS = 1 << 21
# Values per buffer of the fused pooling + linear layer (128 MB in float32). Larger chunks mean
# fewer passes over the weight gradient but larger buffers.
_LINEAR_CHUNK_ELEMENTS = 1 << 25
# Largest dense tap array [K, bins, taps] we build (256 MB of index and float32 weight); beyond it
# (adaptive sampling of huge boxes on a fine map) torchvision's kernel, which needs no such array, is used.
_MAX_DENSE_TAPS = 1 << 25


def boxes_to_rois(boxes: BoxesArg) -> Tensor:
    """Return RoIs as Tensor[K, 5] rows ``(batch_index, x1, y1, x2, y2)``.

    boxes: Tensor[K, 5] already in that format, or a list with one Tensor[L_i, 4] per image.
    """
    if isinstance(boxes, Tensor):
        if boxes.dim() != 2 or boxes.shape[1] != 5:
            raise ValueError(f"roi_align: boxes tensor must have shape [K, 5], got {list(boxes.shape)}")
        return boxes
    if len(boxes) == 0:
        raise ValueError("roi_align: boxes list is empty, expected one Tensor[L, 4] per image")
    for i, b in enumerate(boxes):
        if b.dim() != 2 or b.shape[1] != 4:
            raise ValueError(f"roi_align: boxes[{i}] must have shape [L, 4], got {list(b.shape)}")
    concat = torch.cat(boxes, dim=0)
    image_ids = torch.cat(
        [torch.full((b.shape[0], 1), i, dtype=concat.dtype, device=concat.device) for i, b in enumerate(boxes)]
    )
    return torch.cat([image_ids, concat], dim=1)


def _pair(size: SizeArg) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    if len(size) == 1:
        return int(size[0]), int(size[0])
    return int(size[0]), int(size[1])


def _axis_taps(
    start: Tensor, bin_size: Tensor, grid: Tensor, pooled: int, size: Tensor
) -> tuple[Tensor, Tensor]:
    """Merged interpolation taps along one axis for every (RoI, bin).

    start, bin_size: Tensor[K] RoI start and bin length in feature pixels.
    grid: Tensor[K] int64 number of samples per bin along this axis.
    size: Tensor[K] int64 length of the RoI's feature map along this axis.
    Returns (index Tensor[K, P, M] int64 in [0, size), weight Tensor[K, P, M]): the summed linear
    interpolation weights of the valid samples of bin p; unused slots have weight 0.
    """
    dtype = start.dtype
    grid_max = max(int(grid.max()), 1) if grid.numel() > 0 else 1
    size = size[:, None, None]
    p = torch.arange(pooled, dtype=dtype)
    i = torch.arange(grid_max, dtype=dtype)
    # Same operation order as the reference kernel, start + p*bin + ((i + 0.5) * bin) / grid, so a
    # sample lying exactly on a validity or pixel boundary ends up on the same side.
    bin_origin = start[:, None] + p[None, :] * bin_size[:, None]  # [K, P]
    # Clamping only affects RoIs without samples (adaptive grid of 0) and keeps their values finite.
    offset = (i[None, :] + 0.5) * bin_size[:, None] / grid.clamp(min=1).to(dtype)[:, None]  # [K, G]
    coord = bin_origin[:, :, None] + offset[:, None, :]  # [K, P, G]

    used = torch.arange(grid_max)[None, :] < grid[:, None]  # [K, G]
    valid = used[:, None, :] & (coord >= -1.0) & (coord <= size)  # [K, P, G]
    coord = coord.clamp(min=0.0)
    low = coord.long()
    at_edge = low >= size - 1
    low = torch.where(at_edge, size - 1, low)
    high = torch.where(at_edge, size - 1, low + 1)
    frac = torch.where(at_edge, 0.0, coord - low.to(dtype))
    valid = valid.repeat(1, 1, 2)
    weight = torch.where(valid, torch.cat([1.0 - frac, frac], dim=-1), 0.0)  # [K, P, 2G]
    # Invalid samples get index `size`: they sort last and never occupy a tap slot.
    index = torch.where(valid, torch.cat([low, high], dim=-1), size)

    # Merge equal indices: sort, give every run of equal values one slot, sum weights per slot.
    index, order = index.sort(dim=-1)
    weight = weight.gather(-1, order)
    new_run = torch.ones_like(index, dtype=torch.bool)
    new_run[..., 1:] = index[..., 1:] != index[..., :-1]
    slot = new_run.long().cumsum(-1) - 1
    num_slots = int((new_run & (index < size)).sum(-1).max()) if index.numel() > 0 else 0
    num_slots = max(num_slots, 1)
    merged_weight = torch.zeros_like(weight).scatter_add_(-1, slot, weight)[..., :num_slots]
    merged_index = torch.zeros_like(index).scatter_(-1, slot, index)[..., :num_slots]
    return torch.minimum(merged_index, size - 1), merged_weight


def interpolation_taps(
    rois: Tensor,
    spatial_scale: Tensor,
    height: Tensor,
    width: Tensor,
    pixel_base: Tensor,
    output_size: tuple[int, int],
    sampling_ratio: int,
    aligned: bool,
    index_dtype: torch.dtype = torch.int64,
) -> Optional[tuple[Tensor, Tensor]]:
    """RoIAlign weights of every output bin over the pixels of the RoI's feature map.

    rois: Tensor[K, 5] (batch_index, x1, y1, x2, y2) in image coordinates, float32 or float64.
    spatial_scale: Tensor[K] (dtype of rois) feature size / image size of each RoI's map.
    height, width: Tensor[K] int64 size of each RoI's map.
    pixel_base: Tensor[K] int64 flat index of pixel (0, 0) of the RoI's image in its map.
    Returns (index Tensor[K, PH*PW, T] of flat pixels in index_dtype, weight Tensor[K, PH*PW, T]
    in the dtype of rois). Bins are in (ph, pw) order; weights include the division by the sample
    count, unused taps have weight 0. None if K*PH*PW*T would exceed _MAX_DENSE_TAPS.
    """
    pooled_h, pooled_w = output_size
    num_rois = rois.shape[0]
    shift = 0.5 if aligned else 0.0
    x1 = rois[:, 1] * spatial_scale - shift
    y1 = rois[:, 2] * spatial_scale - shift
    roi_w = rois[:, 3] * spatial_scale - shift - x1
    roi_h = rois[:, 4] * spatial_scale - shift - y1
    if not aligned:
        roi_w = roi_w.clamp(min=1.0)
        roi_h = roi_h.clamp(min=1.0)

    if sampling_ratio > 0:
        grid_h = torch.full((num_rois,), sampling_ratio, dtype=torch.long)
        grid_w = grid_h
    else:
        grid_h = torch.ceil(roi_h / pooled_h).long()
        grid_w = torch.ceil(roi_w / pooled_w).long()
    count = (grid_h * grid_w).clamp(min=1).to(rois.dtype)

    row, row_w = _axis_taps(y1, roi_h / pooled_h, grid_h, pooled_h, height)  # [K, PH, My]
    col, col_w = _axis_taps(x1, roi_w / pooled_w, grid_w, pooled_w, width)  # [K, PW, Mx]
    taps = row.shape[-1] * col.shape[-1]
    if num_rois * pooled_h * pooled_w * taps > _MAX_DENSE_TAPS:
        return None

    row_pixel = (pixel_base[:, None, None] + row * width[:, None, None]).to(index_dtype)  # [K, PH, My]
    index = row_pixel[:, :, None, :, None] + col.to(index_dtype)[:, None, :, None, :]  # [K, PH, PW, My, Mx]
    row_w = row_w / count[:, None, None]
    weight = row_w[:, :, None, :, None] * col_w[:, None, :, None, :]
    return index.reshape(num_rois, pooled_h * pooled_w, taps), weight.reshape(num_rois, pooled_h * pooled_w, taps)


def _compress_rows(index: Tensor, weight: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Drop zero-weight taps: [B, T] row form -> CSR (row_start [B+1], column [nnz], value [nnz])."""
    keep = weight != 0
    row_start = torch.zeros(index.shape[0] + 1, dtype=torch.long)
    torch.cumsum(keep.sum(1), 0, out=row_start[1:])
    kept = torch.nonzero(keep.flatten()).flatten()
    return row_start, index.flatten()[kept], weight.flatten()[kept]


class _SparsePyramidPool(torch.autograd.Function):
    """Y = S @ X with X the channels-last pixels of all levels; dX = S^T @ dY.

    forward inputs: CSR of S (row_start [K*P+1], column [nnz], value [nnz]), the number of RoIs K,
    output size (PH, PW), output dtype, then the level feature maps Tensor[N, C, H_l, W_l].
    Output: Tensor[K, C, PH, PW].

    Work is done in chunks of RoIs with buffers allocated once per call, since every fresh large
    allocation costs page faults comparable to the arithmetic itself.
    """

    @staticmethod
    def forward(ctx, row_start, column, value, num_rois, output_size, out_dtype, *features):
        channels = features[0].shape[1]
        bins = output_size[0] * output_size[1]
        table = _channels_last_table(features, value.dtype)  # [R, C]
        out = torch.empty(num_rois, channels, bins, dtype=out_dtype)
        pool = _ChunkedPool(row_start, column, value, table, bins, _chunk_rois(bins * channels))
        for first, last in pool.chunks():
            out[first:last].copy_(pool.rows(first, last).view(last - first, bins, channels).transpose(1, 2))
        ctx.save_for_backward(row_start, column, value)
        _remember_levels(ctx, features, table.shape[0])
        return out.view(num_rois, channels, *output_size)

    @staticmethod
    @torch.autocast("cpu", enabled=False)
    def backward(ctx, grad_out):
        row_start, column, value = ctx.saved_tensors
        num_rois, channels, pooled_h, pooled_w = grad_out.shape
        bins = pooled_h * pooled_w
        scatter = _ChunkedScatter(row_start, column, value, ctx.table_rows, channels, bins, _chunk_rois(bins * channels))
        for first, last in scatter.chunks():
            scatter.add(first, last, grad_out[first:last].reshape(last - first, channels, bins))
        return (None, None, None, None, None, None, *_level_grads(ctx, scatter.grad_table, ctx.needs_input_grad[6:]))


class _SparsePoolLinear(torch.autograd.Function):
    """``linear((S @ X) as Tensor[K, C*PH*PW], W, b)`` without keeping the pooled features.

    The pooled features of all RoIs (and their gradient) would be the largest tensors of a
    training step; here each chunk of RoIs is pooled into a reused buffer and multiplied by W at
    once, and the backward pass pools each chunk again for W's gradient.

    forward inputs: CSR of S, K, (PH, PW), W Tensor[D, C*PH*PW], b Tensor[D] or None, then the
    level feature maps (float32). Output: Tensor[K, D].
    """

    @staticmethod
    def forward(ctx, row_start, column, value, num_rois, output_size, weight, bias, *features):
        channels = features[0].shape[1]
        bins = output_size[0] * output_size[1]
        table = _channels_last_table(features, value.dtype)
        out = torch.empty(num_rois, weight.shape[0], dtype=weight.dtype)
        pool = _ChunkedPool(row_start, column, value, table, bins, _linear_chunk_rois(bins * channels, num_rois))
        for first, last in pool.chunks():
            pooled = pool.pooled(first, last).view(last - first, channels * bins)
            if bias is None:
                torch.mm(pooled, weight.t(), out=out[first:last])
            else:
                torch.addmm(bias, pooled, weight.t(), out=out[first:last])
        ctx.save_for_backward(row_start, column, value, weight, *features)
        ctx.has_bias = bias is not None
        ctx.output_size = output_size
        _remember_levels(ctx, features, table.shape[0])
        return out

    @staticmethod
    @torch.autocast("cpu", enabled=False)
    def backward(ctx, grad_out):
        row_start, column, value, weight, *features = ctx.saved_tensors
        num_rois = grad_out.shape[0]
        channels = features[0].shape[1]
        bins = ctx.output_size[0] * ctx.output_size[1]
        chunk = _linear_chunk_rois(bins * channels, num_rois)
        need_weight, need_bias = ctx.needs_input_grad[5], ctx.needs_input_grad[6] and ctx.has_bias
        need_features = any(ctx.needs_input_grad[7:])
        grad_weight = None
        grad_bias = grad_out.sum(0) if need_bias else None
        if need_weight:
            # Sum over chunks: the first product initialises (no separate zero fill of the weight's size).
            grad_weight = torch.zeros_like(weight) if num_rois == 0 else torch.empty_like(weight)
            pool = _ChunkedPool(row_start, column, value, _channels_last_table(features, value.dtype), bins, chunk)
            for first, last in pool.chunks():
                pooled = pool.pooled(first, last).view(last - first, channels * bins)
                if first == 0:
                    torch.mm(grad_out[first:last].t(), pooled, out=grad_weight)
                else:
                    grad_weight.addmm_(grad_out[first:last].t(), pooled)
            del pool
        grads = [None] * len(features)
        if need_features:
            scatter = _ChunkedScatter(row_start, column, value, ctx.table_rows, channels, bins, chunk)
            grad_pooled = torch.empty(min(chunk, num_rois), channels * bins, dtype=value.dtype)
            for first, last in scatter.chunks():
                torch.mm(grad_out[first:last], weight, out=grad_pooled[: last - first])
                scatter.add(first, last, grad_pooled[: last - first].view(last - first, channels, bins))
            grads = _level_grads(ctx, scatter.grad_table, ctx.needs_input_grad[7:])
        return (None, None, None, None, None, grad_weight, grad_bias, *grads)


class _ChunkedPool:
    """Pools chunks of RoIs, ``S[rows of RoIs first..last) @ table``, into one reused buffer.

    table: Tensor[R, C] channels-last pixels of all levels; bins: PH*PW; chunk: RoIs per chunk.
    """

    def __init__(self, row_start: Tensor, column: Tensor, value: Tensor, table: Tensor, bins: int, chunk: int):
        self.row_start, self.column, self.value, self.table = row_start, column, value, table
        self.bins, self.chunk = bins, chunk
        self.num_rois = (row_start.shape[0] - 1) // bins
        self.max_rois = min(chunk, self.num_rois)
        self.row_buffer = torch.empty(self.max_rois * bins, table.shape[1], dtype=value.dtype)
        self.pooled_buffer: Optional[Tensor] = None

    def chunks(self) -> Iterator[tuple[int, int]]:
        yield from _chunks(self.num_rois, self.chunk)

    def rows(self, first: int, last: int) -> Tensor:
        """Tensor[(last - first) * bins, C]: pooled bins of RoIs first..last, one bin per row
        (valid until the next call)."""
        b0, b1 = first * self.bins, last * self.bins
        lo, hi = int(self.row_start[b0]), int(self.row_start[b1])
        matrix = _csr(self.row_start[b0 : b1 + 1] - lo, self.column[lo:hi], self.value[lo:hi],
                      (b1 - b0, self.table.shape[0]))
        rows = self.row_buffer[: b1 - b0]
        # Zeroing first and accumulating is the same result, but ~3x faster than mm(out=): the
        # sparse kernel's own clearing of the output is slow.
        rows.zero_()
        torch.addmm(rows, matrix, self.table, out=rows)
        return rows

    def pooled(self, first: int, last: int) -> Tensor:
        """Tensor[last - first, C, bins] of RoIs first..last (valid until the next call)."""
        if self.pooled_buffer is None:
            self.pooled_buffer = torch.empty(self.max_rois, self.table.shape[1], self.bins, dtype=self.value.dtype)
        pooled = self.pooled_buffer[: last - first]
        pooled.copy_(self.rows(first, last).view(last - first, self.bins, -1).transpose(1, 2))
        return pooled


class _ChunkedScatter:
    """Accumulates ``grad_table += S[rows of a chunk]^T @ dY_chunk`` chunk by chunk.

    grad_table: Tensor[R, C] float32 gradient of the channels-last pixel table.
    """

    def __init__(self, row_start: Tensor, column: Tensor, value: Tensor, table_rows: int, channels: int,
                 bins: int, chunk: int):
        self.bins, self.chunk = bins, chunk
        self.num_rois = (row_start.shape[0] - 1) // bins
        self.grad_table = torch.zeros(table_rows, channels, dtype=value.dtype)
        self.plan = _TransposePlan(row_start, column, value, chunk * bins, table_rows)
        self.rows = torch.empty(min(chunk, self.num_rois) * bins, channels, dtype=value.dtype)

    def chunks(self) -> Iterator[tuple[int, int]]:
        yield from _chunks(self.num_rois, self.chunk)

    def add(self, first: int, last: int, grad: Tensor) -> None:
        """grad: Tensor[last - first, C, bins] gradient of the pooled RoIs first..last."""
        index = first // self.chunk
        lo, hi = int(self.plan.chunk_start[index]), int(self.plan.chunk_start[index + 1])
        if lo == hi:
            return
        count = last - first
        rows = self.rows[: count * self.bins]
        rows.view(count, self.bins, -1).copy_(grad.transpose(1, 2))
        # This chunk of S^T, restricted to the pixel range [p0, p1] its RoIs touch.
        pixels = self.plan.pixel[lo:hi]
        p0, p1 = int(pixels[0]), int(pixels[-1])
        row_bounds = torch.searchsorted(pixels, torch.arange(p0, p1 + 2, dtype=pixels.dtype), out_int32=True)
        matrix = _csr(row_bounds, self.plan.bin[lo:hi], self.plan.value[lo:hi], (p1 - p0 + 1, count * self.bins))
        target = self.grad_table[p0 : p1 + 1]
        torch.addmm(target, matrix, rows, out=target)


def _chunks(num_rois: int, chunk: int) -> Iterator[tuple[int, int]]:
    """(first, last) RoI ranges of at most ``chunk`` RoIs covering 0..num_rois."""
    for first in range(0, num_rois, chunk):
        yield first, min(first + chunk, num_rois)


def _remember_levels(ctx, features: tuple[Tensor, ...], table_rows: int) -> None:
    """Keep what _level_grads needs to shape the gradient of each level like its input."""
    ctx.level_shapes = [f.shape for f in features]
    ctx.level_dtypes = [f.dtype for f in features]
    ctx.level_contiguous = [f.is_contiguous() for f in features]
    ctx.table_rows = table_rows


def _level_grads(ctx, grad_table: Tensor, needs_grad: tuple[bool, ...]) -> list[Optional[Tensor]]:
    """Split the pixel-table gradient Tensor[R, C] into one gradient per level (None if unneeded)."""
    channels = grad_table.shape[1]
    grads, start = [], 0
    for shape, dtype, contiguous, needed in zip(ctx.level_shapes, ctx.level_dtypes, ctx.level_contiguous, needs_grad):
        n, _, h, w = shape
        level = grad_table[start : start + n * h * w].view(n, h, w, channels).permute(0, 3, 1, 2)
        # The gradient takes the input's layout: NCHW if the input was, else channels-last.
        layout = torch.contiguous_format if contiguous else torch.preserve_format
        grads.append(level.to(dtype=dtype, memory_format=layout) if needed else None)
        start += n * h * w
    return grads


class _TransposePlan:
    """Taps of S regrouped for the backward pass, which computes S^T @ dY one RoI chunk at a time.

    Taps are sorted by (chunk, pixel, row within chunk). Attributes: chunk_start Tensor[chunks+1]
    tap range of each chunk; pixel, bin, value Tensor[nnz] with bin the row inside the chunk.
    """

    def __init__(self, row_start: Tensor, column: Tensor, value: Tensor, chunk_rows: int, num_pixels: int):
        num_rows = row_start.shape[0] - 1
        tap_row = torch.repeat_interleave(torch.arange(num_rows), row_start.diff())
        tap_chunk = tap_row // chunk_rows
        local_row = tap_row - tap_chunk * chunk_rows
        order = torch.argsort((tap_chunk * num_pixels + column) * chunk_rows + local_row)
        num_chunks = (num_rows + chunk_rows - 1) // chunk_rows
        self.chunk_start = torch.searchsorted(tap_chunk[order], torch.arange(num_chunks + 1))
        self.pixel = column[order]
        self.bin = local_row[order].to(column.dtype)
        self.value = value[order]


def _csr(row_start: Tensor, column: Tensor, value: Tensor, size: tuple[int, int]) -> Tensor:
    """Sparse CSR matrix from trusted parts; row_start is cast to the index dtype of column.

    No invariant checks, and the beta-feature warning is muted.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")
        return torch.sparse_csr_tensor(row_start.to(column.dtype), column, value, size, check_invariants=False)


def _channels_last_table(features: tuple[Tensor, ...], dtype: torch.dtype) -> Tensor:
    """Stack the pixels of all levels: Tensor[sum_l N*H_l*W_l, C] in level, image, row, col order."""
    channels = features[0].shape[1]
    total = sum(f.shape[0] * f.shape[2] * f.shape[3] for f in features)
    table = torch.empty(total, channels, dtype=dtype)
    start = 0
    for f in features:
        n, _, h, w = f.shape
        table[start : start + n * h * w].view(n, h, w, channels).copy_(f.permute(0, 2, 3, 1))
        start += n * h * w
    return table


def _chunk_rois(elements_per_roi: int) -> int:
    """RoIs per chunk so that a chunk's [bins, C] buffer holds about _CHUNK_ELEMENTS values."""
    return max(1, _CHUNK_ELEMENTS // max(elements_per_roi, 1))


def _linear_chunk_rois(elements_per_roi: int, num_rois: int) -> int:
    """RoIs per chunk of the fused pooling + linear layer: buffers of at most
    _LINEAR_CHUNK_ELEMENTS values, chunks of equal size (each chunk is one pass over W)."""
    most = max(1, _LINEAR_CHUNK_ELEMENTS // max(elements_per_roi, 1))
    num_chunks = -(-num_rois // most)
    return max(1, -(-num_rois // max(num_chunks, 1)))


def _uses_fast_path(features: list[Tensor]) -> bool:
    """True if our sparse kernel handles these maps: dense CPU tensors of a floating dtype, not
    being traced for export (torchvision's op has an ONNX form)."""
    return not is_tracing() and all(
        f.device.type == "cpu" and not f.is_quantized and f.dtype in _SUPPORTED_DTYPES and f.layout == torch.strided
        for f in features
    )


def pyramid_roi_align(
    features: list[Tensor],
    rois: Tensor,
    levels: Optional[Tensor],
    spatial_scales: list[float],
    output_size: SizeArg,
    sampling_ratio: int,
    aligned: bool = False,
) -> Tensor:
    """RoIAlign of each RoI on its own feature level.

    features: list of Tensor[N, C, H_l, W_l], one per level.
    rois: Tensor[K, 5] (batch_index, x1, y1, x2, y2) in image coordinates.
    levels: Tensor[K] int64 level of each RoI (None: every RoI on level 0).
    spatial_scales: feature size / image size of each level.
    Returns Tensor[K, C, PH, PW] in RoI order, in the dtype of features[0].
    """
    size = _pair(output_size)
    levels = _checked_levels(features, rois, levels, spatial_scales)
    if not _uses_fast_path(features):
        return _torchvision_pyramid(features, rois, levels, spatial_scales, size, sampling_ratio, aligned)

    compute_dtype = torch.float64 if any(f.dtype == torch.float64 for f in features) else torch.float32
    # Like torchvision's autocast rule: always compute in float32 (or float64), whatever autocast says.
    with torch.autocast("cpu", enabled=False):
        rois = rois.detach().to(compute_dtype)
        shapes = [f.shape for f in features]
        matrix = _pyramid_matrix(shapes, rois, levels, spatial_scales, size, sampling_ratio, aligned)
        if matrix is not None:
            return _SparsePyramidPool.apply(*matrix, rois.shape[0], size, features[0].dtype, *features)
        # Too many taps to build the matrix densely: torchvision's kernel, in the compute dtype.
        upcast = [f.to(compute_dtype) for f in features]
        result = _torchvision_pyramid(upcast, rois, levels, spatial_scales, size, sampling_ratio, aligned)
        return result.to(features[0].dtype)


def pyramid_roi_align_linear(
    features: list[Tensor],
    rois: Tensor,
    levels: Optional[Tensor],
    spatial_scales: list[float],
    output_size: SizeArg,
    sampling_ratio: int,
    weight: Tensor,
    bias: Optional[Tensor],
    aligned: bool = False,
) -> Tensor:
    """``F.linear(pyramid_roi_align(...).flatten(1), weight, bias)``: Tensor[K, D].

    weight: Tensor[D, C*PH*PW]; bias: Tensor[D] or None; the rest as pyramid_roi_align. When
    autograd records (training), with float32 CPU maps and parameters and autocast off, the pooled
    features are never stored (see _SparsePoolLinear); otherwise this is exactly that composition
    (in inference the pooled features are transient anyway, and one product over all RoIs reads
    the weight once).
    """
    size = _pair(output_size)
    levels = _checked_levels(features, rois, levels, spatial_scales)
    tensors = [*features, weight] + ([] if bias is None else [bias])
    fusable = (
        torch.is_grad_enabled()
        and any(t.requires_grad for t in tensors)
        and _uses_fast_path(features)
        and all(t.dtype == torch.float32 and t.device.type == "cpu" for t in tensors)
        and not torch.is_autocast_enabled("cpu")
    )
    if fusable:
        rois = rois.detach().to(torch.float32)
        matrix = _pyramid_matrix([f.shape for f in features], rois, levels, spatial_scales, size, sampling_ratio, aligned)
        if matrix is not None:
            return _SparsePoolLinear.apply(*matrix, rois.shape[0], size, weight, bias, *features)
    pooled = pyramid_roi_align(features, rois, levels, spatial_scales, size, sampling_ratio, aligned)
    return F.linear(pooled.flatten(1), weight, bias)


def _checked_levels(features: list[Tensor], rois: Tensor, levels: Optional[Tensor], spatial_scales: list[float]) -> Tensor:
    """The level of every RoI as Tensor[K] int64 (zeros when None), after checking that the maps
    are [N, C, H, W] with one C and one scale each."""
    if len(features) != len(spatial_scales):
        raise ValueError(f"roi_align: {len(features)} feature maps but {len(spatial_scales)} spatial scales")
    channels = features[0].shape[1]
    for i, f in enumerate(features):
        if f.dim() != 4 or f.shape[1] != channels:
            raise ValueError(f"roi_align: feature map {i} must be [N, {channels}, H, W], got {list(f.shape)}")
    if levels is None:
        return torch.zeros(rois.shape[0], dtype=torch.long, device=rois.device)
    return levels.long()


def _pyramid_matrix(
    shapes: list[torch.Size],
    rois: Tensor,
    levels: Tensor,
    spatial_scales: list[float],
    output_size: tuple[int, int],
    sampling_ratio: int,
    aligned: bool,
) -> Optional[tuple[Tensor, Tensor, Tensor]]:
    """CSR of the pooling matrix: rows are (RoI, ph, pw), columns the pixels of all levels stacked.

    shapes: [N, C, H_l, W_l] of each level; rois: Tensor[K, 5]; levels: Tensor[K].
    Returns (row_start Tensor[K*PH*PW + 1] int64, column Tensor[nnz] int32 (int64 beyond 2**31
    pixels), value Tensor[nnz]), or None if there are too many taps (see interpolation_taps).
    """
    num_images = torch.tensor([s[0] for s in shapes])
    height = torch.tensor([s[2] for s in shapes])
    width = torch.tensor([s[3] for s in shapes])
    level_pixels = num_images * height * width
    level_base = torch.cumsum(level_pixels, 0) - level_pixels
    scale = torch.tensor(spatial_scales, dtype=rois.dtype)

    batch = rois[:, 0].long()
    if rois.shape[0] > 0:
        if int(levels.min()) < 0 or int(levels.max()) >= len(shapes):
            raise ValueError(f"roi_align: a RoI level is outside [0, {len(shapes)})")
        if int(batch.min()) < 0 or bool((batch >= num_images[levels]).any()):
            raise ValueError(f"roi_align: a box has a batch index outside [0, {shapes[0][0]})")
    h, w = height[levels], width[levels]
    pixel_base = level_base[levels] + batch * h * w
    # 32-bit indices spare the sparse kernels a conversion on every call.
    index_dtype = torch.int32 if int(level_pixels.sum()) < 2**31 else torch.int64
    taps = interpolation_taps(
        rois, scale[levels], h, w, pixel_base, output_size, sampling_ratio, aligned, index_dtype
    )
    if taps is None:
        return None
    return _compress_rows(taps[0].flatten(0, 1), taps[1].flatten(0, 1))


def _torchvision_pyramid(
    features: list[Tensor],
    rois: Tensor,
    levels: Tensor,
    spatial_scales: list[float],
    output_size: tuple[int, int],
    sampling_ratio: int,
    aligned: bool,
) -> Tensor:
    """Per-level torchvision.ops.roi_align merged in RoI order, in the dtype of features[0]."""
    if len(features) == 1:
        return torchvision.ops.roi_align(features[0], rois, output_size, spatial_scales[0], sampling_ratio, aligned)
    first = features[0]
    result = first.new_zeros((rois.shape[0], first.shape[1]) + output_size)
    for members, f, scale in zip(level_members(levels, len(features)), features, spatial_scales):
        pooled = torchvision.ops.roi_align(f, rois[members], output_size, scale, sampling_ratio, aligned)
        result[members] = pooled.to(result.dtype)
    return result


def level_members(levels: Tensor, num_levels: int) -> list[Tensor]:
    """Indices of the RoIs of each level, in RoI order (``nonzero(levels == l)`` of every level l):
    one stable sort and one host read of the counts, instead of one sync per level.

    levels: Tensor[K] int64 in [0, num_levels). Returns num_levels Tensor[K_l] int64.
    """
    if is_tracing():  # an exported graph keeps the data-dependent sizes
        return [torch.nonzero(levels == level).flatten() for level in range(num_levels)]
    order = torch.sort(levels, stable=True).indices
    counts = (levels[None, :] == torch.arange(num_levels, device=levels.device)[:, None]).sum(dim=1)
    with allowed_sync("the RoIs per pyramid level size each level's RoIAlign"):
        counts = counts.tolist()
    return list(order.split(counts))
