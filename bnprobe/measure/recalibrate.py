"""PreciseBN, layer by layer: put the sequential population statistics into the BN buffers.

After training, running buffers lag the weights (an exponential average over past batches,
each normalized by batch statistics). :func:`recalibrate` replaces them with the statistics of
:func:`.reference.reference_pass`: each layer's input over the data, with every upstream BN
already normalizing by its own population statistics (Wu & Johnson 2021).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..data.batches import DeviceImages
from ..errors import BnprobeError
from ..layers import BN_TYPES
from ._source import InputSource
from .reference import reference_pass


@torch.no_grad()
def recalibrate(
    model: nn.Module,
    data: Any,
    size: int | None = None,
    augment: bool | None = None,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    progress: bool = False,
    shard: bool = False,
) -> dict[str, Any]:
    """Set every BN layer's running buffers to its sequential population statistics.

    Training flags are restored; only ``running_mean`` and ``running_var`` change (the
    variance stored is the biased population variance, which is what BN divides by in
    evaluation mode).

    Args:
        model: A network with BN layers that keep running statistics.
        data: ``DeviceImages``, a Dataset or a Tensor of inputs.
        size: Use this many inputs (a seeded subset); None: all.
        augment: Augment inputs as in training (default: when ``data`` is DeviceImages that
            translate or flip).
        generator: CPU generator (subset, augmentation seed); None: seed 0.
        device: Where to run (default: the model's device).
        progress: Show a progress bar.
        shard: Under torchrun, split the inputs between the processes and merge the
            statistics layer by layer (every process ends with the same buffers).

    Returns:
        Provenance: ``{"buffers": "population", "images": N, "augment": bool, "method": ...}``.

    Raises:
        BnprobeError: If the network has no BN layer with running statistics.
    """
    layers = {n: m for n, m in model.named_modules()
              if isinstance(m, BN_TYPES) and m.running_mean is not None and m.running_var is not None}
    if not layers:
        raise BnprobeError("the network has no BatchNorm layers with running statistics to recalibrate")
    if device is None:
        device = next(iter(model.parameters())).device
    device = torch.device(device)
    if augment is None:
        augment = isinstance(data, DeviceImages) and (data.norm.translate > 0 or data.norm.flip)
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    aug_gen = torch.Generator(device=device).manual_seed(int(torch.randint(2**62, (1,), generator=gen)))
    source = InputSource(data, device, augment)
    flags = {m: m.training for m in model.modules()}
    try:
        res = reference_pass(model, source, size=size, generator=gen, aug_generator=aug_gen,
                             progress=progress, shard=shard)
    finally:
        for m, flag in flags.items():
            m.training = flag
    for name, module in layers.items():
        if name in res.population:
            mean, var = res.population[name]
            module.running_mean.copy_(mean.to(module.running_mean))
            module.running_var.copy_(var.to(module.running_var))
    return {"buffers": "population", "images": res.inputs, "augment": bool(source.augment),
            "method": res.method, "layers": len(res.population)}
