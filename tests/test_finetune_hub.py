"""Fine-tuning hub VisionEncoderDecoder checkpoints with `imcap train`, offline, on tiny local stand-ins."""

import json

import pytest
import torch
from transformers import GPT2LMHeadModel, VisionEncoderDecoderModel, ViTModel

from imcap.captioner import Captioner
from imcap.modeling import load_model
from imcap.training.config import TrainConfig
from imcap.training.loop import train

from .conftest import make_shared_subset
from .tiny_hub import tiny_gpt2_folder, tiny_vit_folder, tiny_vit_gpt2_folder


@pytest.fixture(scope="module")
def data(flickr8k, tmp_path_factory):
    return make_shared_subset(flickr8k, tmp_path_factory.mktemp("flickr8k16"), n_train=16, n_val=4)


def recipe(data, tmp_path, epochs: int = 3, **model) -> TrainConfig:
    return TrainConfig.from_dict(
        {
            "data": {"path": str(data), "max_tokens": 20},
            "model": {"type": "encoder-decoder", **model},
            "optim": {"epochs": epochs, "batch_images": 4, "lr": 3e-3, "warmup_steps": 2, "flip": False},
            "output_dir": str(tmp_path / "run"),
            "cache_dir": str(tmp_path / "cache"),
            "seed": 1,
            "threads": 1,
        }
    )


def test_a_whole_checkpoint_fine_tunes_with_its_encoder_frozen_and_cached(data, tmp_path):
    hub = tiny_vit_gpt2_folder(tmp_path / "vit-gpt2")
    before = VisionEncoderDecoderModel.from_pretrained(hub)
    best = train(recipe(data, tmp_path, pretrained=str(hub)))

    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["train_loss"] < rows[0]["train_loss"] - 0.3
    assert len(list((tmp_path / "cache").glob("encoder-*.pt"))) == 2  # the ViT's outputs: train, val
    after = load_model(best)
    assert isinstance(after.model, VisionEncoderDecoderModel)
    for name, tensor in before.encoder.state_dict().items():  # frozen
        assert torch.equal(after.model.encoder.state_dict()[name], tensor), name
    changed = [
        n
        for n, t in before.decoder.state_dict().items()
        if not torch.equal(after.model.decoder.state_dict()[n], t)
    ]
    assert any("crossattention" in n for n in changed) and any(".mlp." in n for n in changed)
    assert after.tokenizer.eos_token == "<|endoftext|>"  # the checkpoint's own tokenizer, kept

    captioner = Captioner(after)
    result = captioner(sorted((data / "images").iterdir())[:2])
    assert len(result) == 2 and all(isinstance(r.caption, str) for r in result)


def test_eos_is_a_training_target_even_when_it_is_also_pad_and_bos(data, tmp_path):
    """GPT-2 has one token for bos, eos and pad; a loss mask made from `ids != pad` would never teach eos."""
    from imcap.training.build import build
    from imcap.training.steps import caption_mask

    hub = tiny_vit_gpt2_folder(tmp_path / "vit-gpt2")
    built = build(recipe(data, tmp_path, pretrained=str(hub)), [], None)
    end = built.tokenizer.eos_token_id
    assert built.tokenizer.pad_token_id == end == built.tokenizer.bos_token_id
    ids = torch.tensor([[end, 5, 6, end, end, end]])  # bos, caption, eos, padding
    assert caption_mask(ids, end).tolist() == [[1, 1, 1, 1, 0, 0]]


def test_a_pretrained_encoder_and_decoder_pair_up_with_new_cross_attention(data, tmp_path):
    encoder_dir, decoder_dir = tiny_vit_folder(tmp_path / "vit"), tiny_gpt2_folder(tmp_path / "gpt2")
    config = recipe(
        data, tmp_path, epochs=1, pretrained_encoder=str(encoder_dir), pretrained_decoder=str(decoder_dir)
    )
    from imcap.training.build import build

    built = build(config, [], None)
    model = built.model
    assert model.config.decoder.add_cross_attention and hasattr(model, "enc_to_dec_proj")  # 32 -> 24 wide
    for name, tensor in ViTModel.from_pretrained(encoder_dir).state_dict().items():
        assert torch.equal(model.encoder.state_dict()[name], tensor), name
    for name, tensor in GPT2LMHeadModel.from_pretrained(decoder_dir).state_dict().items():
        assert torch.equal(model.decoder.state_dict()[name], tensor), name

    best = train(config)
    assert isinstance(Captioner.from_pretrained(best)(sorted((data / "images").iterdir())[0])[0].caption, str)


@pytest.mark.parametrize(
    ("model", "message"),
    [
        ({"type": "lstm", "pretrained_decoder": "gpt2"}, "takes no pretrained_decoder"),
        ({"type": "prefix", "pretrained": "x/y"}, "takes no pretrained"),
        ({"pretrained": "x/y", "pretrained_decoder": "gpt2"}, "is a whole model"),
        ({"type": "transformer"}, "is not one of"),
    ],
)
def test_recipes_with_impossible_model_settings_fail_with_one_line(model, message):
    with pytest.raises(ValueError, match=message) as error:
        TrainConfig.from_dict({"model": model})
    assert "\n" not in str(error.value)
