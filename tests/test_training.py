"""A few real training steps on 32 Flickr8k images with a tiny model: the loss falls, resume is exact."""

import json

import pytest
import torch

from imcap.modeling import load_model, save_model
from imcap.training import checkpoints, loop, scst
from imcap.training.batches import CaptionTable, mirror_caption
from imcap.training.config import TrainConfig
from imcap.training.loop import train
from imcap.training.steps import scst_loss

from .conftest import TINY_CAPTIONS, make_shared_subset


def tiny_config(data, out, cache, xe_epochs=3, scst_epochs=0) -> TrainConfig:
    return TrainConfig.from_dict(
        {
            "data": {"path": str(data), "max_tokens": 24},
            "model": {
                "variant": "efficientnet-lite0",
                "image_size": 64,
                "hidden_size": 48,
                "encoder_layers": 1,
                "decoder_layers": 1,
                "num_heads": 2,
                "vocab_size": 400,
                "imagenet_weights": False,
            },
            "optim": {"epochs": xe_epochs, "batch_images": 8, "lr": 3e-3, "warmup_steps": 2},
            "scst": {"epochs": scst_epochs, "batch_images": 8, "samples": 3},
            "output_dir": str(out),
            "cache_dir": str(cache),
            "seed": 7,
            "threads": 1,
        }
    )


def metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def data(flickr8k, tmp_path_factory):
    return make_shared_subset(flickr8k, tmp_path_factory.mktemp("flickr8k32"), n_train=32, n_val=8)


def test_loss_falls_and_resume_reproduces_a_straight_run(data, tmp_path, monkeypatch):
    straight = tmp_path / "straight"
    best = train(tiny_config(data, straight, tmp_path / "cache", xe_epochs=3, scst_epochs=1))
    rows = metrics(straight)
    assert [(r["stage"], r["epoch"]) for r in rows] == [("xe", 1), ("xe", 2), ("xe", 3), ("scst", 1)]
    assert rows[2]["train_loss"] < rows[0]["train_loss"] - 0.3
    assert (straight / "learning_curve.png").stat().st_size > 1000
    assert load_model(best).model is not None

    # the same recipe killed after its second epoch's checkpoint, then resumed
    resumed, recipe = tmp_path / "resumed", tiny_config(data, tmp_path / "resumed", tmp_path / "cache", 3, 1)
    real_epoch = loop._train_epoch

    def crash_after_two(run, state, xe):
        state = real_epoch(run, state, xe)
        if state["epoch"] == 2:
            raise KeyboardInterrupt
        return state

    monkeypatch.setattr(loop, "_train_epoch", crash_after_two)
    with pytest.raises(KeyboardInterrupt):
        train(recipe)
    monkeypatch.setattr(loop, "_train_epoch", real_epoch)
    train(recipe, resume=True)
    assert [r["train_loss"] for r in metrics(resumed)] == [r["train_loss"] for r in rows]
    assert [r["CIDEr"] for r in metrics(resumed)] == [r["CIDEr"] for r in rows]


def test_feature_cache_is_reused_and_rebuilt_when_stale(data, tmp_path):
    cache = tmp_path / "cache"
    train(tiny_config(data, tmp_path / "a", cache, xe_epochs=1))
    files = sorted(cache.glob("trunk-*.pt"))
    assert len(files) == 3  # train, mirrored train, val
    stamps = [f.stat().st_mtime_ns for f in files]
    train(tiny_config(data, tmp_path / "b", cache, xe_epochs=1))
    assert [f.stat().st_mtime_ns for f in sorted(cache.glob("trunk-*.pt"))] == stamps  # reused
    first_image = sorted((data / "images").iterdir())[0]
    first_image.write_bytes(first_image.read_bytes())  # touched: the image may have changed
    train(tiny_config(data, tmp_path / "c", cache, xe_epochs=1))
    assert len(list(cache.glob("trunk-*.pt"))) > 3  # a new entry instead of the stale one


def test_batches_hold_every_caption_of_every_image_once_per_epoch():
    from imcap.tokenizer import train_tokenizer

    tokenizer = train_tokenizer(TINY_CAPTIONS * 3, vocab_size=300, min_frequency=1)
    captions = [TINY_CAPTIONS[i : i + 5] for i in range(3)] + [TINY_CAPTIONS[3:8]]
    table = CaptionTable(tokenizer, captions, max_tokens=16)
    batches = list(table.batches(3, torch.Generator().manual_seed(0), flip=False))
    seen = sorted(int(i) for b in batches for i in b.image_index)
    assert seen == [0, 1, 2, 3]
    assert sum(b.input_ids.shape[0] for b in batches) == 4 * 5
    assert all((b.input_ids[:, 0] == tokenizer.bos_token_id).all() for b in batches)


def test_mirror_caption_swaps_left_and_right():
    assert (
        mirror_caption("a man on the left holds his right hand up")
        == "a man on the right holds his left hand up"
    )


def test_scst_step_raises_the_better_sample_and_lowers_the_worse(tmp_path):
    from imcap.training.steps import caption_logits, caption_mask

    from .conftest import build_tiny_model

    model, tokenizer = build_tiny_model(tmp_path / "m")
    model.eval()
    tokens = torch.randn(2, 5, 32)
    samples = torch.tensor([[1, 10, 11, 2], [1, 12, 13, 2]])
    mask = caption_mask(samples, tokenizer.eos_token_id)

    def logits():
        return caption_logits(model, tokens, samples[:, :-1], mask[:, :-1])

    def sequence_log_probs():
        return logits().log_softmax(-1).gather(-1, samples[:, 1:, None]).sum((1, 2))

    before = sequence_log_probs().detach()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)  # small: the claim is first-order
    loss = scst_loss(logits(), samples, mask, torch.tensor([1.0, 0.0]), 2).mean()
    loss.backward()
    optimizer.step()
    after = sequence_log_probs().detach()
    assert after[0] > before[0] and after[1] < before[1]


def test_concept_tokens_train_with_a_frozen_head_and_are_saved(data, tmp_path):
    """A recipe with ImageNet concepts: the head stays what it was (frozen), the concept layers learn, and
    the saved model records its head and table."""
    config = tiny_config(data, tmp_path / "run", tmp_path / "cache", xe_epochs=2)
    config.model.concept_head, config.model.concept_tokens, config.model.concept_dropout = True, 3, 0.3
    best = train(config.validate())
    loaded = load_model(best)
    encoder = loaded.model.encoder
    assert encoder.config.concept_tokens == 3 and encoder.config.concept_table == "imagenet-1k-wordnet-v1"
    start = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)["model"]
    loop._seed_everything(config.seed)  # as prepare() does before building: the same initial weights
    fresh = loop.build(config, TINY_CAPTIONS, None).model.state_dict()
    torch.testing.assert_close(start["encoder.classifier.weight"], fresh["encoder.classifier.weight"])
    assert not torch.equal(start["encoder.concept_rank"], fresh["encoder.concept_rank"])


def test_concept_head_refuses_a_trainable_tail(data, tmp_path):
    raw = tiny_config(data, tmp_path / "run", tmp_path / "cache").to_dict()
    raw["model"].update(concept_head=True)
    raw["optim"]["finetune_tail_from_epoch"] = 2
    with pytest.raises(ValueError, match="frozen tail"):
        TrainConfig.from_dict(raw)


def test_tail_fine_tunes_beside_the_frozen_concept_tail(data, tmp_path):
    """With model.concept_tail the CNN tail trains from finetune_tail_from_epoch, while the head's own copy
    of the tail and the head itself stay exactly as built; the saved model brings the copy back."""
    config = tiny_config(data, tmp_path / "run", tmp_path / "cache", xe_epochs=2, scst_epochs=1)
    config.model.concept_head, config.model.concept_tokens, config.model.concept_tail = True, 3, True
    config.optim.finetune_tail_from_epoch = 2
    best = train(config.validate())
    end = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)["model"]
    loop._seed_everything(config.seed)
    fresh = loop.build(config, TINY_CAPTIONS, None).model.state_dict()
    frozen = [k for k in fresh if k.startswith(("encoder.concept_tail.", "encoder.classifier."))]
    tail = [k for k in fresh if k.startswith("encoder.cnn._conv_head.")]
    assert frozen and tail
    for key in frozen:
        torch.testing.assert_close(end[key], fresh[key])
    assert any(not torch.equal(end[key], fresh[key]) for key in tail)
    encoder = load_model(best).model.encoder
    assert encoder.config.concept_tail and hasattr(encoder, "concept_tail")


@pytest.mark.parametrize("concepts", [False, True], ids=["plain", "concept_tail"])
def test_scst_fine_tunes_the_tail_when_asked(data, tmp_path, concepts):
    """scst.finetune_tail: the tail, frozen through cross-entropy here, changes in the SCST epoch (from the
    cached trunk features, or the trunk-only path of a concept_tail encoder); the head's copy does not."""
    config = tiny_config(data, tmp_path / "run", tmp_path / "cache", xe_epochs=1, scst_epochs=1)
    config.scst.finetune_tail = True
    config.optim.tail_lr_scale = 1.0
    if concepts:
        config.model.concept_head, config.model.concept_tokens, config.model.concept_tail = True, 3, True
    train(config.validate())
    after_scst = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)["model"]
    loop._seed_everything(config.seed)
    fresh = loop.build(config, TINY_CAPTIONS, None).model.state_dict()
    tail = [k for k in fresh if k.startswith("encoder.cnn._conv_head.")]
    assert tail and any(not torch.equal(after_scst[key], fresh[key]) for key in tail)
    for key in (k for k in fresh if k.startswith(("encoder.concept_tail.", "encoder.classifier."))):
        torch.testing.assert_close(after_scst[key], fresh[key])


def test_scst_tail_needs_the_concept_heads_own_copy(data, tmp_path):
    raw = tiny_config(data, tmp_path / "run", tmp_path / "cache").to_dict()
    raw["model"].update(concept_head=True)
    raw["scst"]["finetune_tail"] = True
    with pytest.raises(ValueError, match="frozen tail"):
        TrainConfig.from_dict(raw)


def test_scst_reward_adds_the_weighted_sentence_bleu4():
    from types import SimpleNamespace

    from imcap.metrics import CiderD, SentenceBleu4

    refs = {"a": ["a dog runs on the grass", "a brown dog running in a field"], "b": ["two men play soccer"]}
    texts, ids = ["a dog runs on the grass", "a cat sits", "two men play soccer"], ["a", "a", "b"]
    cider, bleu = CiderD(refs).scores(texts, ids), SentenceBleu4(refs).scores(texts, ids)
    assert bleu.max() > 0.5  # the term is not zero on these captions, so the test can tell the two apart

    def run(weight):
        return SimpleNamespace(
            train_refs=refs,
            cider=None,
            bleu=None,
            config=TrainConfig.from_dict({"scst": {"bleu4_weight": weight}}),
        )

    torch.testing.assert_close(scst.sample_rewards(run(0.0), texts, ids), cider)
    torch.testing.assert_close(scst.sample_rewards(run(2.0), texts, ids), cider + 2.0 * bleu)


def test_scst_bleu4_weight_must_not_be_negative():
    with pytest.raises(ValueError, match="bleu4_weight"):
        TrainConfig.from_dict({"scst": {"bleu4_weight": -1.0}})


def test_scst_wise_weight_must_be_a_share():
    with pytest.raises(ValueError, match="wise_weight must be in"):
        TrainConfig.from_dict({"scst": {"wise_weight": 1.5}})


def test_wise_ft_mixes_the_best_epoch_with_the_cross_entropy_stages_last(data, tmp_path):  # noqa: F811
    """scst.wise_weight: the run keeps its model at the end of cross-entropy (xe/) and returns wise/, that
    model moved wise_weight of the way to best/, with its greedy val scores beside it."""
    config = tiny_config(data, tmp_path / "run", tmp_path / "cache", xe_epochs=1, scst_epochs=1)
    config.scst.wise_weight = 0.25
    run = tmp_path / "run"
    assert train(config.validate()) == run / "wise"
    scores = json.loads((run / "wise.json").read_text())
    assert scores["wise_weight"] == 0.25 and scores["CIDEr"] >= 0
    # a best/ far from xe/ (a tiny run's SCST epoch may not beat cross-entropy), mixed again on resume
    best = load_model(run / "best")
    with torch.no_grad():
        for value in {
            v.data_ptr(): v for v in best.model.state_dict().values() if v.is_floating_point()
        }.values():
            value += 1
    save_model(best.model, best.tokenizer, best.image_processor, run / "best")
    assert train(config.validate(), resume=True) == run / "wise"
    start, moved = load_model(run / "xe").model.state_dict(), load_model(run / "best").model.state_dict()
    got = load_model(run / "wise").model.state_dict()
    for key, value in start.items():
        expected = 0.75 * value + 0.25 * moved[key] if value.is_floating_point() else value
        torch.testing.assert_close(got[key], expected)
    (run / "xe" / "config.json").unlink()  # a run from before xe/ was kept: one clear error
    with pytest.raises(FileNotFoundError, match="no cross-entropy model to mix with"):
        train(config.validate(), resume=True)


def test_export_carries_the_no_repeat_decoding_default(seeing_model_dir, tmp_path):
    """An exported model never repeats a 3-gram by default (its generation_config.json); the trained
    folder itself, which validation and SCST decode with, stays without it."""
    checkpoints.export_fp16(seeing_model_dir, tmp_path / "exported")
    exported = load_model(tmp_path / "exported")
    exported_size = exported.model.generation_config.no_repeat_ngram_size
    assert exported_size == checkpoints.EXPORT_NO_REPEAT_NGRAM_SIZE == 3
    assert not load_model(seeing_model_dir).model.generation_config.no_repeat_ngram_size


@pytest.mark.parametrize("concept_tail", [False, True], ids=["plain", "concept_tail"])
def test_the_frozen_tails_output_kept_gives_the_tokens_of_running_the_tails(data, tmp_path, concept_tail):
    """front.precompute keeps the tail's maps (and a concept_tail head's logits) so that SCST steps run no
    tail: the tokens equal those made from the trunk features in the step, but for fp16 maps."""
    config = tiny_config(data, tmp_path / "run", tmp_path / "cache")
    config.model.concept_head, config.model.concept_tokens, config.model.concept_tail = True, 3, concept_tail
    built = loop.build(config.validate(), TINY_CAPTIONS, None)
    built.model.eval()
    encoder = built.front.encoder
    torch.manual_seed(0)
    with torch.no_grad():  # an untrained tail's output all but vanishes: random weights, unit inputs
        shape = encoder.trunk(torch.randn(1, 3, 64, 64)).shape[1:]
        trunk = torch.randn(5, *shape).half()
        for weight in (encoder.cnn._conv_head.weight, encoder.cnn._bn1.weight, encoder.cnn._bn1.bias):
            weight.normal_()  # "fine-tuned": the head's own copy of the tail now differs
    kept = built.front.precompute(trunk, torch.device("cpu"), batch=2)
    assert len(kept) == 5 and (kept.concept_logits is not None) == concept_tail
    with torch.no_grad():
        from_trunk = built.front.tokens(trunk[1:4], from_trunk=True)
        from_kept = built.front.tokens(kept[1:4].to("cpu"), from_trunk=False)
    torch.testing.assert_close(from_kept, from_trunk, rtol=2e-2, atol=2e-2)
    if concept_tail:  # the head's logits, from its own tail, not the fine-tuned one
        with torch.no_grad():
            _, logits = encoder.encode_trunk(trunk.float())
            fine_tuned = encoder.concept_logits(encoder.tail(trunk.float()))
        torch.testing.assert_close(kept.concept_logits, logits, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(kept.concept_logits, fine_tuned, atol=1e-2)
    with pytest.raises(ValueError, match="trunk features or the TailOutput"):
        built.front.tokens(trunk, from_trunk=False)
