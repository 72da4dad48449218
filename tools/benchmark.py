"""Measure the speed of the data path, cached-feature training, evaluation and feature extraction.

Each figure is printed next to its reference, measured in the same run on the same machine, and as a
ratio. Run it alone on the machine, pinned to one core for figures that another job cannot disturb:

    taskset -c 1 env OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 .venv/bin/python tools/benchmark.py

Sections: data, train, metrics, extract (all by default; choose with --sections). --quick shrinks
every workload to a smoke test of the script, whose figures mean nothing.
The data and train sections read the mini COCO set (--data-root or COCOMIX_DATA) and the train
section its feature cache (COCOMIX_CACHE), extracting it first if it is cold.
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

M_MMAP_THRESHOLD = -3  # mallopt parameter number in glibc's malloc.h


# ---------------------------------------------------------------------------------------------------
# Measurement helpers


def seconds_of(function, repeat: int = 1) -> float:
    "Return the shortest wall-clock time in seconds of `repeat` calls of `function()`."
    best = float("inf")
    for _ in range(repeat):
        started = time.perf_counter()
        function()
        best = min(best, time.perf_counter() - started)
    return best


def _proc_status(field: str) -> int:
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"{field}:\s+(\d+) kB", text).group(1)) * 1024


def peak_memory_increase(function) -> tuple[int, float, object]:
    """Run `function()`; return the rise of peak resident memory (bytes), the seconds it took, and its result.

    Linux only: /proc/self/clear_refs resets the peak. main() sets glibc's mmap threshold to 128 KiB,
    so freed buffers leave the resident memory and the peak counts buffers alive at the same time.
    """
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")
    before = _proc_status("VmRSS")
    started = time.perf_counter()
    result = function()
    seconds = time.perf_counter() - started
    return _proc_status("VmHWM") - before, seconds, result


def machine_description() -> list[str]:
    "Describe the CPU, the cores this process may run on, threads and library versions."
    lines = []
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for key in ("Model name", "CPU(s)", "Flags"):
            match = re.search(rf"^{key}:\s+(.*)$", lscpu, re.M)
            if match and key == "Flags":
                relevant = [f for f in match.group(1).split() if f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")]
                lines.append(f"CPU flags (relevant): {' '.join(relevant)}")
            elif match:
                lines.append(f"{key}: {match.group(1)}")
    except (OSError, subprocess.SubprocessError):
        lines.append("lscpu: not available")
    lines.append(f"cores this process may use: {sorted(os.sched_getaffinity(0))}")
    lines.append(f"torch threads: {torch.get_num_threads()}, torch {torch.__version__}, python {platform.python_version()}")
    lines.append(f"CUDA: {torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'not available'}")
    return lines


def ratio(new: float, reference: float) -> str:
    return f"{new / reference:.2f}x" if reference > 0 else "n/a"


# ---------------------------------------------------------------------------------------------------
# Data path


def benchmark_data(data_root: str | None, quick: bool):
    "Images per second of the fast data path against PIL full-size decoding and the torchvision PIL transform."
    from cocomix_nb.backbones import image_backbone_config, image_transform, normalize_pixels
    from cocomix_nb.data import load_coco_split, load_image
    from cocomix_nb.fastdata import FastImageLoader, fast_image_transform

    name = "efficientnet_lite0"
    config = image_backbone_config(name)
    split = load_coco_split("test", data_root, max_images=32 if quick else None)
    paths = split.image_paths
    sides = [min(p) for p in _image_sizes(paths)]
    print(f"{len(paths)} test images of {split.root}, short side {min(sides)}..{max(sides)} px (median {int(np.median(sides))})")
    batch = 64

    for train in (False, True):
        reference_transform = image_transform(name, train=train)
        fast_transform, fast_loader = fast_image_transform(name, train=train), FastImageLoader(name, train=train)

        def reference():
            for start in range(0, len(paths), batch):
                torch.stack([reference_transform(load_image(p)) for p in paths[start:start + batch]])

        def fast():
            for start in range(0, len(paths), batch):
                pixels = torch.stack([fast_transform(fast_loader(p)) for p in paths[start:start + batch]])
                normalize_pixels(pixels, config.mean, config.std)

        reference(); fast()  # warm the page cache and the libraries
        reference_seconds, fast_seconds = seconds_of(reference, 2), seconds_of(fast, 2)
        label = "train (random crop)" if train else "eval (resize + centre crop)"
        print(f"  {label:28s} reference {len(paths) / reference_seconds:7.1f} img/s   fast {len(paths) / fast_seconds:7.1f} img/s"
              f"   speed-up {ratio(reference_seconds, fast_seconds)}")


def _image_sizes(paths):
    from PIL import Image
    sizes = []
    for path in paths:
        with Image.open(path) as img:
            sizes.append(img.size)
    return sizes


# ---------------------------------------------------------------------------------------------------
# Cached-feature training


TRAIN_VARIANTS = {
    "baseline": dict(stage="baseline"),
    "lemda": dict(stage="lemda"),
    "pairing": dict(stage="pairing"),
    "premix": dict(stage="premix"),
    "token_baseline": dict(stage="baseline", model_type="token"),
    "tokenmix": dict(stage="tokenmix", model_type="token"),
    "alignaware": dict(stage="alignaware", model_type="token"),
}


def time_training_steps(config, split, steps: int, warmup: int) -> dict:
    """Run `warmup + steps` training steps of `config` on cached features of `split`, as the trainer does.

    Returns the seconds per step (batch assembly included) and the share of it spent assembling batches.
    """
    from cocomix_nb.stage import create_stage
    from cocomix_nb.train import (CachedSource, TrainingObjective, build_model, build_optimizers,
                                  seed_everything, train_step)

    seed_everything(config.seed)
    model = build_model(config)
    stage = create_stage(config.stage, **config.stage_params)
    source = CachedSource(split, config)
    objective = TrainingObjective(model, stage, config)
    optimizers = build_optimizers(config, model, stage, total_steps=warmup + steps)
    model.train()
    stage.train()
    device = torch.device("cpu")

    order = torch.randperm(split.n_captions, generator=torch.Generator().manual_seed(0))
    while len(order) < (warmup + steps) * config.batch_size:
        order = torch.cat([order, order])
    batches = source.train_batches(order, config.batch_size)
    assembly = 0.0
    for step in range(warmup + steps):
        if step == warmup:
            started, assembly = time.perf_counter(), 0.0
        assembly_started = time.perf_counter()
        batch = next(batches)
        assembly += time.perf_counter() - assembly_started
        train_step(batch, objective, optimizers, device, amp=False, max_violation=True)
    total = time.perf_counter() - started
    return {"seconds_per_step": total / steps, "batch_share": assembly / total}


def benchmark_train(data_root: str | None, quick: bool):
    "Training steps per second on cached features for the baseline and each stage, and the time each stage adds."
    from cocomix_nb.data import load_coco_split
    from cocomix_nb.train import make_config

    steps, warmup = (4, 1) if quick else (60, 5)
    max_images = 64 if quick else None
    batch_size = 32 if quick else 128
    split = load_coco_split("train", data_root, max_images=max_images)
    print(f"train split: {split.n_images} images, {split.n_captions} captions; preset cpu-mini, batch {batch_size}, "
          f"{steps} timed steps after {warmup} warm-up steps")
    timings = {}
    for variant, overrides in TRAIN_VARIANTS.items():
        config = make_config("cpu-mini", data_root=data_root, max_images=max_images, batch_size=batch_size, **overrides)
        timings[variant] = time_training_steps(config, split, steps, warmup)

    for variant, timing in timings.items():
        reference_name = "token_baseline" if TRAIN_VARIANTS[variant].get("model_type") == "token" else "baseline"
        step = timing["seconds_per_step"]
        line = (f"  {variant:15s} {1 / step:7.1f} steps/s  {1000 * step:8.2f} ms/step  "
                f"batch assembly {100 * timing['batch_share']:4.1f} % of the step")
        if variant != reference_name:
            reference_step = timings[reference_name]["seconds_per_step"]
            line += (f"   {ratio(step, reference_step)} the time of {reference_name}: the stage is "
                     f"{100 * (1 - reference_step / step):4.1f} % of its step time")
        print(line)


# ---------------------------------------------------------------------------------------------------
# Evaluation metrics


def argsort_ranks(sims: np.ndarray, caption_to_image: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Reference ranks: one full argsort per query, as VSE++'s evaluation code computes them.

    Also returns, per query, whether another candidate ties with the ground truth's score: argsort
    places ties anywhere, while `i2t_ranks` and `t2i_ranks` rank them ahead of the ground truth.
    """
    n_images, n_captions = sims.shape
    i2t, i2t_tied = np.empty(n_images, dtype=np.int64), np.zeros(n_images, dtype=bool)
    for image in range(n_images):
        row = sims[image]
        order = np.argsort(-row)
        i2t[image] = np.flatnonzero(caption_to_image[order] == image).min()
        i2t_tied[image] = np.count_nonzero(row == row[order[i2t[image]]]) > 1
    t2i, t2i_tied = np.empty(n_captions, dtype=np.int64), np.zeros(n_captions, dtype=bool)
    for caption in range(n_captions):
        column = sims[:, caption]
        order = np.argsort(-column)
        t2i[caption] = np.flatnonzero(order == caption_to_image[caption])[0]
        t2i_tied[caption] = np.count_nonzero(column == column[caption_to_image[caption]]) > 1
    return i2t, t2i, i2t_tied, t2i_tied


def benchmark_metrics(quick: bool, max_memory_bytes: int):
    "Time and peak memory of retrieval_metrics against the argsort loop on random matrices."
    from cocomix_nb.metrics import i2t_ranks, retrieval_metrics, t2i_ranks

    shapes = [(100, 500), (200, 1000)] if quick else [(1000, 5000), (5000, 25000)]
    for n_images, n_captions in shapes:
        generator = torch.Generator().manual_seed(0)
        # float32 on a 2**-24 grid, so a few ground-truth scores tie with another candidate.
        sims = torch.rand(n_images, n_captions, generator=generator)
        caption_to_image = np.arange(n_captions) % n_images  # 5 captions per image, spread over the columns
        sims_numpy = sims.numpy()

        reference_memory, reference_seconds, (i2t_expected, t2i_expected, i2t_tied, t2i_tied) = peak_memory_increase(
            lambda: argsort_ranks(sims_numpy, caption_to_image))
        unbounded_memory, unbounded_seconds, _ = peak_memory_increase(
            lambda: retrieval_metrics(sims, caption_to_image, chunk_size=max(n_images, n_captions)))
        bounded_memory, bounded_seconds, _ = peak_memory_increase(
            lambda: retrieval_metrics(sims, caption_to_image, max_memory_bytes=max_memory_bytes))
        i2t_actual, t2i_actual = i2t_ranks(sims, caption_to_image), t2i_ranks(sims, caption_to_image)
        assert np.array_equal(i2t_actual[~i2t_tied], i2t_expected[~i2t_tied]), "i2t ranks differ from the argsort loop"
        assert np.array_equal(t2i_actual[~t2i_tied], t2i_expected[~t2i_tied]), "t2i ranks differ from the argsort loop"
        assert (i2t_actual >= i2t_expected).all(), "an i2t rank is below the argsort loop's: a tie was not counted against the ground truth"
        assert (t2i_actual >= t2i_expected).all(), "a t2i rank is below the argsort loop's: a tie was not counted against the ground truth"

        print(f"  {n_images} x {n_captions} float32 ({sims.numel() * 4 / 1e6:.0f} MB): ranks equal to the reference on every "
              f"query without a tie at its ground-truth score ({i2t_tied.sum()} i2t and {t2i_tied.sum()} t2i queries have one)")
        print(f"    argsort loop (reference)                  {reference_seconds:7.2f} s   peak +{reference_memory / 1e6:7.1f} MB")
        print(f"    retrieval_metrics, one chunk              {unbounded_seconds:7.2f} s   peak +{unbounded_memory / 1e6:7.1f} MB"
              f"   {ratio(reference_seconds, unbounded_seconds)} faster")
        print(f"    retrieval_metrics, max_memory_bytes={max_memory_bytes / 1e6:.0f} MB  {bounded_seconds:7.2f} s"
              f"   peak +{bounded_memory / 1e6:7.1f} MB   {ratio(reference_seconds, bounded_seconds)} faster")


# ---------------------------------------------------------------------------------------------------
# Feature extraction


def benchmark_extract(data_root: str | None, quick: bool):
    "Images and captions per second of the frozen backbones in float32 and under bf16 autocast, on real COCO."
    from cocomix_nb.backbones import create_image_backbone, create_text_backbone, image_transform
    from cocomix_nb.data import load_coco_split, load_image

    split = load_coco_split("val", data_root, max_images=16 if quick else 128)
    image_batch = torch.stack([image_transform("efficientnet_lite0")(load_image(p)) for p in split.image_paths])
    captions = split.captions[:64 if quick else 640]
    repeat = 1 if quick else 2

    image_model = create_image_backbone("efficientnet_lite0").eval()
    rates = {}
    for label, channels_last, bf16 in [("float32", False, False), ("float32 channels-last", True, False),
                                       ("bf16 channels-last", True, True)]:
        image_model.set_channels_last(channels_last)

        def run():
            with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                for start in range(0, len(image_batch), 32):
                    image_model(image_batch[start:start + 32])

        run()
        rates[label] = len(image_batch) / seconds_of(run, repeat)
    print(f"  images ({len(image_batch)}, batch 32, EfficientNet-Lite0):")
    for label, rate in rates.items():
        print(f"    {label:24s} {rate:7.1f} img/s   {ratio(rate, rates['float32'])} of float32")

    text_model = create_text_backbone("minilm-l6")
    tokens = [text_model.tokenize(captions[start:start + 128]) for start in range(0, len(captions), 128)]
    text_rates = {}
    for label, bf16 in [("float32", False), ("bf16", True)]:
        def run():
            with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                for batch in tokens:
                    text_model(batch["input_ids"], batch["attention_mask"])

        run()
        text_rates[label] = len(captions) / seconds_of(run, repeat)
    print(f"  captions ({len(captions)}, batch 128, MiniLM-L6):")
    for label, rate in text_rates.items():
        print(f"    {label:24s} {rate:7.1f} captions/s   {ratio(rate, text_rates['float32'])} of float32")


# ---------------------------------------------------------------------------------------------------


SECTIONS = {"data": benchmark_data, "train": benchmark_train, "metrics": benchmark_metrics, "extract": benchmark_extract}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sections", nargs="+", choices=list(SECTIONS), default=list(SECTIONS),
                        help="sections to run (default: all)")
    parser.add_argument("--data-root", default=None, help="mini COCO folder (default: COCOMIX_DATA)")
    parser.add_argument("--max-memory-mb", type=float, default=64,
                        help="max_memory_bytes given to retrieval_metrics, in MB (default 64)")
    parser.add_argument("--quick", action="store_true", help="tiny workloads, to check that the script runs")
    args = parser.parse_args(argv)

    ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, 128 * 1024)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    print("command:", " ".join([Path(sys.executable).name, *sys.argv]))
    for line in machine_description():
        print(line)
    for name in args.sections:
        print(f"\n== {name}")
        started = time.perf_counter()
        if name == "metrics":
            benchmark_metrics(args.quick, int(args.max_memory_mb * 1e6))
        elif name == "train":
            benchmark_train(args.data_root, args.quick)
        else:
            SECTIONS[name](args.data_root, args.quick)
        print(f"   ({time.perf_counter() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
