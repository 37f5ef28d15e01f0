"""The tiny random-weight Qwen2-VL: a real tokenizer, template, processor and config, built offline."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from scalecap.testing.tiny_model import MARKER, MAX_PIXELS, MIN_PIXELS, build_tiny_qwen2vl
from tests.backend_contract import make_image

SPECIALS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<|object_ref_start|>",
    "<|box_start|>",
    "<|quad_start|>",
]


@pytest.fixture(scope="module")
def processor(tiny_model_dir: Path):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(tiny_model_dir)


def test_folder_is_small_and_complete(tiny_model_dir: Path) -> None:
    names = {p.name for p in tiny_model_dir.iterdir()}
    for name in ("config.json", "model.safetensors", "tokenizer.json", "processor_config.json", MARKER):
        assert name in names, names
    assert not [n for n in names if n.startswith(".tiny-build-")], names
    size = sum(p.stat().st_size for p in tiny_model_dir.iterdir() if p.is_file())
    assert size < 3_000_000, size


def test_build_is_idempotent(tiny_model_dir: Path) -> None:
    before = {p.name: p.stat().st_mtime_ns for p in tiny_model_dir.iterdir()}
    assert build_tiny_qwen2vl(tiny_model_dir) == tiny_model_dir
    assert {p.name: p.stat().st_mtime_ns for p in tiny_model_dir.iterdir()} == before


def test_config_shape(tiny_model_dir: Path, processor) -> None:
    cfg = json.loads((tiny_model_dir / "config.json").read_text())
    text, vision = cfg["text_config"], cfg["vision_config"]
    assert cfg["model_type"] == "qwen2_vl"
    assert cfg["architectures"] == ["Qwen2VLForConditionalGeneration"]
    assert (text["hidden_size"], text["num_hidden_layers"]) == (128, 2)
    assert (text["num_attention_heads"], text["num_key_value_heads"]) == (2, 1)
    assert text["rope_parameters"]["mrope_section"] == [8, 12, 12]
    assert (vision["depth"], vision["embed_dim"]) == (2, 64)
    assert text["vocab_size"] == len(processor.tokenizer)
    assert cfg["image_token_id"] == processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert cfg["dtype"] == "bfloat16"


def test_tokenizer(processor) -> None:
    tok = processor.tokenizer
    assert 600 <= len(tok) <= 1000, len(tok)
    assert tok.eos_token == "<|im_end|>"
    for special in SPECIALS:
        ids = tok("x" + special + "y", add_special_tokens=False)["input_ids"]
        assert tok.convert_tokens_to_ids(special) in ids, special
    text = "A red square sits in the center, next to a small dog."
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    assert tok.decode(enc["input_ids"]) == text
    assert "".join(text[s:e] for s, e in enc["offset_mapping"]) == text


def test_chat_template(processor) -> None:
    messages = [
        {"role": "system", "content": "Be careful."},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe it."}]},
    ]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == (
        "<|im_start|>system\nBe careful.<|im_end|>\n<|im_start|>user\n"
        "<|vision_start|><|image_pad|><|vision_end|>Describe it.<|im_end|>\n<|im_start|>assistant\n"
    )
    cont = processor.apply_chat_template(
        [*messages, {"role": "assistant", "content": "A cat"}],
        continue_final_message=True,
        tokenize=False,
    )
    assert cont == text + "A cat"
    no_system = processor.apply_chat_template(
        [{"role": "user", "content": "Hi"}], add_generation_prompt=False, tokenize=False
    )
    assert no_system.startswith("<|im_start|>system\n") and no_system.endswith("Hi<|im_end|>\n")


@pytest.mark.parametrize("size", [(20, 20), (96, 72), (800, 600)])
def test_image_token_count_is_bounded(processor, size: tuple[int, int]) -> None:
    text = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi"}]}],
        add_generation_prompt=True,
        tokenize=False,
    )
    out = processor(text=[text], images=[make_image(size=size)], return_tensors="pt")
    pad = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    n = int((out["input_ids"] == pad).sum())
    assert MIN_PIXELS // 28**2 <= n <= MAX_PIXELS // 28**2, (size, n)


def test_cli_reuses_a_built_folder(tiny_model_dir: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    out = subprocess.run(
        [sys.executable, "-m", "scalecap.testing.tiny_model", str(tiny_model_dir)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=True,
    )
    assert "model.safetensors" in out.stdout


def test_import_is_light() -> None:
    code = (
        "import sys, scalecap.testing.tiny_model; "
        "print('transformers' in sys.modules, 'torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"], out.stdout
