"""The shared chat-completions client alone, against a fake server on 127.0.0.1."""

import json
import time

import pytest

from callbacks.chat_client import ChatCompletionsClient, ChatReply

SECRET = "sk-test-DO-NOT-LEAK-0987654321"
KEY_ENV = "P2R_TEST_CHAT_CLIENT_KEY"
BODY = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}


def ok(text, finish_reason="stop"):
    return json.dumps({"choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                    "finish_reason": finish_reason}]}).encode()


def err(message):
    return json.dumps({"error": {"message": message}}).encode()


@pytest.fixture
def serve(chat_server):
    """A fake server from a script of (status, payload bytes, delay_s)."""
    return chat_server


def client_for(server, **kwargs):
    settings = dict(api_key_env=KEY_ENV, timeout_s=2.0, max_retries=2, backoff_s=0.01)
    settings.update(kwargs)
    return ChatCompletionsClient(server.base_url + "/", **settings)


def test_url_and_repr_hold_no_secret(monkeypatch):
    monkeypatch.setenv(KEY_ENV, SECRET)
    client = ChatCompletionsClient("http://h/v1/", KEY_ENV)
    assert client.url == "http://h/v1/chat/completions"
    assert ChatCompletionsClient("http://h/v1/chat/completions", KEY_ENV).url == "http://h/v1/chat/completions"
    assert SECRET not in repr(client) + str(vars(client)) and KEY_ENV in repr(client)
    assert client.redact(f"key={SECRET}!") == "key=***!"
    monkeypatch.delenv(KEY_ENV)
    assert client.redact("nothing to hide") == "nothing to hide"


def test_retries_500_then_succeeds(serve, monkeypatch):
    monkeypatch.delenv(KEY_ENV, raising=False)
    server = serve([(500, err("busy"), 0.0), (503, err("busy"), 0.0), (200, ok("fine", "length"), 0.0)])
    retries = []
    reply = client_for(server).complete(BODY, on_retry=lambda *args: retries.append(args))
    assert reply == ChatReply(text="fine", finish_reason="length", error=None, latency_s=reply.latency_s)
    assert reply.latency_s >= 0.01 + 0.02  # the two backoff sleeps
    assert len(server.requests) == 3 and all(r["body"] == BODY for r in server.requests)
    assert server.requests[0]["path"] == "/v1/chat/completions"
    assert [(a, n) for a, n, _ in retries] == [(1, 3), (2, 3)] and "HTTP 500" in retries[0][2]


def test_retries_are_bounded(serve):
    server = serve([(429, err("slow down"), 0.0)])
    reply = client_for(server, max_retries=1).complete(BODY)
    assert reply.text is None and reply.error.startswith("HTTP 429") and len(server.requests) == 2


def test_no_retry_on_400(serve):
    server = serve([(400, err("bad request"), 0.0), (200, ok("never"), 0.0)])
    retries = []
    reply = client_for(server).complete(BODY, on_retry=lambda *args: retries.append(args))
    assert reply.text is None and reply.error.startswith("RuntimeError: HTTP 400") and "bad request" in reply.error
    assert len(server.requests) == 1 and retries == []


def test_timeout_is_retried_then_fails(serve):
    server = serve([(200, ok("late"), 1.5)])
    start = time.monotonic()
    reply = client_for(server, timeout_s=0.2, max_retries=1).complete(BODY)
    assert time.monotonic() - start < 1.4  # two 0.2 s attempts, not the server's 1.5 s
    assert reply.text is None and "timed out" in reply.error.lower() and len(server.requests) == 2


def test_unreachable_server_and_unencodable_body_never_raise():
    client = ChatCompletionsClient("http://127.0.0.1:9/v1", KEY_ENV, timeout_s=0.5, max_retries=1, backoff_s=0.01)
    reply = client.complete(BODY)
    assert reply.text is None and reply.error
    reply = client.complete({"model": object()})
    assert reply.text is None and reply.error.startswith("TypeError")


@pytest.mark.parametrize("payload", [b"not json", b'{"choices": []}', b'{"choices": [{"message": "x"}]}', b"[]"])
def test_malformed_body_fails_without_retry(serve, payload):
    server = serve([(200, payload, 0.0)])
    reply = client_for(server).complete(BODY)
    assert reply.text is None and "malformed chat-completions response" in reply.error
    assert len(server.requests) == 1


def test_empty_content_is_an_empty_reply(serve):
    server = serve([(200, json.dumps({"choices": [{"message": {"content": None}}]}).encode(), 0.0)])
    reply = client_for(server).complete(BODY)
    assert reply.text == "" and reply.finish_reason is None and reply.error is None


def test_key_header_from_env_and_redacted_in_errors(serve, monkeypatch):
    monkeypatch.setenv(KEY_ENV, SECRET)
    server = serve([(500, err(f"echoing your key {SECRET}"), 0.0)])
    client = client_for(server, max_retries=1)
    retries = []
    reply = client.complete(BODY, on_retry=lambda *args: retries.append(args))
    assert [r["headers"]["Authorization"] for r in server.requests] == [f"Bearer {SECRET}"] * 2
    assert reply.text is None and "***" in reply.error and SECRET not in reply.error
    assert retries and all(SECRET not in error for _, _, error in retries)
    monkeypatch.setenv(KEY_ENV, "sk-rotated")  # read at each request, never kept
    client.complete(BODY)
    assert server.requests[-1]["headers"]["Authorization"] == "Bearer sk-rotated"


def test_no_header_when_env_unset(serve, monkeypatch):
    monkeypatch.delenv(KEY_ENV, raising=False)
    server = serve([(200, ok("hi"), 0.0)])
    reply = client_for(server).complete(BODY)
    assert reply.text == "hi" and reply.finish_reason == "stop"
    assert "Authorization" not in server.requests[0]["headers"]
    assert server.requests[0]["headers"]["Content-Type"] == "application/json"


def test_a_trickling_body_is_cut_at_the_deadline(serve, trickle):
    # 200 bytes at one byte every 0.2 s would take 40 s per attempt; the deadline is 0.8 s per attempt.
    server = serve([(200, trickle(ok("yes " * 40), every_s=0.2), 0.0)])
    retries = []
    start = time.monotonic()
    reply = client_for(server, timeout_s=0.8, max_retries=1).complete(BODY, on_retry=lambda *args: retries.append(args))
    elapsed = time.monotonic() - start
    assert elapsed < 2 * 0.8 + 0.01 + 1.0, elapsed  # two bounded attempts and one backoff, with slack for a busy machine
    assert reply.text is None and "timed out" in reply.error and "timeout_s=0.8" in reply.error
    assert len(server.requests) == 2 and len(retries) == 2  # on_retry hears of every failed attempt


def test_a_body_stalled_past_the_deadline_is_reported_as_a_timeout_not_as_malformed(serve, trickle):
    # One byte, then nothing for 3 s: the deadline shuts the socket while the client waits in a read,
    # which then returns end-of-file with a cut body.
    for length in (f"Content-Length: {len(ok('yes'))}\r\n".encode(), b""):  # without one the body ends at the close
        raw = b"HTTP/1.0 200 OK\r\nContent-Type: application/json\r\n" + length + b"\r\n" + ok("yes")
        server = serve([(200, trickle(raw, every_s=3.0, raw=True, piece=len(raw) - len(ok("yes")) + 1), 0.0)])
        reply = client_for(server, timeout_s=0.5, max_retries=0).complete(BODY)
        assert reply.text is None and reply.error.startswith("timed out") and "malformed" not in reply.error, reply.error


def test_a_read_ended_by_the_deadline_as_end_of_file_is_a_timeout():
    """Where the deadline's socket shutdown makes the blocked read return end-of-file instead of
    raising, the cut body must still count as a timeout (a trickling judge was reported as malformed)."""
    from callbacks.chat_client import _Deadline

    deadline = _Deadline(60.0)
    pieces = [b'{"choices": [', b""]

    class Response:
        def getheader(self, name):
            return None

        def read1(self, n):
            piece = pieces.pop(0)
            if not piece:
                deadline.passed = True  # what _Deadline._expire sets before shutting the socket down
            return piece

    with pytest.raises(TimeoutError):
        ChatCompletionsClient("http://127.0.0.1:9/v1", KEY_ENV)._read_body(Response(), deadline)
    deadline.cancel()


def test_trickling_status_and_headers_are_cut_at_the_deadline(serve, trickle):
    raw = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"
    server = serve([(200, trickle(raw, every_s=0.2, raw=True), 0.0)])
    start = time.monotonic()
    reply = client_for(server, timeout_s=0.6, max_retries=0).complete(BODY)
    assert time.monotonic() - start < 0.6 + 1.0
    assert reply.text is None and "timed out" in reply.error


@pytest.mark.parametrize("declared", [True, False])
def test_a_reply_body_over_the_cap_fails_without_a_retry(serve, trickle, declared):
    body = ok("yes " * 300_000)  # 1.2 MB of "yes"
    if declared:
        payload = body
    else:  # no Content-Length: the body ends when the server closes, and is counted while it is read
        payload = trickle(b"HTTP/1.0 200 OK\r\nContent-Type: application/json\r\n\r\n" + body, every_s=0, raw=True, piece=65536)
    server = serve([(200, payload, 0.0)])
    reply = client_for(server, max_response_bytes=1_000_000).complete(BODY)
    assert reply.text is None and "over max_response_bytes=1,000,000" in reply.error
    assert len(server.requests) == 1
    assert client_for(server, max_response_bytes=2_000_000).complete(BODY).text.startswith("yes yes")


@pytest.mark.parametrize(("status", "body"), [(500, "error"), (400, "error"), (200, "not json")])
def test_the_key_is_redacted_before_a_server_text_is_cut(serve, monkeypatch, status, body):
    monkeypatch.setenv(KEY_ENV, SECRET)
    straddling = ("x" * 190 + SECRET + " trailing words").encode()  # the 200-character cut falls inside the key
    server = serve([(status, straddling, 0.0)])
    retries = []
    reply = client_for(server, max_retries=1).complete(BODY, on_retry=lambda *args: retries.append(args))
    messages = [reply.error, *(error for _, _, error in retries)]
    assert all("x" * 190 + "***" in m for m in messages), messages
    assert not any(SECRET[:6] in m for m in messages)


def test_the_environment_proxy_is_used_as_urllib_would(monkeypatch):
    from callbacks.chat_client import _Deadline

    for name in ("https_proxy", "http_proxy", "no_proxy", "HTTPS_PROXY", "HTTP_PROXY", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("https_proxy", "http://proxy.example:3128")
    monkeypatch.setenv("http_proxy", "http://proxy.example:3128")
    monkeypatch.setenv("no_proxy", "internal.example")
    tunnel, target = ChatCompletionsClient("https://api.example/v1", KEY_ENV)._connection(_Deadline(1.0))
    assert (tunnel.host, tunnel.port, tunnel._tunnel_host, tunnel._tunnel_port) == ("proxy.example", 3128, "api.example", 443)
    assert target == "/v1/chat/completions"  # TLS to the server through a CONNECT tunnel
    plain, target = ChatCompletionsClient("http://judge.example:8000/v1", KEY_ENV)._connection(_Deadline(1.0))
    assert (plain.host, plain.port, target) == ("proxy.example", 3128, "http://judge.example:8000/v1/chat/completions")
    direct, target = ChatCompletionsClient("http://internal.example:8000/v1", KEY_ENV)._connection(_Deadline(1.0))
    assert (direct.host, direct.port, target) == ("internal.example", 8000, "/v1/chat/completions")
