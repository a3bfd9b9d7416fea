"""`ovseg bench`: how long a method takes on one image for one word and for five, its peak memory, and the
CLIPSeg architecture's forward (transformers' default config, random weights) timed in the same run.

Each timed run is what a user waits for on a new image: `set_image` (decode, backbone features) plus
`predict` of the words; the image's features are computed once per run and shared by the words.
"""

from __future__ import annotations

import resource
import statistics
import sys
import time

import numpy as np

FIVE_WORDS = ("person", "dog", "cup", "chair", "car")


def peak_rss_mb() -> float:
    """The process's peak resident memory so far, in MB (Linux reports KB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def bench(image: np.ndarray, methods: list[str], words: tuple[str, ...] = FIVE_WORDS, runs: int = 7,
          device: str = "cpu", reference: bool = True) -> dict:
    """{method: {"one_word_ms", "five_words_ms", "per_extra_word_ms", "ratio_five_to_one"}, "clipseg_ms",
    "peak_rss_mb", "image": [h, w], ...}: medians over `runs` runs after one warm-up run."""
    import torch

    from ovseg.core.predictor import Predictor

    predictor = Predictor(device=device)
    load_s = predictor.models.load()
    out: dict = {"image": list(image.shape[:2]), "runs": runs, "device": str(predictor.device),
                 "threads": torch.get_num_threads(), "models_load_s": round(load_s, 2), "methods": {}}
    for method in methods:
        times = {1: [], len(words): []}
        for n in times:
            for i in range(runs + 1):
                t0 = time.perf_counter()
                predictor.set_image(image)
                predictor.predict(list(words[:n]), methods=[method])
                if i:  # the first run loads the method and warms the caches
                    times[n].append((time.perf_counter() - t0) * 1000.0)
        one, five = statistics.median(times[1]), statistics.median(times[len(words)])
        out["methods"][method] = {"one_word_ms": round(one, 1), f"{len(words)}_words_ms": round(five, 1),
                                  "ratio": round(five / one, 2)}
    if reference:
        from ovseg.train.evaluate import clipseg_reference

        out["clipseg"] = clipseg_reference(runs)
    if predictor.device.type == "cuda":
        out["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated() / 2 ** 20, 1)
    out["peak_rss_mb"] = round(peak_rss_mb(), 1)
    return out


def format_bench(result: dict) -> str:
    lines = [f"image {result['image'][1]}x{result['image'][0]}, {result['device']}, {result['threads']} threads, "
             f"median of {result['runs']} runs (set_image + predict)"]
    for method, r in result["methods"].items():
        five = next(k for k in r if k.endswith("_words_ms"))
        lines.append(f"{method:<24} 1 word {r['one_word_ms']:8.1f} ms   {five.split('_')[0]} words "
                     f"{r[five]:8.1f} ms   ratio {r['ratio']:.2f}")
    if "clipseg" in result:
        c = result["clipseg"]
        lines.append(f"{'CLIPSeg architecture':<24} 1 forward {c['ms_per_forward']:8.1f} ms (random weights, "
                     f"{c['params_millions']:.0f} M parameters; one forward per word)")
    lines.append(f"peak memory (RSS) {result['peak_rss_mb']:.0f} MB"
                 + (f", GPU {result['peak_gpu_mb']:.0f} MB" if "peak_gpu_mb" in result else ""))
    return "\n".join(lines)
