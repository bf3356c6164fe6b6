"""Input perturbations for robustness checks: FGSM and additive Gaussian noise.

Inputs are normalized tensors, not pixel values, so no perturbation is clipped to a valid
range.
"""

from __future__ import annotations

from typing import Dict, Iterable, Mapping, Optional, Sequence, Tuple

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from bnprobe.errors import BnprobeError

__all__ = ["ATTACKS", "DEFAULT_KINDS", "fgsm", "gaussian_noise", "robustness_curve"]

#: Attack names understood by :func:`robustness_curve`.
ATTACKS = ("gaussian", "fgsm")

#: Default strengths of :func:`robustness_curve` (noise std / FGSM step, in normalized units).
DEFAULT_KINDS: Dict[str, Tuple[float, ...]] = {
    "gaussian": (0.1, 0.25, 0.5, 1.0),
    "fgsm": (0.01, 0.03, 0.1, 0.3),
}


def fgsm(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float) -> torch.Tensor:
    """Fast gradient sign method: ``x + eps * sign(grad_x NLL(model(x), y))``.

    The gradient is taken with the model in whatever mode it is in (note that a forward
    pass in training mode updates BatchNorm running statistics). The gradient is computed
    with :func:`torch.autograd.grad`, so the parameters' ``.grad`` are left untouched, and
    ``x`` itself is not modified. No clipping is applied: inputs are normalized, not pixels.

    Args:
        model: Module mapping ``x`` to log-probabilities ``(N, K)``.
        x: Input batch.
        y: Integer labels ``(N,)``.
        eps: Step size (in the units of ``x``).

    Returns:
        The perturbed batch, detached, same shape/dtype/device as ``x``. Entries whose
        gradient is exactly zero are not moved.
    """
    x0 = x.detach()
    x_req = x0.clone().requires_grad_(True)
    with torch.enable_grad():
        loss = F.nll_loss(model(x_req), y)
        (grad,) = torch.autograd.grad(loss, x_req)
    return (x0 + eps * grad.sign()).detach()


def gaussian_noise(
    x: torch.Tensor, std: float, generator: Optional[torch.Generator] = None
) -> torch.Tensor:
    """Add i.i.d. Gaussian noise ``N(0, std^2)`` to every entry of ``x`` (no clipping).

    Args:
        x: Input batch.
        std: Noise standard deviation (>= 0).
        generator: Optional generator on ``x``'s device, for reproducibility; the global
            RNG is used (never seeded here) when None.

    Returns:
        A new tensor ``x + std * noise``, detached.
    """
    if std < 0:
        raise ValueError(f"std must be >= 0, got {std}")
    noise = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
    return (x.detach() + std * noise).detach()


def _correct(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> int:
    """Number of arg-max predictions of ``model(x)`` equal to ``y``."""
    with torch.no_grad():
        return int((model(x).argmax(dim=1) == y).sum().item())


def robustness_curve(
    model: nn.Module,
    batches: Iterable[Tuple[torch.Tensor, torch.Tensor]],
    kinds: Optional[Mapping[str, Sequence[float]]] = None,
    generator: Optional[torch.Generator] = None,
) -> pd.DataFrame:
    """Accuracy under Gaussian noise and FGSM at several strengths.

    ``batches`` is iterated once. The model is used in the mode it is in (call
    ``model.eval()`` first for deterministic predictions). Strength 0 is always included
    for every attack and is the clean accuracy (computed once on the unperturbed inputs).

    Args:
        model: Module mapping inputs to log-probabilities ``(N, K)``.
        batches: Iterable of ``(x, y)`` already on the model's device.
        kinds: Attack name (``"gaussian"``: noise std, ``"fgsm"``: step ``eps``) to
            strengths; defaults to :data:`DEFAULT_KINDS`.
        generator: Optional generator for the Gaussian noise.

    Returns:
        DataFrame with columns ``attack``, ``strength``, ``accuracy``: for each attack (in
        the given order) one row per distinct strength, ascending, starting at 0.

    Raises:
        BnprobeError: For an unknown attack name or a negative strength.
    """
    kinds = DEFAULT_KINDS if kinds is None else kinds
    plan: Dict[str, list] = {}
    for attack, strengths in kinds.items():
        if attack not in ATTACKS:
            raise BnprobeError(f"invalid attack {attack!r}; choose from {', '.join(ATTACKS)}")
        values = sorted({0.0, *(float(s) for s in strengths)})
        if values[0] < 0:
            raise BnprobeError(f"negative {attack} strength {values[0]}")
        plan[attack] = values
    clean = 0
    total = 0
    hits = {(a, s): 0 for a, values in plan.items() for s in values if s > 0}
    for x, y in batches:
        total += int(y.shape[0])
        clean += _correct(model, x, y)
        for attack, strength in hits:
            if attack == "gaussian":
                x_att = gaussian_noise(x, strength, generator)
            else:
                x_att = fgsm(model, x, y, strength)
            hits[(attack, strength)] += _correct(model, x_att, y)
    if total == 0:
        raise BnprobeError("robustness_curve got no examples")
    rows = [
        (a, s, (clean if s == 0 else hits[(a, s)]) / total)
        for a, values in plan.items()
        for s in values
    ]
    return pd.DataFrame(rows, columns=["attack", "strength", "accuracy"])
