"""Generate process-aware CoT data: teacher trace, verification, observation sufficiency (METHOD.md).

    # the paper's setup: a vLLM server as teacher, another as judge
    python tools/generate_cot.py --records Video-R1-260k.json --media-root data/Video-R1 --out data/cot \\
        --teacher openai --base-url http://127.0.0.1:8000/v1 --model Qwen/Qwen2.5-VL-72B-Instruct \\
        --judge openai --judge-base-url http://127.0.0.1:8001/v1 --judge-model meta-llama/Llama-3.1-70B-Instruct
    # on the CPU: the tiny backbone on the synthetic set, the rule-based judge
    python tools/generate_cot.py --shards 'data/synthetic/shards/train-*.tar' --out runs/cot-tiny \\
        --teacher backbone --backbone-class p2r.backbones.TinyQwen25VL --judge rule --limit 16

Writes OUT/cot.jsonl (every finished record, kept or not, with why), OUT/shards/PREFIX-*.tar (the
kept ones, ready for SFT), OUT/stats.json, and prints the statistics table. Run the same command
again to resume: finished records are skipped, teacher answers are never asked for twice, and
records whose teacher or judge failed are retried. Exit status: 0 done, 1 no usable record,
3 some records failed on the teacher or judge side (run again to retry them).
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
from pathlib import Path

from callbacks.rewards.judges import HFTextJudge, Judge, OpenAIChatJudge, RuleBasedJudge
from p2r.cot.pipeline import OUTPUT_FILE, RecordFileSource, RunReport, ShardSource, run_pipeline
from p2r.cot.stats import format_table
from p2r.cot.teachers import BackboneTeacher, OpenAIChatTeacher, Teacher
from p2r.data.shards import count_reasons, shard_pattern
from p2r.data.video import FrameSampling

EXAMPLES_SHOWN = 5


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    source = parser.add_argument_group("input (one of)")
    given = source.add_mutually_exclusive_group(required=True)
    given.add_argument("--records", type=Path, help="Video-R1/VideoP2R record file: JSON list or JSON Lines (.gz too)")
    given.add_argument("--shards", help="WebDataset shards: a glob or brace pattern, several joined by '::'")
    source.add_argument("--media-root", type=Path, help="folder the records' 'path' fields are relative to (with --records)")
    source.add_argument("--limit", type=int, help="only the first N usable records (default: all)")
    parser.add_argument("--out", type=Path, required=True, help="output folder (resumes what is already there)")

    teacher = parser.add_argument_group("teacher (step 1)")
    teacher.add_argument("--teacher", choices=("backbone", "openai"), required=True,
                         help="a local p2r backbone, or an OpenAI-compatible chat server that takes images")
    teacher.add_argument("--backbone-class", default="p2r.backbones.HFBackbone",
                         help="backbone class path, e.g. p2r.backbones.TinyQwen25VL (default: %(default)s)")
    teacher.add_argument("--backbone-args", default="{}",
                         help='backbone init args as JSON, e.g. \'{"dtype": "bfloat16", "weights_from": "sft.ckpt"}\'')
    teacher.add_argument("--model-name-or-path", help="hub id or folder for p2r.backbones.HFBackbone (sets that init arg)")
    teacher.add_argument("--batch-size", type=int, default=4, help="backbone: records per generate call (default: %(default)s)")
    teacher.add_argument("--device", help="backbone: device to run on (default: cuda when available, else cpu)")
    teacher.add_argument("--base-url", help="openai: server root up to the API version, e.g. http://127.0.0.1:8000/v1")
    teacher.add_argument("--model", help="openai: model name the server expects")
    teacher.add_argument("--api-key-env", default="P2R_TEACHER_API_KEY",
                         help="openai: NAME of the environment variable holding the API key (default: %(default)s)")
    teacher.add_argument("--concurrency", type=int, default=8, help="openai: requests in flight (default: %(default)s)")
    teacher.add_argument("--timeout", type=float, default=300.0, help="openai: seconds per request (default: %(default)s)")
    teacher.add_argument("--max-retries", type=int, default=3,
                         help="openai: extra attempts after a timeout, 408, 429 or 5xx (default: %(default)s)")
    teacher.add_argument("--backoff", type=float, default=2.0, help="openai: retry k waits BACKOFF * 2**k s (default: %(default)s)")
    teacher.add_argument("--temperature", type=float, default=0.0, help="0: greedy, as in the paper (default: %(default)s)")
    teacher.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default: %(default)s)")
    teacher.add_argument("--max-new-tokens", type=int, default=1024, help="reply length limit in tokens (default: %(default)s)")

    media = parser.add_argument_group("frames the teacher sees")
    media.add_argument("--frames", type=int, default=16, help="most frames per video (default: %(default)s, as in SFT)")
    media.add_argument("--fps", type=float, default=2.0, help="target sampling rate before clamping (default: %(default)s)")
    media.add_argument("--max-pixels", type=int, default=128 * 28 * 28,
                       help="largest frame area in pixels (default: %(default)s = 128*28*28, as in SFT)")
    media.add_argument("--decode-workers", type=int, default=2, help="threads decoding videos (default: %(default)s)")

    checks = parser.add_argument_group("verification and judge (steps 2 and 3)")
    checks.add_argument("--min-score", type=float, default=0.6, help="step 2: least task score kept (default: %(default)s)")
    checks.add_argument("--judge", choices=("rule", "openai", "hf"), required=True,
                        help="step 3: rule (records' facts['evidence']), openai (chat server) or hf (local text LM)")
    checks.add_argument("--judge-model", help="openai: model name; hf: hub id or folder")
    checks.add_argument("--judge-base-url", help="openai: server root up to the API version")
    checks.add_argument("--judge-api-key-env", default="P2R_JUDGE_API_KEY",
                        help="openai: NAME of the environment variable holding the judge's key (default: %(default)s)")
    checks.add_argument("--judge-concurrency", type=int, default=8, help="openai: requests in flight (default: %(default)s)")
    checks.add_argument("--judge-timeout", type=float, default=60.0, help="openai: seconds per request (default: %(default)s)")
    checks.add_argument("--judge-max-tokens", type=int, default=256, help="judge reply length limit (default: %(default)s)")
    checks.add_argument("--judge-device", help="hf: device (default: cuda when available, else cpu)")

    out = parser.add_argument_group("shards of the kept records")
    out.add_argument("--shard-prefix", default="train", help="OUT/shards/PREFIX-000000.tar, ... (default: %(default)s)")
    out.add_argument("--samples-per-shard", type=int, default=1000, help="records per shard (default: %(default)s)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")

    args = parser.parse_args(argv)
    if args.records is not None and args.media_root is None:
        parser.error("--records needs --media-root")
    if args.teacher == "openai" and not (args.base_url and args.model):
        parser.error("--teacher openai needs --base-url and --model")
    if args.judge == "openai" and not (args.judge_base_url and args.judge_model):
        parser.error("--judge openai needs --judge-base-url and --judge-model")
    if args.judge == "hf" and not args.judge_model:
        parser.error("--judge hf needs --judge-model")
    try:
        args.backbone_args = json.loads(args.backbone_args)
    except json.JSONDecodeError as err:
        parser.error(f"--backbone-args is not JSON: {err}")
    if not isinstance(args.backbone_args, dict):
        parser.error("--backbone-args must be a JSON object")
    return args


def build_teacher(args: argparse.Namespace) -> Teacher:
    if args.teacher == "openai":
        return OpenAIChatTeacher(
            base_url=args.base_url, model=args.model, api_key_env=args.api_key_env, concurrency=args.concurrency,
            timeout_s=args.timeout, max_retries=args.max_retries, backoff_s=args.backoff,
            max_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
        )
    init_args = dict(args.backbone_args)
    if args.model_name_or_path:
        init_args["model_name_or_path"] = args.model_name_or_path
    module, _, name = args.backbone_class.rpartition(".")
    backbone = getattr(importlib.import_module(module), name)(**init_args)
    return BackboneTeacher(backbone, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                           temperature=args.temperature, top_p=args.top_p, device=args.device)


def build_judge(args: argparse.Namespace) -> Judge:
    if args.judge == "openai":
        return OpenAIChatJudge(base_url=args.judge_base_url, model=args.judge_model, api_key_env=args.judge_api_key_env,
                               max_concurrency=args.judge_concurrency, timeout_s=args.judge_timeout,
                               max_tokens=args.judge_max_tokens)
    if args.judge == "hf":
        return HFTextJudge(model_name_or_path=args.judge_model, max_new_tokens=args.judge_max_tokens, device=args.judge_device)
    return RuleBasedJudge()


def print_report(report: RunReport, out: Path) -> None:
    """The unusable records, the table, what this run did, the records left to retry, the shards."""
    if report.rejected:
        print(f"{len(report.rejected)} unusable record(s) left out:")
        for kind, n in count_reasons(report.rejected).most_common():
            print(f"  {n:8d}  {kind}")
        for where, reason in report.rejected[:EXAMPLES_SHOWN]:
            print(f"  e.g. {where}: {reason}")
    print()
    print(format_table(report.summary()))
    print()
    print(f"{len(report.rows)} records in scope: {report.skipped} finished before this run; this run asked the teacher "
          f"{report.asked} time(s) and reused {report.reused} stored answer(s)")
    if report.retry:
        print(f"{len(report.retry)} record(s) to retry (run the same command again), e.g.:")
        for record_id, outcome in report.retry[:EXAMPLES_SHOWN]:
            print(f"  {record_id}: {outcome.reason}: {outcome.detail[:200]}")
    print(f"records: {out / OUTPUT_FILE}")
    if report.shards:
        print(f"{report.kept} kept record(s) in {len(report.shards)} shard(s), for data.train_shards:")
        print(shard_pattern(report.shards))
    else:
        print("no kept record: no shards written")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    source = RecordFileSource(args.records, args.media_root) if args.records else ShardSource(args.shards)
    teacher, judge = build_teacher(args), build_judge(args)
    frames = FrameSampling(fps=args.fps, min_frames=min(4, args.frames), max_frames=args.frames, max_pixels=args.max_pixels)
    named = repr(judge) if type(judge).__repr__ is not object.__repr__ else type(judge).__name__
    print(f"teacher: {teacher.describe()}\njudge: {named}\nout: {args.out}")
    report = run_pipeline(source, teacher, judge, args.out, frames=frames, min_score=args.min_score, limit=args.limit,
                          shard_prefix=args.shard_prefix, samples_per_shard=args.samples_per_shard,
                          decode_workers=args.decode_workers, progress=not args.no_progress)
    print_report(report, args.out)
    if not report.rows:
        return 1
    return 3 if report.retry else 0


if __name__ == "__main__":
    sys.exit(main())
