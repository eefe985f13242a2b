"""Reward callbacks build from YAML the way LightningCLI builds trainer callbacks (jsonargparse)."""

import pytest

jsonargparse = pytest.importorskip("jsonargparse")
import lightning as L  # noqa: E402

from callbacks.reward_callbacks import PerceptionJudgeReward, ReasoningLengthReward  # noqa: E402
from callbacks.rewards.judges import OpenAIChatJudge, RuleBasedJudge  # noqa: E402

YAML = """
callbacks:
  - class_path: callbacks.reward_callbacks.ReasoningLengthReward
    init_args: {lmin: 100, lmax: 200}
  - class_path: callbacks.reward_callbacks.PerceptionJudgeReward
    init_args:
      judge: {class_path: callbacks.rewards.judges.RuleBasedJudge}
      failure_policy: drop_group
  - class_path: callbacks.reward_callbacks.PerceptionJudgeReward
    init_args:
      judge:
        class_path: callbacks.rewards.judges.OpenAIChatJudge
        init_args: {base_url: "http://127.0.0.1:8000/v1", model: judge, max_retries: 1}
"""


def parser():
    p = jsonargparse.ArgumentParser()
    p.add_argument("--callbacks", type=list[L.Callback])
    return p


def test_build_from_yaml(monkeypatch):
    monkeypatch.setenv("P2R_JUDGE_API_KEY", "sk-secret-from-env")
    p = parser()
    cfg = p.parse_string(YAML)
    built = p.instantiate_classes(cfg).callbacks
    assert isinstance(built[0], ReasoningLengthReward) and (built[0].lmin, built[0].lmax) == (100, 200)
    assert isinstance(built[1], PerceptionJudgeReward) and isinstance(built[1].judge, RuleBasedJudge)
    assert built[1].failure_policy == "drop_group"
    assert isinstance(built[2].judge, OpenAIChatJudge) and built[2].judge.client.max_retries == 1
    dumped = p.dump(cfg)
    assert "api_key_env: P2R_JUDGE_API_KEY" in dumped and "sk-secret-from-env" not in dumped


def test_bad_policy_is_rejected_by_the_parser():
    bad = YAML.replace("failure_policy: drop_group", "failure_policy: retry")
    with pytest.raises((jsonargparse.ArgumentError, SystemExit)):
        parser().parse_string(bad)
