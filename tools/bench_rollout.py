"""Time per group of G rollouts: p2r's shared-prefill rollout (eager and compiled decoding)
against the two usual ways.

    python tools/bench_rollout.py [--group-size 8] [--new-tokens 64] [--frames 16] [--side 308] [--repeats 3]

Same model (a Qwen2.5-VL built from config, random weights), same video prompt, same sampling
settings, in one run:
  ours: p2r.algorithms.rollout.generate_groups: the video encoded and the prompt prefilled once,
        the KV cache repeated G times, one batched decode loop; with the eager engine (dynamic
        cache) and the compiled one (static cache, torch.compile'd step; p2r.backbones.decoding);
  (a)   the prompt G times in the batch, one ``generate`` (TRL's and Video-R1's way);
  (b)   ``generate(num_return_sequences=G)``: video encoded once, prompt prefilled G times.
Every method generates exactly ``--new-tokens`` tokens per sample (end tokens are ignored), so
the work compared is the same. Prints each method's median time over ``--repeats`` runs after one
warm-up, with its range and the number of runs (the compiled engine compiles during its warm-up:
that time is printed apart), the ratio of the two engines, and as its last line ``speedup: <x>``,
ours with PA-GRPO's default engine (``rollout.engine``) against (a); every ratio is one of medians.
"""

from __future__ import annotations

import numpy as np
import torch

from bench_common import Timing, add_step_shape, bench_parser, interleaved_timings

from p2r.algorithms.rollout import generate_groups
from p2r.algorithms.settings import RolloutSettings
from p2r.backbones import TinyQwen25VL
from p2r.data.video import Clip

EAGER, COMPILED = "ours, eager decoding", "ours, compiled decoding"
WAY_A, WAY_B = "(a) prompt repeated G times in the batch", "(b) generate(num_return_sequences=G)"


def report(timings: dict[str, Timing], compiling_s: float, default: str) -> list[str]:
    """The lines after the header: one row per method (median, range, runs), then the ratios, all of
    medians (one slow run must not move a headline), ``speedup: <x>`` (ours with the ``default``
    engine against (a)) last."""
    base = timings[COMPILED if default == "compiled" else EAGER].median
    runs = timings[COMPILED].n
    lines = [f"{'method':<44} {'per group: median (min-max, n)':<30} ratio of medians"]
    lines += [f"{name:<44} {str(t):<30} {t.median / base:5.2f}x ours ({default})" for name, t in timings.items()]
    return lines + [
        f"compiled decoding: first rollout {compiling_s:.1f} s (compiling included), then {timings[COMPILED]} per group",
        f"compiled vs eager: {timings[EAGER].median / timings[COMPILED].median:.2f}x (ratio of medians over {runs} runs)",
        f"speedup over (b): {timings[WAY_B].median / base:.2f}",
        f"speedup: {timings[WAY_A].median / base:.2f}",
    ]


def main() -> None:
    parser = bench_parser(__doc__)
    add_step_shape(parser, new_tokens=64)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per method (median, range and count reported)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    backbone = TinyQwen25VL(hidden_size=args.hidden, num_layers=args.layers, num_heads=8, num_kv_heads=4,
                            vision_hidden_size=128, vision_depth=4, seed=0)
    backbone.build()
    backbone.model.eval()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    backbone.model.to(device)
    g, n = args.group_size, args.new_tokens
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 255, (args.frames, args.side, args.side, 3), dtype=np.uint8)
    clip = Clip(frames, fps=2.0, frame_indices=list(range(args.frames)), total_frames=args.frames)
    prompt = backbone.render_prompt("Describe what happens in the video, then answer: which way does it move?", "video")
    single = backbone.move(backbone.encode([prompt], [clip]))
    vision_tokens = int((single["input_ids"] == backbone.tokenizer.convert_tokens_to_ids("<|video_pad|>")).sum())
    repeated = backbone.move(backbone.encode([prompt] * g, [clip] * g))
    sampling = dict(do_sample=True, temperature=1.0, top_p=0.95, max_new_tokens=n, min_new_tokens=n,
                    pad_token_id=backbone.pad_token_id)

    def ours(engine: str):
        return lambda: generate_groups(backbone, [prompt], [clip], g, n, 1.0, 0.95,
                                       torch.Generator(device).manual_seed(0), engine=engine)

    def repeated_batch() -> None:
        with torch.no_grad():
            backbone.model.generate(**repeated, **sampling)

    def num_return_sequences() -> None:
        with torch.no_grad():
            backbone.model.generate(**single, num_return_sequences=g, **sampling)

    # Exactly n new tokens for ours too: no token ends a completion during the benchmark.
    type(backbone).eos_token_ids = property(lambda self: [])
    params = sum(p.numel() for p in backbone.model.parameters()) / 1e6
    print(f"model: Qwen2.5-VL from config, {params:.1f}M parameters, {device}, {torch.get_num_threads()} threads")
    print(f"prompt: {single['input_ids'].shape[1]} tokens ({vision_tokens} vision tokens); G = {g}; {n} new tokens each")
    warmup, timings = interleaved_timings({
        EAGER: ours("eager"),
        COMPILED: ours("compiled"),
        WAY_A: repeated_batch,
        WAY_B: num_return_sequences,
    }, args.repeats, device)
    print("\n".join(report(timings, warmup[COMPILED], RolloutSettings.engine)))


if __name__ == "__main__":
    main()
