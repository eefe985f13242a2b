"""The judge endpoint is down (connection refused on a closed port): each request is tried a bounded
number of times with backoff, in bounded time, then the perception reward applies its failure
policy ("zero" or "drop_group") and counts every failure."""

from __future__ import annotations

import math
import socket
import threading
import time
from http.client import HTTPConnection

import pytest

from callbacks.reward_callbacks import PerceptionJudgeReward, score_all
from callbacks.rewards.judges import JudgeRequest, OpenAIChatJudge
from callbacks.rollouts import Rollouts

MAX_RETRIES = 2
BACKOFF_S = 0.05  # sleeps 0.05 then 0.1 s before the two retries


@pytest.fixture
def closed_port_url() -> str:
    """A loopback URL where nothing listens: a port the OS just handed out and that was closed again."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1"


@pytest.fixture
def attempts(monkeypatch) -> list[str]:
    """Every HTTP attempt's server, recorded before the real connect runs (and is refused)."""
    seen: list[str] = []
    lock = threading.Lock()
    real = HTTPConnection.connect

    def counting_connect(self):
        with lock:
            seen.append(f"http://{self.host}:{self.port}/v1")
        return real(self)

    monkeypatch.setattr(HTTPConnection, "connect", counting_connect)
    return seen


def down_judge(url: str) -> OpenAIChatJudge:
    return OpenAIChatJudge(base_url=url, model="judge", max_concurrency=4, timeout_s=2.0,
                           max_retries=MAX_RETRIES, backoff_s=BACKOFF_S)


def test_refused_requests_are_retried_a_bounded_number_of_times(closed_port_url, attempts):
    requests = [JudgeRequest("How many cars?", "3", f"I see {n} cars.") for n in ("two", "three")]
    start = time.monotonic()
    results = down_judge(closed_port_url).judge(requests)
    elapsed = time.monotonic() - start
    assert len(attempts) == len(requests) * (1 + MAX_RETRIES)
    assert set(attempts) == {closed_port_url}
    assert 0.9 * 3 * BACKOFF_S <= elapsed < 1.5  # the backoff was slept, and nothing waited for a timeout
    for result in results:
        assert result.score is None and "refused" in result.error.lower()


def rollouts() -> Rollouts:
    """Two prompts x two samples; sample 3 has no observation (scored 0 without asking the judge)."""
    prompts = [{"id": str(b), "question": "How many cars?", "options": [], "answer": "3",
                "problem_type": "numerical", "facts": None} for b in range(2)]
    completions = ["<observation>Three cars.</observation><answer>3</answer>",
                   "<observation>Two cars.</observation><answer>2</answer>",
                   "<observation>Three red cars.</observation><answer>3</answer>",
                   "<answer>3</answer>"]
    return Rollouts(group_size=2, prompts=prompts, completions=completions)


@pytest.mark.parametrize("policy", ["zero", "drop_group"])
def test_down_endpoint_applies_the_failure_policy_and_counts_failures(closed_port_url, attempts, policy):
    reward = PerceptionJudgeReward(down_judge(closed_port_url), failure_policy=policy, use_facts=False)
    batch = rollouts()
    start = time.monotonic()
    values, metrics = reward.score_with_metrics(batch)
    assert time.monotonic() - start < 1.5
    assert len(attempts) == 3 * (1 + MAX_RETRIES)  # three observations, each tried 1 + MAX_RETRIES times
    assert metrics["judge/failures"] == 3.0 and metrics["judge/failure_rate"] == 0.75
    assert values[3] == 0.0  # an empty observation is not a failure
    if policy == "zero":
        assert values[:3] == [0.0, 0.0, 0.0]
    else:
        assert all(math.isnan(v) for v in values[:3])
    score_all(None, None, batch, callbacks=[reward])
    assert batch.dropped_prompts() == ([False, False] if policy == "zero" else [True, True])
