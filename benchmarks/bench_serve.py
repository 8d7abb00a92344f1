"""Load test of `imcap serve`: N concurrent clients POST one photo each, again and again, for T seconds.

Starts the server as a subprocess on a free localhost port (so its peak RSS can be read from
/proc/<pid>/status), warms it up, then runs the clients and prints requests/s, latency percentiles,
the share of non-2xx answers by status code, the mean model batch size and the server's peak RSS.
Traffic goes to 127.0.0.1 only; the run is bounded in time and in requests. A client answered 503
waits for its Retry-After, as a polite client would.

    python benchmarks/bench_serve.py --clients 16 --duration 30 --json bench_serve.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path

import httpx
import numpy as np

REPO = Path(__file__).resolve().parents[1]
IMCAP = Path(sys.executable).parent / "imcap"
HOST = "127.0.0.1"  # never anything but this machine


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model folder or hub id (default: the shipped model)")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--duration", type=float, default=30.0, help="seconds of measured load")
    parser.add_argument("--warmup", type=int, default=4, help="requests sent one by one before measuring")
    parser.add_argument("--max-requests", type=int, default=20_000, help="stop early after this many")
    parser.add_argument(
        "--images", type=Path, default=REPO / "examples", help="folder of .jpg photos to send"
    )
    parser.add_argument(
        "--server-arg", action="append", default=[], help="passed to imcap serve, e.g. --no-ui"
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    return parser.parse_args(argv)


@dataclass
class Tally:
    latencies_s: list[float] = field(default_factory=list)  # of 2xx answers
    codes: Counter = field(default_factory=Counter)
    batch_images: list[int] = field(default_factory=list)
    errors: Counter = field(default_factory=Counter)  # transport errors (no HTTP answer)

    @property
    def total(self) -> int:
        return sum(self.codes.values()) + sum(self.errors.values())


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        return probe.getsockname()[1]


def start_server(args: argparse.Namespace, port: int) -> subprocess.Popen:
    command = [str(IMCAP), "serve", "--host", HOST, "--port", str(port), *args.server_arg]
    if args.model:
        command += ["--model", args.model]
    env = {**os.environ, "IMCAP_API_KEY": ""}  # no key: the benchmark measures captioning, not auth
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, text=True)


def wait_until_up(url: str, server: subprocess.Popen, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"imcap serve exited:\n{server.stderr.read()[-2000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise SystemExit("imcap serve did not come up in time")


def memory_kb(pid: int) -> dict[str, int]:
    """VmHWM (peak resident set) and VmRSS (now) of a process, in kB."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmHWM", "VmRSS"):
            fields[name] = int(value.split()[0])
    return fields


@dataclass
class Load:
    """What every client shares: where to send, what, until when, and the tally."""

    url: str
    photos: list[tuple[str, bytes]]
    deadline: float
    requests_left: int
    tally: Tally = field(default_factory=Tally)


async def client(http: httpx.AsyncClient, load: Load, first_photo: int) -> None:
    index = first_photo
    while time.monotonic() < load.deadline and load.requests_left > 0:
        load.requests_left -= 1  # one event loop: no lock needed
        name, data = load.photos[index % len(load.photos)]
        index += 1
        sent = time.monotonic()
        try:
            response = await http.post(
                f"{load.url}/v1/captions", files={"images": (name, data, "image/jpeg")}
            )
        except httpx.TransportError as error:
            load.tally.errors[type(error).__name__] += 1
            continue
        load.tally.codes[response.status_code] += 1
        if response.is_success:
            load.tally.latencies_s.append(time.monotonic() - sent)
            load.tally.batch_images.append(response.json()["images"][0]["timing"]["batch_images"])
        elif response.status_code == 503:
            wait = float(response.headers.get("Retry-After", "1"))
            await asyncio.sleep(min(wait, max(0.0, load.deadline - time.monotonic())))


async def run_load(
    url: str, photos, clients: int, duration_s: float, max_requests: int
) -> tuple[Tally, float]:
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=120, limits=limits) as http:
        started = time.monotonic()
        load = Load(url, photos, started + duration_s, max_requests)
        await asyncio.gather(*(client(http, load, i) for i in range(clients)))
        return load.tally, time.monotonic() - started


def report(tally: Tally, elapsed_s: float, memory: dict, args: argparse.Namespace) -> dict:
    latencies = np.array(tally.latencies_s) * 1000
    total = tally.total
    return {
        "clients": args.clients,
        "duration_s": round(elapsed_s, 1),
        "requests": total,
        "requests_per_s": round(total / elapsed_s, 2),
        "ok_per_s": round(len(latencies) / elapsed_s, 2),
        "latency_ms": {
            name: round(float(np.percentile(latencies, q)), 1) if len(latencies) else None
            for name, q in (("p50", 50), ("p95", 95), ("p99", 99))
        },
        "non_2xx_share": {
            str(code): round(n / total, 4) for code, n in sorted(tally.codes.items()) if code >= 300
        },
        "transport_errors": dict(tally.errors),
        "mean_batch_images": round(float(np.mean(tally.batch_images)), 2) if tally.batch_images else None,
        "server_peak_rss_mb": round(memory["VmHWM"] / 1024, 1),
        "server_rss_after_warmup_mb": round(memory["warm_rss_kb"] / 1024, 1),
        "where": where_it_ran(),
    }


def where_it_ran() -> str:
    cpu = platform.processor() or platform.machine()
    return (
        f"{cpu}, {os.cpu_count()} cores, python {platform.python_version()}, torch {version('torch')}, "
        f"imcap {version('imcap')}; clients and server on the same machine"
    )


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    photos = [(p.name, p.read_bytes()) for p in sorted(args.images.glob("*.jpg"))]
    if not photos:
        raise SystemExit(f"no .jpg photos in {args.images}")
    port = free_port()
    url = f"http://{HOST}:{port}"
    server = start_server(args, port)
    try:
        wait_until_up(url, server)
        for name, data in photos[: args.warmup]:
            httpx.post(f"{url}/v1/captions", files={"images": (name, data)}, timeout=120).raise_for_status()
        warm_rss_kb = memory_kb(server.pid)["VmRSS"]
        tally, elapsed = asyncio.run(run_load(url, photos, args.clients, args.duration, args.max_requests))
        memory = {**memory_kb(server.pid), "warm_rss_kb": warm_rss_kb}
    finally:
        server.terminate()
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
    numbers = report(tally, elapsed, memory, args)
    print(json.dumps(numbers, indent=2))
    if args.json:
        args.json.write_text(json.dumps(numbers, indent=2) + "\n")
    server_errors = {code for code in tally.codes if code >= 500 and code != 503}
    if server_errors:
        raise SystemExit(f"server errors other than 503: {sorted(server_errors)}")


if __name__ == "__main__":
    main()
