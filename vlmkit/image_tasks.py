"""Image tasks on a loaded `VLM`, as in the transformers guide "Image tasks with IDEFICS".

    from vlmkit import image_tasks, load
    m = load("path/to/hf-folder")
    image_tasks.caption(m, "cat.png")                                   # "A cat sitting on a sofa."
    image_tasks.caption(m, "cat.png", prefix="This is an image of")     # prompted captioning: the answer continues it
    image_tasks.vqa(m, "soda.png", "What is the flavour?")
    image_tasks.few_shot(m, [("eiffel.png", "An image of the Eiffel Tower at night. Fun fact: ...")], "statue.png")
    image_tasks.classify(m, "stand.png", ["animals", "vegetables", "cars"], method="score")  # [(label, logp), ...]
    image_tasks.story(m, "door.png")                                    # "Once upon a time, ..."
    image_tasks.batch(m, [("a.png", "What is this?"), ("b.png", None)])  # one answer per item (None: a caption)
    chat = image_tasks.Chat(m); chat.ask("What is this?", images=["a.png"]); chat.ask("And the colour?")

Every prompt is built as chat messages (`*_messages` functions, testable without a model) whose image parts carry
their image inline; the processor renders them with the checkpoint's chat template (or its family's default), so one
code path serves every family, the cross-attention IDEFICS included. The guide's instructions are kept; where the
guide ends its prompt with a cue the model continues ("This is an image of ", story openings), that cue is a
`prefix`: written right after the assistant prompt and returned as the start of the answer (see `render_prompt`).
Images are anything `load_image` accepts: PIL images, paths, bytes, data: URIs, http(s) URLs (unless the model was
loaded with allow_remote_images=False).
"""

from __future__ import annotations

import re
import warnings
from typing import Iterator, Optional, Sequence

from .processing.prompts import IMAGE_TOKEN, PromptError

__all__ = [
    "CAPTION_PROMPT", "VQA_INSTRUCTION", "STORY_PROMPT", "STORY_PREFIX", "Chat", "batch", "caption",
    "caption_messages", "classify", "classify_messages", "classify_prompt", "count_images", "few_shot",
    "few_shot_messages", "join_prefix", "match_label", "render_prompt", "story", "story_messages", "user_content",
    "vqa", "vqa_messages",
]

# The guide's prompts.
CAPTION_PROMPT = "Describe this image."  # the guide's few-shot turn; a caption with no instruction: prompt=""
VQA_INSTRUCTION = "Instruction: Provide an answer to the question. Use the image to answer.\n"
VQA_QUESTION = "Question: {question} Answer:"
CLASSIFY_INSTRUCTION = ("Instruction: Classify the following image into a single category from the following "
                        "list: {labels}.\n")
CLASSIFY_CUE = "Category:"
STORY_PROMPT = "Instruction: Use the image to write a story.\n"
STORY_CUE = "Story:"
STORY_PREFIX = "Once upon a time"

# max_new_tokens per task unless the caller passes one (the guide's budgets, a little more room for chat models).
DEFAULT_TOKENS = {"caption": 30, "vqa": 20, "few_shot": 30, "classify": 10, "story": 200, "batch": 30, "chat": 256}


# ---------------------------------------------------------------------------------------------- messages

def _image_part(image) -> dict:
    return {"type": "image", "image": image}


def _text_part(text: str) -> dict:
    return {"type": "text", "text": text}


def user_content(text: Optional[str], images: Sequence = (), image_token: str = IMAGE_TOKEN) -> list[dict]:
    """Content parts of one user turn. `<image>` placeholders in `text` mark where the images go (their count must
    equal the number of images); without placeholders the images come first, then the text."""
    images, text = list(images or []), text or ""
    n = text.count(image_token)
    if n == 0:
        return [_image_part(x) for x in images] + ([_text_part(text)] if text.strip() else [])
    if n != len(images):
        raise PromptError(f"the prompt has {n} {image_token} placeholder(s) but {len(images)} image(s) were given")
    parts: list[dict] = []
    for i, piece in enumerate(text.split(image_token)):
        if i:
            parts.append(_image_part(images[i - 1]))
        if piece:
            parts.append(_text_part(piece))
    return parts


def _user(content: list[dict]) -> dict:
    if not content:
        raise PromptError("a turn needs text or at least one image")
    return {"role": "user", "content": content}


def _assistant(text: str) -> dict:
    return {"role": "assistant", "content": [_text_part(text)]}


def caption_messages(image, prompt: Optional[str] = None) -> list[dict]:
    """One user turn: the image, then `prompt` (default CAPTION_PROMPT; "" for the image alone, as the guide's
    unprompted captioning)."""
    prompt = CAPTION_PROMPT if prompt is None else prompt
    return [_user([_image_part(image)] + ([_text_part(prompt)] if prompt.strip() else []))]


def vqa_messages(image, question: str, instruction: Optional[str] = VQA_INSTRUCTION) -> list[dict]:
    """The guide's VQA prompt as one user turn: instruction, image, "Question: ... Answer:"
    (instruction=None or "": just the image and the bare question)."""
    if not isinstance(question, str) or not question.strip():
        raise PromptError("vqa needs a non-empty question")
    if not instruction:
        return [_user([_image_part(image), _text_part(question.strip())])]
    return [_user([_text_part(instruction), _image_part(image),
                   _text_part(VQA_QUESTION.format(question=question.strip()))])]


def few_shot_messages(examples: Sequence, image, prompt: Optional[str] = None) -> list[dict]:
    """In-context examples as earlier turns (the guide's "User: <image>Describe this image.\\nAssistant: ..."):
    each example is (image, answer) asked with `prompt`, or (image, prompt, answer); then `image` with `prompt`."""
    prompt = CAPTION_PROMPT if prompt is None else prompt
    messages: list[dict] = []
    for i, example in enumerate(examples):
        if not isinstance(example, (tuple, list)) or len(example) not in (2, 3):
            raise PromptError(f"few-shot example {i} must be (image, answer) or (image, prompt, answer)")
        ex_image, ex_prompt, answer = (example[0], prompt, example[1]) if len(example) == 2 else example
        if not isinstance(answer, str) or not answer.strip():
            raise PromptError(f"few-shot example {i} has no answer text")
        messages += caption_messages(ex_image, ex_prompt) + [_assistant(answer.strip())]
    return messages + caption_messages(image, prompt)


def _check_labels(labels) -> list[str]:
    if isinstance(labels, str) or not labels or not all(isinstance(x, str) and x.strip() for x in labels):
        raise ValueError("labels must be a non-empty list of non-empty strings")
    labels = [x.strip() for x in labels]
    if len(set(labels)) != len(labels):
        raise ValueError(f"labels must be distinct, got {labels}")
    return labels


def classify_messages(image, labels: Sequence[str], prompt: Optional[str] = None) -> list[dict]:
    """The guide's classification prompt: "Instruction: Classify the following image into a single category from
    the following list: ['a', 'b'].\\n", the image, "Category:". `prompt` replaces the instruction; "{labels}" in it
    is filled with the list."""
    labels = _check_labels(labels)
    instruction = (CLASSIFY_INSTRUCTION if prompt is None else prompt).replace("{labels}", str(labels))
    return [_user([_text_part(instruction), _image_part(image), _text_part(CLASSIFY_CUE)])]


def story_messages(image, prompt: Optional[str] = None) -> list[dict]:
    """The guide's image-guided story prompt: "Instruction: Use the image to write a story.\\n", image, "Story:"."""
    prompt = STORY_PROMPT if prompt is None else prompt
    return [_user([_text_part(prompt), _image_part(image), _text_part(STORY_CUE)])]


def count_images(messages: Sequence[dict]) -> int:
    """Image parts in chat messages."""
    return sum(1 for msg in messages for p in (msg.get("content") if isinstance(msg.get("content"), list) else [])
               if isinstance(p, dict) and p.get("type") in ("image", "image_url"))


def _message_images(messages: Sequence[dict]) -> list:
    return [p["image"] for msg in messages for p in (msg["content"] if isinstance(msg["content"], list) else [])
            if p.get("type") == "image"]


# ---------------------------------------------------------------------------------------------- rendering

def render_prompt(m, messages: Sequence[dict], prefix: str = "") -> tuple[str, list]:
    """(prompt text with `<image>` placeholders, its images in order) as the model will see it: the chat template
    with the assistant prompt, then `prefix` (a space in between when needed). `m.generate(text, images=images)`
    gives the same input ids as `m.generate(messages)` plus the prefix: a BOS the template writes is dropped when
    the tokenizer (or IDEFICS's processor) adds its own."""
    proc = m.processor
    text = proc.apply_chat_template(list(messages), add_generation_prompt=True)
    tok = proc.tokenizer
    bos = tok.special_tokens.get("bos_token")
    if bos and text.startswith(bos):
        adds_bos = proc.format.writes_bos or tok.encode("", add_special_tokens=True)[:1] == [tok.bos_token_id]
        if adds_bos:
            text = text[len(bos):]
    prefix = (prefix or "").rstrip()
    if prefix:
        text += prefix if (not text or text[-1].isspace() or prefix[0].isspace()) else " " + prefix
    return text, _message_images(messages)


def _gen(task: str, gen: dict) -> dict:
    if gen.get("stream"):
        raise ValueError(f"{task}() returns text; for streamed answers use Chat.stream() or m.generate(stream=True)")
    gen.pop("stream", None)
    gen.setdefault("max_new_tokens", DEFAULT_TOKENS[task])
    return gen


def _run(m, task: str, messages: list[dict], prefix: Optional[str], gen: dict) -> str:
    gen = _gen(task, gen)
    if not prefix or not prefix.strip():
        return m.generate(messages, **gen).strip()
    text, images = render_prompt(m, messages, prefix)
    return join_prefix(prefix, m.generate(text, images=images, raw=True, **gen), m.processor.tokenizer)


def join_prefix(prefix: str, continuation: str, tokenizer=None) -> str:
    """prefix + the text generated after it. SentencePiece tokenizers (Llama, Mistral) drop the leading space when
    the new tokens are decoded alone ("of" + "a dog"), so a space goes back between two word characters for them."""
    prefix = prefix.strip()
    if (tokenizer is not None and continuation[:1].isalnum() and prefix[-1:].isalnum()
            and _decode_strips_space(tokenizer)):
        continuation = " " + continuation
    return (prefix + continuation).strip()


def _decode_strips_space(tokenizer) -> bool:
    ids = tokenizer.encode("x a", add_special_tokens=False)
    return len(ids) >= 2 and not tokenizer.decode(ids[1:]).startswith(" ")


# ---------------------------------------------------------------------------------------------- tasks

def caption(m, image, prompt: Optional[str] = None, prefix: Optional[str] = None, **gen) -> str:
    """A caption. `prompt`: the instruction (default "Describe this image."; "" = the image alone).
    `prefix`: the start of the caption the model continues (the guide's "This is an image of "); it is included
    in the returned text."""
    return _run(m, "caption", caption_messages(image, prompt), prefix, gen)


def vqa(m, image, question: str, instruction: Optional[str] = VQA_INSTRUCTION, **gen) -> str:
    """The answer to `question` about `image` (the guide's instruction prompt; instruction=None: the bare question)."""
    return _run(m, "vqa", vqa_messages(image, question, instruction), None, gen)


def few_shot(m, examples: Sequence, image, prompt: Optional[str] = None, prefix: Optional[str] = None, **gen) -> str:
    """Answer for `image` in the style of `examples` [(image, answer) | (image, prompt, answer), ...]."""
    return _run(m, "few_shot", few_shot_messages(examples, image, prompt), prefix, gen)


def story(m, image, prompt: Optional[str] = None, prefix: Optional[str] = STORY_PREFIX, **gen) -> str:
    """A story about `image`, starting with `prefix` ("Once upon a time"; None: as the model likes). Long texts
    read better with a tuned decoding strategy, e.g. do_sample=True, top_p=0.9, repetition_penalty=1.1."""
    return _run(m, "story", story_messages(image, prompt), prefix, gen)


def batch(m, items: Sequence, instruction: Optional[str] = VQA_INSTRUCTION, **gen) -> list[str]:
    """One answer per item, decoded together (`m.generate_batch`, left padding). An item is (image, question),
    asked as `vqa` asks it, or an image / (image, None) for a caption."""
    if isinstance(items, (str, bytes)) or not items:
        raise ValueError("batch() takes a non-empty list of (image, question) items")
    prompts = []
    for i, item in enumerate(items):
        if isinstance(item, (tuple, list)):
            if len(item) != 2:
                raise PromptError(f"batch item {i} must be an image or (image, question), got {len(item)} values")
            image, question = item
        else:
            image, question = item, None
        prompts.append(vqa_messages(image, question, instruction) if question else caption_messages(image))
    return [x.strip() for x in m.generate_batch(prompts, **_gen("batch", gen))]


def match_label(answer: str, labels: Sequence[str]) -> Optional[str]:
    """The label an answer names: an exact match ignoring case, spaces and punctuation; else the label written in
    the answer as a whole word or phrase (the earliest; the longest on a tie); else the one label that contains the
    whole answer. None when no label matches."""
    def norm(s: str) -> str:
        return re.sub(r"\s+", " ", re.sub(r"[^\w\s]", " ", s.lower())).strip()

    said = norm(answer or "")
    if not said:
        return None
    keyed = [(norm(label), label) for label in labels]
    for key, label in keyed:
        if key == said:
            return label
    found = []
    for key, label in keyed:
        hit = re.search(rf"(?<!\w){re.escape(key)}(?!\w)", said) if key else None
        if hit:
            found.append((hit.start(), -len(key), label))
    if found:
        return min(found)[2]
    containing = [label for key, label in keyed if said in key]
    return containing[0] if len(containing) == 1 else None


def classify_prompt(m, image, labels: Sequence[str], prompt: Optional[str] = None) -> tuple[str, list, list[str]]:
    """(prompt text, images, candidate continuations) that classify(method="score") scores: each label, after a
    space when the prompt does not end with one (as an answer follows "Assistant:")."""
    labels = _check_labels(labels)
    text, images = render_prompt(m, classify_messages(image, labels, prompt))
    sep = "" if text[-1:].isspace() else " "
    return text, images, [sep + label for label in labels]


def classify(m, image, labels: Sequence[str], method: str = "generate", prompt: Optional[str] = None,
             length_normalize: bool = False, **gen):
    """Zero-shot classification with the guide's prompt.

    method="score": every label ranked by its log-likelihood as the answer (`m.score`): a list of (label, score),
        best first (length_normalize=True divides by the label's token count, against the bias for short labels).
    method="generate": the model writes an answer, mapped to a label by `match_label`; returns the label, or None
        (with a warning that quotes the answer) when the answer names none of them.
    """
    labels = _check_labels(labels)
    if method == "score":
        if gen:
            raise TypeError(f"classify(method='score') takes no generation options, got {sorted(gen)}")
        text, images, candidates = classify_prompt(m, image, labels, prompt)
        scores = m.score(text, candidates, images=images, raw=True)
        if length_normalize:
            tok = m.processor.tokenizer
            scores = [s / max(1, len(tok.encode(c, add_special_tokens=False))) for s, c in zip(scores, candidates)]
        order = sorted(range(len(labels)), key=lambda i: -scores[i])
        return [(labels[i], float(scores[i])) for i in order]
    if method != "generate":
        raise ValueError(f"method must be 'generate' or 'score', got {method!r}")
    answer = _run(m, "classify", classify_messages(image, labels, prompt), None, gen)
    label = match_label(answer, labels)
    if label is None:
        warnings.warn(f"classify: the answer {answer[:100]!r} names none of the labels {labels}; returning None "
                      "(method='score' always ranks every label)", stacklevel=2)
    return label


# ---------------------------------------------------------------------------------------------- chat

class Chat:
    """A multi-turn conversation that keeps its history.

        chat = Chat(m, system="Answer briefly.")
        chat.ask("What is in this image?", images=["dog.png"])   # images belong to the turn they are given in
        chat.ask("And what colour is it?")                       # the model sees the whole history
        for piece in chat.stream("Tell me more."): print(piece, end="")
        chat.reset()                                             # back to the system message only

    `history` holds chat messages (image parts carry their images). Every turn re-reads the whole history (no KV cache
    is kept between turns). A turn that fails (bad image, prompt over the context) leaves the history unchanged.
    """

    def __init__(self, m, system: Optional[str] = None):
        self.m = m
        self.system = system
        self.history: list[dict] = []
        self.reset()

    def reset(self) -> None:
        """Forget every turn (the system message stays)."""
        self.history = [{"role": "system", "content": [_text_part(self.system)]}] if self.system else []

    @property
    def turns(self) -> int:
        return sum(1 for msg in self.history if msg["role"] == "user")

    def messages_for(self, text: str, images: Optional[Sequence] = None) -> list[dict]:
        """The messages the next `ask(text, images)` sends: the history plus the new user turn."""
        if images is not None and (isinstance(images, (str, bytes)) or not isinstance(images, (list, tuple))):
            images = [images]
        placeholder = self.m.processor.placeholder(text or "")
        return self.history + [_user(user_content(text, images or [], placeholder))]

    def ask(self, text: str, images: Optional[Sequence] = None, **gen) -> str:
        messages = self.messages_for(text, images)
        gen.setdefault("max_new_tokens", DEFAULT_TOKENS["chat"])
        if gen.pop("stream", False):
            raise ValueError("ask() returns text; use Chat.stream() for a streamed answer")
        answer = self.m.chat(messages, **gen).strip()
        self.history = messages + [_assistant(answer)]
        return answer

    def stream(self, text: str, images: Optional[Sequence] = None, **gen) -> Iterator[str]:
        """The answer in pieces as it is generated; the turn joins the history once the stream is exhausted.
        Bad input raises here, before the first piece."""
        messages = self.messages_for(text, images)
        gen.setdefault("max_new_tokens", DEFAULT_TOKENS["chat"])
        gen.pop("stream", None)
        pieces = self.m.chat(messages, stream=True, **gen)

        def run() -> Iterator[str]:
            out, started = [], False
            for piece in pieces:
                if not started:
                    piece = piece.lstrip()
                    started = bool(piece)
                if piece:
                    out.append(piece)
                    yield piece
            self.history = messages + [_assistant("".join(out).strip())]

        return run()
