"""Malformed or contradictory request fields get a 400 naming the parameter, never a 500 and never silent
acceptance: logit_bias keys that are not plain token ids, schemas nested past any use, seeds torch cannot take,
min_tokens above max_tokens, tool messages without their call, a final assistant message that cannot be
continued. No error message echoes the request's text."""

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tests.runtime.server_helpers import BASE, start

from ember.runtime.devtools import tinymodels
from ember.runtime.model.tokenizer import TextTokenizer

SECRET = "the secret ship sails"  # request text that must never come back in an error
CHAT = "chat/completions"
ASK = [{"role": "user", "content": SECRET}]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    server = start(tmp_path_factory.mktemp("hardening"))
    yield server
    server.stop()


def post(server, body: dict, path: str) -> httpx.Response:
    return httpx.post(f"{server.url}/v1/{path}", json={"model": BASE, **body}, timeout=60,
                      headers={"Authorization": f"Bearer {server.keys['acme']}"})


def nested(depth: int, shape: str = "items") -> dict:
    """A schema `depth` levels deep: arrays of arrays, or allOf inside allOf (two JSON levels each: the body's JSON
    parser itself refuses nesting past 200, a case of its own)."""
    schema = {"type": "string"}
    for _ in range(depth):
        schema = {"type": "array", "items": schema} if shape == "items" else {"allOf": [schema]}
    return schema


def schema_format(schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "deep", "schema": schema}}


def tool(parameters: dict) -> dict:
    return {"type": "function", "function": {"name": "f", "parameters": parameters}}


# Draft 3's `required` is a boolean where later drafts have a list (it crashed the grammar builder: a 500)
DRAFT_3 = {"$schema": "http://json-schema.org/draft-03/schema#", "type": "object", "required": True}
CALL = {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}


def answered(arguments: str = "{}") -> list[dict]:
    """A conversation whose assistant called a tool, with the call's result."""
    call = {**CALL, "function": {"name": "f", "arguments": arguments}}
    return ASK + [{"role": "assistant", "tool_calls": [call]},
                  {"role": "tool", "tool_call_id": "call_1", "content": "{}"}]

REFUSED = {
    "superscript digit key": ({"prompt": SECRET, "logit_bias": {"²": 1}}, "completions", "logit_bias"),
    "arabic-indic digit key": ({"prompt": SECRET, "logit_bias": {"٣": 1}}, "completions", "logit_bias"),
    "5000-digit key": ({"prompt": SECRET, "logit_bias": {"1" * 5000: 1}}, "completions", "logit_bias"),
    "keys aliasing one token": ({"prompt": SECRET, "logit_bias": {"5": 1, "05": 2, "005": 3}}, "completions",
                                "logit_bias"),
    "120 nested arrays in response_format": ({"messages": ASK, "response_format": schema_format(nested(120))}, CHAT,
                                             "response_format.json_schema.schema"),
    "90 nested allOf in response_format": ({"prompt": SECRET, "response_format": schema_format(nested(90, "allOf"))},
                                           "completions", "response_format.json_schema.schema"),
    "120 nested arrays in a tool": ({"messages": ASK, "tools": [tool(nested(120))]}, CHAT,
                                    "tools.0.function.parameters"),
    "90 nested allOf in a tool": ({"messages": ASK, "tools": [tool(nested(90, "allOf"))]}, CHAT,
                                   "tools.0.function.parameters"),
    "seed 2**64": ({"prompt": SECRET, "seed": 2**64}, "completions", "seed"),
    "seed below -2**63": ({"prompt": SECRET, "seed": -2**63 - 1}, "completions", "seed"),
    "seed + n past 2**64": ({"prompt": SECRET, "seed": 2**64 - 1, "n": 2}, "completions", "seed"),
    "min_tokens above max_tokens": ({"prompt": SECRET, "max_tokens": 4, "min_tokens": 5}, "completions", "min_tokens"),
    "min_tokens above max_completion_tokens": ({"messages": ASK, "max_completion_tokens": 4, "min_tokens": 5}, CHAT,
                                               "min_tokens"),
    "min_tokens above max_completion_tokens, max_tokens higher": (
        {"messages": ASK, "max_completion_tokens": 4, "max_tokens": 50, "min_tokens": 5}, CHAT, "min_tokens"),
    "tool message without tool_call_id": (
        {"messages": ASK + [{"role": "assistant", "tool_calls": [CALL]}, {"role": "tool", "content": SECRET}]}, CHAT,
        "messages.2.tool_call_id"),
    "tool call arguments not JSON": ({"messages": answered(SECRET)}, CHAT,
                                     "messages.1.tool_calls.0.function.arguments"),
    "tool call arguments 100,000 arrays deep": ({"messages": answered("[" * 100_000)}, CHAT,
                                                "messages.1.tool_calls.0.function.arguments"),
    "a draft-03 schema": ({"messages": ASK, "response_format": schema_format(DRAFT_3)}, CHAT,
                          "response_format.json_schema.schema"),
    "a draft-03 schema in a tool": ({"messages": ASK, "tools": [tool(DRAFT_3)], "tool_choice": "required"}, CHAT,
                                    "tools.0.function.parameters"),
    "tools whose schemas are too big together": ({"messages": ASK, "tools": [tool({"anyOf": [{}] * 2000})] * 3},
                                                 CHAT, "tools"),
    "a content part whose type is text": ({"messages": [{"role": "user", "content": [{"type": SECRET}]}]}, CHAT,
                                          "messages.0.content"),
    "tool_choice naming no tool": ({"messages": ASK, "tools": [tool({"type": "object"})],
                                    "tool_choice": {"type": "function", "function": {"name": SECRET}}}, CHAT,
                                   "tool_choice"),
    "final assistant tool calls": ({"messages": ASK + [{"role": "assistant", "content": SECRET, "tool_calls": [CALL]}],
                                    "tools": [tool({"type": "object"})]}, CHAT, "messages"),
}


@pytest.mark.parametrize("body, path, param", REFUSED.values(), ids=REFUSED.keys())
def test_a_malformed_or_contradictory_field_is_a_400_naming_it(server, body, path, param):
    answer = post(server, body, path)
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert error["param"] == param and error["message"].startswith(f"{param}: "), error
    assert SECRET not in error["message"] and len(error["message"]) < 500, error  # no echo of text or huge keys
    assert server.process.poll() is None


def test_what_stays_accepted_at_the_edges(server):
    """The refusals stop where the problems stop: the largest seed torch takes, a negative one, min_tokens equal to
    max_tokens, or above a max_tokens the caller did not give (the default is a ceiling, not a request), a schema
    nested as deep as real ones are."""
    ok = [{"prompt": "x", "max_tokens": 1, "seed": 2**64 - 1}, {"prompt": "x", "max_tokens": 1, "seed": -2**63},
          {"prompt": "x", "max_tokens": 3, "min_tokens": 3}, {"prompt": "x", "min_tokens": 20},
          {"prompt": "x", "max_tokens": 1, "logit_bias": {"0": 1, "7": -1}},
          {"prompt": "x", "max_tokens": 1, "response_format": schema_format(nested(30))}]
    for body in ok:
        assert post(server, body, "completions").status_code == 200, body
    assert post(server, {"messages": answered(), "max_tokens": 1}, CHAT).status_code == 200


def test_a_final_assistant_message_is_continued(server):
    """A conversation that ends with the assistant's message asks for its continuation (vLLM's
    continue_final_message, a prefill): the prompt ends with that message's text, its turn left open."""
    tokenizer = TextTokenizer.from_dir(server.model_dir)
    messages = ASK + [{"role": "assistant", "content": "Blue sky, red"}]
    prompt = tokenizer.encode(tokenizer.render_chat(ASK) + "Blue sky, red", add_special_tokens=False)
    greedy = {"max_tokens": 6, "temperature": 0, "ignore_eos": True}
    chat = post(server, {"messages": messages, **greedy}, CHAT).json()
    assert chat["usage"]["prompt_tokens"] == len(prompt), chat
    completion = post(server, {"prompt": prompt, **greedy}, "completions").json()
    assert chat["choices"][0]["message"]["content"] == completion["choices"][0]["text"]


CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
# Qwen3's shape: an assistant turn's reasoning is dropped when the conversation is rendered again
DROPS_REASONING = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' }}"
                   "{{ m['content'].split('</think>')[-1] if m['role'] == 'assistant' else m['content'] }}"
                   "{{ '<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
                   "{% endif %}")


def test_continuing_is_cut_at_the_message_and_refused_where_the_template_rewrites_it(tiny_model):
    base = TextTokenizer.from_dir(tiny_model)
    chatml = TextTokenizer(base.tokenizer, {}, CHATML)
    # "d" is also in the template's own "<|im_end|>": the cut is after the message, not at the last "d"
    rendered = chatml.render_chat(ASK + [{"role": "assistant", "content": "d"}], continue_final_message=True)
    assert rendered == f"<|im_start|>user\n{SECRET}<|im_end|>\n<|im_start|>assistant\nd"
    trimmed = TextTokenizer(base.tokenizer, {}, tinymodels.CHAT_TEMPLATE)  # trims each message
    assert trimmed.render_chat(ASK + [{"role": "assistant", "content": "  so "}], continue_final_message=True) \
        .endswith("<|end_header_id|>\n\nso ")
    transformers = pytest.importorskip("transformers")
    theirs = transformers.AutoTokenizer.from_pretrained(tiny_model)
    for last in ("Blue sky, red", "d"):
        messages = ASK + [{"role": "assistant", "content": last}]
        assert base.render_chat(messages, continue_final_message=True) == theirs.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=False, continue_final_message=True)
    dropping = TextTokenizer(base.tokenizer, {}, DROPS_REASONING)
    with pytest.raises(ValueError, match="^messages: .*cannot continue") as refused:
        dropping.render_chat(ASK + [{"role": "assistant", "content": "<think>hm</think>It is"}],
                             continue_final_message=True)
    assert SECRET not in str(refused.value) and "It is" not in str(refused.value)


HUGE = st.integers(min_value=10**19, max_value=10**300)
KEYS = st.one_of(st.text(st.characters(categories=["Nd", "No"]), min_size=1, max_size=8),
                 st.integers(0, 10**6).map(str), st.integers(0, 300).map(lambda n: "0" * n + "7"),
                 HUGE.map(str))
SCHEMAS = st.one_of(st.builds(nested, st.integers(0, 190)), st.builds(nested, st.integers(0, 95), st.just("allOf")))


@st.composite
def adversarial(draw) -> tuple[dict, str]:
    body = {"max_tokens": draw(st.integers(1, 3)), "min_tokens": draw(st.integers(0, 4))}
    if draw(st.booleans()):
        body["seed"] = draw(st.one_of(st.integers(-2**64, 2**65), HUGE, HUGE.map(lambda n: -n)))
    if draw(st.booleans()):
        body["logit_bias"] = draw(st.dictionaries(KEYS, st.floats(-100, 100), max_size=4))
    if draw(st.booleans()):
        schema = draw(SCHEMAS)
        if draw(st.booleans()):
            return body | {"messages": ASK, "tools": [tool(schema)], "tool_choice": "required"}, CHAT
        body["response_format"] = schema_format(schema)
    return body | {"prompt": SECRET}, "completions"


def test_no_adversarial_shape_is_a_server_error(server):
    @given(adversarial())
    @settings(max_examples=60, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    def check(case):
        body, path = case
        answer = post(server, body, path)
        assert answer.status_code in (200, 400), (answer.status_code, answer.text[:300])
        if answer.status_code == 400:
            assert (answer.json()["error"]["param"] or "").split(".")[0] in body, answer.text

    check()
    assert server.process.poll() is None


def test_a_body_pydantic_cannot_read_and_a_client_leaving_mid_body_are_answered_cleanly(server):
    import socket

    lone_surrogate = f'{{"model": "{BASE}", "prompt": "\\ud800"}}'
    answer = httpx.post(f"{server.url}/v1/completions", content=lone_surrogate, timeout=30,
                        headers={"Authorization": f"Bearer {server.keys['acme']}", "Content-Type": "application/json"})
    assert answer.status_code == 400 and answer.json()["error"]["code"] == "invalid_json", answer.text
    assert answer.json()["error"]["param"] is None
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=5) as sock:  # says 100 bytes, sends 8, leaves
        sock.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {server.keys['acme']}\r\n"
                     f"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{{\"model\"".encode())
        sock.shutdown(socket.SHUT_WR)
        sock.settimeout(5)
        assert sock.recv(65536) == b""  # no answer to a client that is gone, and no crash
    assert "Exception in ASGI application" not in server.log.read_text()
