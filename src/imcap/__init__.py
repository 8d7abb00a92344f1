"""imcap: image captioning that works offline, on the one transformers VisionEncoderDecoder path.

`from imcap import Captioner, CaptionOptions` is the Python API. The names load on first use, so that
`import imcap` (and `imcap --help`) stays fast: torch and transformers come with the model. Importing
`imcap.modeling` or `imcap.encoder` makes transformers' Auto classes know imcap's architectures.
"""

from importlib import import_module

__version__ = "0.1.0"

_LAZY = {
    "Captioner": "imcap.captioner",
    "CaptionOptions": "imcap.generation",
    "CaptionResult": "imcap.results",
    "Candidate": "imcap.results",
    "Tag": "imcap.results",
    "load_model": "imcap.modeling",
}
__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'imcap' has no attribute {name!r}")
