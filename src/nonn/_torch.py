"""torch, imported on demand, and the device a torch computation runs on:
one helper for the torch search backend and the image features.

Nothing here imports torch at module level.
"""

from __future__ import annotations


def import_torch(needed_by="This part of nonn", extra=None):
    """``torch``, or an ImportError that says what needs it (``needed_by``)
    and how to install it (with the package extra ``extra``, if any)."""
    try:
        import torch
    except ImportError:
        then = (f', then the extra: pip install torch==2.13.0 "nonn[{extra}]"' if extra
                else ": pip install torch==2.13.0")
        raise ImportError(f"{needed_by} needs PyTorch, which is not installed. Install the "
                          f"CPU build first{then} (see pytorch.org for a CUDA build).") from None
    return torch


def check_device(device, owner):
    """ValueError unless ``device`` is "auto", "cpu", "cuda" or "cuda:N"
    (``owner`` names the estimator or backend in the message)."""
    if not isinstance(device, str) or device.split(":")[0] not in ("auto", "cpu", "cuda") or (
            ":" in device and not device.startswith("cuda:")):
        raise ValueError(f"The 'device' parameter of {owner} must be 'auto', 'cpu', 'cuda' or "
                         f"'cuda:N'. Got {device!r} instead. For example: device='auto'.")
    return device


def resolve_device(device, owner="torch"):
    """The device ``device`` stands for: "auto" is CUDA when
    ``torch.cuda.is_available()``, else the CPU; a CUDA device asked for
    where none is visible is a RuntimeError (the value is valid, the machine
    lacks it)."""
    torch = import_torch()
    check_device(device, owner)
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(
            f"device={device!r} was asked for but torch.cuda.is_available() is False (no GPU, "
            "or a CPU-only torch build). Use device='auto' or 'cpu'.")
    return device
