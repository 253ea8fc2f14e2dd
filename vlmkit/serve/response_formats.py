"""Structured output fields of a request -> a `Constraint` (vlmkit.generation.constraints): OpenAI's
`response_format` ({"type": "text" | "json_object" | "json_schema"}) and Ollama's `format` ("json" or a JSON
schema). Only the field's shape is checked here; whether llguidance accepts the schema is checked when the request
is prepared (Engine.prepare), both refusals being 400s."""

from __future__ import annotations

from typing import Optional

from ..generation.constraints import Constraint
from .checks import bad, show_value, type_name

__all__ = ["openai_response_format", "ollama_format"]


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
