"""Structured output: a `Constraint` (a JSON schema, a regular expression or a Lark grammar) that llguidance
compiles against the model's tokenizer, and `GrammarRows`, the per-row matchers behind the generation loop's
grammar logit rule: before each token, every constrained row's logits keep only the tokens its grammar allows
(eos only once the grammar is complete, and only when it is); after it, each row's matcher takes the chosen token.

llguidance (Rust) does the grammar work: its token masks are exact for the tokenizer's real byte strings, so a
constrained answer always parses, or was cut by max_new_tokens (or a stop string) before it closed.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from typing import Any, Optional, Sequence, Union

import llguidance
import llguidance.numpy as llg_numpy
import numpy as np
import torch

__all__ = ["Constraint", "CompiledConstraint", "GrammarRows", "JSON_OPTIONS"]

# Answers are written as json.dumps writes them ('{"a": 1, "b": [2, 3]}'): with free whitespace a small model
# can spend its whole budget on newlines between two tokens of a valid answer.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
ANY_JSON_OBJECT = {"type": "object"}

KINDS = ("json_schema", "regex", "grammar")


@dataclass(frozen=True)
class Constraint:
    """What an answer must match, before it meets a tokenizer.

    kind "json_schema": value is a JSON schema (a dict), or True for any JSON object (OpenAI's json_object, Ollama's
    "json"); "regex": a regular expression the whole answer matches (Rust regex syntax); "grammar": a Lark grammar
    in llguidance's dialect (https://github.com/guidance-ai/llguidance/blob/main/docs/syntax.md)."""

    kind: str
    value: Any

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"constraint kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if self.kind == "json_schema":
            if not (self.value is True or isinstance(self.value, dict)):
                raise ValueError(f"json_schema must be a JSON schema (a dict) or True (any JSON object), got "
                                 f"{type(self.value).__name__}")
        elif not isinstance(self.value, str) or not self.value:
            raise ValueError(f"{self.kind} must be a non-empty string, got {self.value!r:.60}")

    @classmethod
    def from_options(cls, json_schema=None, regex=None, grammar=None) -> Optional["Constraint"]:
        """The constraint that `generate(json_schema=..., regex=..., grammar=...)` asks for (at most one), or None."""
        given = [(k, v) for k, v in zip(KINDS, (json_schema, regex, grammar)) if v is not None and v is not False]
        if len(given) > 1:
            raise ValueError(f"give at most one of json_schema, regex, grammar; got {', '.join(k for k, _ in given)}")
        return cls(*given[0]) if given else None

    def grammar_text(self) -> str:
        """llguidance's grammar for this constraint (not yet checked)."""
        if self.kind == "json_schema":
            schema = ANY_JSON_OBJECT if self.value is True else self.value
            try:
                return llguidance.LLMatcher.grammar_from_json_schema(json.dumps(schema), overrides=JSON_OPTIONS)
            except (TypeError, ValueError, RecursionError) as e:
                raise ValueError(f"invalid JSON schema: {e}") from None
        if self.kind == "regex":
            return llguidance.LLMatcher.grammar_from_regex(self.value)
        return llguidance.LLMatcher.grammar_from_lark(self.value)

    def compile(self, tokenizer, eos_token_ids: Sequence[int]) -> "CompiledConstraint":
        """Check the constraint against the tokenizer; ValueError naming the problem when llguidance refuses it."""
        if not eos_token_ids:
            raise ValueError("a constrained answer needs an eos token id to end on (ignore_eos cannot be combined "
                             "with structured output)")
        compiled = CompiledConstraint(self, llg_tokenizer(tokenizer, tuple(int(i) for i in eos_token_ids)),
                                      self.grammar_text())
        compiled.matcher()  # a matcher holds llguidance's verdict on the grammar
        return compiled


@dataclass(frozen=True)
class CompiledConstraint:
    """A checked constraint, bound to one tokenizer: `matcher()` starts a fresh answer."""

    constraint: Constraint
    tokenizer: Any  # llguidance.LLTokenizer
    grammar: str

    def matcher(self) -> llguidance.LLMatcher:
        m = llguidance.LLMatcher(self.tokenizer, self.grammar, log_level=0)
        if m.is_error():
            what = {"json_schema": "JSON schema", "regex": "regex", "grammar": "grammar"}[self.constraint.kind]
            raise ValueError(f"invalid {what}: {' '.join(m.get_error().split())[:500]}")
        return m


_LLG_TOKENIZERS: dict = {}


def llg_tokenizer(tokenizer, eos_token_ids: tuple) -> llguidance.LLTokenizer:
    """llguidance's view of a vlmkit Tokenizer (its `tokenizers` backend, as `llguidance.hf.from_tokenizer` reads a
    transformers one, without transformers); ~0.5 s to build, so kept per tokenizer and eos ids."""
    key = (id(tokenizer), eos_token_ids)
    entry = _LLG_TOKENIZERS.get(key)
    if entry is not None and entry[0] is tokenizer:
        return entry[1]
    backend = getattr(tokenizer, "backend", None)
    if backend is None or not hasattr(backend, "to_str"):
        raise ValueError("structured output needs a tokenizer backed by the `tokenizers` library")
    backend = copy.copy(backend)
    backend.no_padding()
    backend.no_truncation()
    llg = llguidance.LLTokenizer(backend.to_str(), eos_token=list(eos_token_ids))
    _LLG_TOKENIZERS[key] = (tokenizer, llg)
    return llg


ConstraintRows = Union[None, CompiledConstraint, Sequence[Optional[CompiledConstraint]]]


class GrammarRows:
    """One llguidance matcher per row of a generation call (rows given None decode freely)."""

    _executor: Optional[llguidance.LLExecutor] = None

    def __init__(self, constraints: ConstraintRows, rows: int):
        if isinstance(constraints, CompiledConstraint):
            constraints = [constraints] * rows
        if len(constraints) != rows:
            raise ValueError(f"got {len(constraints)} constraints for {rows} rows")
        self.matchers = [c.matcher() if c is not None else None for c in constraints]
        self.active = [m is not None for m in self.matchers]  # False once a row took eos or left its grammar
        llg_tok = next((c.tokenizer for c in constraints if c is not None), None)
        self.eos = set(llg_tok.eos_tokens) if llg_tok is not None else set()
        self.bitmask = llg_numpy.allocate_token_bitmask(rows, llg_tok.vocab_size if llg_tok is not None else 32)

    def mask(self, logits: torch.Tensor) -> torch.Tensor:
        """logits [B, V] with every token a constrained row's grammar forbids at -inf (head columns past the
        tokenizer's vocabulary included); free and finished rows are left as they are."""
        rows = [(m, i) for i, (m, on) in enumerate(zip(self.matchers, self.active)) if on]
        if not rows:
            return logits
        if len(rows) == 1:
            llg_numpy.fill_next_token_bitmask(rows[0][0], self.bitmask, rows[0][1])
        else:
            if GrammarRows._executor is None:
                GrammarRows._executor = llguidance.LLExecutor()
            llg_numpy.fill_next_token_bitmask_par(GrammarRows._executor, rows, self.bitmask)
        index = [i for _, i in rows]
        # Bit k of word j is token 32j + k: little-endian bytes, little-endian bits.
        words = self.bitmask[index].astype("<i4", copy=False)
        bits = np.unpackbits(words.view(np.uint8), axis=1, count=logits.shape[-1], bitorder="little")
        forbidden = torch.from_numpy(bits).to(logits.device) == 0
        if len(index) == logits.shape[0]:
            return logits.masked_fill(forbidden, -float("inf"))
        logits[index] = logits[index].masked_fill(forbidden, -float("inf"))
        return logits

    def advance(self, tokens: Sequence[int]) -> None:
        """Each constrained row's matcher takes the row's chosen token. A row that took eos is done; one whose
        token its matcher refuses (a row finished by a stop string gets padding) is no longer masked."""
        for i, tok in enumerate(tokens):
            if self.active[i]:
                tok = int(tok)
                if not self.matchers[i].consume_token(tok) or tok in self.eos:
                    self.active[i] = False
