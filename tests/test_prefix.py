"""The prefix captioner: its attention mask, its caption-only loss, generation, training and loading."""

import json

import pytest
import torch
from transformers import GPT2LMHeadModel

from imcap.archs.prefix import PrefixCaptioner, new_prefix_model, prefix_lm_mask
from imcap.captioner import Captioner
from imcap.encoder import EfficientNetLiteEncoderConfig
from imcap.generation import CaptionOptions, OptionsError
from imcap.modeling import (
    DecoderSpec,
    gpt2_config,
    image_processor_for,
    load_model,
    save_model,
    set_special_tokens,
)
from imcap.tokenizer import train_tokenizer
from imcap.training.config import TrainConfig
from imcap.training.loop import train
from imcap.training.steps import token_cross_entropy

from .conftest import TINY_CAPTIONS, make_shared_subset
from .tiny_hub import tiny_gpt2_folder

ENCODER = EfficientNetLiteEncoderConfig(
    variant="efficientnet-lite0", image_size=64, hidden_size=32, num_heads=2
)
IMAGE_TOKENS = 1 + ENCODER.grid_size**2  # lite0 at 64 px: a 2x2 grid and the global token
PREFIX = IMAGE_TOKENS + 1  # and SEP


def tiny_prefix_model(seed: int = 0):
    torch.manual_seed(seed)
    tokenizer = train_tokenizer(TINY_CAPTIONS * 4, vocab_size=300, min_frequency=1)
    spec = DecoderSpec(num_layers=2, hidden_size=32, num_heads=2, max_positions=PREFIX + 64, dropout=0.0)
    model = new_prefix_model(ENCODER, gpt2_config(spec, tokenizer, False), 64, 0.0, imagenet_weights=False)
    set_special_tokens(model, tokenizer)
    return model.eval(), tokenizer


def captured_masks(model):
    """The attention masks GPT-2's first layer receives, as a list filled while the model runs."""
    masks = []
    model.decoder.transformer.h[0].attn.register_forward_pre_hook(
        lambda module, args, kwargs: masks.append(kwargs["attention_mask"]), with_kwargs=True
    )
    return masks


def test_prefix_lm_mask_rows_see_the_prefix_and_earlier_caption_tokens_only():
    padding = torch.tensor([[1] * (PREFIX + 4), [1] * (PREFIX + 2) + [0, 0]])
    visible = prefix_lm_mask(padding, PREFIX, torch.float32)[:, 0] == 0  # (B, L, L)
    length = PREFIX + 4
    for i in range(length):
        for j in range(length):
            expected = j < PREFIX or j <= i
            assert visible[0, i, j] == expected, (i, j)
    assert not visible[1, :, PREFIX + 2 :].any()  # padded keys are never seen
    assert visible[1, :, :PREFIX].all()  # every row sees the prefix, so none is fully masked


def visible(mask: torch.Tensor) -> torch.Tensor:
    """(B, 1, Q, K) attention mask as GPT-2 receives it (bool: True = attend; float: 0 = attend) -> bool."""
    return mask[:, 0] if mask.dtype == torch.bool else mask[:, 0] == 0


def test_one_pass_over_prefix_and_caption_uses_the_prefix_mask():
    """The HF-style forward (generate's prefill, `labels` losses) gets `prefix_lm_mask` as GPT-2's mask."""
    model, _ = tiny_prefix_model()
    masks = captured_masks(model)
    ids = torch.tensor([[40, 41, 42, 43, 2], [50, 51, 2, 0, 0]])
    padding = torch.tensor([[1] * (PREFIX + 5), [1] * (PREFIX + 3) + [0, 0]])
    embeds = torch.cat(
        [model.prefix_embeds(torch.randn(2, IMAGE_TOKENS, 32)), model.get_input_embeddings()(ids)], 1
    )
    with torch.no_grad():
        model(inputs_embeds=embeds, attention_mask=padding, prefix_length=PREFIX)
    assert torch.equal(masks[-1], prefix_lm_mask(padding, PREFIX, masks[-1].dtype))


def test_training_masks_captions_from_later_tokens_and_shows_them_the_whole_prefix():
    """Training runs the prefix once per image, then the image's captions against it (KV cache): the masks
    of both passes, and logits equal to one pass under the prefix mask."""
    model, _ = tiny_prefix_model()
    masks = captured_masks(model)
    visual = torch.randn(2, IMAGE_TOKENS, 32)
    ids = torch.tensor(
        [[1, 40, 41, 42, 43, 2], [1, 44, 45, 2, 0, 0], [1, 50, 51, 52, 53, 2], [1, 54, 2, 0, 0, 0]]
    )
    padding = (torch.arange(6)[None, :] < torch.tensor([[6], [4], [6], [3]])).long()
    with torch.no_grad():
        logits = model.caption_logits(visual, ids, padding, captions_per_image=2)
    assert logits.shape == (4, 6, model.config.decoder.vocab_size)  # SEP, then the 5 caption tokens

    prefix_pass, caption_pass = visible(masks[0]), visible(masks[1])
    assert prefix_pass.shape == (2, PREFIX, PREFIX) and prefix_pass.all()  # image tokens and SEP: both ways
    assert caption_pass.shape == (4, 5, PREFIX + 5)  # caption queries x [prefix, caption] keys
    assert caption_pass[:, :, :PREFIX].all()  # every caption token sees all image tokens and SEP
    for row, length in enumerate(padding.sum(1).tolist()):
        for i in range(length - 1):  # real caption positions
            seen = caption_pass[row, i, PREFIX:].tolist()
            assert seen == [j <= i for j in range(5)], (row, i)  # earlier (and own) caption tokens only

    one_pass = torch.cat(
        [model.prefix_embeds(visual.repeat_interleave(2, 0)), model.get_input_embeddings()(ids[:, 1:])], 1
    )
    full_mask = torch.cat([torch.ones(4, PREFIX, dtype=torch.long), padding[:, 1:]], 1)
    with torch.no_grad():
        reference = model(inputs_embeds=one_pass, attention_mask=full_mask, prefix_length=PREFIX).logits
    real = padding.bool()
    torch.testing.assert_close(logits[real], reference[:, PREFIX - 1 :][real], rtol=1e-5, atol=1e-5)

    # behaviour: a later caption token changes no earlier logit, and changes its own position's
    changed = ids.clone()
    changed[0, 3] = 60
    with torch.no_grad():
        after = model.caption_logits(visual, changed, padding, captions_per_image=2)
    torch.testing.assert_close(after[0, :3], logits[0, :3], rtol=0, atol=1e-6)
    assert not torch.allclose(after[0, 3:], logits[0, 3:])
    torch.testing.assert_close(after[1:], logits[1:], rtol=0, atol=1e-6)  # other captions: untouched


@pytest.mark.parametrize("position", range(PREFIX))
def test_every_caption_position_sees_every_image_token_and_sep(position):
    model, _ = tiny_prefix_model()
    visual = torch.randn(1, IMAGE_TOKENS, 32)
    ids = torch.tensor([[1, 40, 41, 42, 2]])
    with torch.no_grad():
        before = model.caption_logits(visual, ids, torch.ones_like(ids))
        # (a random direction: LayerNorm would cancel a uniform shift)
        if position < IMAGE_TOKENS:
            visual[0, position] += 3 * torch.randn(32)
        else:
            model.sep.add_(3 * torch.randn_like(model.sep))
        after = model.caption_logits(visual, ids, torch.ones_like(ids))
    changed = (after - before).abs().amax(dim=-1)[0]  # per caption position
    assert (changed > 1e-5).all(), changed


def test_the_loss_counts_caption_tokens_and_ignores_image_and_sep_labels():
    model, _ = tiny_prefix_model()
    visual = torch.randn(2, IMAGE_TOKENS, 32)
    captions = torch.tensor([[40, 41, 42, 2], [50, 51, 2, 0]])  # the second padded after eos
    padding = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])
    embeds = torch.cat([model.prefix_embeds(visual), model.get_input_embeddings()(captions)], dim=1)
    mask = torch.cat([torch.ones(2, PREFIX, dtype=torch.long), padding], dim=1)
    labels = torch.cat([torch.full((2, PREFIX), -100), captions.masked_fill(padding == 0, -100)], dim=1)

    def loss(labels):
        with torch.no_grad():
            return model(inputs_embeds=embeds, attention_mask=mask, prefix_length=PREFIX, labels=labels).loss

    reference = loss(labels)
    garbage = labels.clone()
    garbage[:, :PREFIX] = torch.randint(0, 200, (2, PREFIX))  # labels at image and SEP positions
    assert torch.equal(loss(garbage), reference)
    caption_changed = labels.clone()
    caption_changed[0, PREFIX + 1] = 7
    assert not torch.equal(loss(caption_changed), reference)

    # the trainer's loss (teacher forcing from the start token) is the same number
    ids = torch.cat([torch.ones(2, 1, dtype=torch.long), captions], dim=1)
    full_mask = torch.cat([torch.ones(2, 1, dtype=torch.long), padding], dim=1)
    with torch.no_grad():
        logits = model.caption_logits(visual, ids[:, :-1], full_mask[:, :-1])
    total, count = token_cross_entropy(logits, ids, full_mask)
    torch.testing.assert_close(total / count, reference)


def test_generate_decodes_what_teacher_forcing_scores_with_every_control(tmp_path):
    """The prefill of `generate` uses the training mask: its logits are the teacher-forced ones."""
    model, tokenizer = tiny_prefix_model()
    visual = torch.randn(2, IMAGE_TOKENS, 32)
    from transformers.modeling_outputs import BaseModelOutput

    out = model.generate(
        encoder_outputs=BaseModelOutput(last_hidden_state=visual),
        max_new_tokens=6,
        num_beams=1,
        do_sample=False,
        return_dict_in_generate=True,
        output_logits=True,
    )
    assert (out.sequences[:, 0] == tokenizer.bos_token_id).all()  # the start token, as encoder-decoders do
    generated = out.sequences
    with torch.no_grad():
        forced = model.caption_logits(visual, generated[:, :-1], torch.ones_like(generated[:, :-1]))
    torch.testing.assert_close(torch.stack(out.logits, dim=1), forced, rtol=1e-4, atol=1e-4)

    save_model(model, tokenizer, image_processor_for(ENCODER), tmp_path / "prefix")
    captioner = Captioner.from_pretrained(tmp_path / "prefix")
    assert isinstance(captioner.model, PrefixCaptioner)
    image = torch.randint(0, 255, (48, 40, 3), dtype=torch.uint8).numpy()
    for options in (
        CaptionOptions(num_beams=1),
        CaptionOptions(num_beams=3, num_return_sequences=2, length_penalty=0.8),
        CaptionOptions(do_sample=True, num_beams=1, top_p=0.9, num_return_sequences=3, seed=4),
    ):
        result = captioner([image, image], options)
        assert len(result) == 2 and len(result[0].candidates) == options.num_return_sequences
        assert all(torch.isfinite(torch.tensor(c.score)) for c in result[0].candidates)
    seeded = CaptionOptions(do_sample=True, num_beams=1, seed=4)
    assert captioner(image, seeded)[0].caption == captioner(image, seeded)[0].caption
    assert captioner.max_caption_tokens == 64  # the positions after the prefix
    with pytest.raises(OptionsError):
        captioner(image, CaptionOptions(max_new_tokens=65))


def test_save_and_load_keep_the_architecture_and_every_weight(tmp_path):
    model, tokenizer = tiny_prefix_model()
    save_model(model, tokenizer, image_processor_for(ENCODER), tmp_path / "m")
    assert json.loads((tmp_path / "m" / "config.json").read_text())["model_type"] == "imcap-prefix"
    loaded = load_model(tmp_path / "m").model
    assert isinstance(loaded, PrefixCaptioner)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, loaded.state_dict()[name]), name
    assert loaded.decoder.lm_head.weight.data_ptr() == loaded.decoder.transformer.wte.weight.data_ptr()

    save_model(model, tokenizer, image_processor_for(ENCODER), tmp_path / "half", fp16=True)  # --export
    assert isinstance(load_model(tmp_path / "half").model, PrefixCaptioner)
    sizes = [(tmp_path / folder / "model.safetensors").stat().st_size for folder in ("half", "m")]
    assert sizes[0] < 0.6 * sizes[1]


@pytest.fixture(scope="module")
def data(flickr8k, tmp_path_factory):
    return make_shared_subset(flickr8k, tmp_path_factory.mktemp("flickr8k16"), n_train=16, n_val=4)


def prefix_recipe(data, tmp_path, **model) -> TrainConfig:
    return TrainConfig.from_dict(
        {
            "data": {"path": str(data), "max_tokens": 20},
            "model": {
                "type": "prefix",
                "variant": "efficientnet-lite0",
                "image_size": 64,
                "hidden_size": 32,
                "decoder_layers": 2,
                "num_heads": 2,
                "vocab_size": 300,
                "imagenet_weights": False,
                "prefix": {"mapper_hidden": 64},
                **model,
            },
            "optim": {"epochs": 3, "batch_images": 4, "lr": 3e-3, "warmup_steps": 2, "flip": False},
            "output_dir": str(tmp_path / "run"),
            "cache_dir": str(tmp_path / "cache"),
            "seed": 5,
            "threads": 1,
        }
    )


def test_trainer_trains_a_prefix_model_on_a_pretrained_gpt2_decoder(data, tmp_path):
    gpt2 = tiny_gpt2_folder(tmp_path / "gpt2")
    best = train(prefix_recipe(data, tmp_path, pretrained_decoder=str(gpt2)))
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["train_loss"] < rows[0]["train_loss"] - 0.3
    loaded = load_model(best)
    assert isinstance(loaded.model, PrefixCaptioner)
    assert loaded.model.config.decoder.n_embd == 24  # the pretrained GPT-2's shape, not the recipe's width
    assert loaded.tokenizer.eos_token == "<|endoftext|>"  # and its tokenizer
    assert loaded.tokenizer.pad_token == "<|endoftext|>"  # given a pad token (GPT-2 has none)
    captioner = Captioner(loaded)
    assert isinstance(captioner(sorted((data / "images").iterdir())[0])[0].caption, str)


def test_the_pretrained_decoder_weights_are_the_starting_point(tmp_path):
    from imcap.training.build import build

    gpt2 = tiny_gpt2_folder(tmp_path / "gpt2")
    recipe = prefix_recipe(tmp_path, tmp_path, pretrained_decoder=str(gpt2))
    built = build(recipe, TINY_CAPTIONS, None)
    reference = GPT2LMHeadModel.from_pretrained(gpt2)
    for name, tensor in reference.state_dict().items():
        assert torch.equal(built.model.decoder.state_dict()[name], tensor), name
