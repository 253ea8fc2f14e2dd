"""POST /v1/completions (OpenAI's legacy text completions) with the official `openai` client against a live server:
the prompt as written (no chat template), images through `<image>` placeholders and `multi_modal_data` (vLLM's
offline form, sent with extra_body), streaming and not, usage counts, sampling fields, and 400s for bad input."""

from __future__ import annotations

import io
import json

import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed (make install-dev)")
pytest.importorskip("uvicorn", reason="the serve extra is not installed (make install-dev)")
httpx = pytest.importorskip("httpx", reason="httpx is not installed (make install-dev)")
openai = pytest.importorskip("openai", reason="the openai client is not installed (make install-dev)")

from PIL import Image  # noqa: E402

import vlmkit  # noqa: E402
from test_serve import BLUE, LIMITS, RED, LiveServer, data_uri  # noqa: E402
from vlmkit.serve import create_app  # noqa: E402

MODEL = "tiny-llava"
PROMPT = "USER: <image>\nWhat color is it? ASSISTANT:"


@pytest.fixture(scope="module")
def vlm(hf_checkpoint_dir):
    return vlmkit.load(hf_checkpoint_dir("llava"))


@pytest.fixture(scope="module")
def server(vlm):
    app = create_app(vlm, model_name=MODEL, limits=LIMITS, max_batch=4, queue_limit=16, max_tokens_limit=64, ui=False)
    with LiveServer(app) as live:
        yield live


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def red():
    return Image.open(io.BytesIO(RED))


def test_completion_with_an_image_matches_generate(client, vlm):
    expected = vlm.generate(PROMPT, images=[red()], max_new_tokens=8, raw=True)
    n_prompt = int(vlm.processor([PROMPT], [[red()]])["attention_mask"].sum())
    r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0,
                                  extra_body={"multi_modal_data": {"image": [data_uri(RED)]}})
    assert r.object == "text_completion" and r.model == MODEL and r.id.startswith("cmpl-")
    assert r.choices[0].text == expected and r.choices[0].index == 0
    assert r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens == n_prompt > 9  # the image's tokens are counted
    assert 0 < r.usage.completion_tokens <= 8
    assert r.usage.total_tokens == n_prompt + r.usage.completion_tokens

    chunks = list(client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, stream=True,
                                            stream_options={"include_usage": True},
                                            extra_body={"multi_modal_data": {"image": data_uri(RED)}}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == expected
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == \
        [r.choices[0].finish_reason]
    assert chunks[-1].usage.prompt_tokens == n_prompt
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens


def test_text_only_default_length_echo_stop_and_seed(client, vlm):
    prompt = "The sky is"
    r = client.completions.create(model=MODEL, prompt=prompt)  # max_tokens absent: 16, as OpenAI and vLLM
    assert r.choices[0].text == vlm.generate(prompt, max_new_tokens=16, raw=True)
    assert r.usage.completion_tokens <= 16
    echoed = client.completions.create(model=MODEL, prompt=[prompt], max_tokens=4, echo=True)
    assert echoed.choices[0].text == prompt + vlm.generate(prompt, max_new_tokens=4, raw=True)
    kw = dict(model=MODEL, prompt=prompt, max_tokens=6, temperature=0.9, top_p=0.95, seed=11)
    a, b = (client.completions.create(**kw).choices[0].text for _ in range(2))
    assert a == b == vlm.generate(prompt, max_new_tokens=6, do_sample=True, temperature=0.9, top_p=0.95, seed=11,
                                  raw=True)
    greedy = vlm.generate(prompt, max_new_tokens=12, raw=True)
    stop = greedy.strip()[len(greedy.strip()) // 2:][:3]
    assert stop.strip(), greedy
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, stop=stop)
    assert r.choices[0].text == greedy[: greedy.find(stop)] and r.choices[0].finish_reason == "stop"


@pytest.mark.parametrize("extra, field, words", [
    ({"prompt": PROMPT}, "prompt", "<image>"),  # a placeholder with no image
    ({"prompt": "hi", "multi_modal_data": {"image": [data_uri(BLUE)]}}, "prompt", "<image>"),  # an image, no place
    ({"prompt": PROMPT, "multi_modal_data": {"image": ["data:image/png;base64,AAAA"]}}, "multi_modal_data",
     "image[0]"),
    ({"prompt": PROMPT, "multi_modal_data": {"image": ["file:///etc/passwd"]}}, "multi_modal_data.image[0]",
     "data: URI"),
    ({"prompt": PROMPT, "multi_modal_data": {"image": ["https://example.com/a.png"]}},
     "multi_modal_data.image[0]", "--allow-remote-images"),
    ({"prompt": "hi", "multi_modal_data": {"video": ["x"]}}, "multi_modal_data", "images only"),
    ({"prompt": "hi", "multi_modal_data": "x"}, "multi_modal_data", "object"),
    ({"prompt": [1, 2, 3]}, "prompt", "token ids"),
    ({"prompt": ["a", "b"]}, "prompt", "one per request"),
    ({"prompt": 5}, "prompt", "string"),
    ({}, "prompt", "string"),
    ({"prompt": "hi", "suffix": "x"}, "suffix", "suffix"),
    ({"prompt": "hi", "best_of": 2}, "best_of", "best_of=1"),
    ({"prompt": "hi", "n": 2}, "n", "n=1"),
    ({"prompt": "hi", "max_tokens": 0}, "max_tokens", ">= 1"),
    ({"prompt": "hi", "max_tokens": 1000}, "max_tokens", "limit"),
    ({"prompt": "hi", "temperature": "hot"}, "temperature", "number"),
    ({"prompt": "hi", "echo": "yes"}, "echo", "boolean"),
    ({"prompt": "hi", "logprobs": 2}, "logprobs", "logprobs"),
    ({"prompt": "hi " * 3000}, "prompt", "context"),
])
def test_bad_requests_get_400_naming_the_field(server, extra, field, words):
    r = httpx.post(server.url + "/v1/completions", json={"model": MODEL, **extra}, timeout=30)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == field and words in error["message"], error
    assert httpx.get(server.url + "/health").status_code == 200


def test_unknown_model_and_wrong_method(server, client):
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="gpt-3.5-turbo-instruct", prompt="hi")
    assert e.value.body["code"] == "model_not_found"
    r = httpx.get(server.url + "/v1/completions")
    assert r.status_code == 405 and "POST" in r.json()["error"]["message"]


def test_readme_api_key_example_answers_right(tmp_path):
    """The README's key example as written: the curl command, with $VLMKIT_API_KEY, against the default model served
    with that key; and without the key it is refused."""
    import os
    import re
    import shutil
    import subprocess

    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    readme = open(os.path.join(root, "README.md"), encoding="utf-8").read()
    (block,) = [b for b in re.findall(r"```bash\n(.*?)```", readme, flags=re.S) if "VLMKIT_API_KEY" in b]
    lines = block.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("curl -s http://127.0.0.1:8000/v1/completions"))
    end = start + 1
    while end < len(lines) and lines[end] and not lines[end].startswith(("#", "curl", "vlmkit", "export")):
        end += 1
    command = "\n".join(lines[start:end])
    key = "readme-key"
    with LiveServer(create_app(vlmkit.load("default"), model_name="vlmkit-default", ui=False, api_key=key)) as live:
        command = command.replace("127.0.0.1:8000", f"127.0.0.1:{live.port}")
        for env_key, ok in ((key, True), ("wrong", False)):
            run = subprocess.run(["bash", "-c", command], cwd=root, capture_output=True, text=True, timeout=120,
                                 env={**os.environ, "VLMKIT_API_KEY": env_key})
            assert run.returncode == 0, run.stderr
            reply = json.loads(run.stdout)
            if ok:
                assert reply["choices"][0]["text"].strip().lower() == "red", reply
            else:
                assert reply["error"]["code"] == "invalid_api_key", reply
