"""The README.md model card of a folder vlmkit writes (a training run's final/, `vlmkit.save`, `vlmkit quantize`,
exports): the Hugging Face Hub's YAML header (base_model, license, pipeline_tag, library_name, datasets, tags) and a
body saying what the model is (family, sizes from the config), how to use it, how it was trained and its last
metrics. A card carries MARKER; a README.md without it is the user's and is never overwritten.

The YAML is written by hand (every value a JSON string, which YAML reads as a double-quoted scalar) so writing a card
needs no YAML library; reading the source folder's header uses PyYAML when installed, else a small reader of the
flat keys used here.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Iterable, Optional, Union

from ..models.summary import parameter_count
from ..plots import read_metrics
from .io import atomic_write_text

__all__ = ["CARD", "MARKER", "card_header", "hub_id", "is_our_card", "last_metrics", "write_model_card"]

CARD = "README.md"
MARKER = "<!-- model card written by vlmkit: rewritten when vlmkit writes this folder again; delete this line to " \
         "keep your edits -->"
PIPELINE_TAG = "image-text-to-text"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


# ------------------------------------------------------------------------------------------------ reading

def card_header(path) -> dict:
    """The YAML header of a model card file ({} when there is none or it does not parse)."""
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return {}
    match = re.match(r"---\r?\n(.*?)\r?\n---\r?\n", text, re.DOTALL)
    if not match:
        return {}
    try:
        import yaml
    except ImportError:
        return _flat_yaml(match.group(1))
    try:
        header = yaml.safe_load(match.group(1))
    except yaml.YAMLError:
        return {}
    return header if isinstance(header, dict) else {}


def _flat_yaml(text: str) -> dict:
    """`key: value` and `key:` followed by `- item` lines; enough for the keys read here."""
    out: dict = {}
    key = None
    for line in text.splitlines():
        item = re.match(r"\s*-\s+(.*)$", line)
        if item and key is not None:
            out.setdefault(key, [])
            if isinstance(out[key], list):
                out[key].append(_scalar(item.group(1)))
            continue
        pair = re.match(r"([A-Za-z_][\w-]*):\s*(.*)$", line)
        if pair:
            key, value = pair.group(1), pair.group(2).strip()
            out[key] = _scalar(value) if value else []
    return out


def _scalar(text: str):
    text = text.strip()
    if text[:1] == '"':
        try:
            return json.loads(text)
        except ValueError:
            pass
    return text.strip("'\"")


def is_our_card(folder) -> bool:
    path = Path(folder) / CARD
    try:
        return MARKER in path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False


def hub_id(folder) -> Optional[str]:
    """The Hub id a local model folder came from, when it shows: a Hub cache path (models--ORG--NAME) or a
    `_name_or_path` like ORG/NAME in its config.json."""
    folder = Path(folder)
    for part in folder.resolve().parts:
        match = re.fullmatch(r"models--([^/]+?)--(.+)", part)
        if match:
            return f"{match.group(1)}/{match.group(2)}"
    try:
        name = json.loads((folder / "config.json").read_text()).get("_name_or_path")
    except (OSError, ValueError, AttributeError):
        name = None
    if isinstance(name, str) and _HUB_ID.match(name) and not Path(name).exists():
        return name
    return None


def last_metrics(path) -> dict:
    """From a training run's metrics.jsonl: {"steps", "train_loss" (the last step's), "eval" (the last eval's
    metrics, with its "step")}; unreadable lines are skipped."""
    try:
        steps, evals = read_metrics(path)
    except OSError:
        return {}
    out: dict = {}
    with_loss = [step for step, record in steps.items() if record.get("loss") is not None]
    if with_loss:
        out["train_loss"], out["steps"] = steps[max(with_loss)]["loss"], max(with_loss)
    evaluated = [step for step, scores in evals.items() if scores]
    if evaluated:
        out["eval"] = {"step": max(evaluated), **evals[max(evaluated)]}
    return out


# ------------------------------------------------------------------------------------------------ writing

def write_model_card(folder, *, base_model: Optional[str] = None, training: Optional[dict] = None,
                     metrics: Union[dict, str, Path, None] = None, datasets: Optional[Iterable[str]] = None,
                     quantization: Optional[dict] = None, model=None, source=None, license: Optional[str] = None,
                     tags: Iterable[str] = (), usage: Optional[str] = None, title: Optional[str] = None,
                     description: Optional[str] = None, base_model_relation: Optional[str] = None) -> Optional[Path]:
    """Write `folder`/README.md; returns its path, or None when the folder holds a README.md that is not ours.

    base_model: the Hub id (or name) of the model this one comes from; default: `source`'s Hub id, else its name.
    source: the folder the model was loaded from (its card's license and datasets carry over when not given).
    training: the run's settings, shown as a table. metrics: a metrics.jsonl path or `last_metrics`' dict.
    datasets: training data names or paths (paths are shown by file name). quantization: `quantization_of(model)`.
    model: the VLMModel, for parameter counts. usage: markdown replacing the "How to use" section (exports that
    are not Hugging Face folders). title: the card's heading (default: the folder's name). description: what the
    model is, in place of "saved from SOURCE". base_model_relation: the Hub's, when the default (finetune after
    training, quantized after quantizing, none for a plain re-save) is wrong.
    """
    folder = Path(folder)
    path = folder / CARD
    if path.exists() and not is_our_card(folder):
        return None
    inherited = card_header(Path(source) / CARD) if source is not None else {}
    base = base_model or (hub_id(source) or Path(source).resolve().name if source is not None else None)
    datasets = [_dataset_name(d) for d in datasets] if datasets else _as_list(inherited.get("datasets"))
    license = license or inherited.get("license") or "other"
    if isinstance(metrics, (str, Path)):
        metrics = last_metrics(metrics)
    config = _read_config(folder)
    family = _family(config, model)
    tag_list = _unique(["vlmkit", PIPELINE_TAG, "vision-language-model", *([family] if family else []),
                        *([quantization["mode"]] if quantization else []), *(["fine-tuned"] if training else []),
                        *tags])
    relation = base_model_relation or _relation(training, quantization)
    header = {"base_model": base, "base_model_relation": relation if base else None,
              "license": license, "pipeline_tag": PIPELINE_TAG, "library_name": "vlmkit",
              "datasets": datasets or None, "tags": tag_list}
    sections = [
        _front_matter(header), MARKER, "",
        f"# {title or folder.resolve().name}", "",
        _summary(family, config, description or _origin(source, base, training), quantization), "",
        *_parts_table(model, config),
        "## How to use", "",
        usage if usage is not None else _usage(folder, config, quantization), "",
        *_training_section(training, datasets),
        *_metrics_section(metrics),
    ]
    if license == "other":
        sections += ["License: not recorded with the base model; the base model's terms apply.", ""]
    atomic_write_text(path, "\n".join(sections).rstrip() + "\n")
    return path


def _front_matter(header: dict) -> str:
    lines = ["---"]
    for key, value in header.items():
        if value is None:
            continue
        if isinstance(value, (list, tuple)):
            lines.append(f"{key}:")
            lines += [f"- {json.dumps(str(v))}" for v in value]
        else:
            lines.append(f"{key}: {json.dumps(str(value))}")
    lines.append("---")
    return "\n".join(lines)


def _relation(training, quantization) -> Optional[str]:
    """The Hub's base_model_relation; none for a plain re-save (the same model)."""
    if training:
        return "finetune"
    return "quantized" if quantization else None


def _dataset_name(entry) -> str:
    text = str(entry)
    match = re.search(r"datasets--([^/]+?)--([^/]+)", text)
    if match:
        return f"{match.group(1)}/{match.group(2)}"
    if _HUB_ID.match(text) and not Path(text).exists():
        return text
    return Path(text.rstrip("/")).name or text


def _as_list(value) -> list:
    if value is None:
        return []
    return [str(v) for v in value] if isinstance(value, list) else [str(value)]


def _unique(items) -> list:
    return list(dict.fromkeys(str(i) for i in items if i))


def _read_config(folder: Path) -> dict:
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return {}
    return config if isinstance(config, dict) else {}


def _family(config: dict, model) -> Optional[str]:
    if model is not None:
        return model.cfg.extra.get("hf_architecture", model.cfg.family)
    return config.get("model_type")


def _origin(source, base, training) -> str:
    if training:
        return f"fine-tuned from `{base}`" if base else "fine-tuned"
    name = (hub_id(source) or Path(source).resolve().name) if source is not None else base
    return f"saved from `{name}`" if name else "written"


def _summary(family, config, origin: str, quantization) -> str:
    arch = (config.get("architectures") or [None])[0]
    what = "A vision-language model" + (f" of the {family} family" if family else "")
    what += (f" (`{arch}`)" if arch else "") + f", {origin}"
    if quantization:
        group = quantization.get("group_size") if quantization.get("mode") == "int4" else None
        what += (f"; weights quantized to {quantization['mode']}" + (f" (group size {group})" if group else "")
                 + " by vlmkit (vlmkit loads this folder; transformers does not)")
    return what + ". Written by vlmkit."


def _millions(n: int) -> str:
    return f"{n / 1e6:.1f} M" if n >= 1e5 else f"{n / 1e3:.1f} K"


def _parts_table(model, config: dict) -> list:
    if model is None:
        return []
    cfg = model.cfg
    v, t, c = cfg.vision, cfg.text, cfg.connector
    rows = [
        ("vision", f"ViT: {v.image_size} px, patch {v.patch_size}, width {v.hidden_size}, {v.num_layers} layers, "
                   f"{v.num_heads} heads", parameter_count(model.vision)),
        ("connector", f"{c.kind}, {c.in_dim} -> {c.out_dim}; {cfg.tokens_per_image or 'variable'} tokens per image",
         parameter_count(model.connector)),
        ("language model", f"width {t.hidden_size}, {t.num_layers} layers, {t.num_heads} heads ({t.num_kv_heads} "
                           f"key/value), vocabulary {t.vocab_size}, context {t.max_position_embeddings}",
         parameter_count(model.text)),
    ]
    total = parameter_count(model)
    lines = ["| part | what | parameters |", "|---|---|---:|"]
    lines += [f"| {name} | {what} | {_millions(n)} |" for name, what, n in rows]
    lines += [f"| total | images meet text by {cfg.merge.replace('_', ' ')} | {_millions(total)} |", ""]
    return lines


def _hf_loadable(folder: Path, config: dict, quantization) -> bool:
    return (not quantization and "vlmkit_adapter" not in config and bool(config.get("architectures"))
            and (any(folder.glob("*.safetensors")) or (folder / "model.safetensors.index.json").is_file()))


def _usage(folder: Path, config: dict, quantization) -> str:
    name = folder.resolve().name
    text = ["With vlmkit (`pip install vlmkit`):", "", "```python", "import vlmkit", "",
            f'm = vlmkit.load("{name}")  # this folder', 'print(m.generate("<image> Describe this image.", '
            'images=["photo.jpg"]))', "```", "", "or on the command line:", "", "```bash",
            f'vlmkit run --model {name} --image photo.jpg "Describe this image."', "```"]
    if _hf_loadable(folder, config, quantization):
        arch = config["architectures"][0]
        text += ["", "With transformers (the folder is in Hugging Face format):", "", "```python",
                 f"from transformers import AutoProcessor, {arch}", "",
                 f'processor = AutoProcessor.from_pretrained("{name}")',
                 f'model = {arch}.from_pretrained("{name}")', "```"]
    return "\n".join(text)


def _training_section(training: Optional[dict], datasets: list) -> list:
    if not training:
        return []
    lines = ["## Training", ""]
    if datasets:
        lines += ["Data: " + ", ".join(f"`{d}`" for d in datasets) + ".", ""]
    lines += ["| setting | value |", "|---|---|"]
    for key, value in _flatten(training):
        lines.append(f"| {key} | `{_cell(value)}` |")
    return lines + [""]


def _flatten(d: dict, prefix: str = "") -> list:
    out = []
    for key, value in d.items():
        if isinstance(value, dict) and value:
            out += _flatten(value, f"{prefix}{key}.")
        elif value is not None and value != [] and value != {}:
            out.append((prefix + str(key), value))
    return out


def _cell(value) -> str:
    text = json.dumps(value, default=str) if not isinstance(value, str) else value
    return text.replace("|", "\\|").replace("`", "'").replace("\n", " ")


def _metrics_section(metrics: Optional[dict]) -> list:
    if not metrics:
        return []
    lines = ["## Results", ""]
    if metrics.get("train_loss") is not None:
        step = f" (step {metrics['steps']})" if metrics.get("steps") is not None else ""
        lines.append(f"- last training loss: {metrics['train_loss']:.4f}{step}")
    evaluation = metrics.get("eval") or {}
    for key, value in evaluation.items():
        if key != "step" and isinstance(value, (int, float)):
            lines.append(f"- eval {key}: {value:.4f}" + (f" (step {evaluation['step']})"
                                                         if evaluation.get("step") is not None else ""))
    return lines + [""] if len(lines) > 2 else []
