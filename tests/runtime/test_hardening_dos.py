"""What one client can take of a replica, on real servers: request bodies bounded in size (413 before they are
read whole), in time (408) and in nesting (400); prompts refused by cheap bounds before they are tokenized, and
tokenized off the event loop (so /health answers meanwhile); request heads bounded in time; open connections
capped (503). Short limits are set by flag, so each test takes a second or two of waiting."""

import json
import select
import socket
import threading
import time

import httpx
import pytest
from tests.runtime.server_helpers import BASE, start

from ember.runtime.__main__ import build_parser
from ember.runtime.devtools import tinymodels
from ember.runtime.serving.limits import Limits

MiB = 1024 * 1024
MARKER = "SECRET-PROMPT-TEXT-7f3a"  # in request bodies; must never come back in an error or reach the log


@pytest.fixture(scope="module")
def limited(tmp_path_factory):
    server = start(tmp_path_factory.mktemp("limited"), extra=["--max-body-bytes", str(MiB), "--header-timeout", "1",
                                                              "--body-timeout", "1"])
    yield server
    server.stop()
    assert MARKER not in server.log.read_text()


@pytest.fixture(scope="module")
def long_context(tmp_path_factory):
    """The tiny model with a context of 200,000 tokens: megabytes of text it must tokenize to refuse."""
    root = tmp_path_factory.mktemp("long")
    base = tinymodels.make_model(root / "models" / "long", "tiny", seed=3, init_std=0.1, max_position_embeddings=200_000)
    server = start(root, models=(base, {}), extra=["--max-model-len", "200000", "--kv-cache-tokens", "200000"])
    yield server
    server.stop()
    assert MARKER not in server.log.read_text()


def _auth(server) -> dict:
    return {"Authorization": f"Bearer {server.keys['acme']}"}


def _connect(server) -> socket.socket:
    host, port = server.url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=5)


def _head(server, method: str, path: str, headers: dict) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: test", *(f"{k}: {v}" for k, v in (_auth(server) | headers).items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def _read_response(sock: socket.socket, timeout: float = 5.0) -> tuple[int, dict, bytes]:
    """One HTTP/1.1 response with a Content-Length body: (status, headers, body)."""
    sock.settimeout(timeout)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed before a whole response: {data[:200]!r}")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    while len(body) < int(headers.get("content-length", 0)):
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return int(lines[0].split()[1]), headers, body


def _closed_by_server(sock: socket.socket, timeout: float) -> bool:
    """Whether the server closes the connection within `timeout` (anything it sends first is read and dropped)."""
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        if select.select([sock], [], [], left)[0]:
            try:
                if not sock.recv(65536):
                    return True
            except ConnectionError:
                return True
    return False


def _openai_error(body: bytes) -> dict:
    error = json.loads(body)["error"]
    assert set(error) == {"message", "type", "param", "code"} and MARKER not in body.decode()
    return error


# -- request bodies --------------------------------------------------------------------------------------------

def test_a_body_declared_over_the_limit_gets_413_before_it_is_sent(limited):
    with _connect(limited) as sock:
        started = time.perf_counter()
        # 50 MB declared, 1 KB sent: the answer cannot wait for the rest
        sock.sendall(_head(limited, "POST", "/v1/chat/completions", {"Content-Type": "application/json",
                                                                      "Content-Length": str(50 * MiB)})
                     + json.dumps({"model": BASE, "messages": [{"role": "user", "content": MARKER * 40}]}).encode())
        status, headers, body = _read_response(sock)
        elapsed = time.perf_counter() - started
        assert status == 413 and headers["connection"] == "close", (status, body)
        error = _openai_error(body)
        assert error["code"] == "request_too_large" and str(MiB) in error["message"]
        assert elapsed < 1.0, elapsed
        assert _closed_by_server(sock, 2)  # the 50 MB it was promised is not waited for on this connection


def test_a_chunked_body_is_refused_with_413_as_soon_as_it_passes_the_limit(limited):
    with _connect(limited) as sock:
        sock.sendall(_head(limited, "POST", "/v1/completions", {"Content-Type": "application/json",
                                                                "Transfer-Encoding": "chunked"}))
        chunk = (MARKER * 4096)[:64 * 1024].encode()
        for _ in range(MiB // len(chunk) + 1):  # just over the limit, and never the last chunk
            sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        status, headers, body = _read_response(sock)
        assert status == 413 and _openai_error(body)["code"] == "request_too_large", (status, body)
        assert _closed_by_server(sock, 2)


def test_a_body_sent_slowly_gets_408_within_the_body_timeout(limited):
    with _connect(limited) as sock:
        payload = json.dumps({"model": BASE, "prompt": MARKER, "max_tokens": 1}).encode()
        sock.sendall(_head(limited, "POST", "/v1/completions", {"Content-Type": "application/json",
                                                                "Content-Length": str(len(payload))}))
        started = time.perf_counter()
        for byte in payload:  # a byte each 0.1 s: it would take seconds; the body timeout is 1 s
            try:
                sock.sendall(bytes([byte]))
            except ConnectionError:
                break
            if select.select([sock], [], [], 0.1)[0]:
                break
        status, _, body = _read_response(sock)
        elapsed = time.perf_counter() - started
        assert status == 408 and _openai_error(body)["code"] == "request_timeout", (status, body)
        assert 0.8 < elapsed < 2.5, elapsed
        assert _closed_by_server(sock, 2)


@pytest.mark.parametrize("depth", [100_000, 500])  # beyond Python's parser's limit, and beyond pydantic's
def test_a_body_nested_too_deeply_is_a_400_naming_it(limited, depth):
    nested = "[" * depth + "]" * depth
    for body in (nested, f'{{"model": "{BASE}", "messages": [{{"role": "user", "content": [{{"x": {nested}}}]}}]}}'):
        response = httpx.post(f"{limited.url}/v1/chat/completions", content=body, timeout=30,
                              headers=_auth(limited) | {"Content-Type": "application/json"})
        assert response.status_code == 400, (depth, response.text[:300])
        error = _openai_error(response.content)
        assert error["code"] == "invalid_json" and "too deeply" in error["message"]


def test_a_number_of_thousands_of_digits_is_a_400(limited):
    body = f'{{"model": "{BASE}", "prompt": "hi", "seed": {"9" * 5000}}}'  # Python's parser refuses > 4,300 digits
    response = httpx.post(f"{limited.url}/v1/completions", content=body, timeout=30,
                          headers=_auth(limited) | {"Content-Type": "application/json"})
    assert response.status_code == 400, response.text[:300]
    assert _openai_error(response.content)["code"] == "invalid_json"


# -- prompts: cheap bounds first, and the tokenizer off the event loop ------------------------------------------

def test_a_prompt_longer_than_the_context_could_hold_is_refused_by_its_characters(limited):
    # 500,000 characters for a context of 512 tokens: refused without tokenizing them
    text = MARKER + "hello world " * 40_000
    for path, body, param in (
            ("/v1/chat/completions", {"model": BASE, "messages": [{"role": "user", "content": text}]}, "messages"),
            ("/v1/completions", {"model": BASE, "prompt": ["hi", text]}, "prompt")):
        started = time.perf_counter()
        response = httpx.post(f"{limited.url}{path}", json=body, headers=_auth(limited), timeout=30)
        assert response.status_code == 400, response.text[:300]
        error = _openai_error(response.content)
        assert error["code"] == "context_length_exceeded" and error["param"] == param
        assert f"is {len(text)} characters" in error["message"]
        assert time.perf_counter() - started < 1.0


def test_a_chat_of_too_many_messages_is_refused_before_its_template_runs(limited):
    messages = [{"role": "user" if i % 2 == 0 else "assistant", "content": "hi"} for i in range(2049)]
    response = httpx.post(f"{limited.url}/v1/chat/completions", json={"model": BASE, "messages": messages},
                          headers=_auth(limited), timeout=30)
    assert response.status_code == 400
    error = _openai_error(response.content)
    assert error["param"] == "messages" and error["code"] == "invalid_parameter" and "2048" in error["message"]


def test_health_answers_at_once_while_a_big_body_is_parsed_and_tokenized(long_context):
    server = long_context
    text = MARKER + "hello world " * 300_000  # 3.6 MB of text, under the 4 MiB default; fits the character bound
    body = json.dumps({"model": BASE, "messages": [{"role": "user", "content": text}], "max_tokens": 1})
    assert len(body) < Limits.max_body_bytes
    result = {}

    def big():
        started = time.perf_counter()
        response = httpx.post(f"{server.url}/v1/chat/completions", content=body, timeout=120,
                              headers=_auth(server) | {"Content-Type": "application/json"})
        result.update(response=response, elapsed=time.perf_counter() - started)

    thread = threading.Thread(target=big)
    thread.start()
    latencies = []
    while thread.is_alive():
        started = time.perf_counter()
        assert httpx.get(f"{server.url}/health", timeout=60).status_code == 200
        latencies.append(time.perf_counter() - started)
        time.sleep(0.05)
    thread.join()
    response = result["response"]
    assert response.status_code == 400, response.text[:300]
    error = _openai_error(response.content)
    assert error["code"] == "context_length_exceeded" and "tokens" in error["message"]  # tokenized, then refused
    print(f"big body answered in {result['elapsed']:.2f} s; /health worst {max(latencies):.3f} s of {len(latencies)}")
    assert len(latencies) >= 3  # /health was asked while the body was being worked on
    assert max(latencies) < 1.0, latencies


# -- request heads and connections ---------------------------------------------------------------------------

def test_a_request_head_sent_slowly_or_never_is_disconnected_within_the_header_timeout(limited):
    with _connect(limited) as idle:
        started = time.perf_counter()
        assert _closed_by_server(idle, 3)  # opened, and nothing sent
        assert 0.8 < time.perf_counter() - started < 2.5
    with _connect(limited) as slow:
        started = time.perf_counter()
        closed = False
        for byte in b"GET /health HTTP/1.1\r\nHost: test\r\nX-Slow: " + b"a" * 100:  # a byte each 0.05 s
            try:
                slow.sendall(bytes([byte]))
            except ConnectionError:
                closed = True
                break
            if _closed_by_server(slow, 0.05):
                closed = True
                break
        elapsed = time.perf_counter() - started
        assert closed and 0.8 < elapsed < 2.5, elapsed


def test_a_normal_request_and_a_kept_alive_connection_still_work_under_short_timeouts(limited):
    response = httpx.post(f"{limited.url}/v1/chat/completions", headers=_auth(limited), timeout=30,
                          json={"model": BASE, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3})
    assert response.status_code == 200 and response.json()["usage"]["completion_tokens"] >= 1
    with _connect(limited) as sock:
        for _ in range(2):  # idle longer than the header timeout between them: a kept-alive connection is not a slow head
            sock.sendall(_head(limited, "GET", "/health", {}))
            status, headers, _ = _read_response(sock)
            assert status == 200 and headers.get("connection") != "close"
            time.sleep(1.5)


def test_at_the_connection_cap_an_idle_connection_makes_room_and_only_busy_ones_refuse(tmp_path):
    server = start(tmp_path, extra=["--max-connections", "2"])
    try:
        time.sleep(0.5)  # start()'s own probes are closed by now
        # Idle ones (one that never sent a byte, one kept alive after a request) never lock a client out: at the
        # cap the oldest of them is closed to make room.
        silent, kept = _connect(server), _connect(server)
        kept.sendall(_head(server, "GET", "/health", {}))
        assert _read_response(kept)[0] == 200
        with _connect(server) as newcomer:
            newcomer.sendall(_head(server, "GET", "/health", {}))
            assert _read_response(newcomer)[0] == 200
            assert _closed_by_server(silent, 2)  # the oldest idle one went
        kept.close()
        time.sleep(0.3)
        # Busy ones (each in the middle of sending its body) are never closed: a connection beyond them gets 503.
        busy = [_connect(server), _connect(server)]
        for sock in busy:
            sock.sendall(_head(server, "POST", "/v1/completions", {"Content-Length": "100",
                                                                    "Content-Type": "application/json"}) + b'{"mod')
        time.sleep(0.3)
        with _connect(server) as third:
            third.sendall(_head(server, "GET", "/health", {}))
            status, headers, body = _read_response(third)
            assert status == 503 and headers["retry-after"] == "1", (status, body)
            assert _openai_error(body)["code"] == "too_many_connections"
            assert _closed_by_server(third, 2)
        for sock in busy:  # the busy ones were kept all along: each finishes its request
            sock.sendall(b' ' * 95)
            assert _read_response(sock)[0] == 400
            sock.close()
    finally:
        server.stop()


def test_the_serve_flags_default_to_the_limits_named_once():
    args = build_parser().parse_args(["serve", "--model-dir", "m", "--deployment", "d", "--base-model", "b",
                                      "--keys", "k", "--usage", "u"])
    assert Limits(args.max_body_bytes, args.header_timeout, args.body_timeout, args.max_connections) == Limits()
    assert Limits().max_body_bytes == 4 * MiB
    with pytest.raises(ValueError, match="max_connections"):
        Limits(max_connections=0)
