"""Every request field is applied or refused: the logits processors against a reference computation, and the
server's strict parsing through the official openai client."""

import json
import math

import httpx
import openai
import pytest
import torch
from tests.runtime.server_helpers import BASE, PIRATE, metrics_text, start

from ember.runtime.model.sampling import LogitTensors, SamplingParams, process_logits
from ember.runtime.serving.bodies import _parse
from ember.runtime.serving.errors import APIError
from ember.runtime.serving.protocol import CompletionRequest


def reference(logits: list[float], p: SamplingParams, prompt: list[int], output: list[int], ends: set[int]) -> list[float]:
    """The processors written out one token at a time, as their documentation states them."""
    out = list(logits)
    for token, bias in p.logit_bias:
        out[token] += bias
    if len(output) < p.min_tokens:
        for token in (set() if p.ignore_eos else ends) | set(p.stop_token_ids):
            out[token] = -math.inf
    for token in set(prompt) | set(output):
        out[token] = out[token] / p.repetition_penalty if out[token] > 0 else out[token] * p.repetition_penalty
    for token in set(output):
        out[token] -= p.frequency_penalty * output.count(token) + p.presence_penalty
    return out


@pytest.mark.parametrize("params", [
    SamplingParams(presence_penalty=1.5), SamplingParams(frequency_penalty=0.7), SamplingParams(frequency_penalty=-1.0),
    SamplingParams(repetition_penalty=1.3), SamplingParams(repetition_penalty=0.8),
    SamplingParams(logit_bias=((3, 100.0), (7, -50.5))), SamplingParams(min_tokens=5, stop_token_ids=(9,)),
    SamplingParams(min_tokens=5, ignore_eos=True), SamplingParams(presence_penalty=0.5, frequency_penalty=0.5,
                                                                  repetition_penalty=1.2, logit_bias=((1, 2.0),)),
], ids=lambda p: ",".join(f"{k}={v}" for k, v in vars(p).items() if v != getattr(SamplingParams(), k)))
def test_each_processor_matches_its_reference(params):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 16, generator=g)
    histories = [([1, 2, 2], [2, 5, 5, 5]), ([4], []), ([0, 3], [3, 3, 9, 1])]
    plain = SamplingParams()
    mixed = [params, plain, params]  # a free request between two that process: its row is untouched
    expected = [reference(row.tolist(), p, *h, ends={0}) for row, p, h in zip(logits, mixed, histories)]
    tensors = [LogitTensors.of(p, {0}, logits.device) for p in mixed]
    got = process_logits(logits.clone(), mixed, histories, tensors)
    assert torch.allclose(got, torch.tensor(expected), atol=1e-6)
    assert torch.equal(got[1], logits[1])


@pytest.mark.parametrize("param, value", [
    ("max_tokens", 0), ("temperature", 3.0), ("top_p", 0), ("top_k", -2), ("logprobs", 21), ("stop", [""]),
    ("presence_penalty", 2.5), ("frequency_penalty", -3), ("repetition_penalty", 0), ("min_tokens", -1),
])
def test_sampling_values_are_checked_once_at_the_edge(param, value):
    """The request model is where a sampling value is refused (SamplingParams trusts what it is built from)."""
    with pytest.raises(APIError) as info:
        _parse(json.dumps({"model": BASE, "prompt": "x", param: value}).encode(), CompletionRequest)
    assert info.value.status == 400 and info.value.param == param and info.value.message.startswith(f"{param}: ")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    server = start(tmp_path_factory.mktemp("params"))
    yield server
    server.stop()


def api(server, account="acme") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=server.keys[account], max_retries=0)


def refused(server, body: dict, path: str = "completions") -> dict:
    answer = httpx.post(f"{server.url}/v1/{path}", json={"model": BASE, **body},
                        headers={"Authorization": f"Bearer {server.keys['acme']}"})
    assert answer.status_code == 400, answer.text
    return answer.json()["error"]


GREEDY = {"temperature": 0, "max_tokens": 8}


def test_penalties_bias_and_token_limits_change_the_output(server):
    from ember.runtime.model.tokenizer import TextTokenizer

    client, prompt = api(server), "the sea the sea"
    seven = TextTokenizer.from_dir(server.model_dir).token_text(7)
    base = client.completions.create(model=PIRATE, prompt=prompt, **GREEDY)
    forced = client.completions.create(model=PIRATE, prompt=prompt, logit_bias={"7": 100}, **GREEDY)
    assert forced.choices[0].text == seven * 8 != base.choices[0].text
    penalised = client.completions.create(model=PIRATE, prompt=prompt, frequency_penalty=2.0, presence_penalty=2.0,
                                          extra_body={"repetition_penalty": 2.0}, **GREEDY)
    assert penalised.choices[0].text != base.choices[0].text
    # token 7 forced, and a stop token: the request ends at once, or after min_tokens, which keeps it out till then
    stopped = client.completions.create(model=PIRATE, prompt=prompt, logit_bias={"7": 100}, **GREEDY,
                                        extra_body={"stop_token_ids": [7]})
    assert (stopped.usage.completion_tokens, stopped.choices[0].finish_reason) == (1, "stop")
    held = client.completions.create(model=PIRATE, prompt=prompt, logit_bias={"7": 100}, **GREEDY,
                                     extra_body={"stop_token_ids": [7], "min_tokens": 3})
    assert (held.usage.completion_tokens, held.choices[0].finish_reason) == (4, "stop")
    assert seven not in held.choices[0].text[:1]


def test_null_means_the_default_and_disabled_top_k_is_accepted(server):
    answer = httpx.post(f"{server.url}/v1/completions", json={
        "model": BASE, "prompt": "hello", "max_tokens": 4, "temperature": None, "top_p": None, "n": None,
        "stream": None, "logprobs": None, "top_k": -1, "echo": None, "seed": None, "stop": None},
        headers={"Authorization": f"Bearer {server.keys['acme']}"})
    assert answer.status_code == 200, answer.text


@pytest.mark.parametrize("body, param", [
    ({"prompt": "x", "tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ({"prompt": "x", "response_format": {"type": "xml"}}, "response_format.type"),
    ({"prompt": "x", "best_of": 2}, "best_of"),
    ({"prompt": "x", "frequency_penalty": "abc"}, "frequency_penalty"),
    ({"prompt": "x", "temperature": "0.5"}, "temperature"),
    ({"prompt": "x", "stream": "yes"}, "stream"),
    ({"prompt": "x", "max_tokens": 2.0}, "max_tokens"),
    ({"prompt": "x", "logit_bias": {"seven": 1}}, "logit_bias"),
    ({"prompt": "x", "logit_bias": {"7": 101}}, "logit_bias"),
    ({"prompt": "x", "stream_options": {"include_usage": True}}, "stream_options"),
    ({"prompt": "x", "presence_penalty": 3}, "presence_penalty"),
])
def test_what_is_not_applied_is_refused_by_name(server, body, param):
    error = refused(server, body)
    assert error["param"] == param and error["message"].startswith(f"{param}: "), error


def test_chat_refuses_images_and_top_logprobs_alone(server):
    image = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x"}}]}]}
    assert refused(server, image, "chat/completions")["param"] == "messages.0.content"
    alone = {"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}
    assert refused(server, alone, "chat/completions")["param"] == "top_logprobs"
    text_parts = api(server).chat.completions.create(model=BASE, max_tokens=3, temperature=0, messages=[
        {"role": "user", "content": [{"type": "text", "text": "hello"}]}], user="user-123")
    assert text_parts.usage.completion_tokens >= 1


def test_conformance_of_errors_and_model_lookup(server):
    client = api(server)
    with pytest.raises(openai.NotFoundError) as missing:
        client.completions.create(model="accounts/acme/models/nope", prompt="x", max_tokens=2)
    assert missing.value.body["code"] == "model_not_found"
    assert client.models.retrieve(BASE).id == BASE
    pirate = httpx.get(f"{server.url}/v1/models/{PIRATE}", headers={"Authorization": f"Bearer {server.keys['acme']}"})
    assert pirate.json()["parent"] == BASE
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("accounts/acme/models/nope")
    wrong_method = httpx.put(f"{server.url}/v1/completions", headers={"Authorization": f"Bearer {server.keys['acme']}"})
    assert wrong_method.status_code == 405 and wrong_method.json()["error"]["code"] == "method_not_allowed"
    for body, param in (({"prompt": [1, 10**9], "stream": True}, "prompt"), ({"prompt": "x", "logit_bias": {"999999": 1}},
                        "logit_bias"), ({"prompt": "x", "stop_token_ids": [10**6]}, "stop_token_ids")):
        error = refused(server, body)
        assert error["param"] == param and "outside this model's vocabulary" in error["message"]


def test_a_client_that_leaves_a_non_streaming_request_aborts_it(server):
    from tests.runtime.server_helpers import usage_records

    before = len(usage_records(server))
    with pytest.raises(httpx.TimeoutException):
        httpx.post(f"{server.url}/v1/completions", timeout=0.2, headers={"Authorization": f"Bearer {server.keys['acme']}"},
                   json={"model": BASE, "prompt": "x", "max_tokens": 480, "ignore_eos": True, "n": 16})
    import time

    deadline = time.time() + 20
    while len(usage_records(server)) == before and time.time() < deadline:
        time.sleep(0.2)
    last = usage_records(server)[-1]
    assert last["status"] == "aborted" and last["completion_tokens"] < 16 * 480, last


def test_the_text_is_what_the_tokens_decode_to(server):
    """A character cut by max_tokens keeps its bytes (as U+FFFD) in the final text, streamed or not."""
    from ember.runtime.model.tokenizer import TextTokenizer

    tokenizer = TextTokenizer.from_dir(server.model_dir)
    rocket = tokenizer.encode("🚀", add_special_tokens=False)
    assert len(rocket) > 1  # a byte-level vocabulary spells it in several tokens
    client = api(server)
    bias = {str(rocket[0]): 100}
    whole = client.completions.create(model=BASE, prompt="x", max_tokens=1, temperature=0, logit_bias=bias)
    assert whole.choices[0].text == tokenizer.decode(rocket[:1]) == "\ufffd"
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=BASE, prompt="x", max_tokens=1, temperature=0, logit_bias=bias, stream=True) if c.choices)
    assert streamed == "\ufffd"


def test_completion_logprobs_carry_offsets_and_the_sampled_token(server):
    out = api(server).completions.create(model=BASE, prompt="the sea", max_tokens=5, temperature=0, logprobs=0)
    logprobs = out.choices[0].logprobs
    assert logprobs.text_offset == [sum(map(len, logprobs.tokens[:i])) for i in range(len(logprobs.tokens))]
    assert all(list(top) == [token] for top, token in zip(logprobs.top_logprobs, logprobs.tokens))
    assert "".join(logprobs.tokens) == out.choices[0].text


SCHEMA = {"type": "object", "properties": {"answer": {"type": "boolean"}, "mood": {"enum": ["calm", "stormy"]}},
          "required": ["answer", "mood"], "additionalProperties": False}
# A random model would write a free-form object's strings forever: the tiny model's schemas leave it no free text.
COUNT = {"type": "object", "properties": {"n": {"enum": [1, 2, 3]}, "ok": {"type": "boolean"}},
         "required": ["n", "ok"], "additionalProperties": False}


def test_structured_outputs_parse_and_validate_beside_free_requests(server):
    """Even a tiny random model writes valid JSON under the grammar, with an addon or not; free requests in the
    same batch are untouched."""
    import concurrent.futures
    import json

    import jsonschema

    client = api(server)
    free_alone = client.completions.create(model=BASE, prompt="free", **GREEDY).choices[0].text

    def constrained(i: int) -> str:
        schema = SCHEMA if i % 2 else COUNT
        fmt = {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}}
        return client.chat.completions.create(model=PIRATE if i % 3 else BASE, max_tokens=120, seed=i,
                                              messages=[{"role": "user", "content": f"weather {i}"}],
                                              response_format=fmt).choices[0].message.content

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(constrained, i) for i in range(12)]
        free = [pool.submit(lambda: client.completions.create(model=BASE, prompt="free", **GREEDY).choices[0].text)
                for _ in range(4)]
        outputs = [f.result() for f in futures]
    for i, text in enumerate(outputs):
        jsonschema.validate(json.loads(text), SCHEMA if i % 2 else COUNT)
    assert [f.result() for f in free] == [free_alone] * 4


def test_an_invalid_schema_is_refused_naming_where(server):
    bad = {"type": "object", "properties": {"x": {"type": "not-a-type"}}}
    error = refused(server, {"prompt": "x", "response_format": {"type": "json_schema",
                                                                 "json_schema": {"name": "n", "schema": bad}}})
    assert error["param"].startswith("response_format.json_schema") and "/properties/x/type" in error["message"]
    error = refused(server, {"prompt": "x", "response_format": {"type": "json_schema"}})
    assert error["param"] == "response_format" and "json_schema" in error["message"]


def test_metrics_a_vllm_user_looks_for(server):
    client = api(server)
    client.completions.create(model=BASE, prompt="metrics", max_tokens=6, temperature=0, extra_body={"ignore_eos": True})
    refused(server, {"prompt": "x", "temperature": "hot"})
    text = metrics_text(server)
    assert 'ember_request_finished_total{model="accounts/acme/models/tiny-llama",reason="length"}' in text
    assert 'ember_requests_total{model="",status="400"}' in text
    assert "ember_time_per_output_token_seconds_count" in text
    usage = [line for line in text.splitlines() if line.startswith("ember_kv_cache_usage_ratio ")]
    assert usage and 0 <= float(usage[0].split()[1]) <= 1
    assert any(line.startswith("ember_preemptions ") for line in text.splitlines())


def test_usage_records_carry_the_response_id_in_the_deployments_folder(server):
    from tests.runtime.server_helpers import usage_records

    out = api(server).completions.create(model=BASE, prompt="bill me", max_tokens=2, temperature=0, user="end-user-7")
    assert (usage_records(server)[-1]["response_id"], usage_records(server)[-1]["user"]) == (out.id, "end-user-7")
    folders = {p.parent.relative_to(server.root).as_posix() for p in server.root.rglob("requests-*.jsonl")}
    assert folders == {"usage/accounts_acme_deployments_tiny"}  # usage/<deployment>/, not usage/usage/…


def test_a_batch_of_prompts_and_echo(server):
    client = api(server)
    single = [client.completions.create(model=BASE, prompt=p, max_tokens=4, temperature=0).choices[0].text
              for p in ("the sea", "a ship")]
    batch = client.completions.create(model=BASE, prompt=["the sea", "a ship"], max_tokens=4, temperature=0, n=2)
    assert [c.index for c in batch.choices] == [0, 1, 2, 3]
    assert [c.text for c in batch.choices] == [single[0], single[0], single[1], single[1]]
    ids = client.completions.create(model=BASE, prompt=[[1, 40, 41], [1, 50]], max_tokens=2, temperature=0)
    assert len(ids.choices) == 2 and ids.usage.prompt_tokens == 5
    echoed = client.completions.create(model=BASE, prompt="the sea", max_tokens=4, temperature=0, echo=True)
    assert echoed.choices[0].text == "the sea" + single[0]
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=BASE, prompt="the sea", max_tokens=4, temperature=0, echo=True, stream=True) if c.choices)
    assert streamed == "the sea" + single[0]
    assert refused(server, {"prompt": "x", "echo": True, "logprobs": 1})["param"] == "echo"
    assert refused(server, {"prompt": ["x", ""]})["param"] == "prompt"


WEATHER_TOOL = {"type": "function", "function": {  # short: the tiny model's context is 512 tokens
    "name": "get_weather",
    "parameters": {"type": "object", "properties": {"city": {"enum": ["Paris", "Oslo"]}, "celsius": {"type": "boolean"}},
                   "required": ["city", "celsius"], "additionalProperties": False}}}
TIME_TOOL = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"],
    "additionalProperties": False}}}
ASK = [{"role": "user", "content": "Weather in Paris?"}]


def test_a_required_tool_call_round_trip_streamed_and_not(server):
    import json

    import jsonschema

    client = api(server)
    for stream in (False, True):
        kwargs = {"model": PIRATE, "messages": ASK, "tools": [WEATHER_TOOL, TIME_TOOL], "tool_choice": "required",
                  "max_tokens": 60, "seed": 3}
        if stream:
            calls, finish = {}, None
            for chunk in client.chat.completions.create(stream=True, **kwargs):
                for choice in chunk.choices:
                    finish = choice.finish_reason or finish
                    for delta in choice.delta.tool_calls or ():
                        entry = calls.setdefault(delta.index, {"id": delta.id, "name": "", "arguments": ""})
                        entry["name"] += delta.function.name or ""
                        entry["arguments"] += delta.function.arguments or ""
            calls = [calls[k] for k in sorted(calls)]
        else:
            answer = client.chat.completions.create(**kwargs)
            finish = answer.choices[0].finish_reason
            calls = [{"id": c.id, "name": c.function.name, "arguments": c.function.arguments}
                     for c in answer.choices[0].message.tool_calls]
        assert finish == "tool_calls" and calls, (stream, calls)
        schemas = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER_TOOL, TIME_TOOL)}
        for c in calls:
            jsonschema.validate(json.loads(c["arguments"]), schemas[c["name"]])
        # the round trip: the calls and their results go back, and the model answers
        history = ASK + [{"role": "assistant", "content": None, "tool_calls": [
            {"id": c["id"], "type": "function", "function": {"name": c["name"], "arguments": c["arguments"]}}
            for c in calls]}] + [{"role": "tool", "tool_call_id": c["id"], "content": '{"sky": "clear"}'}
                                 for c in calls]
        final = client.chat.completions.create(model=PIRATE, messages=history, tools=[WEATHER_TOOL], max_tokens=8)
        assert final.choices[0].finish_reason in ("stop", "length", "tool_calls")


def test_the_clients_pydantic_tool_helpers(server):
    from typing import Literal

    import openai
    from pydantic import BaseModel

    class GetWeather(BaseModel):
        city: Literal["Paris", "Oslo"]
        celsius: bool

    tool = openai.pydantic_function_tool(GetWeather)
    parsed = api(server).chat.completions.parse(model=BASE, messages=ASK, tools=[tool], max_tokens=80,
                                                tool_choice={"type": "function", "function": {"name": "GetWeather"}})
    [call] = parsed.choices[0].message.tool_calls
    assert isinstance(call.function.parsed_arguments, GetWeather)


def test_tool_choice_none_answers_in_text_and_bad_tools_are_refused(server):
    plain = api(server).chat.completions.create(model=BASE, messages=ASK, tools=[WEATHER_TOOL], tool_choice="none",
                                                max_tokens=4)
    assert plain.choices[0].message.tool_calls is None and plain.choices[0].finish_reason in ("stop", "length")
    chat = "chat/completions"
    named = {"type": "function", "function": {"name": "nope"}}
    assert refused(server, {"messages": ASK, "tools": [WEATHER_TOOL], "tool_choice": named}, chat)["param"] == \
        "tool_choice"
    assert refused(server, {"messages": ASK, "tool_choice": "required"}, chat)["param"] == "tool_choice"
    broken = {"type": "function", "function": {"name": "f", "parameters": {"type": "object",
                                                                           "required": "city"}}}
    error = refused(server, {"messages": ASK, "tools": [broken]}, chat)
    assert error["param"].startswith("tools.0.function.parameters") and "/required" in error["message"]


def test_auto_tool_calls_are_parsed_out_of_the_text():
    from ember.runtime.serving.protocol import ToolDef
    from ember.runtime.serving.tools import ToolUse

    uses = ToolUse([ToolDef.model_validate(WEATHER_TOOL)])
    content, calls = uses.parse('Let me look. <tool_call>{"name": "get_weather", "arguments": {"city": "Oslo", '
                                '"celsius": true}}</tool_call> <tool_call>{"name": "other", "arguments": {}}</tool_call>')
    assert [c["function"]["name"] for c in calls] == ["get_weather"]
    assert content == 'Let me look.  <tool_call>{"name": "other", "arguments": {}}</tool_call>'
    assert uses.parse("no calls here") == ("no calls here", [])


def test_logprobs_carry_the_real_bytes_of_a_partial_character(server):
    from ember.runtime.model.tokenizer import TextTokenizer

    rocket = TextTokenizer.from_dir(server.model_dir).encode("🚀", add_special_tokens=False)
    out = api(server).chat.completions.create(model=BASE, messages=ASK, max_tokens=1, temperature=0, logprobs=True,
                                              logit_bias={str(rocket[0]): 100})
    [token] = out.choices[0].logprobs.content
    assert token.token == "\ufffd" and bytes(token.bytes) and "🚀".encode().startswith(bytes(token.bytes))
