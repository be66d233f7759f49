"""The one device and precision policy of every model step (`device: auto`): CUDA when there is a
GPU, else the CPU; bf16 on a GPU that has it, float16 on one that does not, float32 on the CPU.
torch is imported when a function is called, never at import."""

from __future__ import annotations


def resolve_device(device: str = "auto") -> str:
    """"auto" -> "cuda" when a GPU is visible, else "cpu"; any other value as given."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def has_bf16(device: str = "auto") -> bool:
    """Whether `device` is a GPU that computes in bfloat16."""
    import torch

    return resolve_device(device).startswith("cuda") and torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def resolve_dtype(dtype: str, device: str):
    """A torch dtype from "auto" | "float32" | "bfloat16" | "float16" on `device` (resolved)."""
    import torch

    if dtype == "auto":
        if resolve_device(device).startswith("cuda"):
            return torch.bfloat16 if has_bf16(device) else torch.float16
        return torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
