"""`python -m recipes.default_model`: one flag per RecipeConfig field, and the defaults are what
`vlmkit train --recipe default` ran."""

from __future__ import annotations

from dataclasses import fields, is_dataclass, replace
from pathlib import Path

import pytest

from .. import __main__ as cli
from ..config import RecipeConfig


def test_defaults_are_the_recipe_as_it_ran():
    cfg = cli.config_from(cli.parser().parse_args([]))
    assert cfg == RecipeConfig()
    assert (cfg.out, cfg.ship, cfg.init_from, cfg.init_vision) == (Path("runs/default"), None, None, None)
    assert (cfg.shape.steps, cfg.vision.steps, cfg.word.steps, cfg.language.steps) == (600, 400, 300, 800)
    # stage 1 at batch 16 and lr 1e-3; the vision-only stages at twice the batch
    assert (cfg.language.batch_size, cfg.language.lr) == (16, 1e-3)
    assert cfg.shape.batch_size == cfg.vision.batch_size == cfg.word.batch_size == 32
    assert (cfg.word.class_weight, cfg.word.position_scale, cfg.word.extreme_scale) == (1.0, 0.5, 0.5)
    assert (cfg.shape.seed, cfg.vision.seed, cfg.word.seed, cfg.language.seed) == (2, 0, 3, 1)
    assert cfg.language.lora_spec() == {"r": 16, "alpha": 32.0, "targets": ["q_proj", "k_proj", "v_proj", "o_proj"]}
    assert (cfg.arch.patch_grid, cfg.arch.tokens_per_image) == (12, 16)


def test_flags_set_their_fields_and_main_trains_with_them(monkeypatch):
    calls = []
    monkeypatch.setattr(cli, "train_default", calls.append)
    argv = ["--out", "x", "--shape-steps", "5", "--vision-steps", "3", "--language-steps", "4",
            "--language-batch-size", "2", "--ship", "s", "--word-steps", "6", "--init-vision", "old",
            "--init-from", "older",
            "--word-position-scale", "0.25", "--language-lr", "5e-4", "--word-extreme-scale", "0",
            "--language-lora", "false", "--language-lora-targets", "q_proj,v_proj",
            "--language-weights", '{"color": 2.0}', "--language-lr-scales-word-tokens", "0.5,0.5,1"]
    assert cli.main(argv) == 0
    (cfg,) = calls
    assert (cfg.out, cfg.ship, cfg.init_vision, cfg.init_from) == (Path("x"), Path("s"), Path("old"), Path("older"))
    assert (cfg.shape.steps, cfg.vision.steps, cfg.word.steps, cfg.language.steps) == (5, 3, 6, 4)
    assert (cfg.language.batch_size, cfg.language.lr, cfg.language.lora) == (2, 5e-4, False)
    assert cfg.language.lora_targets == ("q_proj", "v_proj") and cfg.language.weights == {"color": 2.0}
    assert cfg.language.lr_scales_word_tokens == (0.5, 0.5, 1.0)
    assert (cfg.word.position_scale, cfg.word.extreme_scale, cfg.word.class_weight) == (0.25, 0.0, 1.0)
    assert cfg.vision == replace(RecipeConfig().vision, steps=3)  # nothing else moved


def test_every_field_has_a_flag_with_help():
    flags = {a.dest: a for a in cli.parser()._actions}
    cfg = RecipeConfig()
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        names = [f"{f.name}.{g.name}" for g in fields(value)] if is_dataclass(value) else [f.name]
        for name in names:
            assert name in flags and flags[name].help, name


def test_an_unknown_flag_or_a_bad_value_is_refused(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--lr", "1e-3"])
    assert "unrecognized arguments" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["--language-lora", "maybe"])
    assert "invalid boolean value" in capsys.readouterr().err
