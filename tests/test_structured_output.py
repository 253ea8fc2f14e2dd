"""Structured output in the Python API: `generate(json_schema=... | regex=... | grammar=...)` keeps the answer inside
its grammar (llguidance masks the logits in the one generation loop), so even a random tiny model's answer parses
and validates: nested objects, enums, arrays, numbers, booleans, string patterns; streamed pieces add up to the
same answer; generate_batch gives each row its own matcher (and rows of a batch may carry different constraints);
an answer cut by max_new_tokens is a prefix of a valid one; bad schemas, regexes and grammars are refused up
front with the engine's message. The default model answers a schema with JSON that validates."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

import vlmkit
from vlmkit.generation.constraints import Constraint
from vlmkit.generation.loop import GenerationConfig, generate

jsonschema = pytest.importorskip("jsonschema", reason="jsonschema is not installed (make install-dev)")

# Every string, number (multipleOf bounds its digits) and array is bounded, so even random weights close the answer
# within the budget.
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "height": {"type": "number", "minimum": 0, "maximum": 3, "multipleOf": 0.25},
        "color": {"enum": ["red", "green", "blue"]},
        "member": {"type": "boolean"},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 5}, "minItems": 1, "maxItems": 3},
        "address": {
            "type": "object",
            "properties": {"zip": {"type": "string", "pattern": "^[0-9]{5}$"},
                           "kind": {"enum": ["home", "work"]}},
            "required": ["zip", "kind"],
            "additionalProperties": False,
        },
    },
    "required": ["name", "age", "height", "color", "member", "tags", "address"],
    "additionalProperties": False,
}
BUDGET = 160


@pytest.fixture(scope="module")
def vlm(hf_checkpoint_dir):
    return vlmkit.load(hf_checkpoint_dir("llava"))


def valid(text: str, schema: dict) -> dict:
    value = json.loads(text)
    jsonschema.validate(value, schema)
    return value


@pytest.mark.parametrize("seed", [None, 1, 2])
def test_schema_answers_parse_and_validate(vlm, seed):
    sampling = {} if seed is None else {"do_sample": True, "temperature": 1.5, "seed": seed}
    out = vlm.generate("Describe someone.", json_schema=PERSON, max_new_tokens=BUDGET, **sampling)
    value = valid(out, PERSON)
    assert set(value) == set(PERSON["required"]) and value["color"] in ("red", "green", "blue")


def test_any_json_regex_and_grammar(vlm):
    anything = vlm.generate("Some JSON:", json_schema={"type": "object", "properties": {"ok": {"type": "boolean"}},
                                                       "required": ["ok"], "additionalProperties": False})
    assert isinstance(json.loads(anything)["ok"], bool)
    phone = vlm.generate("A phone number:", regex=r"\+[0-9]{2} [0-9]{3}-[0-9]{4}", max_new_tokens=40)
    assert re.fullmatch(r"\+[0-9]{2} [0-9]{3}-[0-9]{4}", phone)
    lark = 'start: answer " because " reason\nanswer: "yes" | "no"\nreason: /[a-z]{1,6}/'
    said = vlm.generate("Is it?", grammar=lark, max_new_tokens=40)
    assert re.fullmatch(r"(yes|no) because [a-z]{1,6}", said)


def test_streamed_pieces_are_the_answer(vlm):
    whole = vlm.generate("Describe someone.", json_schema=PERSON, max_new_tokens=BUDGET)
    pieces = list(vlm.generate("Describe someone.", json_schema=PERSON, max_new_tokens=BUDGET, stream=True))
    assert len(pieces) > 5 and "".join(pieces) == whole
    valid(whole, PERSON)


def test_generate_batch_one_matcher_per_row(vlm):
    prompts = ["Describe someone.", "Who?", "A much longer prompt about a person who lives somewhere far away."]
    outs = vlm.generate_batch(prompts, json_schema=PERSON, max_new_tokens=BUDGET, do_sample=True, seed=3)
    for out in outs:
        valid(out, PERSON)
    assert len(set(outs)) > 1  # rows sample their own answers


def test_rows_of_one_batch_with_different_constraints(vlm):
    tok, eos = vlm.processor.tokenizer, vlm.processor.eos_token_ids
    colors = {"enum": ["red", "green", "blue"]}
    rows = [Constraint("json_schema", PERSON).compile(tok, eos), None,
            Constraint("json_schema", colors).compile(tok, eos), Constraint("regex", "[0-9]{3}").compile(tok, eos)]
    batch = vlm.processor(["Describe someone.", "Free text", "A color", "Digits"], None)
    cfg = GenerationConfig(max_new_tokens=BUDGET, eos_token_ids=list(eos), constraint=rows)
    outs = generate(vlm.model, tok, batch, cfg)
    valid(outs[0], PERSON)
    assert json.loads(outs[2]) in colors["enum"]
    assert re.fullmatch("[0-9]{3}", outs[3])
    free = generate(vlm.model, tok, batch, GenerationConfig(max_new_tokens=BUDGET, eos_token_ids=list(eos)))
    assert outs[1] == free[1]  # an unconstrained row is untouched by its neighbours' grammars


def test_cut_by_max_new_tokens_is_a_valid_prefix(vlm):
    out = vlm.generate("Describe someone.", json_schema=PERSON, max_new_tokens=6)
    full = vlm.generate("Describe someone.", json_schema=PERSON, max_new_tokens=BUDGET)
    assert out and full.startswith(out) and out != full
    with pytest.raises(json.JSONDecodeError):
        json.loads(out)


@pytest.mark.parametrize("kwargs, message", [
    ({"json_schema": {"type": "strange"}}, "invalid JSON schema"),
    ({"json_schema": {"type": "string", "pattern": "(unclosed"}}, "invalid JSON schema"),
    ({"json_schema": "not a schema"}, "json_schema must be a JSON schema"),
    ({"regex": "(a"}, "invalid regex"),
    ({"grammar": "start: undefined_rule"}, "invalid grammar"),
    ({"json_schema": True, "regex": "a"}, "at most one of json_schema, regex, grammar"),
])
def test_bad_constraints_are_refused_up_front(vlm, kwargs, message):
    with pytest.raises(ValueError, match=message):
        vlm.generate("x", **kwargs)


def test_without_a_constraint_nothing_changes(vlm):
    batch = vlm.processor(["Describe someone."], None)
    eos = list(vlm.processor.eos_token_ids)
    plain = generate(vlm.model, vlm.processor.tokenizer, batch, GenerationConfig(max_new_tokens=12, eos_token_ids=eos))
    assert vlm.generate("Describe someone.", max_new_tokens=12, raw=True) == plain[0]


def test_default_model_answers_a_schema():
    m = vlmkit.load("default")
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                               "country": {"type": "string", "maxLength": 20},
                                               "population_millions": {"type": "number"}},
              "required": ["city", "country", "population_millions"], "additionalProperties": False}
    with torch.inference_mode():
        out = m.generate("Name a large city, as JSON.", json_schema=schema, max_new_tokens=48)
    value = valid(out, schema)
    assert value["city"].strip()


def test_any_schema_value_is_compiled_or_refused_with_value_error(vlm):
    """Whatever a client sends as a schema (deep nesting, junk keywords), only ValueError comes out."""
    hypothesis = pytest.importorskip("hypothesis")
    st = hypothesis.strategies
    leaves = st.one_of(st.none(), st.booleans(), st.integers(-3, 3), st.sampled_from(
        ["string", "object", "array", "integer", "number", "null", "boolean", "^a+$", "(", "#/defs/x"]))
    keys = st.sampled_from(["type", "properties", "items", "enum", "required", "pattern", "minimum", "maxItems",
                            "anyOf", "allOf", "$ref", "const", "additionalProperties", "format", "x"])
    values = st.recursive(leaves, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                          st.dictionaries(keys, inner, max_size=4)), max_leaves=12)
    tok, eos = vlm.processor.tokenizer, vlm.processor.eos_token_ids

    @hypothesis.settings(max_examples=150, deadline=None, database=None)
    @hypothesis.given(schema=st.dictionaries(keys, values, max_size=4))
    def check(schema):
        try:
            Constraint("json_schema", schema).compile(tok, eos)
        except ValueError as e:
            assert str(e)

    check()
    deep = {"type": "string"}
    for _ in range(2000):
        deep = {"type": "array", "items": deep}
    with pytest.raises(ValueError, match="invalid JSON schema"):
        Constraint("json_schema", deep).compile(tok, eos)


def test_fast_path_and_model_forward_apply_the_same_rule(vlm, monkeypatch):
    """The grammar rule sits after the logits, so the static-cache fast path and the model's forward agree."""
    from vlmkit.generation import loop

    fast = vlm.generate_batch(["Describe someone.", "Who?"], json_schema=PERSON, max_new_tokens=BUDGET)
    monkeypatch.setattr(loop, "fast_decoder", lambda model: None)
    slow = vlm.generate_batch(["Describe someone.", "Who?"], json_schema=PERSON, max_new_tokens=BUDGET)
    assert fast == slow
    for out in fast:
        valid(out, PERSON)


def test_run_command_constrains_the_answer(tmp_path, capsys):
    from vlmkit import cli

    examples = Path(__file__).parent.parent / "examples"
    schema = tmp_path / "color.json"
    schema.write_text(json.dumps({"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]}},
                                  "required": ["color"]}))
    assert cli.main(["run", "--image", str(examples / "shapes.png"), "--json-schema", str(schema),
                     "What color is the circle?"]) == 0
    assert json.loads(capsys.readouterr().out) == {"color": "red"}
    assert cli.main(["run", "--image", str(examples / "count.png"), "--regex", "[0-9]+",
                     "How many stars are there?"]) == 0
    assert capsys.readouterr().out.strip() == "5"
    # refused before the model loads: one line, exit code 2
    for flags, message in [(["--json-schema", "{bad"], "neither a JSON schema nor a file"),
                           (["--json-schema", "[1]"], "must be a JSON object"),
                           (["--grammar", "start: ("], "invalid grammar"),
                           (["--regex", "a", "--grammar", 'start: "a"'], "give one of")]:
        assert cli.main(["run", *flags, "x"]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
