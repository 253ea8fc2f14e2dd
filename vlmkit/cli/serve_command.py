"""`vlmkit serve`: the OpenAI / Ollama HTTP server and the chat page (vlmkit.serve; needs the serve extra)."""

from __future__ import annotations

from .common import MODEL, PROG, CLIError, arg, command, load_model, positive_int, status


@command("serve", "serve a model over HTTP: OpenAI /v1/chat/completions, Ollama /api/chat and /api/generate, "
                  "a chat page at /",
         *MODEL,
         arg("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)"),
         arg("--port", type=positive_int, default=8000, help="port (default 8000)"),
         arg("--name", default=None, metavar="NAME", help="the model name clients use (default: the folder name)"),
         arg("--allow-remote-images", action="store_true",
             help="fetch http(s) image URLs (never loopback, private or link-local addresses)"),
         arg("--max-batch", type=positive_int, default=8, metavar="N", help="prompts decoded together (default 8)"),
         arg("--queue-limit", type=positive_int, default=64, metavar="N",
             help="requests queued or running before new ones get 429 (default 64)"),
         arg("--max-tokens", type=positive_int, default=4096, metavar="N",
             help="the most new tokens a request may ask for (default 4096, at most the context)"),
         arg("--max-prompt-tokens", type=positive_int, default=None, metavar="N",
             help="longest prompt accepted, image tokens included (default: the model's context)"),
         arg("--prefill-chunk", type=positive_int, default=None, metavar="N",
             help="prompt tokens prefilled per scheduler step, between the running requests' decode steps "
                  "(default 64 on CPU, 512 on a GPU)"),
         arg("--max-body-mb", type=positive_int, default=32, metavar="MB", help="request body cap (default 32)"),
         arg("--max-images", type=positive_int, default=16, metavar="N", help="images per request (default 16)"),
         arg("--max-image-pixels", type=positive_int, default=40_000_000, metavar="N",
             help="decoded pixels per image (default 40000000)"),
         arg("--max-request-pixels", type=positive_int, default=100_000_000, metavar="N",
             help="decoded pixels of all images of one request together, checked before decoding "
                  "(default 100000000: four 6000x4000 photos)"),
         arg("--no-ui", action="store_true", help="no Gradio chat page at /"))
def cmd_serve(args) -> int:
    try:
        from ..serve import create_app, default_model_name
        from ..serve.app import run
        if not args.no_ui:
            import gradio  # noqa: F401
    except ImportError as e:
        raise CLIError(f"vlmkit serve needs the serve extra ({e.name} is missing): pip install 'vlmkit[serve]'"
                       + ("" if args.no_ui else " (or pass --no-ui)")) from None
    from ..processing.images import ImageLimits

    if args.host not in ("127.0.0.1", "localhost", "::1"):
        status(f"warning: binding {args.host}: anyone who can reach this address can use the model")
    m = load_model(args)
    limits = ImageLimits(max_pixels=args.max_image_pixels, max_images=args.max_images,
                         max_request_pixels=args.max_request_pixels, allow_remote=args.allow_remote_images,
                         allow_paths=False)
    name = args.name or default_model_name(args.model)
    app = create_app(m, model_name=name, limits=limits, max_batch=args.max_batch, queue_limit=args.queue_limit,
                     max_tokens_limit=args.max_tokens, max_body_bytes=args.max_body_mb * 1024 * 1024,
                     ui=not args.no_ui, max_prompt_tokens=args.max_prompt_tokens, prefill_chunk=args.prefill_chunk)
    status(f"{PROG} serve: {name!r} on http://{args.host}:{args.port} (OpenAI API /v1, Ollama API /api"
           + ("" if args.no_ui else ", chat page /") + ")")
    run(app, host=args.host, port=args.port)
    return 0
