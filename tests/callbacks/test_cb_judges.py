"""Perception judges: a fake OpenAI-compatible server on 127.0.0.1, a tiny local HF model, the rule judge."""

import json
import logging
import time

import pytest

from callbacks.rewards.judges import (
    JUDGE_SYSTEM_PROMPT,
    HFTextJudge,
    JudgeCache,
    JudgeRequest,
    OpenAIChatJudge,
    RuleBasedJudge,
    parse_verdict,
)

SECRET = "sk-test-DO-NOT-LEAK-1234567890"
REQ = JudgeRequest(question="How many cars are parked?", answer="3", observation="Three red cars are parked.")


@pytest.fixture
def serve(chat_server, chat_payload):
    """A fake server from a script of (status, reply text, delay_s)."""
    return lambda script: chat_server([(status, chat_payload(status, text), delay) for status, text, delay in script])


def make_judge(server, **kwargs):
    defaults = dict(model="judge-model", max_concurrency=4, timeout_s=2.0, max_retries=2, backoff_s=0.01)
    defaults.update(kwargs)
    return OpenAIChatJudge(base_url=server.base_url, **defaults)


def test_request_format_and_key_header(serve, monkeypatch):
    monkeypatch.setenv("P2R_JUDGE_API_KEY", SECRET)
    server = serve([(200, "Yes", 0.0)])
    [result] = make_judge(server, max_tokens=32).judge([REQ])
    assert result.score == 1.0 and result.error is None and not result.cached and result.latency_s > 0
    [sent] = server.requests
    assert sent["path"] == "/v1/chat/completions"
    assert sent["headers"]["Authorization"] == f"Bearer {SECRET}"
    assert sent["headers"]["Content-Type"] == "application/json"
    body = sent["body"]
    assert body["model"] == "judge-model" and body["temperature"] == 0.0 and body["max_tokens"] == 32
    assert [m["role"] for m in body["messages"]] == ["system", "user"]
    assert body["messages"][0]["content"] == JUDGE_SYSTEM_PROMPT
    user = body["messages"][1]["content"]
    for text in (REQ.question, REQ.answer, REQ.observation):
        assert text in user


def test_no_key_no_header_and_no_verdict(serve, monkeypatch):
    monkeypatch.delenv("P2R_JUDGE_API_KEY", raising=False)
    server = serve([(200, "No.", 0.0)])
    assert make_judge(server).judge([REQ])[0].score == 0.0
    assert "Authorization" not in server.requests[0]["headers"]
    server2 = serve([(200, "I cannot tell.", 0.0)])
    [result] = make_judge(server2).judge([REQ])
    assert result.score is None and "no yes/no verdict" in result.error
    assert len(server2.requests) == 1  # an unreadable verdict is not retried


def test_retries_on_500_then_success(serve):
    server = serve([(500, "overloaded", 0.0), (503, "overloaded", 0.0), (200, "yes", 0.0)])
    [result] = make_judge(server, max_retries=2).judge([REQ])
    assert result.score == 1.0
    assert len(server.requests) == 3


def test_retries_are_bounded_and_4xx_is_not_retried(serve):
    server = serve([(500, "down", 0.0)])
    [result] = make_judge(server, max_retries=2).judge([REQ])
    assert result.score is None and "HTTP 500" in result.error
    assert len(server.requests) == 3  # 1 + 2 retries, then give up
    server400 = serve([(400, "bad model name", 0.0)])
    [result] = make_judge(server400, max_retries=2).judge([REQ])
    assert result.score is None and "HTTP 400" in result.error and len(server400.requests) == 1


def test_timeout_becomes_a_failed_result_quickly(serve):
    server = serve([(200, "yes", 1.5)])
    start = time.monotonic()
    [result] = make_judge(server, timeout_s=0.2, max_retries=1).judge([REQ])
    assert time.monotonic() - start < 1.4  # two 0.2 s attempts, not the server's 1.5 s
    assert result.score is None and "timed out" in result.error.lower()


def test_unreachable_server_fails_without_raising():
    judge = OpenAIChatJudge(base_url="http://127.0.0.1:9/v1", model="m", timeout_s=0.5, max_retries=1, backoff_s=0.01)
    [result] = judge.judge([REQ])
    assert result.score is None and result.error


def test_requests_run_concurrently(serve):
    server = serve([(200, "yes", 0.4)])
    requests = [JudgeRequest("q", "a", f"observation {i}") for i in range(8)]
    start = time.monotonic()
    results = make_judge(server, max_concurrency=8).judge(requests)
    assert [r.score for r in results] == [1.0] * 8
    assert time.monotonic() - start < 2.0  # serial would take 3.2 s


def test_cache_hit_and_in_batch_dedup(serve):
    server = serve([(200, "yes", 0.0)])
    judge = make_judge(server)
    first = judge.judge([REQ, REQ])  # identical requests in one batch: one call
    assert [r.score for r in first] == [1.0, 1.0] and len(server.requests) == 1
    [again] = judge.judge([REQ])
    assert again.score == 1.0 and again.cached and len(server.requests) == 1
    assert judge.cache.hits == 1


def test_failures_are_not_cached(serve):
    server = serve([(500, "x", 0.0), (200, "yes", 0.0)])
    judge = make_judge(server, max_retries=0)
    assert judge.judge([REQ])[0].score is None
    assert judge.judge([REQ])[0].score == 1.0
    assert len(server.requests) == 2


def test_empty_observation_is_zero_without_a_call(serve):
    server = serve([(200, "yes", 0.0)])
    [result] = make_judge(server).judge([JudgeRequest("q", "a", "  \n")])
    assert result.score == 0.0 and server.requests == []


def test_api_key_never_in_repr_state_or_logs(serve, monkeypatch, caplog):
    monkeypatch.setenv("MY_JUDGE_KEY", SECRET)
    server = serve([(500, f"echoing your key {SECRET}", 0.0)])
    judge = make_judge(server, api_key_env="MY_JUDGE_KEY", max_retries=1)
    with caplog.at_level(logging.DEBUG, logger="callbacks"):
        [result] = judge.judge([REQ])
    assert server.requests[0]["headers"]["Authorization"] == f"Bearer {SECRET}"  # the key was used...
    assert result.score is None
    assert "***" in result.error  # ...the server echoed it back, and it was redacted
    assert caplog.records  # the failure was logged
    for text in (repr(judge), str(vars(judge)), caplog.text, result.error):
        assert SECRET not in text
    assert "MY_JUDGE_KEY" in repr(judge)


@pytest.mark.parametrize(
    "reply, verdict",
    [
        ("Yes", True), ("yes.", True), ("**No**", False), ("Verdict: yes", True), ("Answer: NO", False),
        ("<think>The observation lists cars... no wait</think>\nYes", True),
        ("The observation names the colour, so the answer follows: yes", True),
        ("Yes, although it does not say no explicitly... Final: no", True),  # the first word decides
        ("<think>still thinking", None), ("Maybe", None), ("", None), ("nobody knows", None),
    ],
)
def test_parse_verdict(reply, verdict):
    assert parse_verdict(reply) is verdict


def test_cache_is_bounded_lru():
    cache = JudgeCache(max_entries=2)
    cache.put(("a", "", ""), 1.0)
    cache.put(("b", "", ""), 0.0)
    assert cache.get(("a", "", "")) == 1.0  # "a" is now the most recent
    cache.put(("c", "", ""), 1.0)
    assert cache.get(("b", "", "")) is None and len(cache) == 2


def test_judges_pickle_with_their_cache(serve):
    import pickle

    server = serve([(200, "yes", 0.0)])
    judge = make_judge(server)
    judge.judge([REQ])
    clone = pickle.loads(pickle.dumps(judge))
    assert clone.judge([REQ])[0].cached and len(server.requests) == 1


EVIDENCE = {"evidence": [["three cars", "3 cars"], ["red"]]}


@pytest.mark.parametrize(
    "observation, score",
    [
        ("Three  red cars are parked; I see THREE CARS.", 1.0),
        ("There are 3 cars, all red.", 1.0),
        ("There are 3 cars, all blue.", 0.0),  # second group missing
        ("A red truck and three carsick people.", 0.0),  # word boundaries: "carsick" is not "cars"
        ("Three\nred cars... three cars", 1.0),
    ],
)
def test_rule_based_judge(observation, score):
    [result] = RuleBasedJudge().judge([JudgeRequest("q", "3", observation, facts=EVIDENCE)])
    assert result.score == score and result.error is None


@pytest.mark.parametrize("facts", [None, {}, {"evidence": []}, {"evidence": [[]]}, {"evidence": "red"}, {"evidence": [["  "]]}])
def test_rule_based_judge_without_usable_facts_is_an_error(facts):
    [result] = RuleBasedJudge().judge([JudgeRequest("q", "3", "three red cars", facts=facts)])
    assert result.score is None and "evidence" in result.error


def test_rule_based_judge_string_group():
    facts = {"evidence": ["red", ["car", "truck"]]}
    assert RuleBasedJudge().judge([JudgeRequest("q", "a", "a red truck", facts=facts)])[0].score == 1.0


def test_a_broken_backend_never_raises():
    class Broken(RuleBasedJudge):
        def _judge_uncached(self, requests):
            raise RuntimeError("GPU fell off")

    results = Broken().judge([REQ, REQ])
    assert [r.score for r in results] == [None, None] and "GPU fell off" in results[0].error


# ---- HF judge: a tiny random causal LM and an in-process tokenizer, nothing downloads -------------

def tiny_hf_judge(favoured_word):
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers, decoders
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = [JUDGE_SYSTEM_PROMPT, REQ.question, REQ.observation, "yes no yes no Yes No"] * 20
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=800, special_tokens=["<eos>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=tokenizer.vocab_size, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=2048,
                         bos_token_id=None, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    model = LlamaForCausalLM(config)
    word_id = tokenizer.get_vocab().get("\u0120" + favoured_word)  # byte-level BPE: " yes" is one token
    assert word_id is not None and word_id != tokenizer.unk_token_id
    with torch.no_grad():  # a bias makes greedy decoding say the favoured word, whatever the prompt
        head = torch.nn.Linear(16, tokenizer.vocab_size, bias=True)
        head.weight.zero_()
        head.bias.zero_()
        head.bias[word_id] = 10.0
        model.lm_head = head
    return HFTextJudge(model=model, tokenizer=tokenizer, batch_size=2, max_new_tokens=3, device="cpu"), tokenizer


@pytest.mark.parametrize("word, score", [("yes", 1.0), ("no", 0.0)])
def test_hf_judge_plumbing(word, score):
    judge, _ = tiny_hf_judge(word)
    requests = [REQ, JudgeRequest("q2", "a2", "o2"), JudgeRequest("q3", "a3", "longer observation text here")]
    results = judge.judge(requests)  # 3 requests, batch_size 2: a full and a partial left-padded batch
    assert [r.score for r in results] == [score] * 3
    assert all(r.error is None and r.latency_s > 0 for r in results)
    assert judge.judge([REQ])[0].cached


def test_hf_judge_uses_the_chat_template_when_there_is_one():
    judge, tokenizer = tiny_hf_judge("yes")
    tokenizer.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:"
    prompt = judge._prompt(REQ)
    assert prompt.startswith("system: " + JUDGE_SYSTEM_PROMPT) and prompt.endswith("assistant:")
    assert judge.judge([REQ])[0].score == 1.0


def test_hf_judge_needs_a_model():
    with pytest.raises(ValueError):
        HFTextJudge()
    with pytest.raises(ValueError):
        HFTextJudge(model=object())


@pytest.mark.parametrize(("status", "text"), [(200, "x" * 190 + SECRET + " is what you sent me"),  # a reply without a verdict
                                              (503, "y" * 151 + "busy; your key: " + SECRET)])  # an error body, in its JSON
def test_a_key_straddling_the_message_cut_never_leaks_a_prefix(serve, monkeypatch, caplog, status, text):
    monkeypatch.setenv("P2R_JUDGE_API_KEY", SECRET)
    server = serve([(status, text, 0.0)])
    with caplog.at_level(logging.DEBUG, logger="callbacks"):
        [result] = make_judge(server, max_retries=1).judge([REQ])
    assert result.score is None and "***" in result.error
    for message in (result.error, caplog.text):
        assert SECRET[:6] not in message  # not even the part before a 200-character cut


def test_a_huge_reply_is_refused_not_read(chat_server):
    payload = json.dumps({"choices": [{"message": {"content": "yes " * 2_000_000}, "finish_reason": "stop"}]}).encode()
    server = chat_server([(200, payload, 0.0)])  # 8 MB saying "yes"
    start = time.monotonic()
    [result] = make_judge(server).judge([REQ])
    assert result.score is None and "over max_response_bytes" in result.error
    assert len(server.requests) == 1 and time.monotonic() - start < 5
