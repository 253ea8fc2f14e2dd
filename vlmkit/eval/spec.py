"""Task specs: a benchmark over any file, defined in YAML or JSON, and `get_task`, which resolves a task
argument (a built-in name, a Task, a spec path or a dict).

    from vlmkit.eval.spec import get_task, load_task_spec
    task = get_task("vqav2")                    # or a Task, or a YAML/JSON task spec file

A task spec (YAML or JSON) defines a task over any file:

    name: my_vqa
    data: questions.jsonl            # optional: --data overrides it; relative to the spec file
    prompt: "{question}\\nAnswer the question using a single word or phrase."
    image_field: image               # a field, a list of fields, or null (text only)
    answer_field: answers
    metric: vqav2                    # vqav2 textvqa anls relaxed_accuracy exact_match multiple_choice cider bleu4
    options_field: options           # multiple_choice only: a list of option texts; "{choices}" in the prompt
    id_field: question_id            # optional (default: the row number)
    category_field: type             # optional: scores per value of this field too
    max_new_tokens: 16
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Union

from . import metrics as M
from .tasks import TASKS, Task, breakdown, field_images, item_scorer, mean, parse_options

__all__ = ["get_task", "load_task_spec"]


class _Fields(dict):
    def __missing__(self, key):
        raise KeyError(key)


def _format(template: str, row: dict, extra: dict) -> str:
    values = _Fields({k: ("" if v is None else v) for k, v in row.items() if isinstance(k, str)})
    values.update(extra)
    try:
        return template.format_map(values)
    except KeyError as e:
        raise ValueError(f"the prompt template uses {{{e.args[0]}}} but the row has no such field "
                         f"(fields: {', '.join(sorted(k for k in row if isinstance(k, str)))})") from None
    except (IndexError, ValueError) as e:
        raise ValueError(f"bad prompt template {template!r}: {e}") from None


def load_task_spec(spec: Union[str, os.PathLike, dict]) -> Task:
    """A Task from a YAML / JSON spec file (or an already-parsed dict); see the module docstring."""
    base, default_name = Path("."), "custom"
    if not isinstance(spec, dict):
        path = Path(spec).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"task spec {str(path)!r} does not exist")
        text = path.read_text(encoding="utf-8")
        if path.suffix.lower() in (".yaml", ".yml"):
            try:
                import yaml
            except ImportError:  # pragma: no cover
                raise ImportError("YAML task specs need PyYAML: pip install 'vlmkit[eval]' (or write the spec as JSON)"
                                  ) from None
            spec = yaml.safe_load(text)
        else:
            spec = json.loads(text)
        base, default_name = path.parent, path.stem
        if not isinstance(spec, dict):
            raise ValueError(f"{path}: a task spec is a mapping of settings")
    spec = dict(spec)
    known = {"name", "data", "split", "prompt", "image_field", "answer_field", "metric", "options_field", "id_field",
             "category_field", "max_new_tokens", "description"}
    unknown = set(spec) - known
    if unknown:
        raise ValueError(f"unknown task spec keys {sorted(unknown)}; known: {sorted(known)}")
    for key in ("prompt", "answer_field", "metric"):
        if not spec.get(key):
            raise ValueError(f"the task spec needs '{key}'")
    metric = str(spec["metric"])
    if metric not in M.METRIC_NAMES:
        raise ValueError(f"unknown metric {metric!r}; choose from {', '.join(M.METRIC_NAMES)}")
    template, answer_field = str(spec["prompt"]), str(spec["answer_field"])
    images = spec.get("image_field", "image")
    image_fields = [] if images is None else [images] if isinstance(images, str) else list(images)
    options_field = spec.get("options_field")
    if metric == "multiple_choice" and not options_field:
        raise ValueError("the multiple_choice metric needs 'options_field' (a list of option texts per row)")
    category = spec.get("category_field")
    groups = (category,) if category else ()

    def build(row):
        extra = {}
        if options_field:
            opts = parse_options(row.get(options_field))
            extra["choices"] = "\n".join(f"{c}. {o}" for c, o in zip(M.choice_letters(len(opts)), opts))
        return _format(template, row, extra), field_images(row, image_fields)

    def record(row):
        if answer_field not in row:
            raise ValueError(f"the row has no answer field {answer_field!r}")
        target = row[answer_field]
        if isinstance(target, (list, tuple)):
            target = [str(t["answer"]) if isinstance(t, dict) else str(t) for t in target]
        elif target is not None:
            target = str(target)
        out = {"target": target}
        if options_field:
            out["options"] = parse_options(row.get(options_field))
        if category:
            out[category] = row.get(category)
        return out

    if metric in M.CORPUS_METRICS:
        fn = M.CORPUS_METRICS[metric]

        def score(records, seed=0):
            refs = [r["target"] if isinstance(r["target"], list) else [r["target"] or ""] for r in records]
            value = fn([r["prediction"] for r in records], refs) if records else 0.0
            return {"metrics": {metric: value}, "breakdown": {}, "item_scores": {}}
    elif metric == "multiple_choice":
        def choice(prediction, target, options, rid, seed):
            index2ans, letters = M.get_multi_choice_info(options)
            picked = M.parse_multi_choice_response(prediction, letters, index2ans, random.Random(f"{seed}:{rid}"))
            gold = target
            if isinstance(target, str) and target not in letters and target in options:  # gold given as text
                gold = letters[options.index(target)]
            return float(M.eval_multi_choice(gold, picked))

        def score(records, seed=0):
            item = {r["id"]: choice(r["prediction"], r["target"], r["options"], r["id"], seed) for r in records}
            return {"metrics": {"accuracy": mean(list(item.values()))},
                    "breakdown": breakdown(records, item, groups, "accuracy"), "item_scores": item}
    else:
        score = item_scorer(metric, M.ITEM_METRICS[metric], groups)

    data = spec.get("data")
    if data and not Path(str(data)).expanduser().is_absolute():
        data = str(base / str(data))
    return Task(str(spec.get("name") or default_name), build, record, score,
                str(spec.get("description", f"user task ({metric})")), spec.get("id_field"),
                int(spec.get("max_new_tokens", 32)), data=data, spec=spec)


def get_task(task: Union[str, os.PathLike, Task, dict]) -> Task:
    """A built-in task by name, a Task as is, or a task spec (a .yaml / .yml / .json path, or a dict)."""
    if isinstance(task, Task):
        return task
    if isinstance(task, dict):
        return load_task_spec(task)
    name = str(task)
    if name in TASKS:
        return TASKS[name]()
    if name.lower().endswith((".yaml", ".yml", ".json")) or os.path.sep in name:
        return load_task_spec(name)
    raise ValueError(f"unknown task {name!r}; built-in tasks: {', '.join(TASKS)}; or give a .yaml/.json task spec")
