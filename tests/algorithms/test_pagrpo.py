"""PA-GRPO module: advantages per process, micro-batch weights, and the real CLI from a tiny SFT run."""

from __future__ import annotations

import csv
import math
import random
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch

from callbacks.rollouts import Rollouts
from p2r.algorithms.pagrpo import PAGRPOModule, micro_batches, micro_weight, shuffled_clip
from p2r.algorithms.settings import LossSettings, RolloutSettings
from p2r.backbones import TinyQwen25VL
from p2r.cli import main
from p2r.data.synthetic import make_synthetic
from p2r.data.video import Clip

ROOT = Path(__file__).resolve().parents[2]
SMALL = [
    "--model.init_args.backbone.init_args.hidden_size=32",
    "--model.init_args.backbone.init_args.num_layers=2",
    "--model.init_args.backbone.init_args.vision_hidden_size=32",
    "--trainer.limit_val_batches=0",
    "--data.num_workers=0",
    "--trainer.log_every_n_steps=1",
]


def _rollouts(perception, reasoning, group_size=2):
    n = len(perception)
    r = Rollouts(group_size=group_size, prompts=[{"id": str(i)} for i in range(n // group_size)], completions=[""] * n,
                 truncated=[False] * n)
    r.set_reward("perception/accuracy", perception, "perception")
    r.set_reward("reasoning/accuracy", reasoning, "reasoning")
    return r


def _module(mode):
    return PAGRPOModule(TinyQwen25VL(hidden_size=32, num_layers=1, vision_hidden_size=32), rollout=RolloutSettings(group_size=2),
                        loss=LossSettings(mode=mode))


def test_pa_grpo_normalises_each_process_in_its_group():
    # Group 1: P = [1, 0] -> (+0.7071, -0.7071) (unbiased std 0.7071); R = [0, 1] -> (-0.7071, +0.7071).
    # Group 2: P = [1, 1] -> zero variance -> 0; R = [1, 0] -> (+0.7071, -0.7071).
    adv_p, adv_r, keep = _module("pa_grpo")._advantages(_rollouts([1, 0, 1, 1], [0, 1, 1, 0]))
    s = 1 / math.sqrt(2)
    torch.testing.assert_close(adv_p, torch.tensor([s, -s, 0.0, 0.0]), atol=1e-3, rtol=0)
    torch.testing.assert_close(adv_r, torch.tensor([-s, s, s, -s]), atol=1e-3, rtol=0)
    assert keep.all()


def test_plain_grpo_sums_rewards_and_shares_one_advantage():
    # Totals: group 1 [1, 1] -> 0, 0; group 2 [2, 1] -> (+0.7071, -0.7071) on both processes.
    adv_p, adv_r, _ = _module("grpo")._advantages(_rollouts([1, 0, 1, 1], [0, 1, 1, 0]))
    torch.testing.assert_close(adv_p, adv_r)
    torch.testing.assert_close(adv_p, torch.tensor([0.0, 0.0, 0.7071, -0.7071]), atol=1e-3, rtol=0)


def test_sum_of_advantages_puts_both_normalised_advantages_on_every_token():
    # The other reading of "without separate assignment": A_P + A_R, each normalised in its group.
    # Same rewards as above: group 1 (s - s, -s + s) = (0, 0); group 2 (0 + s, 0 - s).
    adv_p, adv_r, _ = _module("sum_of_advantages")._advantages(_rollouts([1, 0, 1, 1], [0, 1, 1, 0]))
    s = 1 / math.sqrt(2)
    torch.testing.assert_close(adv_p, adv_r)
    torch.testing.assert_close(adv_p, torch.tensor([0.0, 0.0, s, -s]), atol=1e-3, rtol=0)


def test_a_completion_without_observation_keeps_its_perception_advantage():
    """Issue 21, point 1: A_P of a row with no perception token lands on its first token, never nowhere."""
    module = _module("pa_grpo")
    masks = [[True, True, False, False], [False, False, False]]  # row 1 skipped the observation
    completion = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]], dtype=torch.bool)
    adv, perception, comp = module._token_tensors([0, 1], masks, torch.tensor([0.5, -1.5]), torch.tensor([0.2, 0.3]),
                                                  torch.tensor([True, True]), completion)
    assert perception.int().tolist() == [[1, 1, 0, 0], [1, 0, 0, 0]]
    torch.testing.assert_close(adv, torch.tensor([[0.5, 0.5, 0.2, 0.2], [-1.5, 0.3, 0.3, 0.0]]))


def test_nan_reward_drops_the_whole_group():
    _, _, keep = _module("pa_grpo")._advantages(_rollouts([1, math.nan, 1, 0], [0, 1, 1, 0]))
    assert keep.tolist() == [False, False, True, True]


def test_micro_batches_weights_sum_to_one():
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [0, 0, 0], [1, 1, 1]], dtype=torch.bool)
    chunks = micro_batches(4, 3)
    assert chunks == [[0, 1, 2], [3]]
    for mode in ("token_mean", "sequence_mean", "constant"):
        total = sum(micro_weight(mode, mask[rows], mask) for rows in chunks)
        assert total == pytest.approx(1.0)
    # token_mean: 3 of 6 tokens in the first chunk; sequence_mean: 2 of the 3 non-empty rows.
    assert micro_weight("token_mean", mask[:3], mask) == pytest.approx(0.5)
    assert micro_weight("sequence_mean", mask[:3], mask) == pytest.approx(2 / 3)
    assert micro_weight("constant", mask[:3], mask) == pytest.approx(0.75)
    # process_mean weighs whole groups (G = 2): rows 0-1 and rows 2-3 both have tokens, 1/2 each;
    # with rows 2-3 empty (a dropped group) the first group is the whole loss.
    assert micro_weight("process_mean", mask[:2], mask, group_size=2) == pytest.approx(0.5)
    empty_second = mask.clone()
    empty_second[3] = False
    assert micro_weight("process_mean", empty_second[:2], empty_second, group_size=2) == pytest.approx(1.0)


@pytest.fixture(scope="module")
def tiny_sft(tmp_path_factory):
    """A tiny SFT run in its own working folder: runs/sft/checkpoints/last.ckpt, as pagrpo.yaml expects."""
    work = tmp_path_factory.mktemp("work")
    make_synthetic(work / "data", 16, 4, 4, seed=0, progress=False)
    data = [f"--data.train_shards={work}/data/shards/train-*.tar", f"--data.val_shards={work}/data/shards/val-*.tar",
            f"--data.test_sets={{\"synthetic\": \"{work}/data/shards/test-*.tar\"}}", "--data.batch_size=2"]
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(work)
        main(["fit", "--config", f"{ROOT}/configs/sft.yaml", "--config", f"{ROOT}/configs/tiny.yaml",
              *SMALL, *data, "--trainer.max_steps=4"])
    assert (work / "runs/sft/checkpoints/last.ckpt").is_file()
    return work, data


@pytest.fixture(scope="module")
def tiny_video_r1_sft(tiny_sft):
    """Video-R1's think/answer SFT in the same working folder: runs/sft_video_r1/checkpoints/last.ckpt,
    as tgrpo.yaml expects."""
    work, data = tiny_sft
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(work)
        main(["fit", "--config", f"{ROOT}/configs/sft_video_r1.yaml", "--config", f"{ROOT}/configs/tiny.yaml",
              *SMALL, *data, "--trainer.max_steps=2"])
    assert (work / "runs/sft_video_r1/checkpoints/last.ckpt").is_file()
    return work, data


def _metrics(csv_path: Path) -> list[dict[str, str]]:
    return list(csv.DictReader(open(csv_path)))


@pytest.mark.slow
@pytest.mark.parametrize("config", ["pagrpo", "joint", "grpo"])
def test_rl_fit_from_the_tiny_sft_checkpoint(tiny_sft, config, monkeypatch):
    work, data = tiny_sft
    monkeypatch.chdir(work)
    sft = torch.load(work / "runs/sft/checkpoints/last.ckpt", weights_only=True)["state_dict"]
    cli = main(["fit", "--config", f"{ROOT}/configs/{config}.yaml", "--config", f"{ROOT}/configs/tiny.yaml",
                *SMALL, *data, "--trainer.max_steps=2", "--model.init_args.rollout.group_size=2",
                "--model.init_args.rollout.max_completion_length=12", "--model.init_args.micro_batch_size=3"])
    after = cli.model.state_dict()
    changed = [k for k, v in sft.items() if not torch.equal(v, after[k].cpu())]
    assert changed, "no parameter moved in 2 RL steps"
    assert cli.trainer.global_step == 2
    rows = _metrics(next((work / f"runs/{config}/logs").glob("version_*/metrics.csv")))
    logged = {k for r in rows for k, v in r.items() if v}
    perception = ("reward/perception/accuracy", "train/reward/perception", "judge/failure_rate")
    for name in ("reward/reasoning/accuracy", "reward/reasoning/format", "train/reward/reasoning", "train/kl",
                 "train/clip_fraction", "train/entropy", "train/perception_length", "train/no_perception_rows",
                 "train/zero_advantage_groups/perception", "train/zero_advantage_groups/reasoning",
                 "train/advantage_mean/perception", "train/advantage_mean/reasoning", "time/rollout_s",
                 "time/update_s", *(perception if config != "grpo" else ())):
        assert name in logged, name
    if config == "grpo":  # process-agnostic GRPO: the reasoning rewards only, no judge
        assert not logged & set(perception)
    assert list((work / f"runs/{config}/logs").glob("version_*/rollouts/*.jsonl")), "no rollout table written"


class ShuffledRecorder(L.Callback):
    """Keeps what T-GRPO's producer handed the rewards: shuffled completions per prompt."""

    seen: list[tuple[int, int, list[str]]] = []

    def on_rollouts_scored(self, trainer, pl_module, rollouts):
        ShuffledRecorder.seen.append((rollouts.num_prompts, rollouts.shuffled_samples, rollouts.shuffled_completions))


@pytest.mark.slow
def test_tgrpo_fit_samples_half_a_group_on_shuffled_frames(tiny_video_r1_sft, monkeypatch):
    """configs/tgrpo.yaml on the tiny overlay, from the tiny think/answer SFT: G = 4 completions per
    prompt and G / 2 = 2 more on shuffled frames, Video-R1's reward set logged, the policy moves."""
    work, data = tiny_video_r1_sft
    monkeypatch.chdir(work)
    ShuffledRecorder.seen = []
    sft = torch.load(work / "runs/sft_video_r1/checkpoints/last.ckpt", weights_only=True)["state_dict"]
    cli = main(["fit", "--config", f"{ROOT}/configs/tgrpo.yaml", "--config", f"{ROOT}/configs/tiny.yaml",
                *SMALL, *data, "--trainer.max_steps=2", "--model.init_args.rollout.group_size=4",
                "--model.init_args.rollout.max_completion_length=12", f"--trainer.callbacks+={__name__}.ShuffledRecorder",
                "--trainer.callbacks+=varied_rewards.TokenSumReward"])
    assert cli.model.rollout.shuffled_samples == 2 and cli.model.loss.aggregation == "sequence_mean"
    for prompts, per_prompt, shuffled in ShuffledRecorder.seen:
        assert per_prompt == 2 and len(shuffled) == 2 * prompts and all(shuffled)
    after = cli.model.state_dict()
    assert any(not torch.equal(v, after[k].cpu()) for k, v in sft.items())
    rows = _metrics(next((work / "runs/tgrpo/logs").glob("version_*/metrics.csv")))
    logged = {k for r in rows for k, v in r.items() if v}
    for name in ("reward/reasoning/accuracy", "reward/reasoning/think_answer_format", "reward/reasoning/temporal",
                 "reward/reasoning/completion_length", "temporal/pass_rate"):
        assert name in logged, name


@pytest.mark.slow
def test_reference_equals_the_starting_policy(tiny_sft, monkeypatch):
    """At step 0 the policy is the reference: the KL of the first update is exactly 0."""
    work, data = tiny_sft
    monkeypatch.chdir(work)
    cli = main(["fit", "--config", f"{ROOT}/configs/pagrpo.yaml", "--config", f"{ROOT}/configs/tiny.yaml",
                *SMALL, *data, "--trainer.max_steps=1", "--model.init_args.rollout.group_size=2",
                "--model.init_args.rollout.max_completion_length=8", "--trainer.default_root_dir=runs/pagrpo_reference"])
    rows = _metrics(next((work / "runs/pagrpo_reference/logs").glob("version_*/metrics.csv")))
    kl = [float(r["train/kl"]) for r in rows if r.get("train/kl")]
    assert kl and kl[0] == pytest.approx(0.0, abs=1e-6)
    ref = cli.model.reference.model
    assert not any(p.requires_grad for p in ref.parameters())
    assert not any(k.startswith("_reference") for k in cli.model.state_dict())


@pytest.mark.slow
def test_rl_without_reward_callbacks_fails_clearly(tiny_sft, monkeypatch, tmp_path):
    work, data = tiny_sft
    monkeypatch.chdir(work)
    overlay = tmp_path / "no_rewards.yaml"
    overlay.write_text("trainer:\n  callbacks: []\n")
    with pytest.raises(Exception, match="(?i)reward"):
        main(["fit", "--config", f"{ROOT}/configs/pagrpo.yaml", "--config", f"{ROOT}/configs/tiny.yaml",
              "--config", str(overlay), *SMALL, *data, "--trainer.max_steps=1", "--model.init_args.rollout.group_size=2",
              "--model.init_args.rollout.max_completion_length=4"])


@pytest.mark.slow
def test_shared_prompt_and_per_sample_passes_give_the_same_step(tiny_sft, monkeypatch):
    """The same seeded step with the prompt shared per group or repeated per sample: same rollouts,
    same losses, with two updates per rollout batch so that the second update's loss depends on the
    log-probs of the updated policy (ratio != 1) and on the stored old-policy log-probs.
    (Parameters are not compared: Adam's first step is lr * sign(grad), which turns float noise on
    near-zero gradients into full-size differences; gradient equality is tested on the functions
    in tests/algorithms/test_shared_prompt.py.)"""
    work, data = tiny_sft
    monkeypatch.chdir(work)
    logged = {}
    for shared in ("true", "false"):
        main(["fit", "--config", f"{ROOT}/configs/pagrpo.yaml", "--config", f"{ROOT}/configs/tiny.yaml",
              *SMALL, *data, "--trainer.max_steps=2", "--model.init_args.rollout.group_size=3",
              "--model.init_args.rollout.max_completion_length=10", "--model.init_args.micro_batch_size=3",
              "--model.init_args.num_iterations=2", "--model.init_args.lr=1e-3", f"--model.init_args.shared_prompt={shared}",
              "--trainer.callbacks+=varied_rewards.TokenSumReward", f"--trainer.default_root_dir=runs/pagrpo_shared_{shared}"])
        rows = _metrics(next((work / f"runs/pagrpo_shared_{shared}/logs").glob("version_*/metrics.csv")))
        logged[shared] = {k: float(v) for r in rows for k, v in r.items() if v and k.startswith("train/") and k != "train/lr"}
    assert logged["true"].keys() == logged["false"].keys() and "train/loss" in logged["true"]
    # The second update saw a policy that had moved (measured: ratio_max 1.056, KL 1e-3): the loss read the log-probs.
    assert abs(logged["true"]["train/ratio_max"] - 1) > 1e-3
    for key, value in logged["true"].items():
        assert value == pytest.approx(logged["false"][key], rel=1e-4, abs=1e-6), key


# --- wiring: which advantage reaches which token ---------------------------------------------------
def _wiring_completions(tokenizer, end: int) -> tuple[list[list[int]], list[int], list[int]]:
    """Three well-formed completions as token ids and their perception / reasoning token counts.

    The perception part (``<observation>...</observation>``) and the reasoning part (the rest, the
    end token included) are tokenized apart, so the segment boundary is a token boundary.
    """
    ids, lp, lr = [], [], []
    for words_p, words_r in ((3, 9), (6, 5), (4, 7)):
        p = tokenizer("<observation>" + " red square" * words_p + "</observation>", add_special_tokens=False)["input_ids"]
        r = tokenizer(" <think>" + " it moves" * words_r + "</think> <answer>A</answer>", add_special_tokens=False)["input_ids"]
        ids.append(p + r + [end])
        lp.append(len(p))
        lr.append(len(r) + 1)
    return ids, lp, lr


def test_each_segment_gets_its_own_advantage(synthetic_root, monkeypatch):
    """One real PA-GRPO step in which the perception and the reasoning rewards disagree.

    G = 3 completions of one prompt; perception accuracy [1, 1, 0], reasoning accuracy [0, 1, 1],
    both formats 1, and length windows that only sample 0's observation (P) and sample 1's
    reasoning (R) fit. Totals: R_P = [2.2, 2, 1], R_R = [1, 2.2, 2], so (unbiased std, eps 1e-4)
    A_P = [0.7259, 0.4148, -1.1407] and A_R = [-1.1407, 0.7259, 0.4148]. With one update per
    batch (ratio 1), beta 0 and process_mean, the loss's gradient on the log-prob of a token of
    sample i is -A_P,i / sum_j n_P,j on its perception tokens and -A_R,i / sum_j n_R,j on its
    reasoning tokens (one group; n = the segment's tokens). Swapping A_P and A_R, giving a
    segment's tokens the other advantage, or swapping the segment lengths (the length rewards
    read them) each changes these numbers.
    """
    from callbacks.reward_callbacks import PerceptionFormatReward, PerceptionLengthReward, ReasoningFormatReward, ReasoningLengthReward
    from fixed_step import FixedReward, one_step, train_sample

    module = PAGRPOModule(TinyQwen25VL(hidden_size=32, num_layers=1, vision_hidden_size=16, vision_depth=1, vocab_size=512),
                          rollout=RolloutSettings(group_size=3, max_completion_length=64), loss=LossSettings(beta=0.0),
                          lr=1e-3, schedule="constant")
    tok = module.backbone.tokenizer
    ids, lp, lr = _wiring_completions(tok, module.backbone.eos_token_ids[0])
    assert len({*lp, *lr}) == 6  # every P and R length differs: swapped lengths never fit a window
    rewards = [
        FixedReward("perception/accuracy", "perception", [1.0, 1.0, 0.0]), PerceptionFormatReward(),
        PerceptionLengthReward(lmin=lp[0], lmax=lp[0]),
        FixedReward("reasoning/accuracy", "reasoning", [0.0, 1.0, 1.0]), ReasoningFormatReward(),
        ReasoningLengthReward(lmin=lr[1], lmax=lr[1]),
    ]
    grad, perception, completion = one_step(module, train_sample(synthetic_root), ids, rewards, monkeypatch)

    a_p = torch.tensor([0.7259, 0.4148, -1.1407])
    a_r = torch.tensor([-1.1407, 0.7259, 0.4148])
    expected = torch.zeros_like(grad)
    for i in range(3):
        expected[i, : lp[i]] = -a_p[i] / sum(lp)
        expected[i, lp[i] : lp[i] + lr[i]] = -a_r[i] / sum(lr)
    assert perception.sum(1).tolist() == lp and (completion & ~perception).sum(1).tolist() == lr
    torch.testing.assert_close(grad, expected, atol=1e-6, rtol=1e-3)


def test_shuffled_clip_moves_frames_only():
    """T-GRPO's contrast permutes the frame content; the clip's real (VFR) timestamps stay in order."""
    frames = np.arange(4, dtype=np.uint8)[:, None, None, None] * np.ones((4, 2, 2, 3), dtype=np.uint8)
    clip = Clip(frames, fps=10.0, frame_indices=[0, 3, 9, 20], total_frames=21, timestamps=[0.0, 0.25, 0.9, 2.1])
    shuffled = shuffled_clip(clip, random.Random(1))
    order = [int(f[0, 0, 0]) for f in shuffled.frames]
    assert sorted(order) == [0, 1, 2, 3] and order != [0, 1, 2, 3]
    assert shuffled.timestamps == clip.timestamps and shuffled.frame_indices == clip.frame_indices
