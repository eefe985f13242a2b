"""Time one whole PA-GRPO step: shared-prompt training passes against the per-sample path (and TRL).

    python tools/bench_step.py                       # CPU default (a 3.9M Qwen2.5-VL), about 1 minute
    python tools/bench_step.py --trl                 # + TRL 1.16's GRPOTrainer on the same step (pip install -e ".[bench]")
    python tools/bench_step.py --hidden 3584 --layers 4 --heads 28 --kv-heads 4 \\
        --vision-hidden 1280 --vision-depth 8 --dtype bfloat16 --attn sdpa   # real width, on a GPU

The step, as PAGRPOModule runs it (p2r/algorithms/pagrpo.py):
  rollout                   p2r.algorithms.rollout.generate_groups (the same for both paths);
  old-policy log-probs      no-grad pass (the module needs it when num_iterations > 1; --no-old-policy
                            skips it, as the module does at num_iterations 1);
  reference log-probs       no-grad pass under the reference (LoRA off, or a frozen copy);
  policy forward+backward   log-probs with grad, pagrpo_loss (--loss), backward;
  optimizer step            grad-norm clip 5, AdamW.
The per-sample path runs each (prompt, completion) as its own row (build_train_batch +
completion_logprobs, micro-batches of --micro-batch rows); the shared path runs one row per
prompt (p2r.algorithms.shared_prompt, --micro-batch // G prompts per forward).

Same model (built from config, random weights, seeded), same video prompts, same seed for both.
Every completion is exactly --new-tokens long (no token ends a sample), so both do the same
work. Rewards are not part of the step (the same for both paths): advantages are seeded random
numbers. Each run is its own process, so its peak memory is its own: on CUDA
``torch.cuda.max_memory_allocated`` over the timed step; on CPU the peak resident set size of
the process (``resource.getrusage``, ru_maxrss: Python, torch and the model included, so the
figure before the step is printed too). The loss and gradient norm of both paths are printed as
a check that they computed the same step. Every time is the median over ``--rounds`` with its
range and count, "median s (min-max, n=rounds)", every ratio a ratio of medians (one slow round
must not move a headline, as a mean lets it). The last line is ``speedup: <x>``: the per-sample
path's median whole-step time / the shared path's.

``--trl`` adds TRL 1.16's ``GRPOTrainer`` (transformers ``generate``, no vLLM) on the same step:
the same model weights (saved to a temporary folder, which TRL loads twice: policy and
reference), the same question, G, completion length (``min_new_tokens`` = max = --new-tokens, so
no completion ends early), temperature 1.0 / top_p 0.95, beta 0.04, lr, clip and grad-norm clip,
one optimizer step per generation. TRL takes images, not video: it gets every second frame as an
image, which gives the same number of vision tokens (a video's 2 frames share one temporal patch;
an image fills both). The loss is the per-sequence mean on both sides (TRL ``loss_type="grpo"``,
p2r ``sequence_mean``) and neither runs an old-policy pass. Rewards are seeded random numbers.
``--rounds`` repeats every run in alternating order (p2r, TRL, TRL, p2r, ...) so that a loaded
machine slows both alike; each row is the median over rounds with its range and count, every
round's time listed beside it, and the "vs TRL" ratios are ratios of medians.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import time
import typing
from dataclasses import dataclass

import numpy as np
import torch

from bench_common import Timing, add_step_shape, bench_parser, peak_rss_mib, synchronize

from p2r.algorithms.pagrpo import micro_batches, micro_weight
from p2r.algorithms.policy_loss import AGGREGATION_MODES, pagrpo_loss
from p2r.algorithms.rollout import build_train_batch, completion_logprobs, generate_groups, perception_masks
from p2r.algorithms.settings import RolloutSettings
from p2r.algorithms.shared_prompt import shared_prompt_logprobs, supports_shared_prompt
from p2r.backbones import LoraOptions, TinyQwen25VL
from p2r.backbones.decoding import DecodeEngine
from p2r.data.video import Clip

PHASES = ("rollout", "old-policy log-probs", "reference log-probs", "policy forward+backward", "optimizer step")
PATHS = ("per-sample", "shared")
QUESTIONS = ("Describe what happens in the video, then answer: which way does the square move?",
             "How many objects cross the frame from left to right before the end of the clip?")


def fixed_length(cls: type) -> type:
    """``cls`` with no end token: every completion is exactly max_new_tokens long."""
    return type(f"FixedLength{cls.__name__}", (cls,), {"eos_token_ids": property(lambda self: [])})


FixedLengthQwen25VL = fixed_length(TinyQwen25VL)


def rollout_engines() -> tuple[str, ...]:
    """The decode engines of ``generate_groups`` (p2r.backbones.decoding.DecodeEngine)."""
    return typing.get_args(DecodeEngine)


@dataclass
class StepSettings:
    """The shape and options of one benchmarked PA-GRPO step."""

    group_size: int = 8
    new_tokens: int = 128
    micro_batch: int = 8
    seed: int = 0
    loss: str = "process_mean"
    old_policy: bool = True  # run the old-policy pass (PAGRPOModule does only when num_iterations > 1)
    engine: str = "eager"  # rollout decode engine of generate_groups
    autocast: str | None = None  # "bfloat16": mixed precision over the whole step, as Lightning's bf16-mixed
    token_segments: bool = True  # False: perception = the first third of each completion (no decoding)


class PhaseTimer:
    """Wall time of consecutive phases (the device synchronised at each boundary)."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.times = device, {}
        synchronize(device)
        self._last = time.perf_counter()

    def lap(self, phase: str | None) -> None:
        """Charge the time since the last lap to ``phase`` (None: to nothing)."""
        synchronize(self.device)
        now = time.perf_counter()
        if phase is not None:
            self.times[phase] = self.times.get(phase, 0.0) + now - self._last
        self._last = now


def make_prompts(backbone, prompts: int, frames: int, side: int, seed: int) -> tuple[list[str], list[Clip]]:
    """``prompts`` video prompts (seeded frames) with questions of different lengths."""
    rng = np.random.default_rng(seed)
    texts, clips = [], []
    for i in range(prompts):
        pixels = rng.integers(0, 255, (frames, side, side if side > 0 else -side, 3), dtype=np.uint8)
        clips.append(Clip(pixels, fps=2.0, frame_indices=list(range(frames)), total_frames=frames))
        texts.append(backbone.render_prompt(QUESTIONS[i % len(QUESTIONS)], "video"))
    return texts, clips


def _perception(backbone, completion_ids: list[list[int]], token_segments: bool) -> list[list[bool]]:
    if token_segments:
        return perception_masks(backbone.tokenizer, completion_ids)[1]
    return [[j < len(ids) // 3 for j in range(len(ids))] for ids in completion_ids]


def one_step(backbone, reference, optimizer, prompts, clips, s: StepSettings, shared: bool) -> tuple[dict, dict]:
    """One PA-GRPO step; returns the time per phase and {loss, grad_norm, prompt/vision tokens}."""
    device, g = backbone.model.device, s.group_size
    mixed = torch.autocast(device.type, dtype=getattr(torch, s.autocast)) if s.autocast else contextlib.nullcontext()
    timer = PhaseTimer(device)
    with mixed:
        backbone.eval()
        gen = torch.Generator(device).manual_seed(s.seed)
        rollout = generate_groups(backbone, prompts, clips, g, s.new_tokens, 1.0, 0.95, gen, engine=s.engine)
        timer.lap("rollout")

        backbone.train()
        n = len(rollout.completion_ids)
        if shared:
            chunks = micro_batches(len(prompts), max(1, s.micro_batch // g))

            def logprobs(chunk, model=None):
                return shared_prompt_logprobs(backbone, rollout, chunk, model=model)
        else:
            chunks = micro_batches(n, s.micro_batch)

            def logprobs(chunk, model=None):
                batch = build_train_batch(backbone, rollout, chunk)
                return completion_logprobs(backbone, batch, model=model), batch.completion_mask

        if s.old_policy:
            with torch.no_grad():
                old = [logprobs(chunk)[0] for chunk in chunks]
            timer.lap("old-policy log-probs")
        with torch.no_grad(), reference_policy(backbone, reference) as ref_model:
            ref = [logprobs(chunk, ref_model)[0] for chunk in chunks]
        timer.lap("reference log-probs")

        # Not timed: the same numbers for both paths (seeded advantages, perception spans).
        perception = _perception(backbone, rollout.completion_ids, s.token_segments)
        adv = torch.randn(n, generator=torch.Generator().manual_seed(s.seed + 1))  # (N,)
        masks = torch.zeros(n, s.new_tokens, dtype=torch.bool)  # (N, T) all completion tokens
        for i, ids in enumerate(rollout.completion_ids):
            masks[i, : len(ids)] = True
        timer.lap(None)

        total = 0.0
        start = 0
        for c, chunk in enumerate(chunks):
            logp, mask = logprobs(chunk)  # (n, T), (n, T)
            rows = list(range(start, start + logp.shape[0]))
            start += logp.shape[0]
            t = logp.shape[1]
            perception_mask = torch.zeros(len(rows), t, dtype=torch.bool)  # (n, T)
            for r, i in enumerate(rows):
                perception_mask[r, : len(perception[i])] = torch.tensor(perception[i], dtype=torch.bool)
            loss, _ = pagrpo_loss(
                logp, old[c] if s.old_policy else logp.detach(), ref[c], adv[rows].to(device)[:, None].expand(-1, t), mask,
                beta=0.04, eps_low=0.2, mode=s.loss, perception_mask=perception_mask.to(device), group_size=g,
            )
            weight = micro_weight(s.loss, masks[rows], masks, g)
            (loss * weight).backward()
            total += float(loss.detach()) * weight
        timer.lap("policy forward+backward")
    params = [p for p in backbone.model.parameters() if p.requires_grad]
    grad_norm = float(torch.nn.utils.clip_grad_norm_(params, 5.0))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    timer.lap("optimizer step")
    video = backbone.tokenizer.convert_tokens_to_ids("<|video_pad|>")
    info = {"loss": total, "grad_norm": grad_norm, "completion_lengths": [len(ids) for ids in rollout.completion_ids],
            "prompt_tokens": [int(it["input_ids"].shape[1]) for it in rollout.prompts.items],
            "vision_tokens": [int((it["input_ids"] == video).sum()) for it in rollout.prompts.items]}
    return timer.times, info


@contextlib.contextmanager
def reference_policy(backbone, reference):
    """The reference model to pass to the log-prob functions: the policy with its LoRA adapters off,
    or the frozen copy (as PAGRPOModule does)."""
    if reference is None:
        with backbone.adapters_disabled():
            yield backbone.model
        return
    yield reference


def peak_memory(device: torch.device, before_mib: float) -> dict:
    """Peak memory of the timed step: CUDA's allocator peak, or the process's peak RSS on CPU."""
    if device.type == "cuda":
        return {"peak_mib": torch.cuda.max_memory_allocated(device) / 2**20, "kind": "cuda max_memory_allocated"}
    return {"peak_mib": peak_rss_mib(), "before_mib": before_mib, "kind": "peak RSS of the process"}


def build_tiny(args) -> FixedLengthQwen25VL:
    lora = LoraOptions(r=args.lora, alpha=2 * args.lora, dropout=0.0) if args.lora else None
    backbone = FixedLengthQwen25VL(
        hidden_size=args.hidden, num_layers=args.layers, num_heads=args.heads, num_kv_heads=args.kv_heads,
        vision_hidden_size=args.vision_hidden, vision_depth=args.vision_depth, seed=args.seed,
        dtype=args.dtype, attn_implementation=args.attn, lora=lora, freeze_vision=args.freeze_vision,
    )
    backbone.build()
    return backbone


def settings_of(args) -> StepSettings:
    return StepSettings(args.group_size, args.new_tokens, args.micro_batch, args.seed, args.loss, not args.no_old_policy,
                        engine=args.engine)


def run_path(args, path: str) -> dict:
    """Build everything, run the warm-up steps, time one step of ``path``; all in this process."""
    torch.set_num_threads(args.threads)
    if path == "trl":
        return run_trl(args)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    backbone = build_tiny(args)
    backbone.model.to(device)
    if path == "shared":
        ok, reason = supports_shared_prompt(backbone)
        if not ok:
            raise SystemExit(f"shared prompt refused: {reason}")
    reference = None if args.lora else backbone.frozen_copy(next(backbone.model.parameters()).dtype)
    params = [p for p in backbone.model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-6, weight_decay=0.01)
    prompts, clips = make_prompts(backbone, args.prompts, args.frames, args.side, args.seed)
    settings = settings_of(args)
    for _ in range(args.warmup):
        one_step(backbone, reference, optimizer, prompts, clips, settings, path == "shared")
    before = peak_rss_mib()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times, info = one_step(backbone, reference, optimizer, prompts, clips, settings, path == "shared")
    info.update(times=times, memory=peak_memory(device, before), device=str(device), threads=torch.get_num_threads(),
                params_m=sum(p.numel() for p in backbone.model.parameters()) / 1e6)
    return info


def run_trl(args) -> dict:
    """One timed step of TRL's GRPOTrainer on the same model, question and shape (after --warmup steps)."""
    import tempfile

    from datasets import Dataset
    from PIL import Image
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    if args.lora or args.prompts != 1:
        raise SystemExit("--trl compares full fine-tuning on one prompt per step")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    backbone = build_tiny(args)
    _, clips = make_prompts(backbone, 1, args.frames, args.side, args.seed)
    # Every second frame as an image: the same vision tokens as the video (temporal patch 2).
    images = [Image.fromarray(f) for f in clips[0].frames[::2]]
    data = Dataset.from_list([{"prompt": [{"role": "user", "content": QUESTIONS[0]}], "images": images}])
    rng = np.random.default_rng(args.seed + 1)
    lengths: list[list[int]] = []

    def random_reward(completions, completion_ids, **kwargs) -> list[float]:
        lengths.append([len(ids) for ids in completion_ids])
        return [float(x) for x in rng.standard_normal(len(completions))]

    class StepClock(TrainerCallback):
        def __init__(self) -> None:
            self.steps, self.generate_s, self.before_mib = [], [], 0.0

        def on_step_begin(self, args_, state, control, **kwargs):
            if state.global_step == args.warmup:  # the timed step starts: reset the peaks
                self.before_mib = peak_rss_mib()
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
            self._start = time.perf_counter()

        def on_step_end(self, args_, state, control, **kwargs):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            self.steps.append(time.perf_counter() - self._start)

    with tempfile.TemporaryDirectory() as tmp:
        backbone.model.save_pretrained(tmp)
        backbone.processor.save_pretrained(tmp)
        g, t = args.group_size, args.new_tokens
        config = GRPOConfig(
            output_dir=tmp, per_device_train_batch_size=g, num_generations=g, gradient_accumulation_steps=1,
            max_completion_length=t, generation_kwargs={"min_new_tokens": t}, temperature=1.0, top_p=0.95,
            beta=0.04, epsilon=0.2, loss_type="grpo", num_iterations=1, learning_rate=1e-6, weight_decay=0.01,
            max_grad_norm=5.0, lr_scheduler_type="constant", max_steps=args.warmup + 1, logging_steps=1_000_000,
            save_strategy="no", report_to="none", use_cpu=device.type == "cpu", bf16=False, seed=args.seed,
            dataloader_num_workers=0, disable_tqdm=True, gradient_checkpointing=False,
        )
        clock = StepClock()
        trainer = GRPOTrainer(model=tmp, reward_funcs=random_reward, args=config, train_dataset=data,
                              processing_class=backbone.processor, callbacks=[clock])
        generate = trainer.model.generate
        image_pad = backbone.tokenizer.convert_tokens_to_ids("<|image_pad|>")
        vision_tokens: list[int] = []

        def timed_generate(*a, **k):
            vision_tokens.append(int((k["input_ids"][0] == image_pad).sum()))  # what TRL's processor made of the images
            start = time.perf_counter()
            try:
                return generate(*a, **k)
            finally:
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                clock.generate_s.append(time.perf_counter() - start)

        trainer.model.generate = timed_generate
        trainer.train()
    step = clock.steps[-1]
    return {"step_s": step, "generate_s": clock.generate_s[-1], "memory": peak_memory(device, clock.before_mib),
            "vision_tokens": vision_tokens[-1:], "completion_lengths": lengths[-1],
            "threads": torch.get_num_threads()}


def run_round(path: str) -> dict:
    cmd = [sys.executable, __file__, *sys.argv[1:], "--path", path]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if proc.returncode or line is None:
        sys.stderr.write(proc.stdout + proc.stderr)
        raise SystemExit(f"the {path} run failed (exit {proc.returncode})")
    return json.loads(line[len("RESULT "):])


def step_seconds(result: dict) -> float:
    return result["step_s"] if "step_s" in result else sum(result["times"].values())


def report(runs: dict[str, list[dict]]) -> list[str]:
    """The lines after the header, from every round's result of each path: per phase and for the whole
    step the median (min-max, n) of both paths and the ratio of medians; each path's loss, gradient
    norm and highest peak memory; with a "trl" path its table and ratios; ``speedup: <x>`` last."""
    rounds = len(runs["shared"])
    step = {p: Timing.of(step_seconds(x) for x in results) for p, results in runs.items()}
    lines = [f"median (min-max, n) over {rounds} round(s); ratios of medians",
             f"{'phase':<26}{'per-sample':>30}{'shared':>30}{'ratio':>9}"]
    for phase in PHASES:
        a, b = (Timing.of(x["times"].get(phase, 0.0) for x in runs[p]) for p in PATHS)
        lines.append(f"{phase:<26}{a!s:>30}{b!s:>30}{a.median / b.median:>8.2f}x" if b.median
                     else f"{phase:<26}{'not run':>30}{'not run':>30}")
    ratio = step["per-sample"].median / step["shared"].median
    lines.append(f"{'whole step':<26}{step['per-sample']!s:>30}{step['shared']!s:>30}{ratio:>8.2f}x")
    for p in PATHS:
        r = runs[p][-1]
        mem = max(x["memory"]["peak_mib"] for x in runs[p])
        extra = f" (before the step {r['memory']['before_mib']:.0f} MiB)" if "before_mib" in r["memory"] else ""
        lines.append(f"{p:<11} loss {r['loss']:.6f}  grad norm {r['grad_norm']:.6f}  peak memory {mem:.0f} MiB{extra} "
                     f"[{r['memory']['kind']}; highest of {rounds} round(s)]")
    if "trl" in runs:
        trl = runs["trl"]
        lines.append(f"TRL 1.16 GRPOTrainer (transformers generate; every second frame as an image: {trl[0]['vision_tokens']} "
                     "vision tokens), same model, question, G, completion length, beta and per-sequence loss:")
        lines.append(f"{'run':<16}{'whole step':>30}{'generation':>30}{'peak memory':>14}   rounds")
        for p, label in (("shared", "p2r shared"), ("per-sample", "p2r per-sample"), ("trl", "TRL")):
            gen = Timing.of(x["generate_s"] if p == "trl" else x["times"]["rollout"] for x in runs[p])
            mem = max(x["memory"]["peak_mib"] for x in runs[p])
            each = ", ".join(f"{step_seconds(x):.2f}" for x in runs[p])
            lines.append(f"{label:<16}{step[p]!s:>30}{gen!s:>30}{mem:>10.0f} MiB   {each} s")
        lines.append(f"vs TRL: {step['trl'].median / step['shared'].median:.2f}x faster (shared prompt), "
                     f"{step['trl'].median / step['per-sample'].median:.2f}x (per-sample); ratios of medians over {rounds} rounds")
    return lines + [f"speedup: {ratio:.2f}"]


def main() -> None:
    parser = bench_parser(__doc__)
    add_step_shape(parser, new_tokens=128)
    parser.add_argument("--prompts", type=int, default=1, help="video prompts per step")
    parser.add_argument("--heads", type=int, default=8, help="attention heads")
    parser.add_argument("--kv-heads", type=int, default=4, help="key/value heads")
    parser.add_argument("--vision-hidden", type=int, default=128, help="vision tower width")
    parser.add_argument("--vision-depth", type=int, default=4, help="vision tower blocks")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="parameter dtype")
    parser.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"], help="attention implementation")
    parser.add_argument("--lora", type=int, default=0, help="LoRA rank (0: full fine-tuning, reference = frozen copy)")
    parser.add_argument("--freeze-vision", action="store_true", help="keep the vision tower frozen")
    parser.add_argument("--micro-batch", type=int, default=8, help="rows per forward in the per-sample path (shared: this // G prompts)")
    parser.add_argument("--loss", default="process_mean", choices=AGGREGATION_MODES,
                        help="loss aggregation (--trl uses sequence_mean, TRL's loss_type='grpo')")
    parser.add_argument("--no-old-policy", action="store_true", help="skip the old-policy pass (PAGRPOModule at num_iterations 1)")
    parser.add_argument("--trl", action="store_true", help="also time TRL 1.16's GRPOTrainer on the same step (needs trl: the bench extra)")
    parser.add_argument("--rounds", type=int, default=None,
                        help="runs per path in alternating order (default 1; 2 with --trl); medians and ranges over them")
    parser.add_argument("--engine", default=RolloutSettings.engine, choices=rollout_engines(),
                        help="rollout decode engine (default: p2r's, model.init_args.rollout.engine)")
    parser.add_argument("--warmup", type=int, default=None,
                        help="untimed steps first (default: 1 on CUDA, with --trl or with the compiled engine, whose "
                             "first rollout compiles; else 0)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: on a shared machine, threads waiting for a busy core slow small ops 10-60x)")
    parser.add_argument("--seed", type=int, default=0, help="seed of weights, frames, sampling and advantages")
    parser.add_argument("--path", choices=(*PATHS, "trl"), help=argparse.SUPPRESS)  # internal: run one path, print JSON
    args = parser.parse_args()
    if args.warmup is None:  # one-off set-up (TRL's first step, compiling a decode step): time a later step
        args.warmup = 1 if torch.cuda.is_available() or args.trl or args.engine == "compiled" else 0
    if args.trl:
        args.loss, args.no_old_policy = "sequence_mean", True
    if args.path:
        print("RESULT " + json.dumps(run_path(args, args.path)))
        return

    paths = (*PATHS, "trl") if args.trl else PATHS
    rounds = args.rounds or (2 if args.trl else 1)
    runs: dict[str, list[dict]] = {p: [] for p in paths}
    for r in range(rounds):
        for path in paths if r % 2 == 0 else reversed(paths):
            runs[path].append(run_round(path))
    first = runs["shared"][0]
    print(f"model: Qwen2.5-VL from config, {first['params_m']:.1f}M parameters (hidden {args.hidden}, {args.layers} layers), "
          f"{first['device']} {args.dtype} {args.attn}, {first['threads']} threads, "
          f"{'LoRA r=' + str(args.lora) if args.lora else 'full fine-tuning'}")
    print(f"step: {args.prompts} prompt(s) of {first['prompt_tokens']} tokens ({first['vision_tokens']} vision) x G = "
          f"{args.group_size}, {args.new_tokens} new tokens each, micro-batch {args.micro_batch} rows, loss {args.loss}, "
          f"{args.engine} decoding, warm-up steps {args.warmup}, rounds {rounds}")
    print("\n".join(report(runs)))


if __name__ == "__main__":
    main()
