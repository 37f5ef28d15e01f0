"""Test models built locally (the tiny random-weight Qwen2-VL); torch/transformers load only when called."""
