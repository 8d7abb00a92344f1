"""Tiny random BLIP, GIT and LLaVA checkpoints, saved as the hub hands them over: model, processor and
tokenizer in one folder (`save_pretrained`). Everything is built here; nothing is downloaded.

The tokenizer is a BERT WordPiece tokenizer over a few dozen words (BLIP and GIT use BERT's); LLaVA's gets
an `<image>` token and a small chat template. Sizes: hidden 32, one layer, 32 px images.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    BertTokenizer,
    BlipConfig,
    BlipForConditionalGeneration,
    BlipImageProcessor,
    BlipProcessor,
    CLIPImageProcessor,
    CLIPVisionConfig,
    GitConfig,
    GitForCausalLM,
    GitProcessor,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
)

_TEXT = "a dog cat runs on the grass sits red couch two people walk beach man rides bike in snow "
_PROMPTS = "describe this image one sentence . photo of user assistant :"
WORDS = (_TEXT + _PROMPTS).split()  # the words of captions and of the prompts
PAD, UNK, CLS, SEP = 0, 1, 2, 3  # BERT's special tokens, first in the vocabulary
VISION = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "image_size": 32,
    "patch_size": 8,
}
TEXT = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2}
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }} : {% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<image>{% else %}{{ c['text'] }}{% endif %}{% endfor %} {% endfor %}"
    "{% if add_generation_prompt %}assistant :{% endif %}"
)


def bert_tokenizer(folder: Path) -> BertTokenizer:
    folder.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *dict.fromkeys(WORDS)]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    return BertTokenizer(str(folder / "vocab.txt"))


def _special(tokenizer) -> dict:
    return {"bos_token_id": CLS, "eos_token_id": SEP, "pad_token_id": PAD, "vocab_size": len(tokenizer)}


def blip_folder(folder: Path) -> Path:
    tokenizer = bert_tokenizer(folder / "vocab")
    text = {**TEXT, **_special(tokenizer), "max_position_embeddings": 64, "encoder_hidden_size": 32}
    config = BlipConfig(text_config={**text, "sep_token_id": SEP}, vision_config=VISION, projection_dim=32)
    with torch.random.fork_rng():
        torch.manual_seed(1)
        model = BlipForConditionalGeneration(config).eval()
    processor = BlipProcessor(BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer)
    return _saved(folder, model, processor)


def git_folder(folder: Path) -> Path:
    tokenizer = bert_tokenizer(folder / "vocab")
    config = GitConfig(vision_config=VISION, **TEXT, **_special(tokenizer), max_position_embeddings=64)
    with torch.random.fork_rng():
        torch.manual_seed(2)
        model = GitForCausalLM(config).eval()
    processor = GitProcessor(_clip_processor(), tokenizer)
    return _saved(folder, model, processor)


def llava_folder(folder: Path) -> Path:
    tokenizer = bert_tokenizer(folder / "vocab")
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    text = LlamaConfig(**TEXT, **_special(tokenizer), num_key_value_heads=2, max_position_embeddings=256)
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(**VISION, projection_dim=32),
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-1,
    )
    with torch.random.fork_rng():
        torch.manual_seed(3)
        model = LlavaForConditionalGeneration(config).eval()
    model.generation_config.update(eos_token_id=SEP, pad_token_id=PAD, bos_token_id=CLS)
    processor = LlavaProcessor(
        image_processor=_clip_processor(),
        tokenizer=tokenizer,
        patch_size=8,
        vision_feature_select_strategy="default",
        chat_template=CHAT_TEMPLATE,
        image_token="<image>",
        num_additional_image_tokens=1,
    )
    return _saved(folder, model, processor)


def _clip_processor() -> CLIPImageProcessor:
    return CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})


def _saved(folder: Path, model, processor) -> Path:
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder
