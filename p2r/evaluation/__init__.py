"""Benchmark evaluation for ``p2r test`` (and validation during fit): adapters, protocols, scorers.

The seven benchmarks of VideoP2R's Table 1 (VSI-Bench, VideoMMMU, MMVU and VCR-Bench multiple-choice
subsets, MVBench, TempCompass, VideoMME without subtitles) and p2r's synthetic set, each scored
under one of three protocols (:mod:`p2r.evaluation.protocol`): ``video_r1`` (Video-R1's
eval_bench.py), ``lmms_eval`` (lmms-eval 0.7.3's tasks) or ``p2r`` (lenient, not comparable). The
evaluation callback (``callbacks.evaluation.BenchmarkEvaluation``) takes the adapters by class path
in YAML and sets the protocol of every adapter that does not choose one::

    protocol: video_r1
    benchmarks:
      vsibench: {class_path: p2r.evaluation.VSIBench}
      mmvu: {class_path: p2r.evaluation.MMVU, init_args: {protocol: p2r}}
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
from p2r.evaluation.judge import EvalJudge
from p2r.evaluation.protocol import PROTOCOLS, make_rules
from p2r.evaluation.scoring import MRA_CONVENTIONS, mean_relative_accuracy

__all__ = [
    "BENCHMARKS", "EvalJudge", "MMVU", "MRA_CONVENTIONS", "MVBench", "PROTOCOLS", "Synthetic", "TempCompass",
    "VCRBench", "VSIBench", "VideoBenchmark", "VideoMME", "VideoMMMU", "make_benchmark", "make_rules",
    "mean_relative_accuracy",
]
