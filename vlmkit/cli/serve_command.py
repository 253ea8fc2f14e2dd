"""`vlmkit serve`: the OpenAI / Ollama HTTP server (vlmkit.serve; the serve extra) and the chat page (the ui extra).

Flags are spelled as `vllm serve` spells them (the model positional, --served-model-name, --max-num-seqs,
--limit-mm-per-prompt, --api-key, --max-model-len, --quantization, --dtype auto/half/float); vlmkit's earlier
spellings (--model, --name, --max-batch, --max-images, --quantize) still work, hidden from --help.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os

from .common import ADAPTER, DTYPES, MODEL, PROG, CLIError, arg, command, load_model, positive_int, status

API_KEY_ENV = ("VLMKIT_API_KEY", "VLLM_API_KEY")  # read in this order when no --api-key is given
VLLM_DTYPES = {"auto": None, "half": "float16", "float": "float32"}  # vLLM's other spellings
HIDDEN = argparse.SUPPRESS


def mm_limit(text: str) -> int:
    """--limit-mm-per-prompt: vLLM's JSON ('{"image": 4}') or a plain count of images."""
    text = text.strip()
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        raise argparse.ArgumentTypeError(f"expected a count of images or JSON like '{{\"image\": 4}}', got "
                                         f"{text!r}") from None
    if isinstance(value, int) and not isinstance(value, bool):
        return positive_int(text)
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a count of images or JSON like '{{\"image\": 4}}', got {text!r}")
    for key, count in value.items():
        if isinstance(count, dict):  # vLLM's newer form: {"image": {"count": 4, "width": ..., "height": ...}}
            count = count.get("count")
        if not isinstance(count, int) or isinstance(count, bool) or count < 0:
            raise argparse.ArgumentTypeError(f"{key!r} must map to a count >= 0, got {value[key]!r}")
        if key != "image" and count:
            raise argparse.ArgumentTypeError(f"{key!r} inputs are not supported (vlmkit models take images only)")
        if key == "image":
            if count < 1:
                raise argparse.ArgumentTypeError("the image count must be >= 1")
            image_count = count
    if "image" not in value:
        raise argparse.ArgumentTypeError(f"no 'image' count in {text!r}")
    return image_count


_MODEL_FLAGS = {flags[0]: kwargs for flags, kwargs in MODEL}

SERVE_ARGS = (
    arg("model", nargs="?", default=None, metavar="MODEL",
        help="model folder in Hugging Face format, or 'default' (the embedded model; used when none is given)"),
    arg("--model", "-m", dest="model_flag", default=None, help=HIDDEN),
    arg("--served-model-name", default=None, metavar="NAME",
        help="the model name clients send (default: the folder's name; the embedded model is vlmkit-default)"),
    arg("--name", dest="served_model_name", default=HIDDEN, help=HIDDEN),
    arg("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)"),
    arg("--port", type=positive_int, default=8000, help="port (default 8000)"),
    arg("--api-key", action="append", default=None, metavar="KEY",
        help="clients must send 'Authorization: Bearer KEY' on every route but /health (repeat for several keys; "
             f"default: ${API_KEY_ENV[0]}, else ${API_KEY_ENV[1]}, else no key)"),
    arg("--dtype", choices=[*VLLM_DTYPES, *DTYPES], default=None,
        help="compute dtype of the float parts; auto (the default) is what is fast on the device: bf16 on GPUs and "
             "on CPUs with bf16 units, fp16 on MPS, fp32 on other CPUs"),
    arg("--device", **_MODEL_FLAGS["--device"]),
    ADAPTER,
    arg("--quantization", "-q", choices=["int8", "int4"], default=None, help="weight-only quantization"),
    arg("--quantize", dest="quantization", choices=["int8", "int4"], default=HIDDEN, help=HIDDEN),
    arg("--allow-remote-images", action="store_true",
        help="fetch http(s) image URLs (never loopback, private or link-local addresses)"),
    arg("--max-num-seqs", type=positive_int, default=8, metavar="N", help="requests decoded together (default 8)"),
    arg("--max-batch", dest="max_num_seqs", type=positive_int, default=HIDDEN, help=HIDDEN),
    arg("--max-model-len", type=positive_int, default=None, metavar="N",
        help="the context a request may fill, prompt and answer together (default: the model's)"),
    arg("--queue-limit", type=positive_int, default=64, metavar="N",
        help="requests queued or running before new ones get 429 (default 64)"),
    arg("--max-tokens", type=positive_int, default=4096, metavar="N",
        help="the most new tokens a request may ask for (default 4096, at most the context)"),
    arg("--max-prompt-tokens", type=positive_int, default=None, metavar="N",
        help="longest prompt accepted, image tokens included (default: the context)"),
    arg("--prefill-chunk", type=positive_int, default=None, metavar="N",
        help="prompt tokens prefilled per scheduler step, between the running requests' decode steps "
             "(default 64 on CPU, 512 on a GPU)"),
    arg("--max-body-mb", type=positive_int, default=32, metavar="MB", help="request body cap (default 32)"),
    arg("--limit-mm-per-prompt", type=mm_limit, default=16, metavar="LIMIT",
        help="images per request: JSON as vLLM takes it ('{\"image\": 4}') or a plain count (default 16)"),
    arg("--max-images", dest="limit_mm_per_prompt", type=positive_int, default=HIDDEN, help=HIDDEN),
    arg("--max-image-pixels", type=positive_int, default=40_000_000, metavar="N",
        help="decoded pixels per image (default 40000000)"),
    arg("--max-request-pixels", type=positive_int, default=100_000_000, metavar="N",
        help="decoded pixels of all images of one request together, checked before decoding "
             "(default 100000000: four 6000x4000 photos)"),
    arg("--no-ui", action="store_true",
        help="no Gradio chat page at / (the page needs gradio: the ui extra)"),
)


def resolve_model(args) -> str:
    """MODEL (positional, as `vllm serve`) or the older --model; both may be given only if they agree."""
    positional, flag = args.model, args.model_flag
    if positional is not None and flag is not None and os.path.normpath(positional) != os.path.normpath(flag):
        raise CLIError(f"two models given: {positional!r} (MODEL) and {flag!r} (--model); pass one")
    return positional or flag or "default"


def api_keys(args, environ=os.environ) -> list[str]:
    """--api-key values, else the first environment variable of API_KEY_ENV that is set."""
    if args.api_key is not None:
        keys = args.api_key
        if any(not k.strip() for k in keys):
            raise CLIError("--api-key must not be empty")
        return keys
    for name in API_KEY_ENV:
        value = environ.get(name)
        if value is not None and value.strip():
            return [value.strip()]
    return []


@command("serve", "serve a model over HTTP: OpenAI /v1/chat/completions and /v1/completions, Ollama /api/chat and "
                  "/api/generate, a chat page at /",
         *SERVE_ARGS)
def cmd_serve(args) -> int:
    try:
        from ..serve import create_app, default_model_name
        from ..serve.app import run
        from ..serve.auth import is_loopback
        import uvicorn  # noqa: F401  (imported by run(), after the model has loaded)
    except ImportError as e:
        raise CLIError(f"vlmkit serve needs the serve extra ({e.name} is missing): pip install 'vlmkit[serve]'"
                       ) from None
    if not args.no_ui and importlib.util.find_spec("gradio") is None:
        # the APIs are the server's job; the page is optional, so a missing gradio costs the page, not the server
        status("warning: no chat page at / (it needs gradio: pip install 'vlmkit[ui]'); serving the APIs only "
               "(--no-ui silences this)")
        args.no_ui = True
    from ..processing.images import ImageLimits

    args.model = resolve_model(args)
    args.dtype = VLLM_DTYPES.get(args.dtype, args.dtype)
    args.quantize = args.quantization  # the name load_model reads
    keys = api_keys(args)
    if not is_loopback(args.host) and not keys:
        status(f"warning: binding {args.host} without --api-key: anyone who can reach this address can use the model "
               f"(set --api-key or ${API_KEY_ENV[0]})")
    if args.model == "default":
        from .. import api

        if not (api.default_model_path() / "config.json").is_file():
            raise CLIError(f"no model given and the embedded default model is not installed: {PROG} serve "
                           "MODEL_FOLDER (a local Hugging Face folder)")
    m = load_model(args)
    limits = ImageLimits(max_pixels=args.max_image_pixels, max_images=args.limit_mm_per_prompt,
                         max_request_pixels=args.max_request_pixels, allow_remote=args.allow_remote_images,
                         allow_paths=False)
    name = args.served_model_name or default_model_name(args.model)
    try:
        app = create_app(m, model_name=name, limits=limits, max_batch=args.max_num_seqs,
                         queue_limit=args.queue_limit, max_tokens_limit=args.max_tokens,
                         max_body_bytes=args.max_body_mb * 1024 * 1024, ui=not args.no_ui,
                         max_prompt_tokens=args.max_prompt_tokens, prefill_chunk=args.prefill_chunk, api_key=keys,
                         max_model_len=args.max_model_len)
    except ValueError as e:
        raise CLIError(f"--max-model-len: {e}" if "max_model_len" in str(e) else str(e)) from None
    status(f"{PROG} serve: {name!r} on http://{args.host}:{args.port} (OpenAI API /v1, Ollama API /api"
           + ("" if args.no_ui else ", chat page /") + ")" + (" with an API key" if keys else ""))
    run(app, host=args.host, port=args.port, log_level=(args.log_level or "info").lower())
    return 0
