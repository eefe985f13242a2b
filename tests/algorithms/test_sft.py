"""Process-aware SFT: answer-only labels, the masked loss on worked numbers, the chunked loss training uses (worked numbers,
and equal loss and gradients to the full-logits loss on the tiny model), and the real CLI fitting and testing the tiny model;
Video-R1's think/answer SFT (configs/sft_video_r1.yaml): its labels and a tiny fit through the CLI."""

from __future__ import annotations

import csv
import json
import math
import sys
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
from torch import nn

import p2r.algorithms.sft as sft_module
from callbacks.rewards.format import think_answer_format
from p2r.algorithms.sft import IGNORE_INDEX, answer_loss, answer_span, chunked_lm_loss, masked_lm_loss, sft_batch
from p2r.backbones import TinyQwen25VL
from p2r.cli import main
from p2r.data.prompts import VIDEO_R1_QUESTION_TEMPLATE, build_prompt
from p2r.data.records import parse_record, think_answer_target
from p2r.data.synthetic import VideoSpec, generate_split
from p2r.data.video import Clip

REPO = Path(__file__).resolve().parents[2]
CONFIGS = ["--config", str(REPO / "configs" / "sft.yaml"), "--config", str(REPO / "configs" / "tiny.yaml")]
LN2, LN3 = math.log(2.0), math.log(3.0)
BIG = [100.0, -100.0, 5.0]  # logits at positions whose prediction is not scored
_rng = np.random.default_rng(0)
# A 4-frame 56x56 video (8 vision tokens on the tiny Qwen2.5-VL) and a 56x84 image (6 tokens).
VIDEO = Clip(_rng.integers(0, 255, (4, 56, 56, 3), dtype=np.uint8), fps=4.0, frame_indices=[2, 6, 10, 14], total_frames=16)
IMAGE = Clip(_rng.integers(0, 255, (1, 56, 84, 3), dtype=np.uint8), fps=1.0, frame_indices=[0], total_frames=1, is_image=True)
TARGETS = ["<observation>A red circle moves left.</observation>\n<think>Left.</think>\n<answer>A</answer>", "<answer>3</answer>"]


def test_masked_lm_loss_hand_worked_1x4():
    # Position t predicts label t+1. Labels [-, 2, -, 1]: position 0 must predict 2 from uniform
    # logits (CE ln 3); position 2 must predict 1 from [0, ln 2, 0] = probabilities 1/4, 1/2, 1/4
    # (CE ln 2); positions 1 and 3 are not scored. Token mean: (ln 3 + ln 2) / 2 = ln 6 / 2.
    logits = torch.tensor([[[0.0, 0.0, 0.0], BIG, [0.0, LN2, 0.0], BIG]])
    labels = torch.tensor([[IGNORE_INDEX, 2, IGNORE_INDEX, 1]])
    assert masked_lm_loss(logits, labels).item() == pytest.approx(math.log(6.0) / 2, abs=1e-6)
    # The first label never counts (nothing predicts it).
    assert masked_lm_loss(logits, torch.tensor([[0, 2, IGNORE_INDEX, 1]])).item() == pytest.approx(math.log(6.0) / 2, abs=1e-6)


def test_masked_lm_loss_is_a_mean_over_answer_tokens_of_the_whole_batch():
    # Row 0 as above (ln 3, ln 2); row 1 scores one token from uniform logits (ln 3), rest padding.
    logits = torch.tensor([[[0.0, 0.0, 0.0], BIG, [0.0, LN2, 0.0], BIG], [[0.0, 0.0, 0.0], BIG, BIG, BIG]])
    labels = torch.tensor([[IGNORE_INDEX, 2, IGNORE_INDEX, 1], [IGNORE_INDEX, 0, IGNORE_INDEX, IGNORE_INDEX]])
    loss = masked_lm_loss(logits.requires_grad_(), labels)
    assert loss.item() == pytest.approx((2 * LN3 + LN2) / 3, abs=1e-6)
    loss.backward()
    assert logits.grad[:, [1, 3]].abs().sum() == 0 and logits.grad[1, 2].abs().sum() == 0


def test_answer_span_starts_at_the_first_position_that_predicts_a_label_in_any_row():
    labels = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, 5, 6, IGNORE_INDEX], [IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, 7, 8]])
    assert answer_span(labels) == 4  # position 1 predicts row 0's label 5: positions 1..4
    assert answer_span(labels[1:]) == 3
    assert answer_span(torch.tensor([[4, IGNORE_INDEX, IGNORE_INDEX]])) == 1  # nothing predicts position 0's label
    assert answer_span(torch.full((2, 3), IGNORE_INDEX)) == 1


class RecordingHead(nn.Linear):
    """The hand-worked head: logits (0, h0, h1) for hidden h (3 words, width 2); records the rows of each call."""

    def __init__(self) -> None:
        super().__init__(2, 3, bias=False)
        with torch.no_grad():
            self.weight.copy_(torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]]))
        self.rows: list[int] = []

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        self.rows.append(hidden.shape[0])
        return super().forward(hidden)


@pytest.mark.parametrize("chunk", [1, 2, 100])
def test_chunked_lm_loss_hand_worked(chunk):
    # Labels [-, -, -, 2, -, 1] over 6 positions: position 2 predicts 2, position 4 predicts 1, so the
    # loss reads the last 4 positions' hidden states. Position 2's hidden (0, 0) gives uniform logits
    # (CE ln 3); position 4's (ln 2, 0) gives logits (0, ln 2, 0) = probabilities 1/4, 1/2, 1/4 (CE ln 2).
    # Token mean: ln 6 / 2. Gradients (token mean of (p - onehot) h^T, and W^T (p - onehot) / 2):
    # position 2 has h = 0, so only position 4 moves W: p - e1 = (1/4, -1/2, 1/4) times (ln 2, 0) / 2;
    # d loss / d h at position 2 = W^T (1/3, 1/3, -2/3) / 2 = (1/6, -1/3); unscored positions get 0.
    labels = torch.tensor([[IGNORE_INDEX] * 3 + [2, IGNORE_INDEX, 1]])
    assert answer_span(labels) == 4
    hidden = torch.tensor([[[0.0, 0.0], [100.0, -100.0], [LN2, 0.0], [5.0, 5.0]]], requires_grad=True)  # (1, 4, 2)
    head = RecordingHead()
    loss = chunked_lm_loss(hidden, head, labels, chunk)
    assert loss.item() == pytest.approx(math.log(6.0) / 2, abs=1e-6)
    assert head.rows == ([1, 1] if chunk == 1 else [2])  # the two scored positions only, at most `chunk` at a time
    loss.backward()
    assert head.rows == ([1, 1] * 2 if chunk == 1 else [2, 2])  # every chunk's logits recomputed in the backward
    expected_w = torch.tensor([[LN2 / 8, 0.0], [-LN2 / 4, 0.0], [LN2 / 8, 0.0]])
    torch.testing.assert_close(head.weight.grad, expected_w, rtol=0, atol=1e-6)
    torch.testing.assert_close(hidden.grad[0, 0], torch.tensor([1 / 6, -1 / 3]), rtol=0, atol=1e-6)
    assert hidden.grad[0, [1, 3]].abs().sum() == 0
    # Hidden states of all 6 positions (the full sequence) give the same loss.
    full = torch.cat([torch.full((1, 2, 2), 7.0), hidden.detach()], dim=1)  # (1, 6, 2)
    assert chunked_lm_loss(full, RecordingHead(), labels, chunk).item() == pytest.approx(math.log(6.0) / 2, abs=1e-6)


def parameter_grads(model: nn.Module) -> dict[str, torch.Tensor | None]:
    return {name: None if p.grad is None else p.grad.clone() for name, p in model.named_parameters()}


def test_chunked_loss_equals_the_full_logits_loss_and_its_gradients(tiny_sizes):
    """The tiny Qwen2.5-VL on a video row and an image row whose prompts and answers differ in length (one
    row padded): answer_loss (what training_step computes) gives the loss and every parameter gradient of
    masked_lm_loss on the full logits, for chunks of 1 token, a few tokens, and more than the answers."""
    backbone = TinyQwen25VL(**tiny_sizes, seed=0)
    backbone.build()
    backbone.train()
    rendered = [backbone.render_prompt("Which way does it move?", "video"), backbone.render_prompt("How many?", "image")]
    inputs, labels = sft_batch(backbone, rendered, [VIDEO, IMAGE], TARGETS)
    answers = (labels != IGNORE_INDEX).sum(1)  # (B,)
    assert answers[0] != answers[1] and labels[1, -1] == IGNORE_INDEX and inputs["attention_mask"][1, -1] == 0
    assert answer_span(labels) < labels.shape[1]  # the prompt's hidden states never reach the head

    full = masked_lm_loss(backbone(**inputs), labels)
    full.backward()
    expected = parameter_grads(backbone.model)
    assert sum(g is not None for g in expected.values()) == len(expected)  # every parameter, the vision tower too
    for chunk in (1, 5, int(answers.sum()) + 1, 10_000):
        backbone.model.zero_grad(set_to_none=True)
        loss = answer_loss(backbone, inputs, labels, chunk)
        torch.testing.assert_close(loss, full, rtol=1e-6, atol=1e-6)
        loss.backward()
        grads = parameter_grads(backbone.model)
        for name, grad in expected.items():
            torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-6, msg=lambda m, n=name, c=chunk: f"{n} (chunk {c}): {m}")


def test_a_loss_chunk_below_one_token_is_refused_naming_the_setting(tiny25):
    with pytest.raises(ValueError, match=r"model.init_args.loss_chunk_tokens must be >= 1, got 0"):
        sft_module.SFTModule(tiny25, loss_chunk_tokens=0)


def overlay(tmp: Path, data: Path, sizes: dict) -> Path:
    """Everything a test run writes goes under ``tmp``; small model, 6 steps, tiny frames."""
    backbone = ", ".join(f"{k}: {v}" for k, v in sizes.items())
    text = f"""
trainer:
  default_root_dir: {tmp}/run
  max_steps: 6
  log_every_n_steps: 1
  limit_val_batches: 1
  num_sanity_val_steps: 1
  enable_progress_bar: false
  logger:
    - class_path: lightning.pytorch.loggers.CSVLogger
      init_args: {{save_dir: {tmp}/run, name: logs}}
  callbacks:
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args: {{dirpath: {tmp}/checkpoints, save_last: true}}
model:
  init_args:
    backbone:
      init_args: {{{backbone}}}
    eval_max_new_tokens: 8
data:
  train_shards: {data}/shards/train-*.tar
  val_shards: {data}/shards/val-*.tar
  test_sets:
    synthetic: {data}/shards/test-*.tar
  batch_size: 4
  eval_batch_size: 6
  num_workers: 0
  shuffle_buffer: 0
  train_frames: {{fps: 4.0, min_frames: 4, max_frames: 4, min_pixels: 3136, max_pixels: 3136}}
  eval_frames: {{fps: 4.0, min_frames: 4, max_frames: 4, min_pixels: 3136, max_pixels: 3136}}
"""
    path = tmp / "test_overlay.yaml"
    path.write_text(text)
    return path


def read_metrics(root: Path) -> list[dict[str, str]]:
    [path] = sorted(root.glob("version_*/metrics.csv"))[-1:]
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def fitted(tmp_path_factory, synthetic_root, tiny_sizes):
    tmp = tmp_path_factory.mktemp("sft_run")
    extra = overlay(tmp, synthetic_root, tiny_sizes)
    with mock.patch.object(sys, "argv", ["p2r"]):  # not pytest's own arguments
        cli = main(["fit", *CONFIGS, "--config", str(extra)])
    return cli, tmp, extra


@pytest.mark.slow
def test_fit_changes_parameters_and_lowers_the_loss(fitted, tiny_sizes):
    cli, tmp, _ = fitted
    assert cli.trainer.global_step == 6
    assert isinstance(cli.model.backbone, TinyQwen25VL)
    initial = TinyQwen25VL(**tiny_sizes, seed=0)  # configs/tiny.yaml's seed: the run's starting point
    initial.build()
    before, after = initial.state_dict(), cli.model.backbone.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    vision = {k for k in before if ".visual." in k}
    assert vision and changed == set(before) - vision  # configs/tiny.yaml freezes the vision tower; all else moved

    rows = read_metrics(tmp / "run" / "logs")
    losses = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    assert len(losses) == 6
    assert losses[-1] < losses[0]
    assert sum(losses[-2:]) < sum(losses[:2])
    logged = {k for r in rows for k, v in r.items() if v}
    assert {"train/lr", "train/tokens_per_s", "train/target_tokens", "data/skipped_samples", "val/accuracy", "val/format"} <= logged
    assert all(float(r["data/skipped_samples"]) == 0 for r in rows if r.get("data/skipped_samples"))
    log_dir = Path(cli.trainer.log_dir)
    assert log_dir.is_relative_to(tmp) and (log_dir / "config.yaml").is_file()  # not into the repo's runs/


@pytest.mark.slow
def test_fit_writes_a_checkpoint_that_weights_from_loads(fitted, tiny_sizes):
    cli, tmp, _ = fitted
    ckpt = tmp / "checkpoints" / "last.ckpt"
    assert ckpt.is_file()
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert state["global_step"] == 6
    assert state["state_dict"] and all(k.startswith("backbone.") for k in state["state_dict"])
    reloaded = TinyQwen25VL(**tiny_sizes, weights_from=str(ckpt))
    reloaded.build()
    trained = cli.model.backbone.state_dict()
    assert all(torch.equal(v, trained[k]) for k, v in reloaded.state_dict().items())


@pytest.mark.slow
def test_test_on_the_checkpoint_logs_accuracy_and_format(fitted, synthetic_root):
    _, tmp, extra = fitted
    ckpt = tmp / "checkpoints" / "last.ckpt"
    with mock.patch.object(sys, "argv", ["p2r"]):
        cli = main(["test", *CONFIGS, "--config", str(extra), f"--ckpt_path={ckpt}"])
    metrics = {k: float(v) for k, v in cli.trainer.callback_metrics.items()}
    assert {"test/accuracy", "test/format"} <= metrics.keys()
    assert all(0.0 <= metrics[k] <= 1.0 for k in metrics if k.startswith("test/"))
    types = {r["problem_type"] for r in json.loads((synthetic_root / "test.json").read_text())}
    assert {f"test/accuracy/{t}" for t in types} <= metrics.keys()
    rows = read_metrics(tmp / "run" / "logs")  # the test run's own CSV version
    assert any(r.get("test/accuracy") for r in rows) and any(r.get("test/format") for r in rows)


@pytest.mark.slow
def test_flags_beat_the_hyperparameters_saved_in_the_checkpoint(fitted):
    """Lightning's CLI would merge the checkpoint's saved hparams over the config: not in p2r."""
    _, tmp, extra = fitted
    ckpt = tmp / "checkpoints" / "last.ckpt"
    saved = torch.load(ckpt, weights_only=True)["hyper_parameters"]
    assert saved["eval_max_new_tokens"] != 3 and saved["prompt_template"] == "videop2r"
    with mock.patch.object(sys, "argv", ["p2r"]):
        cli = main(["test", *CONFIGS, "--config", str(extra), f"--ckpt_path={ckpt}", "--trainer.logger=false",
                    "--model.init_args.eval_max_new_tokens=3", "--model.init_args.prompt_template=none"])
    assert cli.model.eval_max_new_tokens == 3 and cli.model.prompt_template == "none"


def assert_labels_are_exactly_the_targets(tiny25, rendered: list[str], targets: list[str]) -> None:
    """sft_batch on a video row and an image row: each row's labels are its target's tokens and the
    end-of-turn token at the target's own positions, IGNORE_INDEX on the prompt, vision tokens and padding."""
    tok = tiny25.tokenizer
    batch, labels = sft_batch(tiny25, rendered, [VIDEO, IMAGE], targets)
    assert "target_mask" not in batch  # consumed: the batch holds model inputs only
    end, pad = tok.convert_tokens_to_ids("<|im_end|>"), tiny25.pad_token_id
    assert pad == tok.convert_tokens_to_ids("<|endoftext|>")
    length = batch["input_ids"].shape[1]
    row_ends = []
    for i, (prompt, n_vision) in enumerate(zip(rendered, (8, 6))):
        # The prompt as the tokenizer sees it, with its one placeholder expanded to n_vision tokens.
        p = len(tok(prompt, add_special_tokens=False)["input_ids"]) - 1 + n_vision
        target = tok(targets[i], add_special_tokens=False)["input_ids"] + [end]
        t = len(target)
        ids, row_labels, mask = batch["input_ids"][i], labels[i], batch["attention_mask"][i]
        assert ids[:p].tolist() == tiny25.process_one(prompt, [VIDEO, IMAGE][i])["input_ids"][0].tolist()
        assert row_labels[:p].tolist() == [IGNORE_INDEX] * p  # prompt and vision tokens
        assert ids[p : p + t].tolist() == target and row_labels[p : p + t].tolist() == target
        assert row_labels[p + t :].tolist() == [IGNORE_INDEX] * (length - p - t)  # padding
        assert ids[p + t :].tolist() == [pad] * (length - p - t)
        assert mask.tolist() == [1] * (p + t) + [0] * (length - p - t)
        assert tok.decode(row_labels[row_labels != IGNORE_INDEX]) == targets[i] + "<|im_end|>"
        row_ends.append(p + t)
    assert length == max(row_ends) and row_ends[0] != row_ends[1]  # one row really is padded
    assert "target_mask" not in tiny25.encode(rendered, [VIDEO, IMAGE])


def test_answer_labels_mask_everything_but_the_answer_exactly(tiny25):
    rendered = [tiny25.render_prompt("Which way does it move?", "video"), tiny25.render_prompt("How many?", "image")]
    assert_labels_are_exactly_the_targets(tiny25, rendered, TARGETS)


def test_think_answer_labels_are_exactly_the_video_r1_targets(tiny25):
    """Video-R1's template on synthetic records (observation folded into think): the answer-only mask
    still covers exactly the target tokens, and neither prompt nor target has an observation block."""
    records = [rec for rec, _ in generate_split("train", 3, seed=0, spec=VideoSpec())[:2]]
    targets = [think_answer_target(rec) for rec in records]
    assert targets[1] == (
        "<think>On a white background, a blue square appears at the bottom right. In total one shape appears. "
        "Only the blue square appears, so there is 1 shape. So the answer is 1.</think>\n<answer>1</answer>"
    )
    assert all("<observation>" not in t and think_answer_format(t) == 1.0 for t in targets)
    rendered = [tiny25.render_prompt(build_prompt(rec, "video_r1"), kind) for rec, kind in zip(records, ("video", "image"))]
    assert not any("<observation>" in r for r in rendered)
    assert_labels_are_exactly_the_targets(tiny25, rendered, targets)


@pytest.mark.slow
def test_video_r1_sft_config_trains_on_think_answer_targets(tmp_path, synthetic_root, tiny_sizes, monkeypatch):
    """configs/sft_video_r1.yaml's CPU line (+ tiny.yaml) for 2 steps: every row it trained on has Video-R1's
    prompt and a think/answer target of a training record, and its labels are that target with no observation."""
    trained = []

    def recording_sft_batch(backbone, prompts, clips, targets):
        inputs, labels = sft_batch(backbone, prompts, clips, targets)
        trained.extend((p, t, backbone.tokenizer.decode(row[row != IGNORE_INDEX])) for p, t, row in zip(prompts, targets, labels))
        return inputs, labels

    monkeypatch.setattr(sft_module, "sft_batch", recording_sft_batch)
    configs = ["--config", str(REPO / "configs" / "sft_video_r1.yaml"), "--config", str(REPO / "configs" / "tiny.yaml")]
    with mock.patch.object(sys, "argv", ["p2r"]):
        cli = main(["fit", *configs, "--config", str(overlay(tmp_path, synthetic_root, tiny_sizes)), "--trainer.max_steps=2",
                    "--trainer.num_sanity_val_steps=0", "--trainer.limit_val_batches=0"])
    assert cli.trainer.global_step == 2
    assert (cli.model.target_template, cli.model.prompt_template) == ("video_r1", "video_r1")
    records = [parse_record(r) for r in json.loads((synthetic_root / "train.json").read_text())]
    expected = {think_answer_target(r) for r in records}
    instruction = VIDEO_R1_QUESTION_TEMPLATE.split("\n", 1)[1]  # the text after "{Question}\n"
    assert len(trained) == 2 * 4  # 2 steps x batch 4, none skipped
    for prompt, target, labels in trained:
        assert instruction in prompt and "<observation>" not in prompt
        assert target in expected and labels == target + "<|im_end|>" and "<observation>" not in labels


def test_an_unknown_target_template_is_refused_naming_the_setting(tiny25):
    with pytest.raises(ValueError, match=r"model.init_args.target_template must be one of videop2r, video_r1, got 'observation'"):
        sft_module.SFTModule(tiny25, target_template="observation")
