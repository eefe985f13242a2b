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


def test_length_windows_bracket_the_reference_traces(tmp_path):
    # 20 records whose observation is 1..20 copies of a one-token word: the 5th-95th percentile
    # window of perception lengths is the 1st and the 19th sorted value.
    from p2r.backbones.tokenizer import train_tokenizer

    tok = train_tokenizer()
    word = " red"
    assert len(tok(word).input_ids) == 1
    records = []
    for n in range(1, 21):
        observation = word * n
        output = observation + word * 5
        records.append({"observation": observation, "output": output})
    (tmp_path / "train.json").write_text(json.dumps(records))
    windows = compare_rl.length_windows(tmp_path)
    assert windows["perception"] == [1, 19]
    assert windows["completion"] == [7, 25]  # output + the end token
    assert windows["reasoning"] == [6, 6]


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
