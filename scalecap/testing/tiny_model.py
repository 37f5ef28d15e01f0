"""A tiny random-weight Qwen2-VL built offline, so tests run the real engines without a download.

The weights are random, so the text is gibberish; what is real is the architecture, the tokenizer
machinery, the chat template, the image processor and the number of image tokens. Tests assert on
structure (counts, shapes, logprob presence), never on content. Usage:
`python -m scalecap.testing.tiny_model OUT_DIR`.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
from pathlib import Path
from typing import Any

MARKER = "scalecap_tiny_model.json"
"""Written last; its presence means the folder is complete (builds are idempotent)."""

RECIPE_VERSION = 1

SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]

VOCAB_SIZE = 800
"""Target size of the trained BPE vocabulary, special tokens included."""

MIN_PIXELS = 3136
MAX_PIXELS = 12544
"""4 to 16 image tokens per image (28x28 pixels per merged token): cheap on a CPU."""

# Qwen2-VL's template: a default system turn, image placeholders for {"type": "image"} parts.
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# fmt: off
_SUBJECTS = [
    "man", "woman", "child", "dog", "cat", "car", "bicycle", "tree", "house", "boat", "bird",
    "horse", "table", "chair", "lamp", "cup", "book", "sign", "train", "bus", "flower", "window",
    "door", "bench", "umbrella", "kite", "bottle", "plate", "laptop", "phone", "clock", "bridge",
]
_COLOURS = ["red", "green", "blue", "yellow", "white", "black", "brown", "grey", "orange", "pink"]
# fmt: on
_PLACES = [
    *("on the left", "on the right", "in the center", "at the top", "at the bottom"),
    *("in the background", "in the foreground", "near the edge", "next to the wall", "under the sky"),
]
_ACTIONS = [
    *("stands", "sits", "lies", "rests", "waits", "leans", "hangs", "appears", "is visible"),
    "is parked",
]
_TEMPLATES = [
    "A {c} {s} {a} {p}.",
    "The {s} {p} is {c}.",
    "There is a {c} {s} {p} of the image.",
    "In this picture, a {s} {a} {p}.",
    "Describe more details about the {s}.",
    "Describe more details about the position of the {s}.",
    "The image shows a {c} {s} and a {s2}.",
    "A small {s} {a} beside the {c} {s2}.",
    "Is the {c} {s} visible in the image? Answer yes or no.",
]


def corpus(seed: int = 0, n: int = 400) -> list[str]:
    """A few hundred deterministic English sentences about images: the tokenizer's training text."""
    rng = random.Random(seed)
    lines = [
        "Describe this image in fine detail.",
        "Cover the overall scene, every object, its colour, shape, size and material.",
        "You are a careful visual assistant. You describe only what can actually be seen.",
        "Write plain, complete sentences. Answer with a single word: yes or no.",
        "List each concrete, visible object that these sentences mention, one per line.",
        "Summarise the details of every object in a few factual sentences.",
        "Write one detailed, fluent description of an image. No analysis, no opinions.",
        "yes no Yes No 0 1 2 3 4 5 6 7 8 9 10 100",
    ]
    for _ in range(n):
        s, s2 = rng.sample(_SUBJECTS, 2)
        lines.append(
            rng.choice(_TEMPLATES).format(
                s=s, s2=s2, c=rng.choice(_COLOURS), p=rng.choice(_PLACES), a=rng.choice(_ACTIONS)
            )
        )
    return lines


def _build_tokenizer(seed: int) -> Any:
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=[AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(seed), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        bos_token=None,
        chat_template=CHAT_TEMPLATE,
        model_max_length=32768,
        padding_side="left",
    )


def build_tiny_qwen2vl(out_dir: str | Path, *, seed: int = 0) -> Path:
    """Build the tiny model into `out_dir` (skipped when its marker file is already there)."""
    out = Path(out_dir)
    if (out / MARKER).exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    # Build aside, then move the files in with the marker last: a concurrent session that
    # shares the folder (SCALECAP_TINY_MODEL_DIR) never loads a half-written model.
    with tempfile.TemporaryDirectory(prefix=".tiny-build-", dir=out) as tmp:
        _build_into(Path(tmp), seed)
        for path in sorted(Path(tmp).iterdir(), key=lambda p: p.name == MARKER):
            path.chmod(0o644)
            os.replace(path, out / path.name)
    return out


def _build_into(out: Path, seed: int) -> None:
    import torch
    from transformers import (
        GenerationConfig,
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
        Qwen2VLImageProcessor,
        Qwen2VLProcessor,
        Qwen2VLVideoProcessor,
    )

    tokenizer = _build_tokenizer(seed)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    image_processor = Qwen2VLImageProcessor(
        min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS, patch_size=14, merge_size=2, temporal_patch_size=2
    )
    video_processor = Qwen2VLVideoProcessor(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
    processor = Qwen2VLProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        chat_template=CHAT_TEMPLATE,
    )
    processor.save_pretrained(out)
    tokenizer.save_pretrained(out)

    vocab = len(tokenizer)
    eos, pad = ids["<|im_end|>"], ids["<|endoftext|>"]
    text_config = dict(
        vocab_size=vocab,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        hidden_act="silu",
        max_position_embeddings=4096,
        rms_norm_eps=1e-6,
        use_sliding_window=False,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [8, 12, 12]},
        bos_token_id=pad,
        eos_token_id=eos,
        pad_token_id=pad,
    )
    vision_config = dict(
        depth=2,
        embed_dim=64,
        hidden_size=128,
        mlp_ratio=4,
        num_heads=4,
        in_channels=3,
        patch_size=14,
        spatial_merge_size=2,
        temporal_patch_size=2,
    )
    config = Qwen2VLConfig(
        text_config=text_config,
        vision_config=vision_config,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )
    config.architectures = ["Qwen2VLForConditionalGeneration"]
    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(config).to(torch.bfloat16)
    model.config.dtype = "bfloat16"
    model.generation_config = GenerationConfig(
        bos_token_id=pad, eos_token_id=[eos, pad], pad_token_id=pad, do_sample=False
    )
    model.save_pretrained(out, safe_serialization=True)

    (out / MARKER).write_text(
        json.dumps({"recipe": RECIPE_VERSION, "seed": seed, "vocab_size": vocab}, indent=1) + "\n"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", help="folder to build the model into")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    out = build_tiny_qwen2vl(args.out_dir, seed=args.seed)
    size = sum(p.stat().st_size for p in out.iterdir() if p.is_file())
    print(f"{out} ({size / 1e6:.1f} MB): {', '.join(sorted(p.name for p in out.iterdir()))}")


if __name__ == "__main__":
    main()
