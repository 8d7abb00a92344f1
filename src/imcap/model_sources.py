"""Where a model comes from: a local folder or a hub id, loaded with any loader, failing with one line.

A broken folder fails in many libraries' ways (safetensors, JSON, tokenizers, transformers); `ModelLoadError`
says which file is wrong where that can be told. A hub id with no cached copy probes the hub once instead of
letting huggingface_hub retry for ~30 s and end in a long traceback.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlparse

HUB_HOST_TIMEOUT_S = 3.0


class ModelLoadError(RuntimeError):
    """A model folder or hub id that cannot be loaded; the message is one line saying what to do."""


def from_folder_or_hub(source: str, load: Callable[..., object]):
    """`load(where, local_files_only=...)` on a local folder or a hub id, failing with one line.

    A cached hub copy works offline; without one, the hub is probed once instead of letting huggingface_hub
    retry for ~30 s and end in a long traceback. Used for whole models and for pretrained parts alike.
    """
    local = Path(source).expanduser()
    if local.exists():
        return _load_local(local, load)
    if source.startswith((".", "/", "~")) or source.count("/") > 1:
        raise ModelLoadError(f"model folder not found: {source}")
    return _load_hub(source, load)


def _load_local(folder: Path, load: Callable[..., object]):
    if not folder.is_dir():
        raise ModelLoadError(f"{folder} is a file; pass the model folder (with config.json) instead")
    missing = [name for name in ("config.json",) if not (folder / name).exists()]
    if missing:
        raise ModelLoadError(f"{folder} is not a model folder: it has no {', '.join(missing)}")
    _check_config(folder / "config.json")
    try:
        return load(str(folder))
    except Exception as error:  # a broken folder fails in many libraries' ways; the user gets one line
        raise ModelLoadError(f"cannot load the model in {folder}: {_diagnose(folder, error)}") from error


def _check_config(path: Path) -> None:
    try:
        config = json.loads(path.read_bytes())
    except json.JSONDecodeError as error:
        raise ModelLoadError(
            f"{path} is not valid JSON ({error.msg}, line {error.lineno} column {error.colno})"
        ) from None
    except (OSError, ValueError) as error:  # unreadable, or not UTF-8
        raise ModelLoadError(f"{path} cannot be read ({_first_line(error)})") from None
    if not isinstance(config, dict):
        raise ModelLoadError(f"{path} does not hold a JSON object")


def _diagnose(folder: Path, error: Exception) -> str:
    """Why loading `folder` failed, in one line: the broken file where we can tell, else the error's gist."""
    weights = sorted(folder.glob("*.safetensors"))
    for path in weights:
        if problem := _safetensors_problem(path):
            return f"{path.name} {problem}"
    if not weights and not any(folder.glob("*.bin")):
        return "it has no weights (model.safetensors)"
    for path in sorted(folder.glob("*.json")):  # tokenizer, processor and generation settings
        try:
            json.loads(path.read_bytes())
        except ValueError as bad:
            return f"{path.name} is not valid JSON ({_first_line(bad)})"
    text = _first_line(error)
    tokenizer_files = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model")
    if "tokenizer" in text.lower() and not any((folder / name).exists() for name in tokenizer_files):
        return f"it has no tokenizer files ({', '.join(tokenizer_files[:3])}...)"
    if "image processor" in text.lower() and not (folder / "preprocessor_config.json").exists():
        return "it has no image processor settings (preprocessor_config.json)"
    if "ignore_mismatched_sizes" in text:
        return "its weights do not fit its config.json (tensor shapes differ)"
    text = text.split(". Should contain one of")[0]  # transformers lists every model type it knows
    return text if len(text) <= 300 else text[:297] + "..."


def _safetensors_problem(path: Path) -> str | None:
    """What is wrong with a safetensors file, judged by its header (8-byte length, JSON, data offsets)."""
    size = path.stat().st_size
    with open(path, "rb") as file:
        length = int.from_bytes(file.read(8), "little")
        if size < 8 or length > size - 8:
            return f"is truncated or corrupt ({size} bytes; its header does not fit in them)"
        try:
            header = json.loads(file.read(length))
            offsets = [entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"]
            end = max(offsets, default=0)
        except (ValueError, TypeError, KeyError, IndexError, AttributeError):
            return "is corrupt (its header is not a safetensors header)"
    if 8 + length + end > size:
        return f"is truncated ({size} bytes, where its header says {8 + length + end})"
    return None


def _load_hub(hub_id: str, load: Callable[..., object]):
    try:
        return load(hub_id, local_files_only=True)
    except (OSError, ValueError):
        pass
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false") or not _hub_reachable():
        raise ModelLoadError(
            f"cannot download {hub_id!r}: no network (or HF_HUB_OFFLINE is set); "
            "pass a local model folder or run once with internet access"
        )
    try:
        return load(hub_id)
    except (OSError, ValueError) as error:
        raise ModelLoadError(f"cannot load {hub_id!r} from the hub: {_first_line(error)}") from error


def _hub_reachable() -> bool:
    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        with socket.create_connection((endpoint.hostname, endpoint.port or 443), timeout=HUB_HOST_TIMEOUT_S):
            return True
    except OSError:
        return False


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
