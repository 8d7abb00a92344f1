"""Captioning checkpoints that come with a transformers processor: BLIP, GIT, Florence-2 and the chat
vision-language models (LLaVA, Idefics3/SmolVLM, Qwen2-VL, ...), next to imcap's own VisionEncoderDecoder.

Each family is a small description of how its inputs are built, not a fork of its model code: the model is
transformers' own (`AutoModelForImageTextToText`), its processor turns images (and the prompt, if the
family takes one) into `generate`'s inputs, and imcap's `Captioner` scores and ranks what `generate`
returns exactly as it does for its own models. Families are chosen by the checkpoint's `model_type`, from
the explicit table `FAMILIES`; an image-to-text type transformers knows and the table does not gets the
generic chat description when its processor has a chat template, else the plain one.

Input kinds:
- IMAGE: image in, caption out (GIT); no prompt.
- PREFIX: image in, and an optional text the caption continues (BLIP's conditional captioning); the
  prompt is the start of the text, given as is.
- CHAT: an instruction (default `DEFAULT_INSTRUCTION`) put in the processor's chat template as the user's
  turn after the image; the caption is the assistant's answer.
- TASK: one of the model's task tokens (Florence-2's `<CAPTION>`, ...).

Only what the model generated after its prompt is returned: `generate` of decoder-only models gives the
prompt back in front of the new tokens, and the Captioner keeps only the tokens it has scores for.
Decoder-only models are padded on the left, as their processors expect for batched generation.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
from PIL import Image

from imcap.generation import CaptionOptions, OptionsError

IMAGE, PREFIX, CHAT, TASK = "image", "prefix", "chat", "task"
DEFAULT_INSTRUCTION = "Describe this image in one sentence."
FLORENCE_TASKS = ("<CAPTION>", "<DETAILED_CAPTION>", "<MORE_DETAILED_CAPTION>")
_SPACES = re.compile(r"\s+")


@dataclass(frozen=True)
class Checkpoint:
    """A well-known hub checkpoint of a family, for `imcap models` (information only)."""

    hub_id: str
    params: str  # parameter count as the model card gives it, e.g. "247M"
    licence: str


@dataclass(frozen=True)
class Family:
    """How a family's captioning inputs are built."""

    name: str
    model_types: tuple[str, ...]  # config.json's model_type values of the family
    inputs: str  # IMAGE, PREFIX, CHAT or TASK
    default_prompt: str | None = None  # used when the options give no prompt
    tasks: tuple[str, ...] = ()  # TASK: the prompts the model knows
    decoder_only: bool = True  # the text model continues the prompt: pad on the left
    nested_images: bool = False  # the processor takes one list of images per text (Idefics3, SmolVLM)
    processor: bool = True  # False: imcap's own loading (VisionEncoderDecoder and imcap's architectures)
    checkpoints: tuple[Checkpoint, ...] = field(default=(), compare=False)

    @property
    def takes_prompt(self) -> bool:
        return self.inputs != IMAGE


FAMILIES: tuple[Family, ...] = (
    Family(
        "VisionEncoderDecoder",
        ("vision-encoder-decoder",),
        IMAGE,
        processor=False,
        checkpoints=(
            Checkpoint("default (shipped inside imcap)", "12M", "Apache-2.0"),
            Checkpoint("nlpconnect/vit-gpt2-image-captioning", "239M", "Apache-2.0"),
        ),
    ),
    Family(
        "imcap prefix / LSTM",
        ("imcap-prefix", "imcap-lstm"),
        IMAGE,
        processor=False,
        checkpoints=(Checkpoint("(trained with imcap train)", "-", "yours"),),
    ),
    Family(
        "BLIP",
        ("blip",),
        PREFIX,
        checkpoints=(
            Checkpoint("Salesforce/blip-image-captioning-base", "247M", "BSD-3-Clause"),
            Checkpoint("Salesforce/blip-image-captioning-large", "470M", "BSD-3-Clause"),
        ),
    ),
    Family(
        "BLIP-2",
        ("blip-2",),
        PREFIX,
        checkpoints=(Checkpoint("Salesforce/blip2-opt-2.7b", "3.9B", "MIT"),),
    ),
    Family(
        "GIT",
        ("git",),
        IMAGE,
        checkpoints=(
            Checkpoint("microsoft/git-base-coco", "177M", "MIT"),
            Checkpoint("microsoft/git-large-coco", "394M", "MIT"),
        ),
    ),
    Family(
        "Florence-2",
        ("florence2",),
        TASK,
        default_prompt="<CAPTION>",
        tasks=FLORENCE_TASKS,
        decoder_only=False,
        checkpoints=(
            Checkpoint("microsoft/Florence-2-base", "0.23B", "MIT"),
            Checkpoint("microsoft/Florence-2-large", "0.77B", "MIT"),
        ),
    ),
    Family(
        "Idefics3 / SmolVLM",
        ("idefics3", "smolvlm"),
        CHAT,
        default_prompt=DEFAULT_INSTRUCTION,
        nested_images=True,
        checkpoints=(
            Checkpoint("HuggingFaceTB/SmolVLM-256M-Instruct", "256M", "Apache-2.0"),
            Checkpoint("HuggingFaceTB/SmolVLM-500M-Instruct", "507M", "Apache-2.0"),
        ),
    ),
    Family(
        "Qwen2-VL / Qwen2.5-VL",
        ("qwen2_vl", "qwen2_5_vl"),
        CHAT,
        default_prompt=DEFAULT_INSTRUCTION,
        checkpoints=(
            Checkpoint("Qwen/Qwen2-VL-2B-Instruct", "2.2B", "Apache-2.0"),
            Checkpoint("Qwen/Qwen2.5-VL-3B-Instruct", "3.8B", "Qwen Research"),
        ),
    ),
    Family(
        "LLaVA",
        ("llava", "llava_next", "llava_onevision"),
        CHAT,
        default_prompt=DEFAULT_INSTRUCTION,
        checkpoints=(Checkpoint("llava-hf/llava-1.5-7b-hf", "7.1B", "Llama 2 Community"),),
    ),
    Family(
        "PaliGemma",
        ("paligemma",),
        PREFIX,
        default_prompt="caption en",
        checkpoints=(Checkpoint("google/paligemma-3b-mix-224", "2.9B", "Gemma (gated)"),),
    ),
)
_BY_MODEL_TYPE = {model_type: family for family in FAMILIES for model_type in family.model_types}
# image-to-text model types transformers knows and FAMILIES does not describe (untested)
GENERIC_CHAT = Family("other (chat template)", (), CHAT, default_prompt=DEFAULT_INSTRUCTION)
GENERIC_PLAIN = Family("other (no chat template)", (), IMAGE)


def family_for(model_type: str, processor) -> Family:
    """The description of a processor-based checkpoint's family (see the module docstring)."""
    if model_type in _BY_MODEL_TYPE:
        return _BY_MODEL_TYPE[model_type]
    return GENERIC_CHAT if getattr(processor, "chat_template", None) else GENERIC_PLAIN


def is_image_to_text(model_type: str | None) -> bool:
    """Whether transformers' AutoModelForImageTextToText has a class for this model_type."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    return model_type in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES


def load_processor_model(source: str, dtype: torch.dtype, **kwargs):
    """(model, processor, family) of a processor-based checkpoint; raises ValueError (one line) when the
    folder's processor is missing or is not one for images and text."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(source, **kwargs)
    if getattr(processor, "image_processor", None) is None or getattr(processor, "tokenizer", None) is None:
        raise ValueError(
            "it has no image+text processor (processor_config.json or preprocessor_config.json with a "
            "tokenizer); save the processor next to the model with processor.save_pretrained"
        )
    model = AutoModelForImageTextToText.from_pretrained(source, dtype=dtype, **kwargs).eval()
    family = family_for(model.config.model_type, processor)
    if family.decoder_only:
        processor.tokenizer.padding_side = "left"  # batched generation continues every row at the right
    return model, processor, family


def check_prompt(family: Family | None, model_name: str, options: CaptionOptions) -> None:
    """Raise OptionsError (one line) when the options' prompt cannot be used with this model."""
    prompt = options.prompt
    if prompt is None:
        return
    if family is None or not family.takes_prompt:
        kind = family.name if family else "imcap's own architectures"
        raise OptionsError(f"prompt: {model_name} ({kind}) does not take one; see imcap models")
    if family.inputs == TASK and prompt not in family.tasks:
        raise OptionsError(
            f"prompt must be one of {', '.join(family.tasks)} for {family.name}, got {prompt!r}"
        )


@dataclass
class ProcessorInputs:
    """A batch as the processor made it: `generate`'s tensors, and the pictures and prompt they came from
    (so a batch can be made again image by image, see `one_by_one`)."""

    tensors: dict[str, torch.Tensor]
    pictures: list[Image.Image]
    prompt: str | None

    def on(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        """The tensors on the model's device, images in its dtype."""
        return {
            name: value.to(model.device, model.dtype if value.is_floating_point() else None)
            for name, value in self.tensors.items()
        }


def prepare(processor, family: Family, pictures: list[Image.Image], prompt: str | None) -> ProcessorInputs:
    """Run the processor on a batch of RGB pictures (in imcap.batch's read-ahead workers)."""
    text = prompt_text(processor, family, prompt)
    images = [[p] for p in pictures] if family.nested_images else pictures
    if text is None:
        tensors = processor(images=images, return_tensors="pt")
    else:
        tensors = processor(images=images, text=[text] * len(pictures), padding=True, return_tensors="pt")
    return ProcessorInputs(dict(tensors), list(pictures), prompt)


def one_by_one(processor, family: Family, inputs: ProcessorInputs) -> list[ProcessorInputs]:
    """The batch again, one image per ProcessorInputs (seeded sampling captions each image alone)."""
    return [prepare(processor, family, [picture], inputs.prompt) for picture in inputs.pictures]


def prompt_text(processor, family: Family, prompt: str | None) -> str | None:
    """The text the processor gets next to each image: None (image only), the prefix or task token as
    is, or the instruction in the chat template with the assistant's turn opened."""
    prompt = prompt if prompt is not None else family.default_prompt
    if prompt is None or family.inputs != CHAT:
        return prompt
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True)


def caption_text(text: str) -> str:
    """The display form of a generated caption: single spaces, first letter capitalised, ending in a full
    stop unless it ends in other punctuation. Case is kept (a VLM's names stay as written)."""
    text = _SPACES.sub(" ", text).strip()
    if not text:
        return ""
    text = text[0].upper() + text[1:]
    return text if text[-1] in ".!?" else f"{text}."
