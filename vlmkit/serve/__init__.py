"""vlmkit's server: OpenAI- and Ollama-compatible routes and a Gradio chat UI on one FastAPI app.

    from vlmkit.serve import create_app, serve
    app = create_app(vlmkit.load(folder), model_name="my-model")     # in-process (tests, embedding)
    serve("path/to/model", host="127.0.0.1", port=8000)               # what `vlmkit serve` runs

Needs the `serve` extra: pip install "vlmkit[serve]".
"""

from __future__ import annotations

import os
from typing import Optional

__all__ = ["create_app", "serve"]


try:
    from .app import create_app  # noqa: E402
except ImportError as e:
    if (e.name or "").split(".")[0] not in ("fastapi", "starlette", "uvicorn", "anyio"):  # not the serve extra's
        raise
    raise ImportError(f"vlmkit.serve needs the serve extra ({e.name} is missing): pip install 'vlmkit[serve]'",
                      name=e.name) from None


def default_model_name(model: str) -> str:
    if model == "default":
        return "vlmkit-default"
    return os.path.basename(os.path.normpath(os.path.expanduser(model))) or "vlmkit"


def serve(model: str = "default", host: str = "127.0.0.1", port: int = 8000, *, model_name: Optional[str] = None,
          allow_remote_images: bool = False, max_request_pixels: Optional[int] = None, dtype=None, device=None,
          ui: bool = True, log_level: str = "info", **app_options) -> None:
    """Load `model` and serve it (blocking). app_options go to create_app (max_batch, queue_limit, limits, api_key,
    ...). max_request_pixels: decoded pixels of one request's images together (default: ImageLimits')."""
    import logging
    from dataclasses import replace

    from .. import api
    from ..processing.images import ImageLimits
    from .app import run
    from .auth import is_loopback

    if not is_loopback(host) and not app_options.get("api_key"):
        logging.getLogger("vlmkit.serve").warning("binding %s without an api_key: anyone who can reach this address "
                                                  "can use the model", host)
    vlm = api.load(model, dtype=dtype, device=device, allow_remote_images=allow_remote_images)
    limits = replace(app_options.pop("limits", None) or ImageLimits(), allow_remote=allow_remote_images,
                     allow_paths=False)
    if max_request_pixels is not None:
        limits = replace(limits, max_request_pixels=max_request_pixels)
    app = create_app(vlm, model_name=model_name or default_model_name(model), limits=limits, ui=ui,
                      **app_options)
    run(app, host=host, port=port, log_level=log_level)
