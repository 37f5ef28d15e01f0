"""A weight-less model folder with Qwen2.5-VL-3B-Instruct's shape, built offline, for timing runs.

vLLM's `load_format="dummy"` fills random weights of the config's shape, so a GPU machine with no
model download runs the real model's cost: text at random, timings real. The folder holds the
published 3B config (36 layers, hidden 2048, 2 KV heads, a 32-block vision tower, vocabulary
151,936), a processor, and a synthetic byte-level tokenizer whose every id decodes: 151,643
regular tokens (bytes, then byte pairs, then byte triples), Qwen's special tokens at their real
ids from 151,643, and filler special tokens up to the vocabulary size. Usage:
`python -m bench.qwen25vl_shape OUT_DIR [--layers N] [--vision-depth N]`.
"""

from __future__ import annotations

import argparse
import itertools
from pathlib import Path
from typing import Any

from scalecap.testing.tiny_model import CHAT_TEMPLATE, SPECIAL_TOKENS

REGULAR_TOKENS = 151_643
VOCAB = 151_936
MIN_PIXELS, MAX_PIXELS = 3136, 12_845_056
"""Qwen2.5-VL's image processor range (4 to 16,384 image tokens before merging)."""


def _tokenizer() -> Any:
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(alphabet)}
    merges: list[tuple[str, str]] = []
    longer = itertools.chain(
        ((a, b) for a, b in itertools.product(alphabet, alphabet)),
        ((a + b, c) for a, b, c in itertools.product(alphabet, alphabet, alphabet)),
    )
    for left, right in longer:
        if len(vocab) >= REGULAR_TOKENS:
            break
        vocab[left + right] = len(vocab)
        merges.append((left, right))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=None, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    specials = list(SPECIAL_TOKENS)
    specials += [f"<|reserved_{i}|>" for i in range(VOCAB - REGULAR_TOKENS - len(specials))]
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token=None,
        bos_token=None, chat_template=CHAT_TEMPLATE, model_max_length=128_000,
    )


def build(out_dir: str | Path, *, layers: int = 36, vision_depth: int = 32) -> Path:
    """Write config, tokenizer and processor of the 3B shape into `out_dir` (no weights)."""
    from transformers import (
        GenerationConfig,
        Qwen2_5_VLConfig,
        Qwen2_5_VLProcessor,
        Qwen2VLImageProcessor,
        Qwen2VLVideoProcessor,
    )

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = _tokenizer()
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    if (len(tokenizer), ids["<|image_pad|>"], ids["<|im_end|>"]) != (VOCAB, 151_655, 151_645):
        raise RuntimeError(f"tokenizer ids differ from Qwen's: {len(tokenizer)} {ids}")
    image = Qwen2VLImageProcessor(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS, patch_size=14,
                                  merge_size=2, temporal_patch_size=2)
    video = Qwen2VLVideoProcessor(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
    Qwen2_5_VLProcessor(image_processor=image, tokenizer=tokenizer, video_processor=video,
                        chat_template=CHAT_TEMPLATE).save_pretrained(out)
    tokenizer.save_pretrained(out)
    eos, pad = ids["<|im_end|>"], ids["<|endoftext|>"]
    text = dict(
        vocab_size=VOCAB, hidden_size=2048, intermediate_size=11008, num_hidden_layers=layers,
        num_attention_heads=16, num_key_value_heads=2, hidden_act="silu", max_position_embeddings=128_000,
        rms_norm_eps=1e-6, use_sliding_window=False, sliding_window=32768, max_window_layers=70,
        rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0, "mrope_section": [16, 24, 24]},
        bos_token_id=pad, eos_token_id=eos, pad_token_id=pad, tie_word_embeddings=True,
    )
    full_attention = [i for i in (7, 15, 23, 31) if i < vision_depth] or [vision_depth - 1]
    vision = dict(
        depth=vision_depth, hidden_size=1280, out_hidden_size=2048, intermediate_size=3420, num_heads=16,
        in_channels=3, patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
        fullatt_block_indexes=full_attention, tokens_per_second=2, hidden_act="silu",
    )
    config = Qwen2_5_VLConfig(
        text_config=text, vision_config=vision, image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=True,
    )
    config.architectures = ["Qwen2_5_VLForConditionalGeneration"]
    config.dtype = "bfloat16"
    config.save_pretrained(out)
    GenerationConfig(bos_token_id=pad, eos_token_id=[eos, pad], pad_token_id=pad,
                     do_sample=False).save_pretrained(out)
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("out_dir")
    p.add_argument("--layers", type=int, default=36, help="text layers (36 in the 3B model)")
    p.add_argument("--vision-depth", type=int, default=32, help="vision blocks (32 in the 3B model)")
    a = p.parse_args(argv)
    print(build(a.out_dir, layers=a.layers, vision_depth=a.vision_depth))


if __name__ == "__main__":
    main()
