"""`vlmkit run` (one prompt, the answer streamed, or one JSON object with counts and timings) and `vlmkit chat`
(turns read from stdin)."""

from __future__ import annotations

import json
import sys
import time

from .common import (GENERATION, MODEL, PROG, REMOTE_IMAGES, STRUCTURED, USAGE_ERROR, CLIError, arg, check_image_files,
                     command, generation_options, load_images, load_model, one_line, remote_images_allowed, status,
                     structured_options, write_stream)


@command("run", "answer one prompt about images, streaming the answer",
         *MODEL, *GENERATION, *STRUCTURED, REMOTE_IMAGES,
         arg("--image", "-i", action="append", default=[], metavar="PATH",
             help="an image file or http(s) URL (repeat for several); placed where the prompt's <image> "
                  "placeholders are, else first"),
         arg("--system", default=None, metavar="TEXT", help="a system message"),
         arg("--json", action="store_true", help="print one JSON object instead of the stream: answer, "
             "prompt_tokens, completion_tokens, timings (load_s, time_to_first_token_s, total_s: prompt to last "
             "token, tokens_per_s: after the first), model, dtype, device"),
         arg("prompt", help="the question or instruction"))
def cmd_run(args) -> int:
    from ..image_tasks import Chat, user_content

    if not args.prompt.strip() and not args.image:
        raise CLIError("the prompt is empty")
    # Everything about the input is checked before the model loads (seconds): paths and headers, the count of
    # <image> placeholders against the images, then every image decoded.
    remote = remote_images_allowed(args)
    check_image_files(args.image, remote)
    user_content(args.prompt, args.image)
    options = {**generation_options(args), **structured_options(args)}
    images = load_images(args.image, remote)
    start = time.perf_counter()
    m = load_model(args)
    load_s = time.perf_counter() - start
    chat = Chat(m, system=args.system)
    if not args.json:
        write_stream(chat.stream(args.prompt, images, **options))
        return 0
    stats, pieces, first = {}, [], None
    start = time.perf_counter()
    for piece in chat.stream(args.prompt, images, stats=stats, **options):
        first = time.perf_counter() - start if first is None else first
        pieces.append(piece)
    total = time.perf_counter() - start
    n = stats["completion_tokens"]
    print(json.dumps({
        "answer": "".join(pieces), "prompt_tokens": stats["prompt_tokens"], "completion_tokens": n,
        "timings": {"load_s": load_s, "time_to_first_token_s": first, "total_s": total,
                    "tokens_per_s": (n - 1) / (total - first) if n > 1 and total > first else None},
        "model": args.model, "dtype": str(m.model.dtype).removeprefix("torch."), "device": str(m.model.device),
    }, indent=2))
    return 0


CHAT_HELP = "commands: /image PATH|URL (attach to the next turn), /reset (forget the conversation), /help, /exit"


@command("chat", "multi-turn chat in the terminal (reads lines from stdin)",
         *MODEL, *GENERATION, REMOTE_IMAGES,
         arg("--image", "-i", action="append", default=[], metavar="PATH",
             help="an image file or http(s) URL for the first turn"),
         arg("--system", default=None, metavar="TEXT", help="a system message"))
def cmd_chat(args) -> int:
    from ..image_tasks import Chat
    from ..processing.images import ImageError

    remote = remote_images_allowed(args)
    pending = load_images(args.image, remote)
    m = load_model(args)
    chat = Chat(m, system=args.system)
    options = generation_options(args)
    interactive = sys.stdin.isatty()
    failed = False  # a bad turn or /image: reported, the chat goes on, the exit code is 2
    if interactive:
        status(f"{PROG} chat with {m.info()['family']} model {args.model}; {CHAT_HELP}")
    while True:
        if interactive:
            sys.stderr.write("> ")
            sys.stderr.flush()
        line = sys.stdin.readline()
        if not line:  # EOF
            break
        line = line.strip()
        if not line:
            continue
        if line.startswith("/"):
            name, _, rest = line.partition(" ")
            rest = rest.strip()
            if name in ("/exit", "/quit", "/bye"):
                break
            if name == "/reset":
                chat.reset()
                pending = []
                status("(conversation cleared)")
            elif name == "/help":
                status(CHAT_HELP)
            elif name == "/image":
                try:
                    pending += load_images([rest], remote) if rest else []
                    status(f"(image attached: {rest}; {len(pending)} for the next turn)" if rest
                           else "usage: /image PATH")
                except CLIError as e:
                    failed = True
                    status(f"{PROG}: error: {one_line(e)}")
            else:
                status(f"unknown command {name}; {CHAT_HELP}")
            continue
        try:
            pieces = chat.stream(line, pending, **options)
        except (ImageError, ValueError) as e:  # bad turn: say so, keep the conversation as it was
            failed = True
            status(f"{PROG}: error: {one_line(e)}")
            continue
        pending = []
        write_stream(pieces)
    return USAGE_ERROR if failed else 0
