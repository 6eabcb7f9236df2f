"""Block maps: the reconstruction units of each architecture, as data.

A block map is a list of module-path patterns (``*`` = any index) per ``config.model_type``. The
units of a model are the modules matching a pattern, in forward (registration) order, that
contain at least one layer being quantized; quantized layers outside every unit (a stem conv, a
head kept quantized) become units of their own. Architectures without a map fall back to "every
Linear/Conv2d is its own unit", with a warning naming the fallback. Adding an architecture is one
entry here plus a tiny-config test.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from torch import nn
from transformers.utils import logging

logger = logging.get_logger("hf_ptq")

__all__ = ["BLOCK_MAPS", "Unit", "units_for", "register_block_map"]

#: model_type → unit patterns. Each pattern names modules whose forward takes the hidden state as
#: its first argument (hooks capture that call), e.g. one ``ViTLayer`` or one ResNet bottleneck.
BLOCK_MAPS: dict[str, tuple[str, ...]] = {
    "resnet": ("resnet.embedder.embedder", "resnet.encoder.stages.*.layers.*"),
    "vit": ("vit.embeddings.patch_embeddings", "vit.layers.*"),
    "deit": ("deit.embeddings.patch_embeddings", "deit.layers.*"),
    "convnext": (
        "convnext.embeddings.patch_embeddings",
        "convnext.encoder.stages.*.downsampling_layer.1",
        "convnext.encoder.stages.*.layers.*",
    ),
    "convnextv2": (
        "convnextv2.embeddings.patch_embeddings",
        "convnextv2.encoder.stages.*.downsampling_layer.1",
        "convnextv2.encoder.stages.*.layers.*",
    ),
    "swin": (
        "swin.embeddings.patch_embeddings",
        "swin.encoder.layers.*.blocks.*",
        "swin.encoder.layers.*.downsample",
    ),
}


def register_block_map(model_type: str, patterns: tuple[str, ...]) -> None:
    """Declare the units of another architecture (``model_type`` as in its config)."""
    BLOCK_MAPS[model_type] = tuple(patterns)


@dataclass
class Unit:
    """One reconstruction unit: a module and the quantized layers inside it (qualified names)."""

    name: str
    module: nn.Module
    layer_names: list[str] = field(default_factory=list)

    @property
    def kind(self) -> str:
        return type(self.module).__name__


def _pattern_regex(pattern: str) -> re.Pattern:
    return re.compile("^" + re.escape(pattern).replace(r"\*", r"\d+") + "$")


def _inside(name: str, unit_name: str) -> bool:
    return name == unit_name or name.startswith(unit_name + ".")


def units_for(model: nn.Module, layer_names: list[str], granularity: str = "block") -> list[Unit]:
    """Units of ``model`` covering ``layer_names`` in forward order.

    ``granularity="layer"`` (or an architecture without a block map) makes each layer a unit.
    """
    modules = dict(model.named_modules())
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    patterns = BLOCK_MAPS.get(model_type) if granularity == "block" else None
    if granularity == "block" and patterns is None:
        logger.warning(
            f"hf_ptq has no block map for model_type={model_type!r}; falling back to one unit per "
            "Linear/Conv2d layer (layer-wise reconstruction). Register one with "
            "hf_ptq.calibration.blocks.register_block_map to reconstruct whole blocks."
        )
    units: list[Unit] = []
    claimed: set[str] = set()
    if patterns:
        regexes = [_pattern_regex(p) for p in patterns]
        for name, module in modules.items():
            if any(r.match(name) for r in regexes) and not any(_inside(name, u.name) for u in units):
                inner = [layer for layer in layer_names if _inside(layer, name)]
                if inner:
                    units.append(Unit(name, module, inner))
                    claimed.update(inner)
    for layer in layer_names:  # leftovers: their own unit
        if layer not in claimed:
            units.append(Unit(layer, modules[layer], [layer]))
    order = {name: i for i, name in enumerate(modules)}
    units.sort(key=lambda u: order[u.name])
    return units
