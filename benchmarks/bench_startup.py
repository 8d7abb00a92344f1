"""How long a new user waits: `imcap --help` and `imcap caption PHOTO` end to end, as fresh processes.

Each command runs `--repeats` times (a first run warms the OS file cache and is not counted); the median
wall-clock and CPU times are reported with the machine's load average, so a busy machine shows as such.

    python benchmarks/bench_startup.py --json docs/bench_startup.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
IMCAP = Path(sys.executable).parent / "imcap"
_LIBRARIES = "import torch, transformers; from transformers import PreTrainedModel"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--photo", type=Path, default=REPO / "examples" / "coffee.jpg")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    return parser.parse_args(argv)


def seconds(command: list[str]) -> tuple[float, float]:
    """(wall-clock, CPU) seconds of one run. CPU time (user + system of the child) is what the command
    itself costs; on a machine busy with other work the wall-clock time also holds the waiting."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def timed(command: list[str], repeats: int) -> dict:
    seconds(command)  # warm-up: file cache, .pyc files
    runs = [seconds(command) for _ in range(repeats)]
    walls, cpus = [wall for wall, _ in runs], [cpu for _, cpu in runs]
    return {
        "median_s": round(statistics.median(walls), 3),
        "median_cpu_s": round(statistics.median(cpus), 3),
        "runs_s": [round(w, 3) for w in walls],
    }


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    photo = os.path.relpath(args.photo)
    commands = {
        "help": [str(IMCAP), "--help"],
        "caption_one_photo": [str(IMCAP), "caption", photo],
        # the floor under any command that runs a transformers model: importing torch and transformers'
        # modeling code (which itself imports torch.distributed.tensor, torch._dynamo, sympy, jinja2...)
        "import_torch_transformers": [sys.executable, "-c", _LIBRARIES],
    }
    report = {"python": platform.python_version(), "cpus": os.cpu_count(), "load_before": os.getloadavg()[0]}
    for name, command in commands.items():
        shown = ["imcap", *command[1:]] if command[0] == str(IMCAP) else ["python", *command[1:]]
        report[name] = {"command": " ".join(shown), **timed(command, args.repeats)}
        row = report[name]
        print(f"{name:26s} median {row['median_s']:.2f} s wall, {row['median_cpu_s']:.2f} s CPU", flush=True)
    report["load_after"] = os.getloadavg()[0]
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
