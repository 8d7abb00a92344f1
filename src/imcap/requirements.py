"""What a command needs beyond the base install, checked before it does any work: each missing part is
one line saying how to get it (instead of a traceback minutes later)."""

from __future__ import annotations

import importlib.util
import shutil

# the modules each optional extra of pyproject.toml brings, in the order worth naming
EXTRAS = {
    "train": ("pycocoevalcap", "matplotlib"),
    "serve": ("fastapi", "uvicorn", "multipart", "gradio"),
    "accel": ("onnxruntime", "onnx", "onnxscript"),
    "parquet": ("pyarrow",),
    "ray": ("ray", "pyarrow"),
}
JAVA_HINT = "apt-get install -y default-jre-headless"


class MissingRequirement(RuntimeError):
    """An extra, a program or a file a command needs is missing; the message is one line."""


def require_extra(extra: str, command: str, modules: tuple[str, ...] | None = None) -> None:
    """Raise MissingRequirement when a module of `extra` (or just `modules` of it) is not installed."""
    for module in modules or EXTRAS[extra]:
        if importlib.util.find_spec(module) is None:
            raise MissingRequirement(
                f"{command} needs {module}: pip install 'imcap[{extra}]' (or scripts/install.sh --dev)"
            )


def require_java(command: str, why: str = "METEOR and the PTB tokenizer") -> None:
    if shutil.which("java") is None:
        raise MissingRequirement(f"{command} needs Java ({why}): {JAVA_HINT}")
