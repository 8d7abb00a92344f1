"""The concept head: ImageNet probabilities from the encoder's own features, equal to the classifier alone."""

from __future__ import annotations

import pytest
import torch
from efficientnet_lite_pytorch import EfficientNet

from imcap.encoder import EfficientNetLiteEncoder, EfficientNetLiteEncoderConfig, imagenet_weights_path
from imcap.engine import Engine
from imcap.images import load_image
from imcap.modeling import image_processor_for, load_model

from .conftest import EXAMPLES


def _imagenet_classifier(variant: str, size: int) -> EfficientNet:
    """The checkpoint's own network, head included, as efficientnet_lite_pytorch runs it."""
    cnn = EfficientNet.from_name(variant, image_size=size)
    cnn.load_state_dict(torch.load(imagenet_weights_path(variant), map_location="cpu", weights_only=True))
    return cnn.eval()


def _pixels(config: EfficientNetLiteEncoderConfig, names: list[str]) -> torch.Tensor:
    pictures = [load_image(EXAMPLES / name) for name in names]
    return image_processor_for(config)(pictures, return_tensors="pt")["pixel_values"]


@torch.no_grad()
def test_head_logits_equal_the_classifier_alone():
    config = EfficientNetLiteEncoderConfig(variant="efficientnet-lite0", concept_head=True, concept_tokens=3)
    encoder = EfficientNetLiteEncoder(config)
    encoder.load_imagenet_weights()
    encoder.eval()
    pixels = _pixels(config, ["chelsea.jpg", "coffee.jpg"])
    out = encoder(pixel_values=pixels)
    expected = _imagenet_classifier("efficientnet-lite0", config.image_size)(pixels)
    torch.testing.assert_close(out.concept_logits, expected, rtol=1e-4, atol=1e-4)
    assert out.last_hidden_state.shape == (2, 1 + config.grid_size**2 + 3, config.hidden_size)


@torch.no_grad()
def test_head_is_frozen_and_tokens_follow_the_top_concepts():
    config = EfficientNetLiteEncoderConfig(
        variant="efficientnet-lite0",
        image_size=64,
        hidden_size=32,
        num_heads=2,
        concept_head=True,
        concept_tokens=2,
    )
    with torch.random.fork_rng():  # the same random encoder and features every run
        torch.manual_seed(0)
        encoder = EfficientNetLiteEncoder(config).eval()
        feature_map = torch.randn(1, 1280, 2, 2)
    assert not any(p.requires_grad for p in encoder.classifier.parameters())
    base, logits = encoder.encode_map(feature_map)
    # a different runner-up class changes the concept tokens, hence the states
    encoder.classifier.bias[logits[0].argsort()[-2]] -= 100.0
    changed, _ = encoder.encode_map(feature_map)
    assert not torch.allclose(base, changed)


def test_concept_tokens_need_the_head():
    with pytest.raises(ValueError, match="concept_head"):
        EfficientNetLiteEncoderConfig(concept_tokens=3)


@torch.no_grad()
def test_shipped_model_tags_are_the_imagenet_classifier():
    """The shipped model's head reads ImageNet's trunk and its own frozen copy of ImageNet's tail (the
    tail that feeds the decoder was fine-tuned), so its tags are the classifier's."""
    loaded = load_model()
    config = loaded.model.encoder.config
    assert config.concept_head and config.concept_table
    pixels = _pixels(config, ["chelsea.jpg", "coffee.jpg", "rocket.jpg"])
    encoded = Engine(loaded.model).encode_with_concepts(pixels)
    expected = _imagenet_classifier(config.variant, config.image_size)(pixels).softmax(-1)
    # fp16 weights and folded BatchNorm move probabilities a little, never the ranking of the top ones
    torch.testing.assert_close(encoded.concept_probs, expected, atol=2e-3, rtol=0.05)
    assert torch.equal(encoded.concept_probs.argmax(-1), expected.argmax(-1))


def _trained_tail_encoder() -> tuple[EfficientNetLiteEncoder, EfficientNetLiteEncoderConfig]:
    """A concept_tail encoder with ImageNet weights whose token tail then moved (as fine-tuning moves it)."""
    config = EfficientNetLiteEncoderConfig(
        variant="efficientnet-lite0", concept_head=True, concept_tokens=3, concept_tail=True
    )
    encoder = EfficientNetLiteEncoder(config)
    encoder.load_imagenet_weights()
    with torch.no_grad(), torch.random.fork_rng():
        torch.manual_seed(0)
        for p in encoder._blocks_split()[1].parameters():
            p.add_(0.05 * torch.randn_like(p))
    return encoder.eval(), config


@torch.no_grad()
def test_concept_tail_keeps_imagenet_probabilities_while_the_tail_fine_tunes():
    encoder, config = _trained_tail_encoder()
    assert not any(p.requires_grad for p in encoder.concept_tail.parameters())
    pixels = _pixels(config, ["chelsea.jpg", "coffee.jpg"])
    out = encoder(pixel_values=pixels)
    expected = _imagenet_classifier("efficientnet-lite0", config.image_size)(pixels)
    torch.testing.assert_close(out.concept_logits, expected, rtol=1e-4, atol=1e-4)
    # the patch tokens come from the moved tail: reading it would not give ImageNet's logits
    trunk = encoder.trunk(pixels)
    moved = encoder.concept_logits(encoder.tail(trunk))
    assert not torch.allclose(moved, expected, atol=1e-2)


def test_concept_tail_stays_in_eval_mode_and_needs_the_head():
    encoder, _ = _trained_tail_encoder()
    encoder.train()
    assert encoder.training and not encoder.concept_tail.training
    assert not any(m.training for m in encoder.concept_tail.modules())
    with pytest.raises(ValueError, match="concept_tail needs concept_head"):
        EfficientNetLiteEncoderConfig(concept_tail=True)


@torch.no_grad()
def test_engine_folds_the_concept_tail_too():
    from imcap.fast_encoder import fast_encoder

    encoder, config = _trained_tail_encoder()
    pixels = _pixels(config, ["chelsea.jpg"])
    fast = fast_encoder(encoder)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fast.concept_tail.modules())
    plain, folded = encoder(pixel_values=pixels), fast(pixel_values=pixels)
    torch.testing.assert_close(folded.concept_logits, plain.concept_logits, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(folded.last_hidden_state, plain.last_hidden_state, rtol=1e-3, atol=1e-3)
