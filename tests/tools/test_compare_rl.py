"""tools/compare_rl.py: the job configs it writes, the length windows and the printed comparison."""

import importlib.util
import json
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
TOOL = REPO / "tools" / "compare_rl.py"
spec = importlib.util.spec_from_file_location("compare_rl_tool", TOOL)
compare_rl = importlib.util.module_from_spec(spec)
spec.loader.exec_module(compare_rl)


@pytest.mark.parametrize("method", sorted(compare_rl.METHODS))
def test_job_config_moves_every_output_into_the_run_folder_and_scales_the_windows(tmp_path, method):
    windows = {"perception": [5, 9], "reasoning": [10, 14], "completion": [15, 23]}
    run_dir = tmp_path / method / "seed1"
    path = compare_rl.job_config(REPO / compare_rl.METHODS[method][0], run_dir, windows)
    job = yaml.safe_load(path.read_text())
    source = yaml.safe_load((REPO / compare_rl.METHODS[method][0]).read_text())
    assert job["trainer"]["default_root_dir"] == str(run_dir)
    assert job["trainer"]["logger"][0]["init_args"]["save_dir"] == str(run_dir)
    names = {}
    for cb in job["trainer"]["callbacks"]:
        names[cb["class_path"].rsplit(".", 1)[-1]] = cb.get("init_args", {})
    assert names["ModelCheckpoint"]["dirpath"] == str(run_dir / "checkpoints")
    for reward, segment in compare_rl.LENGTH_REWARDS.items():
        if reward in names:
            assert [names[reward]["lmin"], names[reward]["lmax"]] == windows[segment]
    assert any(name in names for name in compare_rl.LENGTH_REWARDS)
    # Nothing else changed: the method, its rewards and the model are the shipped config's.
    assert job["model"] == source["model"]
    assert [cb["class_path"] for cb in job["trainer"]["callbacks"]] == [cb["class_path"] for cb in source["trainer"]["callbacks"]]


def test_length_windows_follow_each_recipes_own_traces(tmp_path):
    """The windows bracket the lengths of the recipe's SFT targets: T-GRPO's completion window is
    measured on think/answer traces (no observation block), not on the process-aware ones."""
    from p2r.backbones.tokenizer import train_tokenizer
    from p2r.data.records import target_text, think_answer_target
    from p2r.data.synthetic import VideoSpec, generate_split

    records = [r for r, _ in generate_split("train", 40, seed=2, spec=VideoSpec(), tasks=("count",), style="terse")]
    (tmp_path / "train.json").write_text(json.dumps([r.to_dict() for r in records]))
    tok = train_tokenizer()

    def bracket(values):
        values = sorted(values)
        return [values[int(0.05 * 39)], values[int(0.95 * 39)]]

    videop2r = compare_rl.length_windows(tmp_path, "videop2r")
    video_r1 = compare_rl.length_windows(tmp_path, "video_r1")
    assert videop2r["completion"] == bracket([len(tok(target_text(r)).input_ids) + 1 for r in records])
    assert videop2r["perception"] == bracket([len(tok(r.observation).input_ids) for r in records])
    assert video_r1["completion"] == bracket([len(tok(think_answer_target(r)).input_ids) + 1 for r in records])
    assert video_r1["completion"][1] < videop2r["completion"][0]  # no observation block: shorter


def _seed_scores(clips):
    return {"accuracy": sum(clips) / len(clips), "perception": 0.5, "pass_at_g": 0.9, "clips": {"accuracy": clips}}


def test_summary_table_ends_with_the_pagrpo_grpo_line():
    # SFT start: clips [0, 0, 1, 1]. grpo seeds score [1, 0, 1, 1] twice: per clip +1, 0, 0, 0
    # against the start (mean 0.25). pagrpo seeds [1, 1, 1, 1] and [1, 0, 1, 1]: per clip means
    # 1, 0.5, 1, 1; minus grpo's 1, 0, 1, 1 -> 0, 0.5, 0, 0: mean 0.125, SE over clips
    # sqrt(((0.125^2 * 3 + 0.375^2) / 3) / 4) = 0.125; over seeds: pagrpo 1 and 0.75 (se 0.125),
    # grpo 0.75 and 0.75 (se 0): 0.125. The line prints the larger.
    results = {
        "sft": {"videop2r": {**_seed_scores([0, 0, 1, 1]), "pass_at_1": 0.3, "all_equal_groups": 0.1}},
        "methods": {
            "grpo": {"seeds": {"1": _seed_scores([1, 0, 1, 1]), "2": _seed_scores([1, 0, 1, 1])}},
            "pagrpo": {"seeds": {"1": _seed_scores([1, 1, 1, 1]), "2": _seed_scores([1, 0, 1, 1])}},
        },
    }
    lines = compare_rl.summarise(results)
    assert lines[-1].startswith("pagrpo-grpo: +0.1250 +- 0.1250")
    assert results["summary"]["grpo"]["vs_sft_clips"]["mean"] == pytest.approx(0.25)
    assert results["summary"]["pagrpo-grpo"]["se_clips"] == pytest.approx(0.125)
    assert results["summary"]["pagrpo-grpo"]["se_seeds"] == pytest.approx(0.125)
