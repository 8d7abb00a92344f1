"""The CNN + LSTM merge baseline: the seed's caption cleaning and vocabulary, the model, its decoding."""

import json

import pytest
import torch
from transformers.modeling_outputs import BaseModelOutput

from imcap.archs.lstm import LstmCaptioner, new_lstm_model, seed_preprocess, train_word_tokenizer
from imcap.captioner import Captioner
from imcap.encoder import EfficientNetLiteEncoderConfig
from imcap.generation import CaptionOptions
from imcap.modeling import image_processor_for, load_model, save_model, set_special_tokens
from imcap.tokenizer import encode_for_training
from imcap.training.config import TrainConfig
from imcap.training.loop import train

from .conftest import TINY_CAPTIONS, make_shared_subset

ENCODER = EfficientNetLiteEncoderConfig(
    variant="efficientnet-lite0", image_size=64, hidden_size=32, num_heads=2, dropout=0.0
)


def tiny_lstm_model(seed: int = 0):
    torch.manual_seed(seed)
    tokenizer = train_word_tokenizer(TINY_CAPTIONS * 2, min_count=2)
    model = new_lstm_model(ENCODER, len(tokenizer), 16, dropout=0.0, imagenet_weights=False)
    set_special_tokens(model, tokenizer)
    model.generation_config.suppress_tokens = [tokenizer.unk_token_id]
    return model.eval(), tokenizer


@pytest.mark.parametrize(
    ("caption", "cleaned"),
    [
        ("A dog runs across the green grass .", "dog runs across the green grass"),
        ("A man's 2 dogs, in the   snow!", "mans dogs in the snow"),
        ("I see a B-52 at 5pm", "see at pm"),
        ("Two children play", "two children play"),
    ],
)
def test_seed_preprocessing_and_the_tokenizer_clean_captions_alike(caption, cleaned):
    assert seed_preprocess(caption) == cleaned
    tokenizer = train_word_tokenizer([cleaned] * 3, min_count=1)
    ids = tokenizer(caption, add_special_tokens=False)["input_ids"]
    assert tokenizer.convert_ids_to_tokens(ids) == cleaned.split()


def test_vocabulary_keeps_frequent_words_and_tags():
    captions = ["a dog runs", "the dog runs", "the dog sleeps", "a zebra"]
    tokenizer = train_word_tokenizer(captions, min_count=2)
    vocab = tokenizer.get_vocab()
    assert {"dog", "runs", "the", "startseq", "endseq"} <= set(vocab)
    assert "sleeps" not in vocab and "zebra" not in vocab and "a" not in vocab  # rare, and one-letter
    assert vocab["dog"] < vocab["runs"] < vocab["the"]  # most frequent first, then alphabetical
    ids = encode_for_training(tokenizer, "The dog sleeps.", max_tokens=10)
    assert tokenizer.convert_ids_to_tokens(ids) == ["startseq", "the", "dog", "<unk>", "endseq"]
    assert tokenizer.decode(ids, skip_special_tokens=True) == "the dog"


def test_lstm_outputs_depend_on_earlier_words_only_and_on_the_image_everywhere():
    model, tokenizer = tiny_lstm_model()
    image = torch.randn(2, 1, 32)
    ids = torch.tensor([[2, 5, 6, 7, 3], [2, 8, 9, 3, 0]])
    with torch.no_grad():
        logits = model.caption_logits(image, ids, torch.ones_like(ids))
        later = ids.clone()
        later[:, 3] = 10
        changed_word = model.caption_logits(image, later, torch.ones_like(ids))
        changed_image = model.caption_logits(image + 1.0, ids, torch.ones_like(ids))
    assert logits.shape == (2, 5, len(tokenizer))
    assert torch.equal(changed_word[:, :3], logits[:, :3])
    assert not torch.allclose(changed_word[:, 3:], logits[:, 3:])
    assert ((changed_image - logits).abs().amax(-1) > 1e-6).all()  # the image is added at every step


def test_generate_decodes_what_teacher_forcing_scores():
    model, tokenizer = tiny_lstm_model()
    image = torch.randn(2, 1, 32)
    out = model.generate(
        encoder_outputs=BaseModelOutput(last_hidden_state=image),
        max_new_tokens=6,
        num_beams=1,
        do_sample=False,
        return_dict_in_generate=True,
        output_logits=True,
    )
    sequences = out.sequences
    assert (sequences[:, 0] == tokenizer.bos_token_id).all()
    with torch.no_grad():
        forced = model.caption_logits(image, sequences[:, :-1], torch.ones_like(sequences[:, :-1]))
    torch.testing.assert_close(torch.stack(out.logits, dim=1), forced)
    assert not (sequences == tokenizer.unk_token_id).any()  # suppressed


def test_saved_lstm_loads_and_captions_with_every_control(tmp_path):
    model, tokenizer = tiny_lstm_model()
    save_model(model, tokenizer, image_processor_for(ENCODER), tmp_path / "lstm")
    assert json.loads((tmp_path / "lstm" / "config.json").read_text())["model_type"] == "imcap-lstm"
    loaded = load_model(tmp_path / "lstm")
    assert isinstance(loaded.model, LstmCaptioner)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, loaded.model.state_dict()[name]), name
    save_model(model, tokenizer, image_processor_for(ENCODER), tmp_path / "half", fp16=True)  # --export
    assert isinstance(load_model(tmp_path / "half").model, LstmCaptioner)
    sizes = [(tmp_path / folder / "model.safetensors").stat().st_size for folder in ("half", "lstm")]
    assert sizes[0] < 0.6 * sizes[1]
    captioner = Captioner(loaded)
    assert captioner.max_caption_tokens is None  # no position embeddings: no length limit
    image = torch.randint(0, 255, (48, 40, 3), dtype=torch.uint8).numpy()
    for options in (
        CaptionOptions(num_beams=1),
        CaptionOptions(num_beams=3, num_return_sequences=2),
        CaptionOptions(do_sample=True, num_beams=1, temperature=0.7, num_return_sequences=2, seed=3),
    ):
        results = captioner([image, image], options)
        assert len(results) == 2 and len(results[0].candidates) == options.num_return_sequences
        assert "<unk>" not in results[0].caption and "startseq" not in results[0].caption.lower()


@pytest.fixture(scope="module")
def data(flickr8k, tmp_path_factory):
    return make_shared_subset(flickr8k, tmp_path_factory.mktemp("flickr8k16"), n_train=16, n_val=4)


def test_trainer_trains_the_lstm_and_resumes_it_exactly(data, tmp_path, monkeypatch):
    from imcap.training import loop

    def recipe(out):
        return TrainConfig.from_dict(
            {
                "data": {"path": str(data), "max_tokens": 20},
                "model": {
                    "type": "lstm",
                    "variant": "efficientnet-lite0",
                    "image_size": 64,
                    "hidden_size": 32,
                    "dropout": 0.2,
                    "imagenet_weights": False,
                    "lstm": {"min_word_count": 2, "embedding_size": 16},
                },
                "optim": {"epochs": 3, "batch_images": 4, "lr": 1e-2, "warmup_steps": 1},
                "output_dir": str(out),
                "cache_dir": str(tmp_path / "cache"),
                "seed": 2,
                "threads": 1,
            }
        )

    best = train(recipe(tmp_path / "straight"))
    rows = [json.loads(line) for line in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["train_loss"] < rows[0]["train_loss"] - 0.3
    assert isinstance(load_model(best).model, LstmCaptioner)

    real_epoch = loop._train_epoch

    def crash_after_one(run, state, xe):
        state = real_epoch(run, state, xe)
        if state["epoch"] == 1:
            raise KeyboardInterrupt
        return state

    monkeypatch.setattr(loop, "_train_epoch", crash_after_one)
    with pytest.raises(KeyboardInterrupt):
        train(recipe(tmp_path / "resumed"))
    monkeypatch.setattr(loop, "_train_epoch", real_epoch)
    train(recipe(tmp_path / "resumed"), resume=True)
    losses = [
        [json.loads(line)["loss"] for line in (tmp_path / run / "steps.jsonl").read_text().splitlines()]
        for run in ("straight", "resumed")
    ]
    assert len(losses[0]) == 3 * 4 and losses[0] == losses[1]  # 16 images, 4 per batch, 3 epochs
