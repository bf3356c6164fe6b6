"""Analytic normalization (AN): normalize with propagated, not measured, statistics.

An :class:`ANConv2d` computes ``y = (conv(x, w) - mu(w)) / sigma(w) [-> noise] * s + b`` where
``mu(w)`` and ``sigma(w)^2 = var(w) + eps`` are the per-channel moments of ``conv(x, w)``
predicted in closed form (:func:`bnprobe.norms.moments.conv_moments`) from the moments
``(m_in, v_in)`` of its input channels. They are recomputed from the current weights at every
forward, so the layer is batch independent (batch size 1 works) and identical in train and eval
mode, and gradients flow to ``w`` through ``mu`` and ``sigma``.

Usage in a model, once per forward pass (training and evaluation alike)::

    m, v = self.input_moments()                      # InputMoments: data statistics
    propagate_sequence(self.features, m, v, input_size=x.shape[-2:])
    out = self.features(x)

:func:`propagate_sequence` calls :meth:`ANConv2d.propagate` on every AN layer, which stores
that layer's input moments; they keep their autograd graph, so gradients also reach earlier
layers' ``s`` and ``b`` through the moment chain. Call it again before every forward: a stored
graph can be back-propagated only once.
"""

from __future__ import annotations

from typing import Any, Iterable, Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor, nn

from .moment_maps import channel_moments, conv2d_map_moments, crop_unused_taps
from .moments import avg_pool_moments, conv_moments, leaky_relu_moments
from .spatial import conv2d_cov_moments
from .wn import _check_groups, _pair, _WNBase, affine_moments, normalized_conv2d

__all__ = ["ANConv2d", "InputMoments", "dataset_channel_moments", "propagate_sequence"]

_Maps = tuple[Tensor, Tensor]  # (mean, var) maps (H, W, C)

_IntPair = Union[int, tuple[int, int]]
_Size = Optional[tuple[int, int]]


def state_with_detached_moments(module: nn.Module) -> dict[str, Any]:
    """``module.__dict__`` with its stored input moments (``_m_in``, ``_v_in``) detached.

    They may be non-leaf tensors, which deepcopy and pickle refuse.
    """
    state = module.__dict__.copy()
    for key in ("_m_in", "_v_in", "_cov_in"):
        if state.get(key) is not None:
            state[key] = state[key].detach()
    state["_normalizer_cache"] = None
    return state


class ANConv2d(_WNBase):
    """Analytically normalized conv: ``(conv(x, w) - mu(w)) / sigma(w) [-> noise] * s + b``.

    Holds the raw ``weight`` (scale invariant per output channel, see
    ``scale_invariant_weights()``), ``scale`` s (init 1) and ``bias`` b (init 0). The
    convolution itself has no bias (it would cancel).

    Args:
        in_channels: Input channels.
        out_channels: Output channels.
        kernel_size: Kernel size (int or pair).
        stride: Stride.
        padding: Zero padding (its border effect on the moments is accounted for when the
            input moments are position maps, see :meth:`set_input_moments`; ignored for
            channel vectors).
        dilation: Dilation.
        groups: Convolution groups (the moments of each group's outputs come from its inputs).
        bias: Whether to learn the output bias ``b``.
        scale: Whether to learn the output scale ``s``.
        noise: Optional module applied to ``x_hat`` before the affine.
        eps: Added to the predicted variance: ``sigma = sqrt(var + eps)``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: _IntPair,
        stride: _IntPair = 1,
        padding: _IntPair = 0,
        dilation: _IntPair = 1,
        groups: int = 1,
        bias: bool = True,
        scale: bool = True,
        noise: Optional[nn.Module] = None,
        eps: float = 1e-5,
    ) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = _pair(kernel_size)
        self.stride = _pair(stride)
        self.padding = _pair(padding)
        self.dilation = _pair(dilation)
        self.groups = _check_groups(in_channels, out_channels, groups)
        self.eps = float(eps)
        self._init_params((out_channels, in_channels // groups) + self.kernel_size, bias, scale, noise)
        self._m_in: Optional[Tensor] = None
        self._v_in: Optional[Tensor] = None
        self._cov_in: Optional[Tensor] = None  # the input's lag covariance (first layers)
        self._corr_out: Optional[Tensor] = None  # then the output's spatial correlation
        # the last propagate's (mu, sigma) and cropped kernel (size, weight, padding), valid
        # while weight and grad mode are unchanged; the forward uses them once
        self._normalizer_cache: Optional[tuple[tuple, tuple[Tensor, Tensor], Optional[tuple]]] = None
        self.last_mu: Optional[Tensor] = None
        self.last_sigma: Optional[Tensor] = None

    def set_input_moments(self, m: Tensor, v: Tensor, cov: Optional[Tensor] = None) -> None:
        """Store the input moments used by the following forwards.

        Either channel vectors ``(C_in,)``: every position of a channel has these moments and
        every kernel tap counts (the interior positions' moments); or position maps
        ``(H, W, C_in)`` (:mod:`bnprobe.norms.moment_maps`): the convolution's output moments
        are computed position by position, the padded border included, and normalized by
        their mixture over positions (what BN would measure).

        With position maps, ``cov`` (the lag covariance of a stationary input, as the
        network's images have: :func:`~bnprobe.norms.spatial.lag_covariance`) makes the output
        variance exact instead of that of independent inputs (``groups=1`` only).

        Args:
            m: Input means ``(C_in,)`` or ``(H, W, C_in)`` (its autograd graph is kept).
            v: Input variances, same shape.
            cov: Optional lag covariance ``(C_in, C_in, 2R+1, 2R+1)`` of the input.

        Raises:
            ValueError: If a shape is neither ``(in_channels,)`` nor ``(H, W, in_channels)``.
        """
        for name, t in (("m", m), ("v", v)):
            if t.dim() not in (1, 3) or t.shape[-1] != self.in_channels or t.shape != m.shape:
                raise ValueError(
                    f"ANConv2d.set_input_moments: {name} must have shape ({self.in_channels},) "
                    f"or (H, W, {self.in_channels}) like m, got {tuple(t.shape)}"
                )
        spatial = cov is not None and m.dim() == 3 and self.groups == 1
        if spatial and tuple(cov.shape[:2]) != (self.in_channels, self.in_channels):
            raise ValueError(
                f"ANConv2d.set_input_moments: cov must have shape ({self.in_channels}, "
                f"{self.in_channels}, 2R+1, 2R+1), got {tuple(cov.shape)}"
            )
        self._m_in, self._v_in = m, v
        self._cov_in = cov if spatial else None
        self._corr_out = None
        self._normalizer_cache = None

    def _cache_key(self) -> tuple:
        w = self.weight
        return id(w), w._version, w.data_ptr(), torch.is_grad_enabled()

    def normalizer_moments(self) -> tuple[Tensor, Tensor]:
        """Compute ``(mu(w), sigma(w))`` from the stored input moments and the current weight.

        Returns:
            Per-output-channel mean and standard deviation, in the weight's dtype.

        Raises:
            RuntimeError: If no input moments were set.
        """
        return self._normalizer_and_crop()[0]

    def _normalizer_and_crop(self) -> tuple[tuple[Tensor, Tensor], Optional[tuple]]:
        # ((mu, sigma), cropped kernel (size, weight, padding) or None): propagate's, used once
        # (the forward skips a second moment pass), or computed afresh
        if self._m_in is None or self._v_in is None:
            raise RuntimeError(
                "ANConv2d needs input moments: call propagate(m, v) or set_input_moments(m, v) "
                "(e.g. via propagate_sequence) before forward"
            )
        cache, self._normalizer_cache = self._normalizer_cache, None
        if cache is not None and cache[0] == self._cache_key():
            return cache[1], cache[2]
        moments, _, crop = self._output_moments()
        return self._normalizer(moments), crop

    def _output_moments(self) -> tuple[tuple[Tensor, Tensor], Optional[_Maps], Optional[tuple]]:
        # ((mu, var) per channel, (mean, var) maps or None, cropped kernel or None) of conv(x, w);
        # the kernel without the taps that read only padding at the maps' size is shared with
        # the forward: one crop per step
        if self._m_in.dim() == 1:
            return conv_moments(self._m_in, self._v_in, self.weight, groups=self.groups), None, None
        size = (int(self._m_in.shape[0]), int(self._m_in.shape[1]))
        weight, padding = crop_unused_taps(self.weight, size, self.stride, self.padding, self.dilation)
        if getattr(self, "_cov_in", None) is not None:
            mean, var, self._corr_out = conv2d_cov_moments(
                self._m_in, self._cov_in, weight, None, self.stride, padding, self.dilation
            )
            maps = (mean, var)
        else:
            maps = conv2d_map_moments(
                self._m_in, self._v_in, weight, None, self.stride, padding, self.dilation, self.groups
            )
        return channel_moments(*maps), maps, (size, weight, padding)

    def _normalizer(self, moments: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        mu, var = moments
        sigma = (var + self.eps).sqrt()
        self.last_mu, self.last_sigma = mu.detach(), sigma.detach()
        return mu, sigma

    def propagate(self, m: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store the input moments and return this layer's output moments.

        For channel vectors the normalized ``x_hat`` has moments ``(0, 1)``; they go through
        the noise module's eval-mode map and the affine, giving ``(b, s^2)`` without noise
        (``0``/``1`` where ``b``/``s`` are disabled). For position maps ``x_hat`` has the map
        ``((mean_p - mu) / sigma, var_p / sigma^2)`` (border positions differ from the
        interior), mapped the same way.

        Args:
            m: Input means ``(C_in,)`` or ``(H, W, C_in)``.
            v: Input variances, same shape.

        Returns:
            ``(mean, var)`` of shape ``(out_channels,)`` or ``(H', W', out_channels)``,
            differentiable in ``s`` and ``b`` (and, for maps, in the weight).
        """
        self.set_input_moments(m, v)
        return self._propagate()

    def propagate_spatial(self, m: Tensor, v: Tensor, cov: Tensor) -> tuple[Tensor, Tensor, Optional[Tensor]]:
        """Like :meth:`propagate`, for an input with lag covariance ``cov`` (the images).

        Args:
            m: Input means ``(H, W, C_in)`` (channel vectors: ``cov`` is not used).
            v: Input variances, same shape.
            cov: Lag covariance ``(C_in, C_in, 2R+1, 2R+1)`` of the input.

        Returns:
            ``(mean, var, corr)``: the output maps, as :meth:`propagate`, and the output's
            per-channel spatial correlation ``(C_out, 5, 5)`` (None where ``cov`` was not used).
        """
        self.set_input_moments(m, v, cov)
        mean, var = self._propagate()
        return mean, var, self._corr_out

    def _propagate(self) -> tuple[Tensor, Tensor]:
        m = self._m_in
        if m.dim() == 3:
            moments, (map_m, map_v), crop = self._output_moments()
            mu, sigma = self._normalizer(moments)
            self._normalizer_cache = (self._cache_key(), (mu, sigma), crop)
            inv = 1.0 / sigma
            return affine_moments((map_m - mu) * inv, map_v * inv * inv, self.scale, self.bias,
                                  self.noise)  # fmt: skip
        if self.noise is None and self.scale is not None and self.bias is not None:
            return self.bias, self.scale * self.scale  # the common case, in one op
        zeros = self.weight.new_zeros(self.out_channels)
        return affine_moments(zeros, zeros + 1.0, self.scale, self.bias, self.noise)

    def forward(self, x: Tensor) -> Tensor:
        """Normalize ``conv(x, w)`` with the analytic moments, then noise and affine."""
        (mu, sigma), crop = self._normalizer_and_crop()
        weight, padding = self.weight, self.padding
        if crop is not None and crop[0] == tuple(x.shape[-2:]):
            weight, padding = crop[1], crop[2]
        inv = 1.0 / sigma
        return normalized_conv2d(
            x, weight, inv, -mu * inv, self.scale, self.bias, self.noise,
            self.stride, padding, self.dilation, self.groups,
        )  # fmt: skip

    def __getstate__(self) -> dict[str, Any]:
        return state_with_detached_moments(self)

    def extra_repr(self) -> str:
        """Return the constructor arguments shown by ``repr``."""
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, padding={self.padding}, dilation={self.dilation}, "
            f"groups={self.groups}, bias={self.bias is not None}, scale={self.scale is not None}, "
            f"eps={self.eps}"
        )


def _conv_size(size: _Size, module: nn.Module) -> _Size:
    if size is None:
        return None
    padding = module.padding
    if isinstance(padding, str):
        if padding == "same":
            return size
        padding = (0, 0)
    k, s, p, d = (_pair(x) for x in (module.kernel_size, module.stride, padding, module.dilation))
    return tuple((size[i] + 2 * p[i] - d[i] * (k[i] - 1) - 1) // s[i] + 1 for i in range(2))


def _avg_pool(module: nn.AvgPool2d, m: Tensor, v: Tensor, size: _Size):
    k = _pair(module.kernel_size)
    s = _pair(module.stride if module.stride is not None else module.kernel_size)
    p = _pair(module.padding)
    if size is not None:
        size = tuple((size[i] + 2 * p[i] - k[i]) // s[i] + 1 for i in range(2))
    m, v = avg_pool_moments(m, v, k)
    return m, v, size


def _adaptive_avg_pool(module: nn.AdaptiveAvgPool2d, m: Tensor, v: Tensor, size: _Size):
    if size is None:
        raise ValueError("propagate_sequence: AdaptiveAvgPool2d needs input_size (H, W)")
    out = module.output_size
    out = (out, out) if isinstance(out, int) else tuple(out)
    out = tuple(size[i] if out[i] is None else int(out[i]) for i in range(2))
    pooled = (size[0] * size[1]) / (out[0] * out[1])
    return m, v / pooled, out


SUPPORTED = (
    "modules with a propagate(m, v) method (ANConv2d, WNConv2d, WNLinear, FixedNoise, "
    "LearnedNoise, ChannelAffine), nn.Sequential/nn.ModuleList (recursively), blocks with "
    "'conv' and 'norm' submodules (conv then norm), nn.Conv2d (groups=1), nn.Linear, "
    "nn.LeakyReLU, nn.ReLU, nn.Identity, nn.Dropout, nn.AvgPool2d, nn.AdaptiveAvgPool2d"
)


def _walk(modules: Iterable[nn.Module], m: Tensor, v: Tensor, size: _Size):
    for module in modules:
        if isinstance(module, (nn.Sequential, nn.ModuleList)):
            m, v, size = _walk(module, m, v, size)
        elif callable(getattr(module, "propagate", None)):
            m, v = module.propagate(m, v)
            if hasattr(module, "kernel_size") and hasattr(module, "stride"):
                size = _conv_size(size, module)
        elif isinstance(getattr(module, "conv", None), nn.Module) and isinstance(
            getattr(module, "norm", None), nn.Module
        ):
            m, v, size = _walk([module.conv, module.norm], m, v, size)
        elif isinstance(module, nn.Conv2d) and module.groups == 1:
            m, v = conv_moments(m, v, module.weight, module.bias)
            size = _conv_size(size, module)
        elif isinstance(module, nn.Linear):
            m, v = conv_moments(m, v, module.weight, module.bias)
        elif isinstance(module, nn.LeakyReLU):
            m, v = leaky_relu_moments(m, v, module.negative_slope)
        elif isinstance(module, nn.ReLU):
            m, v = leaky_relu_moments(m, v, 0.0)
        elif isinstance(module, (nn.Identity, nn.Dropout)):
            pass
        elif isinstance(module, nn.AvgPool2d):
            m, v, size = _avg_pool(module, m, v, size)
        elif isinstance(module, nn.AdaptiveAvgPool2d):
            m, v, size = _adaptive_avg_pool(module, m, v, size)
        else:
            raise TypeError(
                f"propagate_sequence: unsupported module {type(module).__name__}; "
                f"supported: {SUPPORTED}"
            )
    return m, v, size


def propagate_sequence(
    modules: Iterable[nn.Module],
    m: Tensor,
    v: Tensor,
    input_size: Optional[Sequence[int]] = None,
) -> tuple[Tensor, Tensor]:
    """Carry per-channel moments through modules in order, storing them in every AN layer.

    Supported: modules with a ``propagate(m, v)`` method (``ANConv2d``, ``WNConv2d``,
    ``WNLinear``, ``FixedNoise``, ``LearnedNoise``, ``ChannelAffine``; noise at its eval-mode
    map), ``nn.Sequential``/``nn.ModuleList`` (recursively, in order), blocks exposing
    ``conv`` and ``norm`` submodules (walked as conv then norm), ``nn.Conv2d`` (groups=1),
    ``nn.Linear``, ``nn.LeakyReLU`` (its ``negative_slope``), ``nn.ReLU``, ``nn.Identity``,
    ``nn.Dropout`` (identity: the deterministic network), ``nn.AvgPool2d`` and
    ``nn.AdaptiveAvgPool2d`` (variance divided by the pooled positions; the adaptive pool needs
    ``input_size``). Other custom modules can be supported by giving them a ``propagate``
    method (the spatial size is then assumed unchanged unless they have conv-like
    ``kernel_size``/``stride``/``padding``/``dilation`` attributes).

    Args:
        modules: Modules in execution order (e.g. an ``nn.Sequential``).
        m: Channel means of the input ``(C,)``.
        v: Channel variances of the input ``(C,)``.
        input_size: Spatial size ``(H, W)`` of the input, tracked through convolutions and
            pools; needed only for ``nn.AdaptiveAvgPool2d``.

    Returns:
        ``(mean, var)`` of the last module's output channels.

    Raises:
        TypeError: For an unsupported module (the message names it).
    """
    size = None if input_size is None else (int(input_size[0]), int(input_size[1]))
    if isinstance(modules, nn.Module) and not isinstance(modules, (nn.Sequential, nn.ModuleList)):
        modules = [modules]
    m, v, _ = _walk(modules, m, v, size)
    return m, v


def dataset_channel_moments(
    images: Union[np.ndarray, Tensor],
    mean: Optional[Sequence[float]] = None,
    std: Optional[Sequence[float]] = None,
    channel_dim: int = 1,
    chunk_size: int = 1024,
) -> tuple[Tensor, Tensor]:
    """Per-channel mean and (population) variance of the normalized training images.

    uint8 images are scaled to ``[0, 1]`` (like ``ToTensor``); float images are taken as
    already in that scale. Then ``(x - mean) / std`` per channel is applied (analytically:
    moments are computed on the raw values and transformed). Accumulation is in float64,
    in chunks of ``chunk_size`` images.

    Args:
        images: Array ``(N, C, H, W)`` (``channel_dim=1``) or ``(N, H, W, C)``
            (``channel_dim=-1``, e.g. CIFAR-10's numpy data), numpy or torch.
        mean: Per-channel normalization mean (None: no shift).
        std: Per-channel normalization std (None: no scaling).
        channel_dim: Dimension holding the channels.
        chunk_size: Images per accumulation step.

    Returns:
        ``(mean, var)`` float64 tensors of shape ``(C,)``, on the images' device.

    Raises:
        ValueError: If there are no images or ``mean``/``std`` have the wrong length.
    """
    x = images if isinstance(images, Tensor) else torch.from_numpy(np.asarray(images))
    if x.shape[0] == 0:
        raise ValueError("dataset_channel_moments: no images")
    x = x.movedim(channel_dim, -1)
    channels = x.shape[-1]
    scale = 1.0 / 255.0 if x.dtype == torch.uint8 else 1.0
    total = torch.zeros(channels, dtype=torch.float64, device=x.device)
    total_sq = torch.zeros(channels, dtype=torch.float64, device=x.device)
    count = 0
    shift = None
    for start in range(0, x.shape[0], chunk_size):
        chunk = x[start : start + chunk_size].reshape(-1, channels).to(torch.float64) * scale
        if shift is None:  # shifting by the first chunk's mean avoids cancellation
            shift = chunk.mean(dim=0)
        chunk = chunk - shift
        total += chunk.sum(dim=0)
        total_sq += (chunk * chunk).sum(dim=0)
        count += chunk.shape[0]
    centered = total / count
    m = centered + shift
    var = (total_sq / count - centered * centered).clamp_min(0.0)
    for name, values in (("mean", mean), ("std", std)):
        if values is not None and len(values) != channels:
            raise ValueError(
                f"dataset_channel_moments: {name} has {len(values)} values, "
                f"images have {channels} channels"
            )
    if mean is not None:
        m = m - torch.as_tensor(mean, dtype=torch.float64, device=x.device)
    if std is not None:
        std_t = torch.as_tensor(std, dtype=torch.float64, device=x.device)
        m, var = m / std_t, var / (std_t * std_t)
    return m, var


class InputMoments(nn.Module):
    """Buffers holding the input channel moments of a model (saved in its ``state_dict``).

    With ``spatial=True`` a third buffer, ``cov``, holds the lag covariance of the input
    images (:func:`~bnprobe.norms.spatial.lag_covariance`), which graph propagation gives to
    the convolutions that read the input; it stays empty (shape ``(0,)``) until set, and a
    state_dict saved without it loads with it empty.

    Args:
        channels: Number of input channels.
        mean: Initial means (default 0).
        var: Initial variances (default 1).
        spatial: Whether to hold the lag covariance too.
    """

    def __init__(
        self, channels: int, mean: Optional[Tensor] = None, var: Optional[Tensor] = None,
        spatial: bool = False,
    ) -> None:  # fmt: skip
        super().__init__()
        self.spatial = bool(spatial)
        self.register_buffer("mean", torch.zeros(channels))
        self.register_buffer("var", torch.ones(channels))
        if self.spatial:
            self.register_buffer("cov", torch.zeros(0))
        if mean is not None or var is not None:
            self.set_(self.mean if mean is None else mean, self.var if var is None else var)

    @torch.no_grad()
    def set_(self, mean: Tensor, var: Tensor, cov: Optional[Tensor] = None) -> None:
        """Copy new moments (e.g. from :func:`dataset_channel_moments`) into the buffers.

        Args:
            mean: Channel means ``(C,)``.
            var: Channel variances ``(C,)``.
            cov: Lag covariance ``(C, C, 2R+1, 2R+1)`` (kept only with ``spatial=True``).
        """
        self.mean.copy_(torch.as_tensor(mean))
        self.var.copy_(torch.as_tensor(var))
        if cov is not None and getattr(self, "spatial", False):
            self.cov = torch.as_tensor(cov).to(self.mean).clone()

    def covariance(self) -> Optional[Tensor]:
        """The lag covariance, or None when not held or not set."""
        cov = getattr(self, "cov", None)
        return cov if cov is not None and cov.numel() > 0 else None

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs) -> None:  # fmt: skip
        key = prefix + "cov"
        if getattr(self, "spatial", False) and key in state_dict:  # the saved shape (radius) wins
            self.cov = torch.empty_like(state_dict[key], device=self.mean.device, dtype=self.mean.dtype)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)  # fmt: skip
        if key in missing_keys:  # saved before the covariance existed: independence
            missing_keys.remove(key)

    def forward(self) -> tuple[Tensor, Tensor]:
        """Return ``(mean, var)``."""
        return self.mean, self.var
