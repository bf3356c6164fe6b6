"""Spatial correlation in analytic normalization: the input's lag covariance, used where exact.

Moment maps (:mod:`bnprobe.norms.moment_maps`) treat every position and channel as
independent. Natural images are not: neighbouring pixels and the three colours are strongly
correlated. Two places of a network feel it most, and this module makes both exact or nearly
so, from one more statistic of the data:

* **The input's lag covariance** ``C[c, c', dy, dx] = Cov(x_c(q), x_c'(q + (dy, dx)))``, the
  images taken as stationary (:func:`lag_covariance`; lags up to ``radius``, 10 by default).
* **The first convolution** (the one that reads the images): the variance of each output
  position is the quadratic form of its kernel in the covariance of the patch it reads, zero
  padding included (:func:`conv2d_cov_moments`), instead of the weighted sum of variances.
  On CIFAR-10 that sum is off per channel by a factor of 0.3-2.5 (resnet18's 7x7 stem). The
  same call gives the per-channel spatial correlation of the output at small lags.
* **A max pool of such a correlated map** (resnet's stem pool): the maximum of
  equicorrelated Gaussians, with the mean correlation of the values in each window
  (:func:`~bnprobe.norms.moment_maps.max_pool2d_map_moments` with ``corr``). Taken as
  independent, the maximum of nine strongly correlated neighbours has its mean
  overestimated by ~0.4 sd.

The correlation is carried only from the first convolution through per-channel maps (the
normalization, its affine and noise, a nondecreasing activation that the pool commutes with)
to the first max pool; past any other node the rules are back to independence. Deeper
layers mix many channels with random-sign weights, where independence is accurate for the
pooled statistics (``benchmarks/an_accuracy.py``).

Approximations: the input is stationary (the covariance of two positions depends only on
their offset); lags beyond ``radius`` count as uncorrelated; the correlation of the first
convolution's output is that of the interior (positions whose kernel reads padding are
correlated differently with their neighbours); a pooling window's values are taken as
equicorrelated.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .moment_maps import _explicit_pads, _IntPair, _nchw, _out_length, _pair
from .moments import _var_floor

__all__ = ["LAG_RADIUS", "conv2d_cov_moments", "lag_covariance"]

LAG_RADIUS = 10
"""Default largest lag of :func:`lag_covariance`: a 7x7 stride-2 stem and a 3x3 pool behind it."""
CORR_LAGS = 2
"""Largest lag (in output positions) of the correlation that :func:`conv2d_cov_moments` returns."""


def lag_covariance(
    images: Union[np.ndarray, Tensor],
    radius: int = LAG_RADIUS,
    mean: Optional[Sequence[float]] = None,
    std: Optional[Sequence[float]] = None,
    channel_dim: int = 1,
    chunk_size: int = 512,
) -> Tensor:
    """Lag covariance of (normalized) images, taken as stationary.

    ``C[c, c', R + dy, R + dx]`` is the mean, over images and over the positions ``q`` with
    ``q`` and ``q + (dy, dx)`` both inside the image, of ``x_c(q) x_c'(q + (dy, dx))`` for the
    images centred by their channel means. ``C[:, :, R, R]`` is the channel covariance (its
    diagonal the variances of :func:`~bnprobe.norms.an.dataset_channel_moments`), and
    ``C[c, c', R + d] = C[c', c, R - d]``. Computed by FFT in float64, in chunks.

    uint8 images are scaled to ``[0, 1]``; the normalization ``(x - mean) / std`` is applied
    analytically (only ``std`` matters).

    Args:
        images: ``(N, C, H, W)`` (``channel_dim=1``) or ``(N, H, W, C)`` (``channel_dim=-1``).
        radius: Largest lag ``R`` per axis (at most ``H - 1``, ``W - 1``).
        mean: Per-channel normalization mean (accepted for symmetry; a shift changes nothing).
        std: Per-channel normalization std (None: no scaling).
        channel_dim: Dimension holding the channels.
        chunk_size: Images per FFT.

    Returns:
        Float64 ``(C, C, 2R + 1, 2R + 1)`` on the images' device.

    Raises:
        ValueError: For no images, a radius that does not fit, or a ``std`` of the wrong length.
    """
    x = images if isinstance(images, Tensor) else torch.from_numpy(np.asarray(images))
    if x.shape[0] == 0:
        raise ValueError("lag_covariance: no images")
    x = x.movedim(channel_dim, 1)
    n, channels, h, w = (int(s) for s in x.shape)
    if not 0 <= radius < min(h, w):
        raise ValueError(f"lag_covariance: radius must be in [0, {min(h, w) - 1}], got {radius}")
    scale = 1.0 / 255.0 if x.dtype == torch.uint8 else 1.0
    total = torch.zeros(channels, dtype=torch.float64, device=x.device)
    for start in range(0, n, chunk_size):
        total += x[start : start + chunk_size].to(torch.float64).sum(dim=(0, 2, 3)) * scale
    centre = (total / (n * h * w)).reshape(1, -1, 1, 1)
    size = (h + radius, w + radius)  # zero padding: no wrap-around up to the radius
    lags = 2 * radius + 1
    acc = torch.zeros(channels, channels, lags, lags, dtype=torch.float64, device=x.device)
    for start in range(0, n, chunk_size):
        chunk = x[start : start + chunk_size].to(torch.float64) * scale - centre
        f = torch.fft.rfft2(chunk, s=size)
        # corr[c, c', d] = sum_q x_c(q) x_c'(q + d): inverse FFT of conj(F_c) F_c'
        cross = torch.fft.irfft2(torch.einsum("nahw,nbhw->abhw", f.conj(), f), s=size)
        rows = torch.arange(-radius, radius + 1, device=x.device) % size[0]
        cols = torch.arange(-radius, radius + 1, device=x.device) % size[1]
        acc += cross[:, :, rows][:, :, :, cols]
    lags_h = torch.arange(-radius, radius + 1, device=x.device, dtype=torch.float64).abs()
    lags_w = torch.arange(-radius, radius + 1, device=x.device, dtype=torch.float64).abs()
    pairs = n * (h - lags_h)[:, None] * (w - lags_w)[None, :]
    cov = acc / pairs
    if std is not None:
        if len(std) != channels:
            raise ValueError(f"lag_covariance: std has {len(std)} values, images have {channels} channels")
        s = torch.as_tensor(std, dtype=torch.float64, device=x.device)
        cov = cov / (s[:, None, None, None] * s[None, :, None, None])
    return cov


def _at_lags(cov: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
    # cov[:, :, R + rows, R + cols] with zeros beyond the radius (rows/cols broadcast together)
    radius = (cov.shape[-1] - 1) // 2
    inside = (rows.abs() <= radius) & (cols.abs() <= radius)
    r = (rows.clamp(-radius, radius) + radius).long()
    c = (cols.clamp(-radius, radius) + radius).long()
    return cov[:, :, r, c] * inside.to(cov.dtype)


def _pair_masks(size: int, out: int, k: int, s: int, p: int, d: int, device) -> Tensor:
    # M[delta + k - 1, a, o] = 1 where taps a and a + delta of output o both read inside the input
    a = torch.arange(k, device=device)
    delta = torch.arange(-(k - 1), k, device=device)
    o = torch.arange(out, device=device)
    first = o[None, None, :] * s - p + a[None, :, None] * d
    second = first + delta[:, None, None] * d
    inside = (first >= 0) & (first < size) & (second >= 0) & (second < size)
    in_kernel = ((a[None, :] + delta[:, None]) >= 0) & ((a[None, :] + delta[:, None]) < k)
    return (inside & in_kernel[:, :, None]).to(torch.float64)


def conv2d_cov_moments(
    m: Tensor,
    cov: Tensor,
    weight: Tensor,
    bias: Optional[Tensor] = None,
    stride: _IntPair = 1,
    padding: Union[str, _IntPair] = 0,
    dilation: _IntPair = 1,
    lags: int = CORR_LAGS,
) -> tuple[Tensor, Tensor, Tensor]:
    """Moment maps of a convolution of a stationary input with lag covariance ``cov``.

    The variance at an output position is ``sum_{a, b} w_a w_b C(b - a)`` over the pairs of
    kernel taps that both read inside the input (zero padding is exact); the mean map is
    the convolution of ``m``. Also returns the correlation of each output channel at output
    lags up to ``lags`` (interior positions, where every tap reads the input):
    ``Cov(y(p), y(p + D)) = sum_{a, b} w_a w_b C(s D + d (b - a))`` over the variance.
    Covariances at lags beyond ``cov``'s radius count as zero. Only ``groups=1``.

    Args:
        m: Input means ``(H, W, C_in)`` (a map: its size sets the borders).
        cov: Lag covariance ``(C_in, C_in, 2R + 1, 2R + 1)`` (:func:`lag_covariance`).
        weight: ``(C_out, C_in, kh, kw)``.
        bias: Optional ``(C_out,)``.
        stride: Stride.
        padding: Zero padding (int, pair, ``"same"`` or ``"valid"``).
        dilation: Dilation.
        lags: Largest output lag of the returned correlation.

    Returns:
        ``(mean, var, corr)``: maps ``(H', W', C_out)`` in the weight's dtype, and the
        correlation ``(C_out, 2 lags + 1, 2 lags + 1)`` (1 at the centre).

    Raises:
        ValueError: For a ``weight`` with another number of input channels than ``cov``.
    """
    c_out, c_in, kh, kw = (int(s) for s in weight.shape)
    if cov.shape[0] != c_in or cov.shape[1] != c_in:
        raise ValueError(
            f"conv2d_cov_moments: the covariance has {cov.shape[0]} channels, the weight {c_in} "
            "(grouped convolutions are not supported)"
        )
    s, d = _pair(stride), _pair(dilation)
    if isinstance(padding, str):
        left, _, top, _ = _explicit_pads(padding, (kh, kw), d)
        p = (top, left)
    else:
        p = _pair(padding)
    size = (int(m.shape[0]), int(m.shape[1]))
    out = [_out_length(size[i], (kh, kw)[i], s[i], p[i], d[i], False) for i in range(2)]
    mean = F.conv2d(_nchw(m, weight), weight, bias, s, p if not isinstance(padding, str) else padding, d)
    mean = mean.squeeze(0).permute(1, 2, 0)

    w = weight.to(torch.float64)
    dev = weight.device
    # shifted[o, c', Y, X, y, x] = w[o, c', y + dY, x + dX] (zero outside the kernel), dY = Y - kh + 1
    shifted = F.pad(w, (kw - 1, kw - 1, kh - 1, kh - 1)).unfold(2, kh, 1).unfold(3, kw, 1)
    dy = torch.arange(-(kh - 1), kh, device=dev)
    dx = torch.arange(-(kw - 1), kw, device=dev)
    c_tap = _at_lags(cov.to(device=dev, dtype=torch.float64), (dy * d[0])[:, None], (dx * d[1])[None, :])
    # g[o, Y, X, y, x] = sum_{c, c'} w[o, c, y, x] C[c, c', lag] w[o, c', y + dY, x + dX]
    g = (torch.einsum("ocyx,cdYX->odYXyx", w, c_tap) * shifted).sum(dim=1)
    my = _pair_masks(size[0], out[0], kh, s[0], p[0], d[0], dev)  # (2kh-1, kh, H')
    mx = _pair_masks(size[1], out[1], kw, s[1], p[1], d[1], dev)
    t = torch.einsum("Xxq,oYXyx->oYyq", mx, g)
    var = torch.einsum("Yyp,oYyq->pqo", my, t)

    # kernel cross-correlation k[o, c, c', Y, X] = sum_a w[o, c, a] w[o, c', a + delta]
    k = torch.einsum("ocyx,odYXyx->ocdYX", w, shifted)
    big = torch.arange(-lags, lags + 1, device=dev)
    rows = big[:, None, None, None] * s[0] + dy[None, None, :, None] * d[0]  # (D, 1, Y, 1)
    cols = big[None, :, None, None] * s[1] + dx[None, None, None, :] * d[1]  # (1, E, 1, X)
    c_out_lag = _at_lags(cov.to(device=dev, dtype=torch.float64), rows, cols)  # (C, C, D, E, Y, X)
    lag_cov = torch.einsum("ocdYX,cdDEYX->oDE", k, c_out_lag)
    centre = lag_cov[:, lags, lags].clamp_min(_var_floor(torch.float64))
    corr = (lag_cov / centre[:, None, None]).clamp(-1.0, 1.0)
    return mean, var.clamp_min(0.0).to(weight.dtype), corr.detach().to(weight.dtype)
