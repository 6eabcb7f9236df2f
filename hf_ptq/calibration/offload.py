"""Accelerate offload: onload one unit at a time, and write quantized layers back into the store.

Accelerate (``device_map`` with ``"cpu"``/``"disk"``) puts an ``AlignDevicesHook`` on each leaf
module; outside a forward its weights sit on ``meta`` and the real values live in
``module._hf_hook.weights_map``. Writing ``module.weight.data`` does not persist, so hf_ptq reads
weights from the map and writes new tensors into ``weights_map.dataset.state_dict`` (the
loader's in-memory dict, which takes priority over the disk index).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from accelerate.hooks import AlignDevicesHook, add_hook_to_module, remove_hook_from_module
from accelerate.utils import PrefixedDataset, has_offloaded_params, set_module_tensor_to_device
from torch import nn

__all__ = ["materialized", "onloaded", "replace_layer", "execution_device", "is_offloaded"]


def is_offloaded(module: nn.Module) -> bool:
    """Whether any leaf below ``module`` keeps its weights in an accelerate offload store."""
    return any(has_offloaded_params(m) for m in module.modules())


def execution_device(model: nn.Module) -> torch.device:
    """Where computation happens: the hooks' execution device, else the first real parameter's."""
    for m in model.modules():
        hook = getattr(m, "_hf_hook", None)
        device = getattr(hook, "execution_device", None)
        if device is not None:
            return torch.device(device if not isinstance(device, int) else f"cuda:{device}")
    for p in model.parameters():
        if p.device.type != "meta":
            return p.device
    return torch.device("cpu")


@contextmanager
def materialized(module: nn.Module, device: torch.device | None = None) -> Iterator[nn.Module]:
    """Yield ``module`` with its real weights on the compute device (a no-op when not offloaded)."""
    if has_offloaded_params(module):
        hook = module._hf_hook
        target = device or hook.execution_device
        names = _direct_tensor_names(module)
        for name in names:
            set_module_tensor_to_device(module, name, target, value=hook.weights_map[name])
        try:
            yield module
        finally:
            for name in names:
                set_module_tensor_to_device(module, name, "meta")
    else:
        yield module


@contextmanager
def onloaded(unit: nn.Module, device: torch.device) -> Iterator[nn.Module]:
    """Take ``unit`` out of offloading while a method works on it.

    Offloaded leaves get their real weights on ``device`` and lose their hooks (so a forward does
    not send them back to ``meta`` halfway); on exit, leaves that are still the same float module
    get their hook back and return to ``meta``. Layers swapped for quantized ones in the meantime
    are handled by :func:`replace_layer`, which stores them through the same offload store; the
    float layers they replaced go to ``meta`` too, so memory does not grow with depth (their
    onloaded weights may be zero-copy views of the checkpoint file, whose pages would otherwise
    stay resident).
    """
    saved: list[tuple[nn.Module, AlignDevicesHook]] = []
    for m in unit.modules():
        if has_offloaded_params(m):
            hook = m._hf_hook
            for name in _direct_tensor_names(m):
                set_module_tensor_to_device(m, name, device, value=hook.weights_map[name])
            remove_hook_from_module(m)
            m._hf_ptq_saved_hook = hook
            saved.append((m, hook))
    try:
        yield unit
    finally:
        in_unit = {id(x) for x in unit.modules()}
        for m, hook in saved:
            del m._hf_ptq_saved_hook
            if id(m) in in_unit:  # still part of the unit → re-offload unchanged
                add_hook_to_module(m, hook)
            else:  # replaced by a quantized layer: drop its float weights, which callers may still reference
                for name in _direct_tensor_names(m):
                    set_module_tensor_to_device(m, name, "meta")


def _direct_tensor_names(m: nn.Module) -> list[str]:
    return [n for n, t in list(m._parameters.items()) + list(m._buffers.items()) if t is not None]


def replace_layer(model: nn.Module, name: str, new: nn.Module) -> None:
    """Swap ``model.<name>`` for ``new``; if the old layer was offloaded, offload ``new`` the same way."""
    old = model.get_submodule(name)
    hook = getattr(old, "_hf_hook", None) or getattr(old, "_hf_ptq_saved_hook", None)
    weights_map = getattr(hook, "weights_map", None)
    if hook is not None and getattr(hook, "offload", False) and isinstance(weights_map, PrefixedDataset):
        store = weights_map.dataset.state_dict
        for tname, tensor in list(new.named_parameters(recurse=False)) + list(new.named_buffers(recurse=False)):
            store[weights_map.prefix + tname] = tensor.detach().to("cpu")
        new_hook = AlignDevicesHook(
            execution_device=hook.execution_device,
            offload=True,
            io_same_device=hook.io_same_device,
            weights_map=PrefixedDataset(weights_map.dataset, weights_map.prefix),
            offload_buffers=True,
        )
        add_hook_to_module(new, new_hook)
    elif hook is not None:  # dispatched but not offloaded: same device, same input alignment
        if hook.execution_device is not None:
            new.to(hook.execution_device)
        add_hook_to_module(new, AlignDevicesHook(execution_device=hook.execution_device, io_same_device=hook.io_same_device))
    model.set_submodule(name, new)
