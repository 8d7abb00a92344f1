"""`imcap serve`: load the models once, build the app, run it with uvicorn in this one process."""

from __future__ import annotations

import os
import signal
import sys
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from imcap.serving.settings import API_KEY_VARIABLE, DEFAULT_MODEL_ID, ServeSettings

_LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1"}


def model_id(name_or_path: str | None) -> str:
    """The API's name for a model: "default" for the shipped one, else the --model value as given (the
    same as `Captioner.name`, known here before any model is loaded)."""
    return DEFAULT_MODEL_ID if name_or_path is None else str(name_or_path)


def load_captioners(models: Sequence[str | None], max_pixels: int | None) -> dict:
    """One Captioner per model, in the given order (the first is the default), keyed by model_id."""
    from imcap.captioner import Captioner

    models = list(models) or [None]
    ids = [model_id(m) for m in models]
    if len(set(ids)) < len(ids):
        raise ValueError(f"a model is given twice: {', '.join(ids)}")
    return {i: Captioner.from_pretrained(m, max_pixels=max_pixels) for i, m in zip(ids, models, strict=True)}


def serve(models: Sequence[str | None], settings: ServeSettings) -> None:
    """Serve until Ctrl-C: one process, one instance of each model, uploads in a temp folder."""
    import torch
    import uvicorn

    settings.validate()
    captioners = load_captioners(models, settings.max_pixels)
    torch.set_num_threads(settings.threads)
    if settings.host not in _LOCAL_HOSTS and settings.api_key is None:
        print(
            f"warning: listening on {settings.host} without {API_KEY_VARIABLE}: anyone who can reach "
            f"port {settings.port} can use the API",
            file=sys.stderr,
        )
    # uvicorn shuts down gracefully on SIGTERM, then raises the signal again; exiting through an exception
    # from there (as Ctrl-C's KeyboardInterrupt does) lets the temp folder below be deleted
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    with _uploads_in_temp_folder():
        from imcap.serving.app import create_app  # imports gradio, which must see GRADIO_TEMP_DIR

        app = create_app(captioners, settings)
        uvicorn.run(app, host=settings.host, port=settings.port, timeout_graceful_shutdown=5)


def _exit_on_sigterm(signum: int, frame) -> None:
    raise SystemExit(128 + signum)


@contextmanager
def _uploads_in_temp_folder() -> Iterator[str]:
    """Every uploaded byte that reaches disk goes under one private temp folder, deleted at the end.

    Gradio keeps page uploads in GRADIO_TEMP_DIR (read when gradio is imported); Starlette spools
    REST uploads over 1 MB to `tempfile` files, which follow `tempfile.tempdir`.
    """
    previous = os.environ.get("GRADIO_TEMP_DIR")
    with tempfile.TemporaryDirectory(prefix="imcap-serve-") as folder:
        os.environ["GRADIO_TEMP_DIR"], tempfile.tempdir = folder, folder
        print(f"uploads are kept in {folder} until the server stops", file=sys.stderr, flush=True)
        try:
            yield folder
        finally:
            tempfile.tempdir = None
            if previous is None:
                os.environ.pop("GRADIO_TEMP_DIR", None)
            else:
                os.environ["GRADIO_TEMP_DIR"] = previous
