"""Benchmark adapters for ``p2r test`` (and validation during fit): record format, prompt,
answer extraction, metric and category breakdown of each benchmark.

The seven benchmarks of VideoP2R's Table 1 (VSI-Bench, VideoMMMU, MMVU and VCR-Bench multiple-choice
subsets, MVBench, TempCompass, VideoMME without subtitles) and p2r's synthetic set; the evaluation
callback (``callbacks.evaluation.BenchmarkEvaluation``) takes them by class path in YAML::

    benchmarks:
      vsibench: {class_path: p2r.evaluation.VSIBench, init_args: {mra_convention: video_r1}}
      synthetic: {class_path: p2r.evaluation.Synthetic}
"""

from p2r.evaluation.benchmarks import (
    BENCHMARKS,
    MMVU,
    MVBench,
    Synthetic,
    TempCompass,
    VCRBench,
    VideoBenchmark,
    VideoMME,
    VideoMMMU,
    VSIBench,
    make_benchmark,
)
from p2r.evaluation.scoring import MRA_CONVENTIONS, mean_relative_accuracy

__all__ = [
    "BENCHMARKS", "MMVU", "MRA_CONVENTIONS", "MVBench", "Synthetic", "TempCompass", "VCRBench", "VSIBench",
    "VideoBenchmark", "VideoMME", "VideoMMMU", "make_benchmark", "mean_relative_accuracy",
]
