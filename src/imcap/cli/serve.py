"""`imcap serve`: the web page and the REST API."""

from __future__ import annotations

from typing import Annotated

import typer

from imcap.cli.common import (
    command,
    fail,
    quiet_libraries,
)
from imcap.images import DEFAULT_MAX_PIXELS


def _serve_option(flag: str, help: str):
    return typer.Option(flag, help=help, rich_help_panel="Limits")


@command()
def serve(
    model: Annotated[
        list[str] | None,
        typer.Option("--model", "-m", help="Model folder or hub id; repeat for several (default: shipped)."),
    ] = None,
    host: Annotated[str, typer.Option("--host", help="Address to listen on (0.0.0.0: all).")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port")] = 8000,
    max_upload_mb: Annotated[float, _serve_option("--max-upload-mb", "Largest file accepted.")] = 20.0,
    max_pixels: Annotated[
        int, _serve_option("--max-pixels", "Refuse larger images (decompression-bomb guard).")
    ] = DEFAULT_MAX_PIXELS,
    max_images: Annotated[int, _serve_option("--max-images", "Images per request.")] = 16,
    timeout: Annotated[float, _serve_option("--timeout", "Seconds a request may wait, then 503.")] = 60.0,
    queue_size: Annotated[
        int, _serve_option("--queue-size", "Images waiting for the model; more get 503 + Retry-After.")
    ] = 64,
    max_batch: Annotated[int, _serve_option("--max-batch", "Images per model call.")] = 8,
    max_wait_ms: Annotated[
        float, _serve_option("--max-wait-ms", "How long to wait for more images to fill a batch.")
    ] = 10.0,
    threads: Annotated[
        int | None, typer.Option("--threads", help="Torch CPU threads (default: all cores).")
    ] = None,
    no_ui: Annotated[bool, typer.Option("--no-ui", help="REST API only, no web page at /.")] = False,
    rate_limit: Annotated[
        str | None, _serve_option("--rate-limit", "REST requests per client address, e.g. 5/s; more get 429.")
    ] = None,
    cors_origin: Annotated[
        list[str] | None,
        typer.Option("--cors-origin", help="Let pages from this origin call the API; repeat (default none)."),
    ] = None,
) -> None:
    """Serve a web page at / and a REST API at /v1 (docs at /docs). Set IMCAP_API_KEY to require a key."""
    quiet_libraries()
    from imcap.modeling import ModelLoadError
    from imcap.serving.server import serve as run_server
    from imcap.serving.settings import ServeSettings, parse_rate

    try:
        settings = ServeSettings(
            host=host,
            port=port,
            max_upload_mb=max_upload_mb,
            max_pixels=max_pixels or None,
            max_images_per_request=max_images,
            request_timeout_s=timeout,
            queue_size=queue_size,
            max_batch=max_batch,
            max_wait_ms=max_wait_ms,
            **({"threads": threads} if threads is not None else {}),
            ui=not no_ui,
            rate_limit=parse_rate(rate_limit) if rate_limit else None,
            cors_origins=tuple(cors_origin or ()),
        ).validate()
        run_server(model or [None], settings)
    except ModuleNotFoundError as error:  # fastapi, uvicorn, gradio... come with the serve extra
        fail(f"imcap serve needs {error.name}: pip install 'imcap[serve]' (or scripts/install.sh --serve)")
    except (ValueError, ModelLoadError) as error:
        fail(str(error))
