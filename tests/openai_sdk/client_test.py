"""The official openai SDK against `phi4 serve` on the tiny fixture model.

Run by tests/openai_sdk.rs with PHI4_BASE_URL, PHI4_API_KEY and PHI4_MODEL set. Every check
raises on failure; the last line printed is the plain 'N passed, 0 failed' summary.
"""

import asyncio
import json
import os

import openai
from openai import AsyncOpenAI, OpenAI

BASE = os.environ["PHI4_BASE_URL"]
KEY = os.environ["PHI4_API_KEY"]
MODEL = os.environ["PHI4_MODEL"]

client = OpenAI(base_url=BASE, api_key=KEY, max_retries=0, timeout=120)

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "enum": ["Paris", "Oslo", "Lima"]},
                "unit": {"type": "string", "enum": ["c", "f"]},
            },
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {
            "type": "object",
            "properties": {"utc": {"type": "boolean"}},
            "required": ["utc"],
            "additionalProperties": False,
        },
    },
}


def user(text):
    return [{"role": "user", "content": text}]


def check_weather_call(call):
    assert call.type == "function", call
    assert call.id.startswith("call_"), call
    assert call.function.name == "get_weather", call
    args = json.loads(call.function.arguments)
    assert args["city"] in ("Paris", "Oslo", "Lima"), args
    assert args["unit"] in ("c", "f"), args
    assert set(args) == {"city", "unit"}, args


def test_models():
    ids = [m.id for m in client.models.list().data]
    assert ids == [MODEL], ids


def test_chat_and_stream_agree():
    kw = dict(model=MODEL, messages=user("Tell me a story"), temperature=0, max_tokens=20)
    whole = client.chat.completions.create(**kw)
    choice = whole.choices[0]
    assert choice.message.role == "assistant"
    assert choice.finish_reason in ("stop", "length"), choice
    assert whole.usage.completion_tokens >= 1
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + whole.usage.completion_tokens
    text, finish, usage = "", None, None
    for chunk in client.chat.completions.create(
        **kw, stream=True, stream_options={"include_usage": True}
    ):
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            text += c.delta.content or ""
            finish = c.finish_reason or finish
    assert text == (choice.message.content or ""), (text, choice.message.content)
    assert finish == choice.finish_reason
    assert usage is not None and usage.completion_tokens == whole.usage.completion_tokens


def test_sampling_is_seeded():
    kw = dict(model=MODEL, messages=user("Hi"), temperature=1.0, top_p=0.9, seed=42, max_tokens=12)
    a = client.chat.completions.create(**kw).choices[0].message.content
    b = client.chat.completions.create(**kw).choices[0].message.content
    assert a == b, (a, b)
    many = client.chat.completions.create(**kw, n=3)
    assert [c.index for c in many.choices] == [0, 1, 2]


def test_logprobs():
    r = client.chat.completions.create(
        model=MODEL, messages=user("Hi"), temperature=0, max_tokens=6, logprobs=True, top_logprobs=3
    )
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens, (len(content), r.usage)
    for t in content:
        assert t.logprob <= 0.0
        assert len(t.top_logprobs) == 3
        # Greedy: the chosen token is the most likely one.
        assert abs(t.top_logprobs[0].logprob - t.logprob) < 1e-6, t


def test_tool_choice_required_gives_a_valid_call():
    for seed, tools, parallel in [(0, [WEATHER, TIME], False), (1, [WEATHER], True), (2, [TIME], True)]:
        r = client.chat.completions.create(
            model=MODEL,
            messages=user("What is the weather in Oslo?"),
            tools=tools,
            tool_choice="required",
            parallel_tool_calls=parallel,
            seed=seed,
            max_tokens=240 if parallel else 140,
        )
        c = r.choices[0]
        assert c.finish_reason == "tool_calls", c
        assert 1 <= len(c.message.tool_calls) <= (4 if parallel else 1), c
        for call in c.message.tool_calls:
            if call.function.name == "get_time":
                assert set(json.loads(call.function.arguments)) == {"utc"}
            else:
                check_weather_call(call)


def test_named_tool_choice_streams_tool_call_deltas():
    calls, finish = {}, None
    for chunk in client.chat.completions.create(
        model=MODEL,
        messages=user("Weather please"),
        tools=[WEATHER, TIME],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        stream=True,
        seed=5,
        max_tokens=140,
    ):
        for c in chunk.choices:
            for d in c.delta.tool_calls or []:
                calls.setdefault(d.index, d)
            finish = c.finish_reason or finish
    assert finish == "tool_calls", finish
    assert calls, "no tool-call deltas"
    for call in calls.values():
        check_weather_call(call)


def test_multi_turn_tool_use():
    r = client.chat.completions.create(
        model=MODEL,
        messages=[
            {"role": "user", "content": "Weather in Lima?"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city": "Lima", "unit": "c"}'},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 19}'},
        ],
        tools=[WEATHER],
        temperature=0,
        max_tokens=8,
    )
    assert r.choices[0].finish_reason in ("stop", "length", "tool_calls")


def test_json_schema_response_format():
    schema = {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 8},
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
            "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3},
        },
        "required": ["name", "age", "tags"],
        "additionalProperties": False,
    }
    for seed in range(3):
        r = client.chat.completions.create(
            model=MODEL,
            messages=user("A person as JSON"),
            response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": schema}},
            seed=seed,
            max_tokens=200,
        )
        c = r.choices[0]
        assert c.finish_reason == "stop", c
        v = json.loads(c.message.content)
        assert set(v) == {"name", "age", "tags"}, v
        assert isinstance(v["name"], str) and len(v["name"]) <= 8, v
        assert isinstance(v["age"], int) and 0 <= v["age"] <= 120, v
        assert len(v["tags"]) <= 3 and all(t in ("a", "b") for t in v["tags"]), v
    r = client.chat.completions.create(
        model=MODEL, messages=user("JSON"), response_format={"type": "json_object"}, seed=1, max_tokens=300
    )
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(r.choices[0].message.content), dict)


def test_completions():
    r = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=5, temperature=0)
    assert r.object == "text_completion"
    assert r.usage.completion_tokens == 5 or r.choices[0].finish_reason == "stop"
    text = "".join(
        c.choices[0].text
        for c in client.completions.create(
            model=MODEL, prompt="Once upon a time", max_tokens=5, temperature=0, stream=True
        )
        if c.choices
    )
    assert text == r.choices[0].text, (text, r.choices[0].text)


def expect(exc, fn, status, code=None):
    try:
        fn()
    except exc as e:
        assert e.status_code == status, (e.status_code, e)
        body = e.body if isinstance(e.body, dict) else {}
        if code is not None:
            assert body.get("code") == code, body
        return
    raise AssertionError(f"expected {exc.__name__}")


def test_errors():
    c = client.chat.completions
    expect(openai.BadRequestError, lambda: c.create(model=MODEL, messages=user("x"), temperature=5), 400)
    expect(openai.BadRequestError, lambda: c.create(model=MODEL, messages=[]), 400)
    expect(openai.NotFoundError, lambda: c.create(model="gpt-9", messages=user("x")), 404, "model_not_found")
    expect(
        openai.BadRequestError,
        lambda: c.create(model=MODEL, messages=user("word " * 600)),
        400,
        "context_length_exceeded",
    )
    expect(
        openai.BadRequestError,
        lambda: c.create(model=MODEL, messages=user("x"), tool_choice="required"),
        400,
    )
    bad = OpenAI(base_url=BASE, api_key="sk-wrong", max_retries=0)
    expect(openai.AuthenticationError, lambda: bad.models.list(), 401, "invalid_api_key")


async def concurrent_streams():
    aclient = AsyncOpenAI(base_url=BASE, api_key=KEY, max_retries=0, timeout=300)
    prompts = [f"Request {i}: " + "lorem ipsum " * (i % 5) for i in range(32)]
    kw = dict(model=MODEL, temperature=0, max_tokens=24)
    sequential = []
    for p in prompts:
        r = client.chat.completions.create(messages=user(p), **kw)
        sequential.append(r.choices[0].message.content or "")

    async def one(p):
        text = ""
        stream = await aclient.chat.completions.create(messages=user(p), stream=True, **kw)
        async for chunk in stream:
            for c in chunk.choices:
                text += c.delta.content or ""
        return text

    results = await asyncio.gather(*(one(p) for p in prompts))
    for i, (a, b) in enumerate(zip(results, sequential)):
        assert a == b, (i, a, b)
    await aclient.close()


def test_32_concurrent_streams_equal_sequential_results():
    asyncio.run(concurrent_streams())


if __name__ == "__main__":
    import runner

    runner.run(globals(), "sdk")
