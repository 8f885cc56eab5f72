"""Model cases on one device, ours vs torchvision's detector, with mixed precision and the GPU's peak.

    python tools/benchmark.py --device cuda            # every case below (sized for about 2 minutes on an H200)
    python tools/benchmark.py --device cuda --quick    # five cases, fewer iterations
    python tools/benchmark.py --device cuda --cases train_r50_b8_bf16 infer_r50_b1_fp32
    python tools/benchmark.py --device cpu --tiny --quick   # the same code at 64x96 on the CPU

A case is ``{train,infer}_{r50,mbv2}_b{batch}_{fp32,bf16,fp16}``: a training step (forward under
autocast, backward, gradients cleared) or an inference of ``batch`` 375x500 images (resized to
800x1066, padded to 800x1088), 4 boxes each, float32 or bf16/fp16 autocast. Both models hold the
same weights (tools/benchmark.py's ``build_pair``) and see the same inputs. Each rotation times a
block of back-to-back steps of one model, then of the other (the order swaps every rotation),
with CUDA events on a GPU and the wall clock on the CPU; the figures are the medians over the
rotations. The FLOPs of a step are counted once per case on torchvision's model
(``FlopCounterMode``: convolutions and matrix products, forward and backward), and the fraction of
peak divides our FLOP/s by the rate of a large bf16 matrix product measured at the start.
"""
import argparse
import contextlib
import json
import re
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torchvision
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from network_files import fast_path  # noqa: E402
from tools.bench_models import VOC_SIZE, build_pair, make_inputs  # noqa: E402

DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
CASE_PATTERN = re.compile(r"^(train|infer)_(r50|mbv2)_b(\d+)_(fp32|bf16|fp16)$")
FULL_CASES = (
    "train_r50_b2_fp32", "train_r50_b2_bf16", "train_r50_b2_fp16",
    "train_r50_b8_fp32", "train_r50_b8_bf16", "train_r50_b8_fp16",
    "train_mbv2_b8_fp32", "train_mbv2_b8_bf16",
    "infer_r50_b1_fp32", "infer_r50_b1_bf16",
    "infer_r50_b2_fp32", "infer_r50_b2_bf16",
    "infer_r50_b8_fp32", "infer_r50_b8_bf16", "infer_r50_b8_fp16",
    "infer_mbv2_b8_fp32", "infer_mbv2_b8_bf16",
)
QUICK_CASES = ("train_r50_b8_fp32", "train_r50_b8_bf16", "train_mbv2_b8_bf16", "infer_r50_b8_fp32",
               "infer_r50_b8_bf16")
TINY_SIZE = (64, 96)  # --tiny: image (height, width), also the models' resize bounds


@dataclass
class Case:
    kind: str  # "train" or "infer"
    arch: str  # "r50" or "mbv2"
    batch: int
    dtype: str  # a DTYPES key

    @classmethod
    def parse(cls, name: str) -> "Case":
        match = CASE_PATTERN.match(name)
        if match is None:
            raise ValueError(f"case {name!r}: expected {{train,infer}}_{{r50,mbv2}}_b<batch>_{{fp32,bf16,fp16}}")
        kind, arch, batch, dtype = match.groups()
        if int(batch) < 1:
            raise ValueError(f"case {name!r}: the batch must be at least 1")
        return cls(kind, arch, int(batch), dtype)

    @property
    def name(self) -> str:
        return f"{self.kind}_{self.arch}_b{self.batch}_{self.dtype}"


@dataclass
class Result:
    case: str
    batch: int
    ours_s: float  # median seconds per step
    torchvision_s: float
    flops: float  # per step, counted on torchvision's model
    peak_flops: float  # FLOP/s of the bf16 matrix product

    @property
    def ratio(self) -> float:
        return self.ours_s / self.torchvision_s

    @property
    def peak_fraction(self) -> float:
        return self.flops / self.ours_s / self.peak_flops

    def row(self) -> str:
        """One markdown table row (TABLE_HEADER's columns)."""
        return (f"| {self.case} | {self.ours_s * 1e3:.1f} | {self.torchvision_s * 1e3:.1f} | {self.ratio:.2f} | "
                f"{self.batch / self.ours_s:.1f} | {self.batch / self.torchvision_s:.1f} | {self.flops / 1e9:.4g} | "
                f"{self.flops / self.ours_s / 1e12:.3g} | {100 * self.peak_fraction:.1f}% |")


def time_block(step: Callable[[], None], iterations: int, device: torch.device) -> float:
    """Seconds per step over ``iterations`` back-to-back calls of ``step``: CUDA events on a GPU
    (the queued work included), the wall clock on the CPU."""
    if device.type != "cuda":
        start = time.perf_counter()
        for _ in range(iterations):
            step()
        return (time.perf_counter() - start) / iterations
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize(device)
    begin.record()
    for _ in range(iterations):
        step()
    end.record()
    end.synchronize()
    return begin.elapsed_time(end) / 1000 / iterations


def matmul_peak(device: torch.device, size: int, repeats: int = 10) -> float:
    """FLOP/s of a ``size`` x ``size`` x ``size`` bf16 matrix product on ``device`` (random data,
    three products of warm-up): the ceiling the fraction of peak is taken against."""
    generator = torch.Generator(device=device).manual_seed(0)
    a, b = (torch.randn(size, size, generator=generator, device=device, dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        torch.mm(a, b)
    seconds = time_block(lambda: torch.mm(a, b), repeats, device)
    return 2 * size ** 3 / seconds


def make_step(model: torch.nn.Module, case: Case, images: List[torch.Tensor], targets: List[Dict],
              device: torch.device) -> Callable[[], None]:
    """One training step (autocast forward, backward, gradients cleared) or one inference."""
    dtype = DTYPES[case.dtype]
    autocast = (lambda: torch.autocast(device.type, dtype=dtype)) if dtype is not None else contextlib.nullcontext
    if case.kind == "infer":
        model.eval()

        def infer() -> None:
            with torch.inference_mode(), autocast():
                model(images)
        return infer
    model.train()

    def train() -> None:
        torch.manual_seed(0)
        with autocast():
            losses = model(images, targets)
        sum(losses.values()).backward()
        model.zero_grad(set_to_none=True)
    return train


def count_flops(step: Callable[[], None]) -> float:
    """FLOPs of one call of ``step`` (convolutions and matrix products, backward included)."""
    with FlopCounterMode(display=False) as counter:
        step()
    return float(counter.get_total_flops())


def case_inputs(case: Case, size: Tuple[int, int], device: torch.device):
    images, targets = make_inputs(case.batch, size)
    return ([image.to(device) for image in images],
            [{k: v.to(device) for k, v in target.items()} for target in targets])


def run_case(case: Case, pair: Tuple[torch.nn.Module, torch.nn.Module], size: Tuple[int, int],
             device: torch.device, rotations: int, block_s: float, peak: float) -> Result:
    """Time ``case`` on (ours, torchvision's): warm-up, then ``rotations`` alternating blocks of
    about ``block_s`` seconds per model."""
    images, targets = case_inputs(case, size, device)
    steps = {"ours": make_step(pair[0], case, images, targets, device),
             "torchvision": make_step(pair[1], case, images, targets, device)}
    for step in steps.values():  # warm-up: cuDNN plans, allocator, anchor and folded-weight caches
        step()
    first = {name: time_block(step, 1, device) for name, step in steps.items()}
    iterations = max(1, min(20, round(block_s / max(min(first.values()), 1e-6))))
    flops = count_flops(steps["torchvision"])
    times: Dict[str, List[float]] = {name: [] for name in steps}
    for rotation in range(rotations):
        order = list(steps) if rotation % 2 == 0 else list(reversed(steps))
        for name in order:
            times[name].append(time_block(steps[name], iterations, device))
    return Result(case.name, case.batch, statistics.median(times["ours"]), statistics.median(times["torchvision"]),
                  flops, peak)


TABLE_HEADER = ("| case | ours ms | torchvision ms | ratio | ours img/s | torchvision img/s | GFLOP/step | "
                "ours TFLOP/s | of peak |\n| --- | --- | --- | --- | --- | --- | --- | --- | --- |")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({torch.get_num_threads()} threads)"


def prepare_pair(arch: str, device: torch.device, tiny: bool) -> Tuple[torch.nn.Module, ...]:
    """(ours, torchvision's) with the same weights on ``device``. ``tiny``: both resize to
    TINY_SIZE and keep few proposals and RoIs (a CPU test in seconds; the same code paths)."""
    pair = tuple(model.to(device) for model in build_pair(arch))
    if tiny:
        for model in pair:
            model.transform.min_size, model.transform.max_size = (min(TINY_SIZE),), max(TINY_SIZE)
            model.rpn._pre_nms_top_n = {"training": 200, "testing": 100}
            model.rpn._post_nms_top_n = {"training": 100, "testing": 50}
            model.roi_heads.fg_bg_sampler.batch_size_per_image = 32
    return pair


def run(cases: Sequence[Case], device: torch.device, tiny: bool, quick: bool,
        print_fn: Callable[[str], None] = print,
        on_records: Callable[[List[Dict]], None] = lambda records: None) -> List[Dict]:
    """Every case in turn, each row printed as it is measured and ``on_records`` called with the
    records so far (a run stopped at a time limit keeps them); a case that fails prints its error
    and the others still run. Returns one dict per case (an "error" key for the failed ones)."""
    size = TINY_SIZE if tiny else VOC_SIZE
    rotations, block_s = (3, 0.1) if quick else (5, 0.25)
    peak = matmul_peak(device, 256 if tiny else 8192)
    print_fn(f"device {device_name(device)}; torch {torch.__version__}, torchvision {torchvision.__version__}; "
             f"bf16 matmul peak {peak / 1e12:.3g} TFLOP/s (measured); images {size[0]}x{size[1]}, 4 boxes each; "
             f"fast path {'on' if fast_path.enabled() else 'off (reference mode)'}, CUDA levers "
             f"{'on' if fast_path.cuda_levers(device) else 'off'}; {rotations} rotations")
    print_fn(TABLE_HEADER)
    pairs: Dict[str, Tuple[torch.nn.Module, ...]] = {}
    records = []
    for case in cases:
        try:
            if case.arch not in pairs:
                pairs[case.arch] = prepare_pair(case.arch, device, tiny)
            result = run_case(case, pairs[case.arch], size, device, rotations, block_s, peak)
        except Exception as error:  # noqa: BLE001 - one failed case must not cost the others
            first_line = (str(error).splitlines() or [""])[0][:200]
            print_fn(f"| {case.name} | error: {type(error).__name__}: {first_line} |")
            records.append({"case": case.name, "error": f"{type(error).__name__}: {error}"})
        else:
            print_fn(result.row())
            records.append({**asdict(result), "ratio": result.ratio, "peak_fraction": result.peak_fraction})
        on_records(records)
    return records


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="tools/benchmark.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", required=True, help="cuda, cuda:N or cpu")
    parser.add_argument("--cases", nargs="+", default=None,
                        help=f"case names (default: all {len(FULL_CASES)}; --quick: {len(QUICK_CASES)})")
    parser.add_argument("--quick", action="store_true", help="five cases, 3 rotations of short blocks")
    parser.add_argument("--tiny", action="store_true", help=f"{TINY_SIZE[0]}x{TINY_SIZE[1]} images (CPU tests)")
    parser.add_argument("--reference", action="store_true",
                        help="run ours in fast_path.reference_mode() (torchvision's exact sequence, no levers)")
    parser.add_argument("--json", default=None, help="also write the rows to this file (rewritten after each case)")
    args = parser.parse_args(argv)
    names = args.cases or (QUICK_CASES if args.quick else FULL_CASES)
    try:
        args.cases = [Case.parse(name) for name in names]
    except ValueError as error:
        parser.error(str(error))
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Exit status: 0 when every case ran, 1 otherwise."""
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device}: CUDA is not available here (torch {torch.__version__})")
    if device.type == "cuda":
        torch.cuda.set_device(device)  # the timing events record on the current device's stream
    def write_json(records: List[Dict]) -> None:
        if args.json:
            Path(args.json).write_text(json.dumps(records, indent=2))

    with fast_path.reference_mode() if args.reference else contextlib.nullcontext():
        records = run(args.cases, device, args.tiny, args.quick, lambda line: print(line, flush=True), write_json)
    return 0 if all("error" not in record for record in records) else 1


if __name__ == "__main__":
    sys.exit(main())
