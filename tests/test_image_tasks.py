"""vlmkit.image_tasks on the tiny random checkpoints of every family.

Random models write gibberish, so these tests check behaviour: the prompt each task builds (its messages, the
guide's instruction text, how many images reach the model), that `classify(method="score")` ranks by `m.score`,
that `Chat` keeps and resets its history, that `batch` gives one answer per item.
"""

import warnings

import pytest

import vlmkit
from hf_fixtures import FAMILIES, sample_images
from vlmkit import image_tasks
from vlmkit.processing.prompts import PromptError

FAST = dict(max_new_tokens=3)
A, B = sample_images()


@pytest.fixture(scope="module")
def load(hf_checkpoint_dir):
    cache = {}

    def get(family):
        if family not in cache:
            cache[family] = vlmkit.load(hf_checkpoint_dir(family))
        return cache[family]

    return get


def images_seen(m, prompt, images=None) -> int:
    """How many images the model receives for `prompt`, counted from the processor's batch."""
    batch = m.processor(prompt, images)
    proc, ids = m.processor, batch["input_ids"]
    n_image_tokens = int((ids == proc.image_token_id).sum())
    family = proc.rules.family
    if family == "llava":
        assert n_image_tokens == batch.get("pixel_values", ids[:0]).shape[0] * m.config.tokens_per_image
        return n_image_tokens // m.config.tokens_per_image
    if family == "idefics":
        return n_image_tokens  # one <image> per image; the cross-attention sees it through image_attention_mask
    if family == "idefics2":
        return n_image_tokens // proc.rules.image_seq_len
    return int((ids == proc.tokenizer.token_to_id(proc.rules.global_token)).sum())  # idefics3 / smolvlm


class Spy:
    """Wraps a VLM method: records each call's arguments and returns the real result (or `result`)."""

    def __init__(self, monkeypatch, m, name, result=None):
        self.calls, self.real, self.result = [], getattr(m, name), result
        monkeypatch.setattr(m, name, self)

    def __call__(self, *args, **kwargs):
        self.calls.append((args, kwargs))
        return self.result(*args, **kwargs) if callable(self.result) else self.real(*args, **kwargs)


def prompt_text(m, prompt) -> str:
    return prompt if isinstance(prompt, str) else m.processor.apply_chat_template(prompt)


# ---------------------------------------------------------------------------------------------- no model

def test_message_builders():
    msgs = image_tasks.caption_messages(A)
    assert msgs == [{"role": "user", "content": [{"type": "image", "image": A},
                                                 {"type": "text", "text": "Describe this image."}]}]
    assert image_tasks.caption_messages(A, prompt="")[0]["content"] == [{"type": "image", "image": A}]

    vqa = image_tasks.vqa_messages(A, "Where are these people?")
    assert [p["type"] for p in vqa[0]["content"]] == ["text", "image", "text"]
    assert vqa[0]["content"][0]["text"] == "Instruction: Provide an answer to the question. Use the image to answer.\n"
    assert vqa[0]["content"][2]["text"] == "Question: Where are these people? Answer:"
    assert [p["type"] for p in image_tasks.vqa_messages(A, "Why?", instruction=None)[0]["content"]] == ["image", "text"]

    shots = image_tasks.few_shot_messages(
        [(A, "An image of a red circle."), (B, "What is it?", "A green triangle.")], A)
    assert [m["role"] for m in shots] == ["user", "assistant", "user", "assistant", "user"]
    assert image_tasks.count_images(shots) == 3
    assert shots[1]["content"] == [{"type": "text", "text": "An image of a red circle."}]
    assert shots[2]["content"][1]["text"] == "What is it?" and shots[4]["content"][1]["text"] == "Describe this image."

    cls = image_tasks.classify_messages(A, ["animals", "vegetables"])
    assert cls[0]["content"][0]["text"] == ("Instruction: Classify the following image into a single category from "
                                            "the following list: ['animals', 'vegetables'].\n")
    assert cls[0]["content"][2]["text"] == "Category:" and image_tasks.count_images(cls) == 1

    story = image_tasks.story_messages(A)
    assert story[0]["content"][0]["text"] == "Instruction: Use the image to write a story.\n"
    assert image_tasks.count_images(story) == 1

    for bad in ([], "animals", ["a", "a"], ["a", ""]):
        with pytest.raises(ValueError):
            image_tasks.classify_messages(A, bad)
    with pytest.raises(PromptError):
        image_tasks.few_shot_messages([(A,)], B)


def test_user_content_places_images_at_placeholders():
    assert [p["type"] for p in image_tasks.user_content("Compare", [A, B])] == ["image", "image", "text"]
    parts = image_tasks.user_content("First <image> then <image> which?", [A, B])
    assert [p.get("text", p["type"]) for p in parts] == ["First ", "image", " then ", "image", " which?"]
    assert parts[1]["image"] is A and parts[3]["image"] is B
    with pytest.raises(PromptError, match="2 <image> placeholder"):
        image_tasks.user_content("<image><image>", [A])


@pytest.mark.parametrize("answer, expected", [
    ("vegetables", "vegetables"), (" Vegetables.", "vegetables"), ("CITY LANDSCAPE", "city landscape"),
    ("The category is: vegetables, clearly", "vegetables"), ("cars and animals", "cars"),
    ("city", "city landscape"), ("vegetable", "vegetables"), ("an", None), ("", None), ("a boat", None),
])
def test_match_label(answer, expected):
    labels = ["animals", "vegetables", "city landscape", "cars", "office"]
    assert image_tasks.match_label(answer, labels) == expected


def test_join_prefix_restores_the_space_sentencepiece_drops():
    class SentencePieceLike:
        def encode(self, text, add_special_tokens=False):
            return list(range(len(text.split())))

        def decode(self, ids):
            return "a"  # the leading "▁" of a word is dropped when the new tokens are decoded alone

    assert image_tasks.join_prefix("This is an image of ", "a dog", SentencePieceLike()) == "This is an image of a dog"
    assert image_tasks.join_prefix("Once upon a time", ", a fox", SentencePieceLike()) == "Once upon a time, a fox"
    assert image_tasks.join_prefix("Once upon a time", " a fox", None) == "Once upon a time a fox"


# ---------------------------------------------------------------------------------------------- on the models

@pytest.mark.parametrize("family", FAMILIES)
def test_rendered_prompt_equals_the_messages_path(load, family):
    """render_prompt (used when the answer has a prefix) gives exactly the ids the processor makes from messages."""
    m = load(family)
    shots = image_tasks.few_shot_messages([(A, "A red circle."), (B, "A triangle.")], B)
    for msgs in (image_tasks.caption_messages(A), shots):
        text, images = image_tasks.render_prompt(m, msgs)
        assert text.count("<image>") == len(images) == image_tasks.count_images(msgs)
        assert m.processor(text, images)["input_ids"].tolist() == m.processor(msgs)["input_ids"].tolist()
        assert images_seen(m, text, images) == len(images)
    text, _ = image_tasks.render_prompt(m, image_tasks.story_messages(A), prefix="Once upon a time")
    assert text.endswith(":" + " Once upon a time") and "Use the image to write a story." in text


@pytest.mark.parametrize("family", ["llava", "idefics", "idefics2", "idefics3"])
def test_single_image_tasks_build_the_guide_prompts(load, family, monkeypatch):
    m = load(family)
    gen = Spy(monkeypatch, m, "generate")
    expected = {  # task -> (instruction text the prompt must hold, images)
        "caption": ("Describe this image.", 1), "vqa": ("Question: What colour is the circle? Answer:", 1),
        "few_shot": ("An image of a red circle.", 2), "story": ("Instruction: Use the image to write a story.", 1),
        "classify": ("from the following list: ['circle', 'triangle']", 1),
    }
    answers = {
        "caption": image_tasks.caption(m, A, **FAST),
        "vqa": image_tasks.vqa(m, A, "What colour is the circle?", **FAST),
        "few_shot": image_tasks.few_shot(m, [(A, "An image of a red circle.")], B, **FAST),
        "story": image_tasks.story(m, A, **FAST),
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # gibberish names no label
        label = image_tasks.classify(m, A, ["circle", "triangle"], **FAST)
    assert label in (None, "circle", "triangle")
    assert len(gen.calls) == 5
    for (task, (needle, n_images)), (args, kwargs) in zip(expected.items(), gen.calls):
        prompt, images = args[0], kwargs.get("images")
        assert needle in prompt_text(m, prompt), task
        assert images_seen(m, prompt, images) == n_images, task
        assert kwargs["max_new_tokens"] == 3
    assert all(isinstance(a, str) for a in answers.values())
    assert answers["story"].startswith("Once upon a time")
    # the story's prompt is text whose assistant turn already starts the story
    assert gen.calls[3][0][0].endswith("Once upon a time")


def test_prompted_caption_continues_the_prefix(load, monkeypatch):
    m = load("idefics2")
    Spy(monkeypatch, m, "generate", result=lambda *a, **k: " a red circle")
    assert image_tasks.caption(m, A, prefix="This is an image of ") == "This is an image of a red circle"
    assert image_tasks.caption(m, A) == "a red circle"


@pytest.mark.parametrize("family", ["llava", "idefics", "idefics2"])
def test_classify_score_ranks_labels_by_m_score(load, family, monkeypatch):
    m = load(family)
    labels = ["circle", "red circle", "triangle", "blue square"]
    score = Spy(monkeypatch, m, "score")
    ranked = image_tasks.classify(m, A, labels, method="score")
    (prompt, candidates), kwargs = score.calls[0][0], score.calls[0][1]
    real = m.score.real(prompt, candidates, images=kwargs["images"], raw=True)
    assert [c.strip() for c in candidates] == labels and images_seen(m, prompt, kwargs["images"]) == 1
    assert "Category:" in prompt
    assert sorted(label for label, _ in ranked) == sorted(labels)
    assert [s for _, s in ranked] == sorted(real, reverse=True)
    assert dict(ranked) == pytest.approx(dict(zip(labels, real)))

    Spy(monkeypatch, m, "score", result=lambda *a, **k: [-3.0, -1.0, -2.0])
    assert image_tasks.classify(m, A, ["a", "b", "c"], method="score") == [("b", -1.0), ("c", -2.0), ("a", -3.0)]
    with pytest.raises(ValueError, match="method"):
        image_tasks.classify(m, A, labels, method="vote")


def test_classify_generate_maps_the_answer_to_a_label(load, monkeypatch):
    m = load("llava")
    labels = ["animals", "vegetables", "city landscape"]
    Spy(monkeypatch, m, "generate", result=lambda *a, **k: " Vegetables.")
    assert image_tasks.classify(m, A, labels) == "vegetables"
    Spy(monkeypatch, m, "generate", result=lambda *a, **k: "a boat")
    with pytest.warns(UserWarning, match="names none of the labels"):
        assert image_tasks.classify(m, A, labels) is None


@pytest.mark.parametrize("family", ["llava", "idefics", "idefics2", "smolvlm"])
def test_chat_keeps_history_and_reset_clears_it(load, family, monkeypatch):
    m = load(family)
    gen = Spy(monkeypatch, m, "generate")
    chat = image_tasks.Chat(m, system="Answer briefly.")
    first = chat.ask("What is in this image?", images=[A], **FAST)
    second = chat.ask("And in this one?", images=[B], **FAST)
    third = "".join(chat.stream("Which is bigger?", **FAST))
    assert [msg["role"] for msg in chat.history] == ["system"] + ["user", "assistant"] * 3
    assert chat.turns == 3 and chat.history[-1]["content"][0]["text"] == third.strip()
    # images stay with the turn they were given in; every turn sends the whole history
    assert [image_tasks.count_images([msg]) for msg in chat.history] == [0, 1, 0, 1, 0, 0, 0]
    prompts = [args[0] for args, _ in gen.calls]
    assert [images_seen(m, p) for p in prompts] == [1, 2, 2]
    assert [sum(msg["role"] == "user" for msg in p) for p in prompts] == [1, 2, 3]
    assert prompts[2][2]["content"][0]["text"] == first and prompts[2][4]["content"][0]["text"] == second
    assert "Answer briefly." in m.processor.apply_chat_template(prompts[2])

    chat.reset()
    assert chat.history == [{"role": "system", "content": [{"type": "text", "text": "Answer briefly."}]}]
    chat.ask("Hello", **FAST)
    assert images_seen(m, gen.calls[-1][0][0]) == 0 and chat.turns == 1
    assert image_tasks.Chat(m).history == []


def test_chat_failed_turn_leaves_history_unchanged(load):
    m = load("idefics2")
    chat = image_tasks.Chat(m)
    chat.ask("Hi", images=[A], **FAST)
    before = list(chat.history)
    with pytest.raises(PromptError, match="placeholder"):
        chat.ask("<image> and <image>?", images=[B], **FAST)
    with pytest.raises(PromptError, match="longer than"):
        chat.ask("word " * 3000, **FAST)
    assert chat.history == before


@pytest.mark.parametrize("family", ["llava", "idefics", "idefics2"])
def test_batch_returns_one_answer_per_item(load, family, monkeypatch):
    m = load(family)
    spy = Spy(monkeypatch, m, "generate_batch")
    items = [(A, "What colour is the circle?"), (B, "What shape is green?"), A]
    answers = image_tasks.batch(m, items, **FAST)
    assert len(answers) == 3 and all(isinstance(a, str) for a in answers)
    assert len(spy.calls) == 1
    prompts = spy.calls[0][0][0]
    assert len(prompts) == 3 and [images_seen(m, p) for p in prompts] == [1, 1, 1]
    assert "Question: What shape is green? Answer:" in prompt_text(m, prompts[1])
    assert "Describe this image." in prompt_text(m, prompts[2])  # an image alone is captioned
    with pytest.raises(ValueError):
        image_tasks.batch(m, [])


def test_idefics_few_shot_each_text_sees_its_latest_image(load):
    """The cross-attention family: the final question attends to the query image, not to the examples."""
    m = load("idefics")
    msgs = image_tasks.few_shot_messages([(A, "A red circle."), (B, "A green triangle.")], A)
    batch = m.processor(msgs)
    mask = batch["image_attention_mask"][0]  # [T, images]
    assert mask.shape[-1] == 3
    assert mask[-1].tolist() == [0, 0, 1]
    image_positions = (batch["input_ids"][0] == m.processor.image_token_id).nonzero().flatten().tolist()
    assert len(image_positions) == 3
    assert not mask[: image_positions[0]].any()  # text before the first image sees none


def test_tasks_refuse_stream(load):
    with pytest.raises(ValueError, match="Chat.stream"):
        image_tasks.caption(load("llava"), A, stream=True)
