"""Where a model trains: `--device auto|cpu|cuda` resolved to a torch.device (no I/O, no model code).

    device = resolve_device("auto")        # cuda when torch sees a GPU, else cpu
    trainer = Trainer(model, cfg, device)  # the model and every batch live there; snapshots stay CPU tensors

The model code is device-following: tensors it creates take the device of the tensors they meet (never torch's
default device), so the same step runs on either. Inputs built on the CPU (padded histories, masks) are moved to
the model's device where they enter it (`Batch.to`, `to_device`); results read as numbers go back with `.cpu()`.
"""

from __future__ import annotations

import torch

DEVICES = ("auto", "cpu", "cuda")


def resolve_device(name: str | torch.device = "cpu") -> torch.device:
    """"auto" -> cuda if available else cpu; "cpu"; "cuda" or "cuda:N" (ValueError, one line, without a GPU)."""
    if isinstance(name, torch.device):
        name = str(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name != "cpu" and not name.startswith("cuda"):
        raise ValueError(f"unknown device {name!r}; expected one of {', '.join(DEVICES)} (or cuda:N)")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ValueError(f"unknown device {name!r}: {exc}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r} asked for, but torch sees no CUDA GPU here (use --device cpu or auto)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device {name!r} asked for, but torch sees {torch.cuda.device_count()} GPU(s)")
        if device.index is None:  # "cuda" -> "cuda:N": the form tensors report, so devices compare equal
            device = torch.device("cuda", torch.cuda.current_device())
    return device


def model_device(model: torch.nn.Module) -> torch.device:
    """The device of a model's parameters (cpu for a model without any)."""
    return next(model.parameters(), torch.empty(0)).device


def to_device(*tensors: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, ...]:
    """The tensors on `device` (no copy where they already are)."""
    return tuple(t.to(device, non_blocking=True) for t in tensors)
