"""Load test of `imcap serve`: N concurrent clients POST one photo each, again and again, for T seconds,
next to `imcap caption` (the batch engine) on the same photos with the same model and settings.

Starts the server as a subprocess on a free localhost port (so its RSS and CPU time can be read from
/proc/<pid>), warms it up, then runs the clients and prints requests/s, latency percentiles, the share
of non-2xx answers by status code, the mean model batch size and the server's RSS. Before and after the
load, `imcap caption --batch-size <max batch>` captions the same photos, so the server's images/s is
compared with the batch engine's measured in the same run (the machine's load changes over minutes).
CPU seconds are counted per party: server, clients (this process), and everything else on the machine.
Per window (`--window`, 60 s) it reports requests, status codes, latency percentiles and the server's
RSS; over a long run (`--duration 600`) that is the soak test: RSS growth per 1000 requests after the
first window, and no 5xx other than 503. Traffic goes to 127.0.0.1 only; the run is bounded in time and
in requests. A client answered 503 waits for its Retry-After, as a polite client would.

    python benchmarks/bench_serve.py --clients 16 --duration 30 --json docs/bench_serve.json
    python benchmarks/bench_serve.py --clients 8 --duration 600 --no-compare --json soak.json  # soak
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import resource
import socket
import subprocess
import sys
import tempfile
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
FLICKR8K_IMAGES = REPO.parent / "shared" / "datasets" / "flickr8k" / "images"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model folder or hub id (default: the shipped model)")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--duration", type=float, default=30.0, help="seconds of measured load")
    parser.add_argument("--warmup", type=int, default=4, help="requests sent one by one before measuring")
    parser.add_argument("--max-requests", type=int, default=20_000, help="stop early after this many")
    parser.add_argument(
        "--images",
        type=Path,
        default=FLICKR8K_IMAGES if FLICKR8K_IMAGES.is_dir() else REPO / "examples",
        help="folder of .jpg photos to send (default: the shared Flickr8k images, else examples/)",
    )
    parser.add_argument("--photos", type=int, default=96, help="use the first N photos of the folder")
    parser.add_argument("--max-batch", type=int, default=8, help="server --max-batch = caption --batch-size")
    parser.add_argument("--window", type=float, default=60.0, help="seconds per reported window")
    parser.add_argument(
        "--no-compare", action="store_true", help="skip the imcap caption runs before and after the load"
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
    answers: list[tuple[float, float, int]] = field(default_factory=list)  # (when done, latency, status)

    @property
    def total(self) -> int:
        return sum(self.codes.values()) + sum(self.errors.values())


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        return probe.getsockname()[1]


def start_server(args: argparse.Namespace, port: int) -> subprocess.Popen:
    command = [str(IMCAP), "serve", "--host", HOST, "--port", str(port), "--max-batch", str(args.max_batch)]
    command += args.server_arg
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


def cpu_s(pid: int) -> float:
    """User + system CPU seconds a process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime, stime (fields 14 and 15)


def machine_busy_s() -> float:
    """CPU seconds all cores of the machine have been busy so far (/proc/stat: all but idle and iowait)."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:8]]
    return (sum(values) - values[3] - values[4]) / CLOCK_TICKS


def own_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def batch_engine(args: argparse.Namespace, paths: list[Path]) -> dict:
    """`imcap caption` on the same photos, batch size = the server's max batch: images/s and CPU use."""
    with tempfile.TemporaryDirectory() as folder:
        command = [str(IMCAP), "caption", *map(str, paths), "--batch-size", str(args.max_batch)]
        command += ["--output", str(Path(folder) / "out.jsonl")] + (
            ["--model", args.model] if args.model else []
        )
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
    found = re.search(r"captioned (\d+), .* in ([\d.]+) s \(([\d.]+) images/s\)", done.stderr)
    if done.returncode != 0 or not found:
        raise SystemExit(f"imcap caption failed:\n{done.stderr[-2000:]}")
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    return {
        "images": int(found[1]),
        "seconds": float(found[2]),
        "images_per_s": float(found[3]),
        "process_cpu_s": round(cpu, 1),  # includes loading the model
        "loadavg_1min": round(os.getloadavg()[0], 2),
    }


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
        load.tally.answers.append((time.monotonic(), time.monotonic() - sent, response.status_code))
        if response.is_success:
            load.tally.latencies_s.append(time.monotonic() - sent)
            load.tally.batch_images.append(response.json()["images"][0]["timing"]["batch_images"])
        elif response.status_code == 503:
            wait = float(response.headers.get("Retry-After", "1"))
            await asyncio.sleep(min(wait, max(0.0, load.deadline - time.monotonic())))


async def sample_rss(pid: int, load: Load, window_s: float, samples: list[tuple[float, int]]) -> None:
    """The server's RSS (kB) at the end of every window, until the load ends."""
    while time.monotonic() < load.deadline and load.requests_left > 0:
        await asyncio.sleep(min(window_s, max(0.05, load.deadline - time.monotonic())))
        samples.append((time.monotonic(), memory_kb(pid)["VmRSS"]))


async def run_load(
    url: str, photos, args: argparse.Namespace, pid: int
) -> tuple[Tally, float, float, list[tuple[float, int]]]:
    """(tally, start time, seconds, RSS samples) of `args.clients` clients for `args.duration` seconds."""
    limits = httpx.Limits(max_connections=args.clients, max_keepalive_connections=args.clients)
    async with httpx.AsyncClient(timeout=120, limits=limits) as http:
        started, samples = time.monotonic(), []
        load = Load(url, photos, started + args.duration, args.max_requests)
        clients = (client(http, load, i) for i in range(args.clients))
        await asyncio.gather(*clients, sample_rss(pid, load, args.window, samples))
        return load.tally, started, time.monotonic() - started, samples


def windows(tally: Tally, started: float, rss: list[tuple[float, int]]) -> list[dict]:
    """Per window: answers by status, latency percentiles of the 2xx ones, the server's RSS at its end."""
    rows = []
    for index, (end, rss_kb) in enumerate(rss):
        begin = rss[index - 1][0] if index else started
        answers = [a for a in tally.answers if begin <= a[0] < end or (index == len(rss) - 1 and a[0] >= end)]
        ok = np.array([latency for _, latency, code in answers if code < 300]) * 1000
        codes = Counter(code for *_, code in answers)
        rows.append(
            {
                "window": index + 1,
                "until_s": round(end - started, 1),
                "answers": len(answers),
                "requests_so_far": sum(1 for a in tally.answers if a[0] < end),
                "status": {str(code): n for code, n in sorted(codes.items())},
                "latency_ms": percentiles(ok),
                "server_rss_mb": round(rss_kb / 1024, 1),
            }
        )
    return rows


def rss_growth(rows: list[dict]) -> float | None:
    """kB of server RSS per 1000 requests: a least-squares slope over the windows after the first."""
    after = rows[1:]
    if len(after) < 2:
        return None
    requests = np.array([r["requests_so_far"] for r in after], float)
    rss_kb = np.array([r["server_rss_mb"] * 1024 for r in after])
    return round(float(np.polyfit(requests, rss_kb, 1)[0] * 1000), 1) if np.ptp(requests) else None


def percentiles(latencies_ms: np.ndarray) -> dict:
    return {
        name: round(float(np.percentile(latencies_ms, q)), 1) if len(latencies_ms) else None
        for name, q in (("p50", 50), ("p95", 95), ("p99", 99))
    }


def report(tally: Tally, elapsed_s: float, measured: dict, args: argparse.Namespace) -> dict:
    latencies = np.array(tally.latencies_s) * 1000
    total = tally.total
    rows = measured["windows"]
    numbers = {
        "clients": args.clients,
        "duration_s": round(elapsed_s, 1),
        "photos": measured["photos"],
        "max_batch": args.max_batch,
        "requests": total,
        "requests_per_s": round(total / elapsed_s, 2),
        "ok_per_s": round(len(latencies) / elapsed_s, 2),
        "server_images_per_s": round(len(latencies) / elapsed_s, 2),  # one image per request
        "latency_ms": percentiles(latencies),
        "non_2xx_share": {
            str(code): round(n / total, 4) for code, n in sorted(tally.codes.items()) if code >= 300
        },
        "server_errors_5xx_not_503": sum(n for code, n in tally.codes.items() if code >= 500 and code != 503),
        "transport_errors": dict(tally.errors),
        "mean_batch_images": round(float(np.mean(tally.batch_images)), 2) if tally.batch_images else None,
        "cpu_cores_used": {  # CPU seconds per second of load, per party
            party: round(seconds / elapsed_s, 2) for party, seconds in measured["cpu_s"].items()
        },
        "loadavg_1min_after_load": measured["loadavg"],
        "server_peak_rss_mb": round(measured["memory"]["VmHWM"] / 1024, 1),
        "server_rss_after_warmup_mb": round(measured["warm_rss_kb"] / 1024, 1),
        "server_rss_growth_kb_per_1000_requests": rss_growth(rows),
        "windows": rows,
        "where": where_it_ran(),
    }
    if measured.get("batch"):
        runs = measured["batch"]
        engine = float(np.mean([run["images_per_s"] for run in runs]))
        numbers["batch_engine"] = {"runs": runs, "mean_images_per_s": round(engine, 2)}
        numbers["server_vs_batch_engine"] = round(numbers["server_images_per_s"] / engine, 3)
    return numbers


def where_it_ran() -> str:
    cpu = platform.processor() or platform.machine()
    return (
        f"{cpu}, {os.cpu_count()} cores, python {platform.python_version()}, torch {version('torch')}, "
        f"imcap {version('imcap')}; clients and server on the same machine"
    )


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    paths = sorted(args.images.glob("*.jpg"))[: args.photos]
    photos = [(p.name, p.read_bytes()) for p in paths]
    if not photos:
        raise SystemExit(f"no .jpg photos in {args.images}")
    measured: dict = {"photos": len(photos), "batch": []}
    if not args.no_compare:  # the batch engine before the load ...
        measured["batch"].append(batch_engine(args, paths))
    port = free_port()
    url = f"http://{HOST}:{port}"
    server = start_server(args, port)
    try:
        wait_until_up(url, server)
        for name, data in photos[: args.warmup]:
            httpx.post(f"{url}/v1/captions", files={"images": (name, data)}, timeout=120).raise_for_status()
        measured["warm_rss_kb"] = memory_kb(server.pid)["VmRSS"]
        cpu_before = (cpu_s(server.pid), own_cpu_s(), machine_busy_s())
        tally, started, elapsed, rss = asyncio.run(run_load(url, photos, args, server.pid))
        cpu_after = (cpu_s(server.pid), own_cpu_s(), machine_busy_s())
        measured["memory"], measured["loadavg"] = memory_kb(server.pid), round(os.getloadavg()[0], 2)
    finally:
        server.terminate()
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
    server_cpu, clients_cpu, machine_cpu = (a - b for a, b in zip(cpu_after, cpu_before, strict=True))
    measured["cpu_s"] = {
        "server": server_cpu,
        "clients": clients_cpu,
        "rest_of_machine": max(0.0, machine_cpu - server_cpu - clients_cpu),
    }
    measured["windows"] = windows(tally, started, rss)
    if not args.no_compare:  # ... and after it: the machine's load drifts
        measured["batch"].append(batch_engine(args, paths))
    numbers = report(tally, elapsed, measured, args)
    print(json.dumps(numbers, indent=2))
    if args.json:
        args.json.write_text(json.dumps(numbers, indent=2) + "\n")
    server_errors = {code for code in tally.codes if code >= 500 and code != 503}
    if server_errors:
        raise SystemExit(f"server errors other than 503: {sorted(server_errors)}")


if __name__ == "__main__":
    main()
