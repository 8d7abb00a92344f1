"""A faster copy of imcap's EfficientNet-Lite encoder for inference: BatchNorm folded into the
convolutions, TF-"same" padding inside them, ReLU6 in place, pointwise convolutions always through oneDNN,
channels-last memory. The numbers change only by float rounding (folding and oneDNN, ~1e-5 on the visual
tokens); padding and in-place activations are exact.
`imcap.engine` runs it; the model itself keeps its layers for training, saving and plain `generate`.
"""

from __future__ import annotations

import copy
import platform

import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.utils.fusion import fuse_conv_bn_weights

from imcap.encoder import EfficientNetLiteEncoder


def fast_encoder(encoder: nn.Module, onednn: bool = True) -> nn.Module:
    """A copy of our CNN encoder with BatchNorm folded into the convolutions, in channels-last memory.

    Other encoders (ViT, ...) are returned as they are. The model itself is left untouched, so that
    training, saving and plain `generate` keep the original layers. `onednn=False` leaves the pointwise
    convolutions to PyTorch's choice of kernel (`OneDnnConv2d`), as a graph exporter needs.
    """
    if not isinstance(encoder, EfficientNetLiteEncoder) or encoder.training:
        return encoder
    fast = copy.deepcopy(encoder)
    cnn = fast.cnn
    cnn._conv_stem, cnn._bn0 = _fold(cnn._conv_stem, cnn._bn0), nn.Identity()
    cnn._conv_head, cnn._bn1 = _fold(cnn._conv_head, cnn._bn1), nn.Identity()
    _fold_blocks(cnn._blocks)
    concept_tail = getattr(fast, "concept_tail", None)  # the concept head's own frozen tail
    if concept_tail is not None:
        concept_tail.conv_head = _fold(concept_tail.conv_head, concept_tail.norm)
        concept_tail.norm = nn.Identity()
        _fold_blocks(concept_tail.blocks)
    pad_in_convolutions(fast)
    _activations_in_place(fast)
    if onednn and onednn_pointwise_pays():
        pointwise_through_onednn(fast)
    return fast.to(memory_format=torch.channels_last)


class OneDnnConv2d(nn.Module):
    """A convolution (no padding module of its own) that oneDNN runs whatever the batch and thread count.

    PyTorch sends a 1x1 convolution of fewer than 16 images on one thread to its own im2col + BLAS kernel
    instead ("THNN is faster when single-threaded": `use_mkldnn` in aten/src/ATen/native/Convolution.cpp).
    With the MKL of the x86 wheels on this AMD CPU, that kernel ran lite2's pointwise convolutions, most of
    its FLOPs, at about half oneDNN's speed: the whole encoder 29-38 against 17-21 ms per image on one
    thread, and one thread per stage is how `imcap.batch` runs it. With two threads PyTorch picks oneDNN
    itself, so there this changes nothing.
    """

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        self.weight, self.bias = conv.weight, conv.bias
        self.stride, self.padding, self.dilation, self.groups = (
            conv.stride,
            conv.padding,
            conv.dilation,
            conv.groups,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.mkldnn_convolution(
            x, self.weight, self.bias, self.padding, self.stride, self.dilation, self.groups
        )


def onednn_pointwise_pays() -> bool:
    """Where `OneDnnConv2d` was measured to pay: x86-64 with oneDNN built in. Elsewhere (ARM, whose BLAS
    behind PyTorch's own kernel is another library) PyTorch keeps its choice."""
    return torch.backends.mkldnn.is_available() and platform.machine().lower() in {"x86_64", "amd64"}


def pointwise_through_onednn(encoder: nn.Module) -> int:
    """Replace every 1x1 convolution (on float32) by an `OneDnnConv2d` with the same weights; returns how
    many. A TF-"same" 1x1 convolution pads nothing, so its padding module is an identity."""
    swapped = 0
    for module in list(encoder.modules()):
        for name, conv in list(module.named_children()):
            if (
                isinstance(conv, nn.Conv2d)
                and conv.kernel_size == (1, 1)
                and conv.padding == (0, 0)
                and conv.padding_mode == "zeros"
                and conv.weight.dtype == torch.float32
            ):
                setattr(module, name, OneDnnConv2d(conv))
                swapped += 1
    return swapped


def _activations_in_place(encoder: nn.Module) -> None:
    """Every ReLU6 of the folded CNN reads a convolution's fresh output (its BatchNorm is folded away),
    so it may overwrite it: no new feature map per activation, the same numbers (~13% of the encoder's
    time on one thread, where the expanded maps are the largest tensors it allocates)."""
    for module in encoder.modules():
        if isinstance(module, nn.ReLU6):
            module.inplace = True


def pad_in_convolutions(encoder: nn.Module) -> None:
    """TF-"same" convolutions pad with a ZeroPad2d module before the convolution, a copy of every feature
    map. The convolution's own zero padding computes the same numbers without the copy: directly where
    the padding is symmetric (every stride-1 depthwise convolution, ~4% of the encoder's time on one
    thread), and where it is one wider on the far sides (the stride-2 stem and first stride-2 depthwise
    convolution, on even-sized maps) with the kernel one wider too, its new first row and column zero, so
    that every window still starts where TF's does (bit-identical; the 130x130 padded copy was ~5%)."""
    for conv in encoder.modules():
        pad = getattr(conv, "static_padding", None)
        if not (isinstance(conv, nn.Conv2d) and isinstance(pad, nn.ZeroPad2d) and conv.padding == (0, 0)):
            continue
        left, right, top, bottom = pad.padding
        if right - left not in (0, 1) or bottom - top not in (0, 1):
            continue
        widen = (right - left, 0, bottom - top, 0)  # zero columns on the left, zero rows on top
        conv.weight = nn.Parameter(F.pad(conv.weight, widen), requires_grad=conv.weight.requires_grad)
        conv.kernel_size = tuple(conv.weight.shape[-2:])
        conv.padding, conv.static_padding = (bottom, right), nn.Identity()


def _fold_blocks(blocks: nn.ModuleList) -> None:
    for block in blocks:
        pairs = [("_expand_conv", "_bn0")] if hasattr(block, "_expand_conv") else []
        for conv, norm in [*pairs, ("_depthwise_conv", "_bn1"), ("_project_conv", "_bn2")]:
            setattr(block, conv, _fold(getattr(block, conv), getattr(block, norm)))
            setattr(block, norm, nn.Identity())


def _fold(conv: nn.Conv2d, norm: nn.BatchNorm2d) -> nn.Conv2d:
    """`conv` (already a copy) with `norm` folded into its weights: what fuse_conv_bn_eval computes, without
    its second deep copy of every convolution (half the folding time, paid by every `imcap caption`)."""
    conv.weight, conv.bias = fuse_conv_bn_weights(
        conv.weight, conv.bias, norm.running_mean, norm.running_var, norm.eps, norm.weight, norm.bias
    )
    return conv
