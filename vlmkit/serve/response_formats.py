"""Structured output fields of a request -> a `Constraint` (vlmkit.generation.constraints): OpenAI's
`response_format` ({"type": "text" | "json_object" | "json_schema"}), vLLM's extra fields (`guided_json`,
`guided_regex`, `guided_choice`, and `structured_outputs` {"json" | "regex" | "choice"}, which the openai client
sends through `extra_body`) and Ollama's `format` ("json" or a JSON schema). Only the field's shape is checked
here; whether llguidance accepts the schema is checked when the request is prepared (Engine.prepare), both
refusals being 400s."""

from __future__ import annotations

import json
from typing import Optional

from ..generation.constraints import Constraint
from .checks import bad, show_value, type_name

__all__ = ["openai_constraint", "openai_response_format", "ollama_format"]

GUIDED = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice"}  # vLLM's extra fields


def openai_constraint(body: dict) -> tuple[Optional[Constraint], str]:
    """(the one constraint an OpenAI-style request asks for, the field it came from): `response_format`, or vLLM's
    `guided_*` fields or `structured_outputs` object."""
    if body.get("guided_grammar") is not None:
        raise bad("'guided_grammar' is not supported here (vLLM's grammar dialects differ from llguidance's Lark); "
                  "use guided_json, guided_regex or guided_choice, or the Python API's grammar=", "guided_grammar")
    plain = body.get("response_format") in (None, {"type": "text"})
    asked = [k for k in (*GUIDED, "structured_outputs") if body.get(k) is not None] + ([] if plain else
                                                                                       ["response_format"])
    if len(asked) > 1:
        raise bad(f"give one structured output field, not {', '.join(asked)}", asked[1])
    if not asked or asked[0] == "response_format":
        return openai_response_format(body.get("response_format")), "response_format"
    key, value = asked[0], body[asked[0]]
    if key == "structured_outputs":
        kinds = [k for k in ("json", "regex", "choice") if isinstance(value, dict) and value.get(k) is not None]
        if len(kinds) != 1:
            raise bad("'structured_outputs' must be an object with one of 'json', 'regex' or 'choice'", key)
        kind, key, value = kinds[0], f"{key}.{kinds[0]}", value[kinds[0]]
    else:
        kind = GUIDED[key]
    return _guided(kind, key, value), asked[0]


def _guided(kind: str, key: str, value) -> Constraint:
    if kind == "json":
        if isinstance(value, str):  # vLLM takes the schema as a JSON string too
            try:
                value = json.loads(value)
            except ValueError as e:
                raise bad(f"'{key}' is not valid JSON: {e}", key) from None
        if not isinstance(value, dict):
            raise bad(f"'{key}' must be a JSON schema object, got {type_name(value)}", key)
        return Constraint("json_schema", value)
    if kind == "regex":
        if not isinstance(value, str) or not value:
            raise bad(f"'{key}' must be a non-empty string (a regular expression), got {type_name(value)}", key)
        return Constraint("regex", value)
    if not isinstance(value, list) or not value or not all(isinstance(c, str) and c for c in value):
        raise bad(f"'{key}' must be a non-empty list of non-empty strings", key)
    # exactly one of the strings: a Lark alternation of string literals (JSON string syntax)
    return Constraint("grammar", "start: " + " | ".join(json.dumps(c, ensure_ascii=False) for c in value))


def openai_response_format(value) -> Optional[Constraint]:
    param = "response_format"
    if value is None:
        return None
    if not isinstance(value, dict):
        raise bad(f"'{param}' must be an object like {{'type': 'json_object'}}, got {type_name(value)}", param)
    kind = value.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return Constraint("json_schema", True)
    if kind != "json_schema":
        raise bad(f"'{param}.type' must be 'text', 'json_object' or 'json_schema', got {show_value(kind)}",
                  f"{param}.type")
    spec = value.get("json_schema")
    if not isinstance(spec, dict):
        raise bad(f"'{param}.json_schema' must be an object {{'name': ..., 'schema': {{...}}, 'strict': ...}}, got "
                  f"{type_name(spec)}", f"{param}.json_schema")
    name = spec.get("name")
    if name is not None and not isinstance(name, str):
        raise bad(f"'{param}.json_schema.name' must be a string, got {type_name(name)}", f"{param}.json_schema.name")
    strict = spec.get("strict")
    if strict is not None and not isinstance(strict, bool):
        raise bad(f"'{param}.json_schema.strict' must be a boolean, got {type_name(strict)}",
                  f"{param}.json_schema.strict")
    schema = spec.get("schema")
    if schema is None:  # OpenAI: the schema is optional; without one any JSON object will do
        return Constraint("json_schema", True)
    if not isinstance(schema, dict):
        raise bad(f"'{param}.json_schema.schema' must be a JSON schema object, got {type_name(schema)}",
                  f"{param}.json_schema.schema")
    return Constraint("json_schema", schema)


def ollama_format(value) -> Optional[Constraint]:
    if value is None or value == "":
        return None
    if value == "json":
        return Constraint("json_schema", True)
    if isinstance(value, dict):
        return Constraint("json_schema", value)
    raise bad(f"'format' must be \"json\" or a JSON schema object, got {type_name(value)} {show_value(value)}")
