from imcap.tokenizer import (
    BOS,
    EOS,
    PAD,
    encode_for_training,
    format_caption,
    normalize_caption,
    train_tokenizer,
)

from .conftest import TINY_CAPTIONS


def test_special_tokens_are_distinct_and_real():
    tokenizer = train_tokenizer(TINY_CAPTIONS * 3, vocab_size=300, min_frequency=1)
    ids = {tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id}
    assert len(ids) == 3  # the GPT-2 pad=eos trap (transformers #7135) is avoided
    assert tokenizer.convert_ids_to_tokens(sorted(ids)) == [PAD, BOS, EOS]


def test_round_trip_of_seen_and_unseen_text():
    tokenizer = train_tokenizer(TINY_CAPTIONS * 3, vocab_size=300, min_frequency=1)
    for text in ["a dog runs across the green grass", "zebras graze in 2024, don't they?"]:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert tokenizer.decode(ids).strip() == text  # byte-level BPE: any text survives


def test_training_ids_start_with_bos_and_always_end_with_eos():
    tokenizer = train_tokenizer(TINY_CAPTIONS * 3, vocab_size=300, min_frequency=1)
    ids = encode_for_training(tokenizer, "A dog runs across the green grass .", max_tokens=64)
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(ids[1:-1]).strip() == "a dog runs across the green grass"
    cut = encode_for_training(tokenizer, " ".join(TINY_CAPTIONS), max_tokens=8)
    assert len(cut) == 8 and cut[-1] == tokenizer.eos_token_id


def test_normalize_and_format():
    assert normalize_caption("  A Dog  runs .  ") == "a dog runs"
    assert format_caption(" a dog runs") == "A dog runs."
    assert format_caption("") == ""
