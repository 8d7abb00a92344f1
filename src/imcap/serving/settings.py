"""`ServeSettings`: every limit of `imcap serve` in one dataclass, checked in one place.

Kept free of FastAPI and Gradio imports so that the CLI can build and check it before loading anything.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from imcap.images import DEFAULT_MAX_PIXELS

API_KEY_VARIABLE = "IMCAP_API_KEY"
DEFAULT_MODEL_ID = "default"  # how the API names the model shipped inside the package
EXAMPLES_DIR = Path(__file__).resolve().parents[3] / "examples"  # the repository's photos (a source checkout)


def _api_key_from_environment() -> str | None:
    return os.environ.get(API_KEY_VARIABLE) or None


@dataclass(frozen=True)
class ServeSettings:
    """How `imcap serve` listens, what it accepts, and how it batches model calls."""

    host: str = "127.0.0.1"  # localhost only unless told otherwise
    port: int = 8000
    max_upload_mb: float = 20.0  # per file
    max_pixels: int | None = DEFAULT_MAX_PIXELS  # per image, from its header (decompression-bomb guard)
    max_images_per_request: int = 16
    request_timeout_s: float = 60.0  # queue wait + model time for one request, then 503
    queue_size: int = 64  # images waiting for the model, over all requests; more -> 503 + Retry-After
    max_batch: int = 8  # images per model call
    max_wait_ms: float = 10.0  # how long an idle worker waits for more images to fill a batch
    max_beams: int = 8  # cap on num_beams and num_return_sequences: the cost of one request stays bounded
    threads: int = field(default_factory=lambda: os.cpu_count() or 1)  # torch CPU threads
    api_key: str | None = field(default_factory=_api_key_from_environment, repr=False)
    ui: bool = True  # the Gradio page at /; the API key guards the REST API only
    examples_dir: Path | None = EXAMPLES_DIR
    rate_limit: float | None = None  # REST requests per second per client address, 429 beyond; None: any
    cors_origins: tuple[str, ...] = ()  # origins whose pages may call the API from a browser; none by default

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)

    @property
    def max_request_bytes(self) -> int:
        """Cap on a whole /v1 request body: every allowed file at its limit, plus 1 MB for the form."""
        return self.max_images_per_request * self.max_upload_bytes + 1024 * 1024

    def validate(self) -> ServeSettings:
        """Raise ValueError (one line) on the first impossible setting; return self when all are fine."""
        checks = [
            (0 <= self.port <= 65535, f"port must be in 0..65535, got {self.port}"),
            (self.max_upload_mb > 0, f"max_upload_mb must be > 0, got {self.max_upload_mb}"),
            (
                self.max_pixels is None or self.max_pixels > 0,
                f"max_pixels must be > 0, not {self.max_pixels}",
            ),
            (self.max_images_per_request >= 1, "max_images_per_request must be >= 1"),
            (self.request_timeout_s > 0, f"request_timeout_s must be > 0, got {self.request_timeout_s}"),
            (self.queue_size >= 1, f"queue_size must be >= 1, got {self.queue_size}"),
            (self.max_batch >= 1, f"max_batch must be >= 1, got {self.max_batch}"),
            (self.max_wait_ms >= 0, f"max_wait_ms must be >= 0, got {self.max_wait_ms}"),
            (self.max_beams >= 1, f"max_beams must be >= 1, got {self.max_beams}"),
            (self.threads >= 1, f"threads must be >= 1, got {self.threads}"),
            (
                self.rate_limit is None or self.rate_limit > 0,
                f"rate_limit must be > 0 requests per second, got {self.rate_limit}",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        return self


_RATE_UNITS = {"s": 1.0, "sec": 1.0, "m": 60.0, "min": 60.0}


def parse_rate(text: str) -> float:
    """'5/s' (or '300/min', or a bare '5') as requests per second; ValueError (one line) otherwise."""
    count, _, unit = text.strip().partition("/")
    try:
        rate = float(count) / _RATE_UNITS[unit.strip() or "s"]
    except (ValueError, KeyError):
        raise ValueError(f"--rate-limit must look like 5/s or 300/min, got {text!r}") from None
    if not rate > 0 or rate == float("inf"):
        raise ValueError(f"--rate-limit must be more than 0 per second, got {text!r}")
    return rate
