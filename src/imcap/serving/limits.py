"""Per-client request rate limit for the REST API: a token bucket per client address, 429 when empty.

    app.add_middleware(RateLimit, per_second=5.0, prefix="/v1/")

Each client (the connecting address: behind a reverse proxy, that is the proxy) may send `per_second`
requests per second on average, in bursts of up to max(1, per_second). A request over the limit gets 429
with `Retry-After`, the whole seconds until it would be let through, before any of its body is read.
"""

from __future__ import annotations

import math
import threading
import time

from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

_PRUNE_EVERY = 1024  # buckets kept before those that are full again (idle clients) are forgotten


class RateLimit:
    """ASGI middleware: at most `per_second` requests per second per client under `prefix`."""

    def __init__(self, app: ASGIApp, per_second: float, prefix: str = "/v1/"):
        self.app, self.rate, self.prefix = app, per_second, prefix
        self.burst = max(1.0, per_second)
        self._buckets: dict[str, tuple[float, float]] = {}  # client -> (tokens, when counted)
        self._lock = threading.Lock()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(self.prefix):
            return await self.app(scope, receive, send)
        client = scope.get("client")
        wait_s = self.take(client[0] if client else "unknown")
        if wait_s > 0:
            retry_after = max(1, math.ceil(wait_s))
            detail = f"too many requests: at most {self.rate:g} per second; retry after {retry_after} s"
            response = JSONResponse(
                {"detail": detail},
                status_code=429,
                headers={"Retry-After": str(retry_after)},
            )
            return await response(scope, receive, send)
        await self.app(scope, receive, send)

    def take(self, client: str, now: float | None = None) -> float:
        """Take one token from `client`'s bucket: 0 if there was one, else the seconds until there is."""
        now = time.monotonic() if now is None else now
        with self._lock:
            tokens, counted = self._buckets.get(client, (self.burst, now))
            tokens = min(self.burst, tokens + (now - counted) * self.rate)
            if tokens >= 1:
                self._buckets[client] = (tokens - 1, now)
                self._prune(now)
                return 0.0
            self._buckets[client] = (tokens, now)
            return (1 - tokens) / self.rate

    def _prune(self, now: float) -> None:
        """Forget clients whose bucket has filled up again (as good as new), so memory stays bounded."""
        if len(self._buckets) < _PRUNE_EVERY:
            return
        full_after = self.burst / self.rate
        self._buckets = {c: b for c, b in self._buckets.items() if now - b[1] < full_after}
