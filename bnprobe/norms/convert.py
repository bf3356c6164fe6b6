"""Convert any BN network to WN or AN (or none) plus BN-like noise, guided by its torch.fx graph.

Design: the graph decides, modules are replaced. :func:`~bnprobe.norms.tracing.bn_sites`
traces the network and finds, for every BN layer, the conv/linear whose output only it uses;
the conversion then swaps modules in place (``set_submodule``) instead of rewriting and
recompiling the graph. The network keeps its class, its Python forward (so run-time flags such
as ``self.training`` in dropout or torchvision's stochastic depth, which ``fx`` would freeze
into constants, keep working), its state_dict names (``layer1.0.conv1.weight`` stays), and it
deep-copies, pickles and wraps in DDP like the original. Because the graph showed that the
conv's output feeds the BN only, replacing the conv by a normalized layer and the BN by
``nn.Identity`` computes exactly what the graph says.

Per BN layer, in graph order (each gets the noise module of its position):

=================  ==========================================  ==================================
BN input           wn                                          an
=================  ==========================================  ==================================
plain Conv2d       ``WNConv2d`` (groups, stride, dilation)     ``ANConv2d``
plain Linear (1d)  ``WNLinear``                                ``ANNorm`` after the linear
anything else      ``FixedNorm`` (BN in eval mode)             ``ANNorm`` (propagated moments)
=================  ==========================================  ==================================

"Anything else" is a concatenation (DenseNet's pre-activation BN), an addition, a pooling, a
conv whose output has other users, or a conv subclass; ``unpaired="error"`` refuses those
instead. ``none`` folds each BN into its conv (a biased conv inside a ``ConvNorm``) or into a
``FixedNorm`` without noise; ``bn`` with noise swaps each BN for a ``NoisyBatchNorm2d``.

The BN's affine is carried over: gamma -> ``s``, beta -> ``b`` (with learned noise, whose
``(x_hat + b) S`` replaces the affine: ``s`` and ``beta / gamma``). A conv bias before a BN is
redundant (BN cancels it) and is dropped, so the converted network has the original's
parameters minus those biases, plus the noise parameters (learned noise's ``u``); the BN
buffers disappear. With ``from_population`` the BN's running statistics are folded in as
well, so that a ``wn`` or ``none`` network reproduces the BN network in evaluation mode:
``s = gamma ||w|| / sqrt(rv + eps)``, ``b = beta + gamma (c - rm) / sqrt(rv + eps)``.

``an`` returns an :class:`~bnprobe.norms.an_network.ANNetwork` around the converted network.

Noise sits on each layer's own ``x_hat``: standardized for AN, ``FixedNorm`` and BN, but
``conv(x, w / ||w||)`` for WN, which is centred and scaled only as far as the data-dependent
init made it (``s`` absorbs ``1 / std``, ``b`` the mean). Where that std is tiny -- e.g. a 5x5
depthwise conv on 1x1 maps (ImageNet nets on 32x32 images), where only the centre tap sees
data -- ``s`` is large and BN-measured noise on that ``x_hat`` is amplified by it.
"""

from __future__ import annotations

import copy
from typing import Any, Optional

import torch
from torch import Tensor, nn

from ..errors import BnprobeError
from ..noise.functional import sigma_param_inverse
from ..noise.modules import LearnedNoise
from ..noise.network import build_noise_modules, check_noise_layers
from ..options import LearnNoise, Norm
from .an import ANConv2d
from .an_network import ANNetwork
from .block import ConvNorm
from .bn import NoisyBatchNorm2d
from .standalone import ANNorm, FixedNorm
from .tracing import BNSite, bn_sites
from .wn import WNConv2d, WNLinear

__all__ = ["UNPAIRED", "align_noise", "convert_bn_network"]

#: What to do with a BN layer that has no conv of its own: replace it (``normalize``) or refuse.
UNPAIRED = ("normalize", "error")


def align_noise(
    noise: dict[str, Any], names: Optional[list[str]], channels: list[int], where: str = "noise"
) -> dict[str, Any]:
    """Check noise arguments against a network's BN layers, ordered like them.

    When every layer name of the noise (``noise["names"]``, written by ``bnprobe measure``)
    is one of ``names``, the layers are matched by name (and must cover all of them);
    otherwise by position.

    Args:
        noise: Noise arguments (see :func:`bnprobe.noise.network.noise_kwargs_from_spec`).
        names: The network's BN layer names in conversion order (None: match by position).
        channels: Their channels.
        where: What to call the noise in messages.

    Returns:
        The arguments with ``sigma_v``, ``sigma_u`` and ``names`` in the order of ``names``.

    Raises:
        BnprobeError: For missing, duplicate or foreign layers, or mismatched channels.
    """
    given = [str(n) for n in (noise.get("names") or [])]
    if names is not None and given:
        known = set(names)
        hits = [n for n in given if n in known]
        if hits and len(hits) < len(given):
            bad = next(n for n in given if n not in known)
            raise BnprobeError(f"{where}: layer {bad!r} is not a BN layer of the network")
        if hits:
            if len(set(given)) != len(given):
                raise BnprobeError(f"{where} lists a layer twice")
            missing = [n for n in names if n not in set(given)]
            if missing:
                raise BnprobeError(f"{where} has no noise for BN layer(s) {', '.join(missing[:3])}"
                                   f"{' ...' if len(missing) > 3 else ''} ({len(given)} of {len(names)} "
                                   "layers): measure every BN layer")
            index = {n: i for i, n in enumerate(given)}
            noise = {**noise, "names": list(names),
                     "sigma_v": [noise["sigma_v"][index[n]] for n in names],
                     "sigma_u": [noise["sigma_u"][index[n]] for n in names]}
    check_noise_layers(noise, channels, where)
    return noise


def convert_bn_network(
    model: nn.Module,
    norm: str | Norm,
    noise: Optional[dict[str, Any]] = None,
    learn_noise: str | LearnNoise = LearnNoise.OFF,
    prior_std: float = 10.0,
    from_population: bool = False,
    unpaired: str = "normalize",
    inplace: bool = False,
    where: Optional[str] = None,
) -> nn.Module:
    """Convert a BN network to ``norm`` (wn, an, none; bn only adds noise), see the module doc.

    Args:
        model: The BN network (traceable by torch.fx).
        norm: ``wn``, ``an``, ``none`` or ``bn``.
        noise: Fixed noise arguments, one layer per BN layer (or learned noise's initial sigma).
        learn_noise: ``off``, ``layer`` or ``channel``.
        prior_std: Prior std of learned noise.
        from_population: Fold the BN running statistics in (``wn``, ``none``): the result
            computes the BN network's evaluation-mode function.
        unpaired: ``normalize`` (FixedNorm / ANNorm) or ``error`` for BN layers without a conv.
        inplace: Convert ``model`` itself (else a deep copy).
        where: How to call the network in messages.

    Returns:
        The converted network (``model`` or its copy; for ``an`` an ``ANNetwork`` around it).

    Raises:
        BnprobeError: For a network or option combination that cannot be converted (the
            message names the module).
    """
    kind = Norm.parse(norm, "norm")
    learn = LearnNoise.parse(learn_noise, "learn-noise")
    noisy = noise is not None or learn is not LearnNoise.OFF
    where = where or type(model).__name__
    if unpaired not in UNPAIRED:
        raise ValueError(f"unpaired must be one of {UNPAIRED}, got {unpaired!r}")
    if kind is Norm.NONE and noisy:
        raise BnprobeError("noise is injected after a normalization: use --norm bn, wn or an, not none")
    if from_population and kind not in (Norm.WN, Norm.NONE):
        raise BnprobeError(f"from_population folds BN statistics into wn or none, not {kind.value}")
    sites = bn_sites(model, where)
    first = next((s for s in sites if not s.paired), None)
    if unpaired == "error" and first is not None:
        raise BnprobeError(f"{where}: cannot fold {first.name} into a conv: {first.note}")
    if kind is Norm.BN and not noisy:
        return model
    in_channels = _input_channels(model, where) if kind is Norm.AN else 0
    if not inplace:
        model = copy.deepcopy(model)
        sites = bn_sites(model, where)
    channels = [s.channels for s in sites]
    if noise is not None:
        noise = align_noise(noise, [s.name for s in sites], channels)
    noises = build_noise_modules(channels, noise, learn, prior_std)
    with torch.no_grad():
        for site, module in zip(sites, noises):
            _convert_site(model, site, kind, module, from_population, where)
    return ANNetwork(model, in_channels) if kind is Norm.AN else model


def _input_channels(model: nn.Module, where: str) -> int:
    for m in model.modules():
        for attr in ("in_channels", "in_features"):
            if isinstance(getattr(m, attr, None), int):
                return int(getattr(m, attr))
    raise BnprobeError(f"{where}: no conv or linear layer to read the input channels from")


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def _statistics(site: BNSite, from_population: bool, where: str) -> tuple[Tensor, Tensor]:
    """``(mean, sd)`` of the BN's normalization: its population statistics, or ``(0, 1)``."""
    bn = site.bn
    ref = bn.weight if bn.weight is not None else bn.running_mean
    if not from_population:
        zeros = torch.zeros(site.channels, device=ref.device if ref is not None else None)
        return zeros, zeros + 1.0
    if bn.running_mean is None or bn.running_var is None:
        raise BnprobeError(f"{where}: {site.name} keeps no running statistics, so from_population cannot "
                           "fold them")
    return bn.running_mean.detach(), (bn.running_var.detach() + bn.eps).sqrt()


def _affine(site: BNSite) -> tuple[Tensor, Tensor]:
    bn, c = site.bn, site.channels
    ref = bn.running_mean if bn.weight is None else bn.weight
    kw = {"device": ref.device, "dtype": ref.dtype} if ref is not None else {}
    gamma = bn.weight.detach() if bn.weight is not None else torch.ones(c, **kw)
    beta = bn.bias.detach() if bn.bias is not None else torch.zeros(c, **kw)
    return gamma, beta


def _set_affine(layer: nn.Module, noise: Optional[nn.Module], s: Tensor, b: Tensor, name: str) -> None:
    """Give ``layer`` the output affine ``x_hat * s + b`` (held by learned noise when it has one)."""
    if getattr(layer, "scale", None) is not None:
        layer.scale.copy_(s)
        layer.bias.copy_(b)
        return
    if not isinstance(noise, LearnedNoise):
        raise ValueError(f"{name}: a layer without affine needs learned noise")
    if bool((s == 0).any()):
        channel = int((s == 0).nonzero()[0])
        raise BnprobeError(f"{name}: scale 0 in channel {channel} cannot be carried by learned noise "
                           "((x_hat + b) * S)")
    ratio = s.abs() if noise.per_channel else s.abs().mean().reshape(1)
    sigma = noise.sigma() * ratio.to(noise.u)  # sigma_S keeps its ratio to s
    noise.scale.copy_(s)
    noise.bias.copy_(b / s)
    noise.u.copy_(sigma_param_inverse(sigma.clamp_min(torch.finfo(sigma.dtype).tiny)))


def _like(module: nn.Module, ref: Tensor) -> nn.Module:
    return module.to(device=ref.device, dtype=ref.dtype)


def _convert_site(
    model: nn.Module, site: BNSite, kind: Norm, noise: Optional[nn.Module], from_population: bool,
    where: str,
) -> None:
    bn = site.bn
    affine = noise is None or not getattr(noise, "provides_affine", False)
    gamma, beta = _affine(site)
    if kind is Norm.BN:
        if not isinstance(bn, nn.BatchNorm2d) or not bn.track_running_stats:
            raise BnprobeError(f"{where}: noise in BN layers needs BatchNorm2d with running statistics, "
                               f"not {site.name} ({type(bn).__name__})")
        new = _like(NoisyBatchNorm2d(site.channels, noise, eps=bn.eps, momentum=bn.momentum), gamma)
        for key in ("running_mean", "running_var", "num_batches_tracked"):
            getattr(new, key).copy_(getattr(bn, key))
        if new.weight is not None:
            new.weight.copy_(gamma)
            new.bias.copy_(beta)
        else:
            _set_affine(new, noise, gamma, beta, site.name)
        _set(model, site.name, new)
        return
    mean, sd = _statistics(site, from_population, where)
    conv = site.conv if site.paired and not (kind is Norm.AN and isinstance(site.conv, nn.Linear)) else None
    if conv is None:
        layer_type = ANNorm if kind is Norm.AN else FixedNorm
        layer = _like(layer_type(site.channels, eps=bn.eps, bias=affine, scale=affine, noise=noise), gamma)
        if from_population:
            layer.set_statistics_(bn.running_mean, bn.running_var)
        _set_affine(layer, noise, gamma, beta, site.name)
        _set(model, site.name, layer)
        return
    w = conv.weight.detach()
    c = conv.bias.detach() if conv.bias is not None else torch.zeros_like(mean)
    k = gamma / sd  # per channel: gamma / sqrt(rv + eps), or gamma
    shift = beta + k * (c - mean) if from_population else beta
    if kind is Norm.NONE:
        folded = _like(copy.deepcopy(conv), w) if conv.bias is not None else _biased_copy(conv)
        folded.weight.copy_(w * k.reshape((-1,) + (1,) * (w.dim() - 1)))
        folded.bias.copy_(beta + k * (c - mean))
        _set(model, site.conv_name, ConvNorm(folded, nn.Identity()))
    else:
        layer = _like(_normalized_like(conv, kind, affine, noise, bn.eps), w)
        layer.weight.copy_(w)
        norms = torch.linalg.vector_norm(w.reshape(w.shape[0], -1), dim=1)
        scale = k * norms if kind is Norm.WN and from_population else gamma
        _set_affine(layer, noise, scale, shift, site.name)
        _set(model, site.conv_name, layer)
    _set(model, site.name, nn.Identity())


def _biased_copy(conv: nn.Module) -> nn.Module:
    if isinstance(conv, nn.Linear):
        new = nn.Linear(conv.in_features, conv.out_features, bias=True)
    else:
        new = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                        conv.dilation, conv.groups, bias=True)
    return _like(new, conv.weight)


def _normalized_like(conv: nn.Module, kind: Norm, affine: bool, noise: Optional[nn.Module],
                     eps: float) -> nn.Module:
    if isinstance(conv, nn.Linear):
        return WNLinear(conv.in_features, conv.out_features, bias=affine, scale=affine, noise=noise)
    args = (conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
            conv.groups)
    if kind is Norm.AN:
        return ANConv2d(*args, bias=affine, scale=affine, noise=noise, eps=eps)
    return WNConv2d(*args, bias=affine, scale=affine, noise=noise)

