import time

import pytest
import torch
from transformers import (
    AutoConfig,
    AutoModel,
    GPT2Config,
    GPT2LMHeadModel,
    VisionEncoderDecoderModel,
    ViTConfig,
    ViTImageProcessor,
    ViTModel,
)

import imcap.encoder  # noqa: F401  (registers the encoder)
from imcap.captioner import Captioner
from imcap.encoder import MODEL_TYPE, EfficientNetLiteEncoder, EfficientNetLiteEncoderConfig
from imcap.generation import CaptionOptions
from imcap.modeling import ModelLoadError, load_model, save_model
from imcap.tokenizer import train_tokenizer

from .conftest import TINY_CAPTIONS, build_tiny_model


def test_encoder_is_registered_with_auto_classes():
    config = AutoConfig.for_model(
        MODEL_TYPE, variant="efficientnet-lite0", image_size=64, hidden_size=32, num_heads=2
    )
    assert isinstance(config, EfficientNetLiteEncoderConfig)
    assert isinstance(AutoModel.from_config(config), EfficientNetLiteEncoder)


def test_lite0_at_224_gives_7x7_patch_tokens_plus_a_global_token():
    config = EfficientNetLiteEncoderConfig(variant="efficientnet-lite0", hidden_size=32, num_heads=2)
    encoder = EfficientNetLiteEncoder(config).eval()
    with torch.no_grad():
        hidden = encoder(pixel_values=torch.randn(1, 3, 224, 224)).last_hidden_state
    assert hidden.shape == (1, 1 + 7 * 7, 32)


def test_imagenet_weights_load_into_every_cnn_parameter():
    encoder = EfficientNetLiteEncoder(EfficientNetLiteEncoderConfig(variant="efficientnet-lite0"))
    before = encoder.cnn._conv_stem.weight.clone()
    encoder.load_imagenet_weights()  # strict load: a missing or renamed key would raise
    assert not torch.equal(before, encoder.cnn._conv_stem.weight)


def test_save_load_round_trip_gives_identical_logits(tmp_path):
    model, _ = build_tiny_model(tmp_path / "m")
    loaded = load_model(tmp_path / "m")
    pixels, ids = torch.randn(2, 3, 64, 64), torch.tensor([[1, 5, 9, 2], [1, 7, 3, 2]])
    with torch.no_grad():
        expected = model(pixel_values=pixels, decoder_input_ids=ids).logits
        actual = loaded.model(pixel_values=pixels, decoder_input_ids=ids).logits
    assert torch.equal(expected, actual)
    assert (tmp_path / "m" / "model.safetensors").exists()
    assert (tmp_path / "m" / "preprocessor_config.json").exists()


def test_fp16_save_is_smaller_and_close(tmp_path):
    model, tokenizer = build_tiny_model(tmp_path / "full")
    loaded = load_model(tmp_path / "full")
    save_model(loaded.model, loaded.tokenizer, loaded.image_processor, tmp_path / "half", fp16=True)
    full, half = (tmp_path / d / "model.safetensors" for d in ("full", "half"))
    assert half.stat().st_size < 0.6 * full.stat().st_size
    pixels, ids = torch.randn(1, 3, 64, 64), torch.tensor([[1, 5, 9, 2]])
    with torch.no_grad():
        expected = model(pixel_values=pixels, decoder_input_ids=ids).logits
        actual = load_model(tmp_path / "half").model(pixel_values=pixels, decoder_input_ids=ids).logits
    assert torch.allclose(expected, actual, atol=5e-2)


def tiny_vit_gpt2(folder):
    """A tiny ViT + GPT-2 VisionEncoderDecoder shaped like nlpconnect/vit-gpt2-image-captioning."""
    tokenizer = train_tokenizer(TINY_CAPTIONS * 3, vocab_size=300, min_frequency=1)
    vit = ViTModel(
        ViTConfig(
            image_size=32,
            patch_size=8,
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=64,
        )
    )
    gpt2 = GPT2LMHeadModel(
        GPT2Config(
            vocab_size=len(tokenizer),
            n_embd=32,
            n_layer=1,
            n_head=2,
            add_cross_attention=True,
            is_decoder=True,
            bos_token_id=tokenizer.eos_token_id,  # GPT-2 style: one token for bos and eos
            eos_token_id=tokenizer.eos_token_id,
        )
    )
    model = VisionEncoderDecoderModel(encoder=vit, decoder=gpt2)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)


def test_tiny_vit_gpt2_checkpoint_loads_and_captions_through_the_same_path(tmp_path):
    tiny_vit_gpt2(tmp_path / "vit-gpt2")
    captioner = Captioner.from_pretrained(tmp_path / "vit-gpt2")
    image = torch.randint(0, 255, (48, 40, 3), dtype=torch.uint8).numpy()
    first = captioner(image, CaptionOptions(num_beams=2, max_new_tokens=5))[0]
    again = captioner(image, CaptionOptions(num_beams=2, max_new_tokens=5))[0]
    assert isinstance(first.caption, str) and first.caption == again.caption
    assert captioner.model.config.decoder_start_token_id is not None  # filled in from the tokenizer


def test_hub_id_without_network_fails_fast_with_one_line():
    started = time.time()
    with pytest.raises(ModelLoadError) as error:
        load_model("nlpconnect/vit-gpt2-image-captioning")
    assert time.time() - started < 10
    message = str(error.value)
    assert "\n" not in message and "local model folder" in message


@pytest.mark.parametrize("make", ["missing", "empty", "file", "broken"])
def test_bad_model_folders_give_one_line_errors(tmp_path, make):
    target = tmp_path / "model"
    if make == "empty":
        target.mkdir()
    elif make == "file":
        target.write_text("not a model")
    elif make == "broken":
        target.mkdir()
        (target / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError) as error:
        load_model(target if make != "missing" else "./no/such/model")
    assert "\n" not in str(error.value)
