"""`python -m recipes.default_model [--flags]`: train the default model. Every flag is a field of RecipeConfig
(nested sections prefixed: --word-steps is `RecipeConfig.word.steps`), with its default."""

from __future__ import annotations

import argparse
import json
import sys
import typing
from dataclasses import fields, is_dataclass, replace

from .config import RecipeConfig
from .train import train_default


def boolean(text: str) -> bool:
    words = {"1": True, "true": True, "yes": True, "0": False, "false": False, "no": False}
    if text.lower() not in words:
        raise ValueError(text)
    return words[text.lower()]


def _parser_type(hint, default):
    """An argparse type for a field: its type hint, resolved; tuples are comma lists, dicts JSON."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    base = args[0] if args else hint
    if base is bool:
        return boolean
    if base is tuple:
        kind = type(default[0]) if default else str
        return lambda s: tuple(kind(x) for x in s.split(",") if x)
    if base is dict:
        return json.loads
    return base


def _add_fields(parser, config, prefix: str, dest: str) -> None:
    """One flag per field of the dataclass instance `config`, its value the default; nested ones get a group."""
    hints = typing.get_type_hints(type(config))
    for f in fields(config):
        default = getattr(config, f.name)
        if is_dataclass(default):
            doc = " ".join((type(default).__doc__ or "").split())
            group = parser.add_argument_group(f"--{prefix}{f.name}-*: {doc[0].lower() + doc[1:]}")
            _add_fields(group, default, f"{f.name}-", f"{dest}{f.name}.")
            continue
        shown = ",".join(map(str, default)) if isinstance(default, tuple) else (
            json.dumps(default) if isinstance(default, dict) else default)
        parser.add_argument(f"--{prefix}{f.name.replace('_', '-')}", dest=f"{dest}{f.name}",
                            type=_parser_type(hints[f.name], default), default=None, metavar=f.name.upper(),
                            help=f.metadata.get("help", "") + ("" if default is None else f" (default {shown})"))


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m recipes.default_model", usage="%(prog)s [--FLAG VALUE ...]",
                                description="Train vlmkit's default model (see recipes/default_model/README.md). "
                                            "Every flag is a field of RecipeConfig.")
    _add_fields(p, RecipeConfig(), "", "")
    return p


def config_from(args: argparse.Namespace, cfg: RecipeConfig | None = None) -> RecipeConfig:
    """RecipeConfig with the flags that were given."""
    cfg = cfg or RecipeConfig()
    for key, value in vars(args).items():
        if value is None:
            continue
        *path, name = key.split(".")
        if path:
            section = getattr(cfg, path[0])
            cfg = replace(cfg, **{path[0]: replace(section, **{name: value})})
        else:
            cfg = replace(cfg, **{name: value})
    return cfg


def main(argv: list | None = None) -> int:
    train_default(config_from(parser().parse_args(argv)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
