"""Structured output through the server, with the official clients against a live server: OpenAI `response_format`
(json_object, json_schema) on /v1/chat/completions and /v1/completions, Ollama `format` ("json", a schema) on
/api/chat and /api/generate, streamed and not; requests with different schemas decoded together in one batch (each
row its own matcher) each get their own schema; an answer cut by max_tokens says finish_reason "length"; bad
formats and schemas get a 400 naming the problem (never a 5xx) and the server keeps serving."""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import sys
import threading

import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed (make install-dev)")
pytest.importorskip("uvicorn", reason="the serve extra is not installed (make install-dev)")
httpx = pytest.importorskip("httpx", reason="httpx is not installed (make install-dev)")
openai = pytest.importorskip("openai", reason="the openai client is not installed (make install-dev)")
ollama = pytest.importorskip("ollama", reason="the ollama client is not installed (make install-dev)")
jsonschema = pytest.importorskip("jsonschema", reason="jsonschema is not installed (make install-dev)")

import vlmkit  # noqa: E402
from test_serve import LIMITS, LiveServer  # noqa: E402
from test_structured_output import PERSON  # noqa: E402
from vlmkit.serve import create_app  # noqa: E402

MODEL = "tiny-llava"
SHAPES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "shapes.png")
BUDGET = 160
COLOR = {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]}}, "required": ["color"],
         "additionalProperties": False}
POINT = {"type": "object", "properties": {"x": {"type": "integer", "minimum": -9, "maximum": 9},
                                          "y": {"type": "number", "minimum": 0, "maximum": 1, "multipleOf": 0.125}},
         "required": ["x", "y"], "additionalProperties": False}
LIST = {"type": "object", "properties": {"items": {"type": "array", "minItems": 2, "maxItems": 4,
                                                   "items": {"type": "boolean"}}},
        "required": ["items"], "additionalProperties": False}


@pytest.fixture(scope="module")
def app(hf_checkpoint_dir):
    # batch_wait_ms: requests sent together start together, so the batch test sees one decode batch.
    return create_app(vlmkit.load(hf_checkpoint_dir("llava")), model_name=MODEL, limits=LIMITS, max_batch=4,
                      queue_limit=16, batch_wait_ms=300, max_tokens_limit=200, ui=False)


@pytest.fixture(scope="module")
def server(app):
    with LiveServer(app) as live:
        yield live


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def ollama_client(server):
    return ollama.Client(host=server.url, timeout=120)


def schema_format(schema: dict, name: str = "answer") -> dict:
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}


def valid(text: str, schema: dict) -> dict:
    value = json.loads(text)
    jsonschema.validate(value, schema)
    return value


def object_or_cut(text: str, finish_reason: str) -> None:
    """Any JSON object: random weights may never close a free string, so a "length" answer is only its start."""
    assert text.startswith("{")
    if finish_reason != "length":
        assert isinstance(json.loads(text), dict)


def chat(client, schema=None, stream=False, max_tokens=BUDGET, fmt=None, **kw):
    fmt = fmt or schema_format(schema)
    return client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Describe someone."}],
                                          response_format=fmt, max_tokens=max_tokens, stream=stream, **kw)


def test_openai_chat_json_schema_and_json_object(client):
    r = chat(client, PERSON)
    assert r.choices[0].finish_reason == "stop"
    valid(r.choices[0].message.content, PERSON)
    anything = chat(client, fmt={"type": "json_object"}, temperature=1.0, seed=5)
    object_or_cut(anything.choices[0].message.content, anything.choices[0].finish_reason)

    chunks = list(chat(client, PERSON, stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == r.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["stop"]


def test_openai_completions_response_format(client):
    kw = dict(model=MODEL, prompt="A point:", max_tokens=BUDGET, extra_body={"response_format": schema_format(POINT)})
    r = client.completions.create(**kw)
    valid(r.choices[0].text, POINT)
    streamed = "".join(c.choices[0].text for c in client.completions.create(**kw, stream=True) if c.choices)
    assert streamed == r.choices[0].text


def test_max_tokens_before_the_json_closes_is_length(client):
    r = chat(client, PERSON, max_tokens=5)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 5
    with pytest.raises(json.JSONDecodeError):
        json.loads(r.choices[0].message.content)
    chunks = list(chat(client, PERSON, stream=True, max_tokens=5))
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]


def test_concurrent_requests_with_different_schemas_share_a_batch(app, client):
    schemas = [PERSON, COLOR, POINT, LIST]
    answers, errors = [None] * len(schemas), []

    def ask(i):
        try:
            answers[i] = chat(client, schemas[i], temperature=1.2, seed=i).choices[0].message.content
        except Exception as e:  # noqa: BLE001 -- reported below
            errors.append(e)

    before = app.state.batcher.stats["max_batch_seen"]
    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(schemas))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    for text, schema in zip(answers, schemas):
        valid(text, schema)
    assert max(before, app.state.batcher.stats["max_batch_seen"]) >= 3


def test_ollama_client_format_json_and_schema(ollama_client):
    r = ollama_client.chat(model=MODEL, messages=[{"role": "user", "content": "Describe someone."}], format=PERSON,
                           options={"num_predict": BUDGET})
    valid(r.message.content, PERSON)
    assert r.done and r.done_reason == "stop"
    anything = ollama_client.chat(model=MODEL, messages=[{"role": "user", "content": "JSON please"}], format="json",
                                  options={"num_predict": BUDGET, "temperature": 0.8, "seed": 2})
    object_or_cut(anything.message.content, anything.done_reason)

    pieces = list(ollama_client.generate(model=MODEL, prompt="A color?", format=COLOR, stream=True,
                                         options={"num_predict": BUDGET}))
    assert pieces[-1].done and pieces[-1].done_reason == "stop"
    valid("".join(p.response for p in pieces), COLOR)
    one = ollama_client.generate(model=MODEL, prompt="A color?", format=COLOR, options={"num_predict": BUDGET})
    assert one.response == "".join(p.response for p in pieces)
    cut = ollama_client.generate(model=MODEL, prompt="A color?", format=PERSON, options={"num_predict": 4})
    assert cut.done_reason == "length"


@pytest.mark.parametrize("response_format, message", [
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strange"}}}, "invalid JSON schema"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "string", "pattern": "(a"}}},
     "invalid JSON schema"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "required": 5}}},
     "invalid JSON schema"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": [1, 2]}}, "must be a JSON schema object"),
    ({"type": "json_schema", "json_schema": "nope"}, "response_format.json_schema' must be an object"),
    ({"type": "json_schema", "json_schema": {"name": 3, "schema": {}}}, "name' must be a string"),
    ({"type": "xml"}, "must be 'text', 'json_object' or 'json_schema'"),
    ("json", "'response_format' must be an object"),
])
def test_openai_bad_formats_are_400(client, response_format, message):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=4,
                                       response_format=response_format)
    assert e.value.status_code == 400 and message in e.value.message
    assert e.value.body["param"].startswith("response_format")


def test_ollama_bad_formats_are_400_and_the_server_keeps_serving(server, ollama_client, client):
    for fmt, message in [({"type": "strange"}, "invalid JSON schema"),
                         ({"type": "object", "properties": {"a": {"$ref": "#/nowhere"}}}, "invalid JSON schema")]:
        with pytest.raises(ollama.ResponseError) as e:
            ollama_client.chat(model=MODEL, messages=[{"role": "user", "content": "x"}], format=fmt)
        assert e.value.status_code == 400 and message in e.value.error, e.value.error
    for fmt in ("yaml", 5):  # the client refuses these itself
        r = httpx.post(server.url + "/api/generate", json={"model": MODEL, "prompt": "x", "format": fmt})
        assert r.status_code == 400 and "'format' must be \"json\" or a JSON schema object" in r.json()["error"]
    r = httpx.post(server.url + "/v1/chat/completions", json={
        "model": MODEL, "messages": [{"role": "user", "content": "x"}], "ignore_eos": True,
        "response_format": {"type": "json_object"}})
    assert r.status_code == 400 and "ignore_eos" in r.json()["error"]["message"]
    assert chat(client, COLOR).choices[0].finish_reason == "stop"



def test_vllm_guided_fields(client):
    """vLLM's extra fields (`extra_body` in the openai client): guided_json (a schema, or its JSON text),
    guided_regex, guided_choice, and the newer structured_outputs object, on both OpenAI routes."""
    ask = dict(model=MODEL, messages=[{"role": "user", "content": "Describe someone."}], max_tokens=BUDGET)
    valid(client.chat.completions.create(**ask, extra_body={"guided_json": PERSON}).choices[0].message.content, PERSON)
    text = client.chat.completions.create(**ask, extra_body={"guided_json": json.dumps(POINT)}).choices[0].message
    valid(text.content, POINT)
    choices = ["cat", "dog", 'a "quoted" ünïcode ✓', "new\nline"]
    for body in ({"guided_choice": choices}, {"structured_outputs": {"choice": choices}}):
        assert client.chat.completions.create(**ask, extra_body=body).choices[0].message.content in choices
    for body in ({"guided_regex": "[0-9]{3}-[a-z]{2}"}, {"structured_outputs": {"regex": "[0-9]{3}-[a-z]{2}"}}):
        r = client.completions.create(model=MODEL, prompt="A code:", max_tokens=BUDGET, extra_body=body)
        assert re.fullmatch("[0-9]{3}-[a-z]{2}", r.choices[0].text), r.choices[0].text


@pytest.mark.parametrize("body, param, message", [
    ({"guided_choice": []}, "guided_choice", "non-empty list of non-empty strings"),
    ({"guided_choice": ["a", 3]}, "guided_choice", "non-empty list of non-empty strings"),
    ({"guided_json": "{not json"}, "guided_json", "is not valid JSON"),
    ({"guided_json": [1]}, "guided_json", "must be a JSON schema object"),
    ({"guided_json": {"type": "strange"}}, "guided_json", "invalid JSON schema"),
    ({"guided_regex": "(a"}, "guided_regex", "invalid regex"),
    ({"guided_regex": 5}, "guided_regex", "non-empty string"),
    ({"guided_grammar": "root ::= 'a'"}, "guided_grammar", "not supported"),
    ({"structured_outputs": {"json": {}, "regex": "a"}}, "structured_outputs", "one of 'json', 'regex' or 'choice'"),
    ({"guided_regex": "a", "response_format": {"type": "json_object"}}, "response_format", "one structured output"),
])
def test_vllm_guided_fields_bad_are_400(client, body, param, message):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=4,
                                       extra_body=body)
    assert e.value.status_code == 400 and message in e.value.message, e.value.message
    if param:
        assert e.value.body["param"] == param


@pytest.fixture(scope="module")
def default_server():
    with LiveServer(create_app(vlmkit.load("default"), model_name="default", ui=False)) as live:
        yield live


def test_default_model_any_json_through_both_apis(default_server):
    """The default model closes free-form JSON objects: OpenAI json_object and Ollama "json" parse."""
    oa = openai.OpenAI(base_url=default_server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    r = oa.chat.completions.create(model="default", max_tokens=64, response_format={"type": "json_object"},
                                   messages=[{"role": "user", "content": "Give a city and its country as JSON."}])
    assert r.choices[0].finish_reason == "stop" and isinstance(json.loads(r.choices[0].message.content), dict)
    o = ollama.Client(host=default_server.url, timeout=120).chat(
        model="default", format="json", options={"num_predict": 64},
        messages=[{"role": "user", "content": "Give a city and its country as JSON."}])
    assert o.done_reason == "stop" and o.message.content == r.choices[0].message.content  # greedy, same rules


def test_default_model_classifies_an_image_with_guided_choice(default_server):
    oa = openai.OpenAI(base_url=default_server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    image = "data:image/png;base64," + base64.b64encode(open(SHAPES, "rb").read()).decode()
    r = oa.chat.completions.create(model="default", max_tokens=8, extra_body={"guided_choice": ["red", "green",
                                                                                                 "blue", "yellow"]},
                                   messages=[{"role": "user", "content": [
                                       {"type": "image_url", "image_url": {"url": image}},
                                       {"type": "text", "text": "What color is the circle?"}]}])
    assert r.choices[0].message.content == "red" and r.choices[0].finish_reason == "stop"


def test_openai_parse_helper_with_a_pydantic_model(default_server):
    """The openai client's own structured-output helper: a pydantic model in, a parsed instance out."""
    pydantic = pytest.importorskip("pydantic")

    class City(pydantic.BaseModel):
        city: str
        country: str

    oa = openai.OpenAI(base_url=default_server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    r = oa.chat.completions.parse(model="default", response_format=City, max_tokens=64,
                                  messages=[{"role": "user", "content": "Name a large city and its country."}])
    parsed = r.choices[0].message.parsed
    assert isinstance(parsed, City) and parsed.city.strip() and parsed.country.strip()


def test_readme_structured_output_examples_run_as_written(default_server, monkeypatch, capsys):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    readme = open(os.path.join(root, "README.md"), encoding="utf-8").read()
    section = readme.split("## Structured output\n", 1)[1].split("\n## ", 1)[0]
    python, client = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    commands, curl = re.findall(r"```bash\n(.*?)```", section, flags=re.S)
    monkeypatch.chdir(root)
    for line in commands.strip().splitlines():
        command, shown = line.rsplit("   # ", 1)
        run = subprocess.run(["bash", "-c", command.replace("vlmkit ", f"{sys.executable} -m vlmkit ", 1)], cwd=root,
                             capture_output=True, text=True, timeout=300)
        assert run.returncode == 0 and run.stdout.strip() == shown.strip(), (command, run.stdout, run.stderr)
    local = f"127.0.0.1:{default_server.port}"
    for code in (python, client.replace("127.0.0.1:8000", local)):
        exec(code, {})
        printed = capsys.readouterr().out.splitlines()
        expected = [line.split("# ", 1)[1].strip() for line in code.splitlines() if line.startswith("print(")]
        assert printed == expected
    run = subprocess.run(["bash", "-c", curl.replace("127.0.0.1:8000", local)], capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr
    content = json.loads(run.stdout)["choices"][0]["message"]["content"]
    shown = curl.split("\n# ", 1)[1]
    assert json.dumps(content)[1:-1] in shown
