"""Opt-in accelerations that change the numbers: ONNX Runtime for the encoder, int8 for the decoder.

Neither is on by default. Both trade exactness for speed, so their cost is measured on Flickr8k val
(README, "Speed"): captions can differ from the fp32 model's, and the metrics say by how much.

- `onnx_encoder`: the (BatchNorm-folded) encoder exported with `torch.onnx.export(dynamo=True)` and run
  by ONNX Runtime, whose CPU kernels for depthwise convolutions beat PyTorch's. The export is cached on
  disk, keyed by the weights, so it happens once per model.
- `int8_decoder`: dynamic int8 quantisation (weights int8, activations quantised per batch) of every
  linear layer of the decoder, GPT-2's `Conv1D` layers included (converted to `nn.Linear` first).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import logging
import os
import warnings
from pathlib import Path

import torch
from torch import nn
from transformers.modeling_outputs import BaseModelOutput
from transformers.pytorch_utils import Conv1D

from imcap.encoder import ConceptEncoderOutput

ONNX_CACHE = Path(os.environ.get("IMCAP_ONNX_CACHE", "~/.cache/imcap/onnx")).expanduser()


class AccelError(RuntimeError):
    """An acceleration that cannot be used here (a missing package, an export that fails); one line."""


def int8_decoder(decoder: nn.Module) -> nn.Module:
    """A copy of `decoder` whose linear layers run in int8 (dynamic quantisation, fp32 elsewhere)."""
    quantized = copy.deepcopy(decoder).eval()
    _conv1d_to_linear(quantized)
    # torch 2.13 deprecates torch.ao's eager quantisation in favour of torchao, whose CPU int8 path
    # (torchao 0.18, Int8DynamicActivationInt8WeightConfig) ran a GPT-2-sized MLP several times slower
    # than this one here and takes 2.6 s to import. Until that changes we keep torch.ao, and silence its
    # two deprecation notices at this call only (every `--int8-decoder` run printed them).
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"torch\.ao\.quantization is deprecated")
        warnings.filterwarnings("ignore", message=r"torch\.quantize_per_tensor.* are deprecated")
        return torch.ao.quantization.quantize_dynamic(quantized, {nn.Linear}, dtype=torch.qint8)


def _conv1d_to_linear(module: nn.Module) -> None:
    """GPT-2's Conv1D is a linear layer with a transposed weight; quantize_dynamic only knows nn.Linear."""
    for name, child in module.named_children():
        if isinstance(child, Conv1D):
            linear = nn.Linear(child.weight.shape[0], child.weight.shape[1])
            linear.weight.data, linear.bias.data = child.weight.data.t().contiguous(), child.bias.data
            setattr(module, name, linear)
        else:
            _conv1d_to_linear(child)


class OnnxEncoder(nn.Module):
    """Runs an encoder through ONNX Runtime; called like the encoder (`pixel_values=` in, states out)."""

    def __init__(self, encoder: nn.Module, image_size: int, threads: int | None = None):
        super().__init__()
        try:
            import onnxruntime
        except ImportError as error:
            raise AccelError("--onnx-encoder needs `pip install imcap[accel]` (onnxruntime)") from error
        path = export_encoder(encoder, image_size)
        settings = onnxruntime.SessionOptions()
        settings.intra_op_num_threads = threads or torch.get_num_threads()
        settings.inter_op_num_threads = 1
        self.session = onnxruntime.InferenceSession(str(path), settings, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name
        self.config = encoder.config

    def forward(self, pixel_values: torch.Tensor, **_) -> BaseModelOutput:
        pixels = pixel_values.float().contiguous().numpy()
        outputs = [torch.from_numpy(x) for x in self.session.run(None, {self.input_name: pixels})]
        logits = outputs[1] if len(outputs) > 1 else None
        return ConceptEncoderOutput(last_hidden_state=outputs[0], concept_logits=logits)


class _StatesOnly(nn.Module):
    """The encoder as a function of pixels alone, returning a plain tensor: what ONNX export wants."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        out = self.encoder(pixel_values=pixel_values)
        logits = getattr(out, "concept_logits", None)  # a concept head's ImageNet logits travel too
        return out.last_hidden_state if logits is None else (out.last_hidden_state, logits)


def export_encoder(encoder: nn.Module, image_size: int) -> Path:
    """The encoder as an ONNX file with a dynamic batch size, exported once per set of weights."""
    path = ONNX_CACHE / f"encoder-{_weights_key(encoder, image_size)}.onnx"
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    example = torch.zeros(2, 3, image_size, image_size)
    batch = torch.export.Dim("batch", min=1, max=1024)
    partial = path.with_suffix(f".{os.getpid()}.partial")
    try:
        with _quiet_exporter():
            program = torch.onnx.export(
                _StatesOnly(encoder).eval(),
                (example,),
                dynamic_shapes={"pixel_values": {0: batch}},
                input_names=["pixel_values"],
                output_names=["hidden", "concept_logits"] if _has_head(encoder) else ["hidden"],
                dynamo=True,
                verbose=False,
            )
            program.save(str(partial))
    except Exception as error:  # the exporter raises many kinds; the user needs one line and a way out
        raise AccelError(
            f"could not export the encoder to ONNX ({type(error).__name__}); drop --onnx-encoder"
        ) from error
    partial.replace(path)  # atomic: a concurrent or interrupted export never leaves half a file
    return path


@contextlib.contextmanager
def _quiet_exporter():
    """Keeps the exporter's own notices off the user's terminal: one line per torchvision operator it skips
    (imcap needs none) and a FutureWarning from torch's pytree internals. Errors still raise."""
    registration = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registration.level
    registration.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
            yield
    finally:
        registration.setLevel(level)


def _has_head(encoder: nn.Module) -> bool:
    return bool(getattr(encoder.config, "concept_head", False))


def _weights_key(module: nn.Module, image_size: int) -> str:
    digest = hashlib.sha256(f"{type(module).__name__}:{image_size}:{torch.__version__}".encode())
    for name, tensor in module.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().float().contiguous().numpy().tobytes())
    return digest.hexdigest()[:24]
