"""Position-resolved moments: per-position means and variances through convolutions and pools.

A *moment map* holds the mean and the variance of every (position, channel) of an activation
tensor, channels last: shape ``(H, W, C)``, so that every per-channel rule of
:mod:`bnprobe.norms.moments` (elementwise maps, affine maps, sums, products) applies to it
unchanged by broadcasting. Convolutions and pools act on the maps with the same torch ops and
geometry as on the activations (stride, dilation, groups, padding and its mode, ``ceil_mode``),
so the border is exact: an output position near the border sums fewer inputs, and the zero
padding pulls its mean towards 0. Batch normalization, and analytic normalization in its
place, see the *channel* moments: the mixture over positions (:func:`channel_moments`).

Approximations: the activations are independent across positions and channels (so the
variance of a weighted sum is the weighted sum of variances; spatially correlated inputs, such
as natural images, have per-channel variances that differ from this, above or below depending
on the filter: :mod:`bnprobe.norms.spatial` has the exact rule for a convolution of the
images); the values in a max-pooling window are equicorrelated Gaussians, independent unless
a correlation is given (see :func:`max_pool2d_map_moments`). Given independent inputs,
convolutions and average pools are exact.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .moments import _max_normal_moments, _var_floor

__all__ = [
    "adaptive_avg_pool2d_map_moments",
    "avg_pool2d_map_moments",
    "channel_moments",
    "conv2d_map_moments",
    "flatten_map_moments",
    "max_pool2d_map_moments",
    "pool2d_output_size",
]

_IntPair = Union[int, Sequence[int]]


def _pair(value: _IntPair) -> tuple[int, int]:
    if isinstance(value, int):
        return value, value
    a, b = value
    return int(a), int(b)


def channel_moments(m: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """Channel moments of a moment map: the mixture over its positions.

    ``mean = E_p[m_p]`` and ``var = E_p[v_p] + Var_p[m_p]`` per channel: what batch
    normalization measures over images and positions. Vectors ``(C,)`` are returned as they
    are.

    Args:
        m: Means ``(H, W, C)`` (or ``(C,)``).
        v: Variances, same shape.

    Returns:
        ``(mean, var)`` of shape ``(C,)``.
    """
    if m.dim() == 1:
        return m, v
    m, v = torch.broadcast_tensors(m, v)
    mf, vf = m.reshape(-1, m.shape[-1]), v.reshape(-1, v.shape[-1])
    spread, mean = torch.var_mean(mf, dim=0, correction=0)
    return mean, vf.mean(dim=0) + spread


def _nchw(t: Tensor, like: Tensor) -> Tensor:
    return t.to(device=like.device, dtype=like.dtype).permute(2, 0, 1).unsqueeze(0)


def _hwc(t: Tensor) -> Tensor:
    return t.squeeze(0).permute(1, 2, 0)


def _explicit_pads(padding: Union[str, _IntPair], kernel, dilation) -> tuple[int, int, int, int]:
    # (left, right, top, bottom) as F.pad takes them
    if isinstance(padding, str):
        if padding == "valid":
            return 0, 0, 0, 0
        total = [dilation[i] * (kernel[i] - 1) for i in range(2)]
        return total[1] // 2, total[1] - total[1] // 2, total[0] // 2, total[0] - total[0] // 2
    p = _pair(padding)
    return p[1], p[1], p[0], p[0]


def conv2d_map_moments(
    m: Tensor,
    v: Tensor,
    weight: Tensor,
    bias: Optional[Tensor] = None,
    stride: _IntPair = 1,
    padding: Union[str, _IntPair] = 0,
    dilation: _IntPair = 1,
    groups: int = 1,
    padding_mode: str = "zeros",
) -> tuple[Tensor, Tensor]:
    """Moment maps of a 2-D convolution of independent inputs: ``conv(m, W)``, ``conv(v, W^2)``.

    Zero padding contributes nothing to the sums (exact); ``reflect``/``replicate``/
    ``circular`` padding pads the maps the same way (a repeated input is then counted as an
    independent one).

    Args:
        m: Input means ``(H, W, C_in)``.
        v: Input variances, same shape.
        weight: ``(C_out, C_in / groups, kh, kw)``.
        bias: Optional ``(C_out,)``.
        stride: Stride.
        padding: Padding (int, pair, ``"same"`` or ``"valid"``).
        dilation: Dilation.
        groups: Groups.
        padding_mode: ``nn.Conv2d.padding_mode``.

    Returns:
        ``(mean, var)`` maps ``(H', W', C_out)``, in the weight's dtype.
    """
    x_m, x_v = _nchw(m, weight), _nchw(v, weight)
    dilation = _pair(dilation)
    if padding_mode != "zeros" or isinstance(padding, str):
        pads = _explicit_pads(padding, weight.shape[2:], dilation)
        mode = "constant" if padding_mode == "zeros" else padding_mode
        x_m, x_v = F.pad(x_m, pads, mode=mode), F.pad(x_v, pads, mode=mode)
        padding = 0
    weight, padding = crop_unused_taps(weight, x_m.shape[-2:], _pair(stride), _pair(padding), dilation)
    geometry = (tuple(weight.shape[2:]), dilation, padding, _pair(stride), int(groups))
    mean, var = _MapConv2d.apply(x_m, x_v, weight, geometry)
    if bias is not None:
        mean = mean + bias.reshape(1, 1, -1)
    return mean, var


def crop_unused_taps(
    weight: Tensor, size: Sequence[int], stride: tuple[int, int], padding: tuple[int, int],
    dilation: tuple[int, int],
) -> tuple[Tensor, tuple[int, int]]:
    """The kernel without the taps that read only zero padding, and the padding that goes with it.

    Such taps add nothing to any output. Deep layers of ImageNet networks on small images
    (a 3x3 kernel on a 1x1 map uses only its centre) then pass over a fraction of the weight.
    An axis is cropped only where the same output size follows with symmetric padding.
    """
    crop, new_padding = [], []
    for i in range(2):
        k, s, p, d, n = int(weight.shape[2 + i]), stride[i], padding[i], dilation[i], int(size[i])
        out = _out_length(n, k, s, p, d, False)
        used = [t for t in range(k) if t * d - p <= n - 1 and (out - 1) * s + t * d - p >= 0]
        lo, hi = (used[0], used[-1]) if used else (0, k - 1)
        q = p - lo * d
        if q < 0 or (n + 2 * q - d * (hi - lo) - 1) // s + 1 != out:
            lo, hi, q = 0, k - 1, p
        crop.append(slice(lo, hi + 1))
        new_padding.append(q)
    if all(c.stop - c.start == weight.shape[2 + i] for i, c in enumerate(crop)):
        return weight, padding
    return _CropTaps.apply(weight, crop[0], crop[1]), (new_padding[0], new_padding[1])


class _CropTaps(torch.autograd.Function):
    """``weight[:, :, rows, cols]``, contiguous; its backward fills the full gradient once.

    (Two slicings would zero-fill and copy a weight-sized gradient once per axis.)
    """

    @staticmethod
    def forward(ctx, weight: Tensor, rows: slice, cols: slice) -> Tensor:  # noqa: D102
        ctx.shape, ctx.rows, ctx.cols = weight.shape, rows, cols
        return weight[:, :, rows, cols].contiguous()

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:  # noqa: D102
        full = grad.new_zeros(ctx.shape)
        full[:, :, ctx.rows, ctx.cols] = grad
        return full, None, None


class _MapConv2d(torch.autograd.Function):
    """``(conv(m, W), conv(v, W^2))`` of two batch-1 NCHW maps, as ``(H', W', C_out)`` maps.

    One im2col per map and batched matmuls over the groups. The backward forms the weight's
    gradient ``G_m U_m^T + 2 W * (G_v U_v^T)`` with one matmul, one multiply and one
    multiply-add in place: the moment pass of a large kernel on a small map (deep layers)
    costs a few passes over the weight rather than the dozen that autograd through two
    ``F.conv2d`` calls and ``W * W`` takes (torch runs batch-1 convolutions of small maps on
    its slow im2col path anyway).
    """

    @staticmethod
    def forward(ctx, x_m: Tensor, x_v: Tensor, weight: Tensor, geometry: tuple) -> tuple[Tensor, Tensor]:
        kernel, dilation, padding, stride, groups = geometry
        size = (int(x_m.shape[-2]), int(x_m.shape[-1]))
        out = [_out_length(size[i], kernel[i], stride[i], padding[i], dilation[i], False) for i in range(2)]
        c_out = weight.shape[0]

        def columns(x: Tensor) -> Tensor:  # (groups, C_in / groups * kh * kw, L)
            cols = F.unfold(x, kernel, dilation, padding, stride)
            return cols.reshape(groups, -1, cols.shape[-1])

        u_m, u_v = columns(x_m), columns(x_v)
        w = weight.reshape(groups, c_out // groups, -1)
        w2 = w * w
        mean, var = torch.bmm(w, u_m), torch.bmm(w2, u_v)
        ctx.save_for_backward(u_m, u_v, w, w2)
        ctx.geometry, ctx.size, ctx.weight_shape = geometry, size, weight.shape

        def hwc(t: Tensor) -> Tensor:
            return t.reshape(c_out, out[0], out[1]).permute(1, 2, 0)

        return hwc(mean), hwc(var)

    @staticmethod
    def backward(ctx, g_mean: Tensor, g_var: Tensor):
        u_m, u_v, w, w2 = ctx.saved_tensors
        kernel, dilation, padding, stride, groups = ctx.geometry

        def cols(g: Tensor) -> Tensor:  # (H', W', C_out) -> (groups, C_out / groups, L)
            return g.permute(2, 0, 1).reshape(groups, w.shape[1], -1)

        g_m, g_v = cols(g_mean), cols(g_var)

        def fold(weights: Tensor, g: Tensor) -> Tensor:
            grad_cols = torch.bmm(weights.transpose(1, 2), g).reshape(1, -1, g.shape[-1])
            return F.fold(grad_cols, ctx.size, kernel, dilation, padding, stride)

        grad_m = fold(w, g_m) if ctx.needs_input_grad[0] else None
        grad_v = fold(w2, g_v) if ctx.needs_input_grad[1] else None
        grad_w = None
        if ctx.needs_input_grad[2]:
            grad_w = torch.bmm(g_v, u_v.transpose(1, 2)).mul_(w)
            grad_w = grad_w.baddbmm_(g_m, u_m.transpose(1, 2), beta=2.0).reshape(ctx.weight_shape)
        return grad_m, grad_v, grad_w, None


def avg_pool2d_map_moments(
    m: Tensor,
    v: Tensor,
    kernel_size: _IntPair,
    stride: Optional[_IntPair] = None,
    padding: _IntPair = 0,
    ceil_mode: bool = False,
    count_include_pad: bool = True,
    divisor_override: Optional[int] = None,
) -> tuple[Tensor, Tensor]:
    """Moment maps of ``nn.AvgPool2d``: mean pooled alike, variance ``sum_valid v / D^2``.

    ``D`` is the window's divisor exactly as torch computes it (with or without the padding,
    ``ceil_mode`` windows clipped, or ``divisor_override``).

    Args:
        m: Means ``(H, W, C)``.
        v: Variances.
        kernel_size: Window.
        stride: Stride (None: the window).
        padding: Zero padding.
        ceil_mode: ``ceil_mode``.
        count_include_pad: Whether padded zeros count in the divisor.
        divisor_override: Fixed divisor.

    Returns:
        ``(mean, var)`` maps.
    """
    stride = kernel_size if stride is None or stride == [] else stride
    args = (kernel_size, stride, padding, ceil_mode)
    x_m, x_v = _nchw(m, m), _nchw(v, m)
    mean = F.avg_pool2d(x_m, *args, count_include_pad, divisor_override)
    ones = torch.ones_like(x_m[:, :1])
    frac = F.avg_pool2d(ones, *args, count_include_pad, divisor_override)  # valid / D
    valid = F.avg_pool2d(ones, *args, True, 1)
    var = F.avg_pool2d(x_v, *args, True, 1) * (frac / valid).square()
    return _hwc(mean), _hwc(var)


def _adaptive_windows(length: int, out: int) -> np.ndarray:
    idx = np.arange(out)
    return (-(-(idx + 1) * length // out)) - (idx * length // out)


def adaptive_avg_pool2d_map_moments(
    m: Tensor, v: Tensor, output_size: Union[int, Sequence[Optional[int]]]
) -> tuple[Tensor, Tensor]:
    """Moment maps of ``nn.AdaptiveAvgPool2d``: mean pooled alike, variance ``mean(v) / n``.

    Output ``i`` of an axis of length ``L`` averages the ``n_i`` inputs ``floor(i L / out)`` to
    ``ceil((i + 1) L / out)`` (torch's windows).

    Args:
        m: Means ``(H, W, C)``.
        v: Variances.
        output_size: Output size (int or pair; None in a pair keeps that axis).

    Returns:
        ``(mean, var)`` maps.
    """
    size = (int(m.shape[0]), int(m.shape[1]))
    outs = (output_size, output_size) if isinstance(output_size, int) else tuple(output_size)
    out = tuple(size[i] if outs[i] is None else int(outs[i]) for i in range(2))
    n = np.outer(_adaptive_windows(size[0], out[0]), _adaptive_windows(size[1], out[1]))
    inv_n = torch.as_tensor(1.0 / n, dtype=m.dtype, device=m.device)
    mean = F.adaptive_avg_pool2d(_nchw(m, m), out)
    var = F.adaptive_avg_pool2d(_nchw(v, m), out) * inv_n
    return _hwc(mean), _hwc(var)


def _out_length(length: int, k: int, s: int, p: int, d: int, ceil_mode: bool) -> int:
    span = length + 2 * p - d * (k - 1) - 1
    if span < 0:
        raise ValueError(f"pooling window {k} (dilation {d}) does not fit an input of {length}")
    if not ceil_mode:
        return span // s + 1
    out = -(-span // s) + 1
    if (out - 1) * s >= length + p:  # the last window must start inside the input or padding
        out -= 1
    return out


def pool2d_output_size(
    input_size: Sequence[int],
    kernel_size: _IntPair,
    stride: Optional[_IntPair] = None,
    padding: _IntPair = 0,
    dilation: _IntPair = 1,
    ceil_mode: bool = False,
) -> tuple[int, int]:
    """Spatial output size of ``nn.MaxPool2d``/``nn.AvgPool2d`` (stride defaults to the kernel)."""
    k, p, d = _pair(kernel_size), _pair(padding), _pair(dilation)
    s = k if stride is None or stride == [] else _pair(stride)
    return tuple(_out_length(int(input_size[i]), k[i], s[i], p[i], d[i], ceil_mode) for i in range(2))


def max_pool2d_map_moments(
    m: Tensor,
    v: Tensor,
    kernel_size: _IntPair,
    stride: Optional[_IntPair] = None,
    padding: _IntPair = 0,
    dilation: _IntPair = 1,
    ceil_mode: bool = False,
    corr: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor]:
    """Moment maps of ``nn.MaxPool2d``: the maximum of a window of equicorrelated Gaussians.

    The ``n`` values of a window that lie inside the input (padding never wins) are taken as
    draws from the window's mixture ``N(mu_w, s_w^2)`` (the mean of their means; the mean of
    their variances plus the variance of their means), with a common pairwise correlation
    ``r``: the mean of the channel's correlations ``corr`` at the offsets between them (0
    without ``corr``: independent draws). Then ``X_i = mu_w + s_w (sqrt(r) Z_0 + sqrt(1 - r)
    Z_i)`` and the maximum has moments ``(mu_w + s_w sqrt(1 - r) e1(n),
    s_w^2 (r + (1 - r) e2(n)))``, ``e1``/``e2`` those of the maximum of ``n`` standard
    normals (:func:`~bnprobe.norms.moments.max_of_gaussians_moments`). Exact when the
    window's values have equal moments and equal correlations; for a 3x3 window of a field
    with correlation ``rho^(|dy| + |dx|)`` the mean is within 0.05 sd and the variance within
    1% of Monte Carlo.

    Neighbouring activations of natural images are strongly positively correlated: taken as
    independent, the maximum of a window is overestimated (resnet18's stem pool on CIFAR-10:
    by 0.4 sd) and its variance underestimated. Graph propagation passes ``corr`` where it is
    known (the first convolution, :mod:`bnprobe.norms.spatial`).

    Args:
        m: Means ``(H, W, C)``.
        v: Variances.
        kernel_size: Window.
        stride: Stride (None: the window).
        padding: Padding (``-inf``).
        dilation: Dilation.
        ceil_mode: ``ceil_mode``.
        corr: Optional per-channel correlation ``(C, 2L + 1, 2L + 1)`` at offsets up to
            ``L`` (centre 1); offsets beyond ``L`` count as uncorrelated.

    Returns:
        ``(mean, var)`` maps.
    """
    k, p, d = _pair(kernel_size), _pair(padding), _pair(dilation)
    s = k if stride is None or stride == [] else _pair(stride)
    size = (int(m.shape[0]), int(m.shape[1]))
    out = pool2d_output_size(size, k, s, p, d, ceil_mode)
    extra = [max(0, (out[i] - 1) * s[i] + d[i] * (k[i] - 1) + 1 - size[i] - 2 * p[i]) for i in range(2)]
    pads = (p[1], p[1] + extra[1], p[0], p[0] + extra[0])
    channels = m.shape[-1]

    def windows(t: Tensor) -> Tensor:  # (C, K, out_h * out_w)
        cols = F.unfold(F.pad(t, pads), k, dilation=d, stride=s)
        return cols.reshape(t.shape[1], k[0] * k[1], -1)

    mask = windows(torch.ones_like(_nchw(m, m)[:, :1]))  # (1, K, L)
    n = mask.sum(dim=1)  # (1, L)
    w_m, w_v = windows(_nchw(m, m)), windows(_nchw(v, m))
    mu = (w_m * mask).sum(dim=1) / n
    spread = ((w_v + (w_m - mu.unsqueeze(1)).square()) * mask).sum(dim=1) / n
    counts = n.reshape(-1).round().to(torch.int64)
    e1 = torch.zeros_like(n.reshape(-1))
    e2 = torch.ones_like(e1)
    for value in torch.unique(counts).tolist():
        first, second = _max_normal_moments(int(value))
        e1 = torch.where(counts == value, torch.full_like(e1, first), e1)
        e2 = torch.where(counts == value, torch.full_like(e2, second), e2)
    sd = spread.clamp_min(_var_floor(spread.dtype)).sqrt()
    if corr is None:
        mean, var = mu + sd * e1, spread * e2
    else:
        r = _window_correlation(corr.to(m), mask[0], k, d)  # (C, L)
        mean = mu + sd * (1.0 - r).sqrt() * e1
        var = spread * (r + (1.0 - r) * e2)
    return mean.t().reshape(out[0], out[1], channels), var.t().reshape(out[0], out[1], channels)


def _at_offsets(table: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
    """``table[..., R + rows, R + cols]`` of a table of offsets ``-R..R`` (last two dims).

    ``rows`` and ``cols`` broadcast together; offsets beyond ``R`` give 0 (uncorrelated).
    """
    radius = (table.shape[-1] - 1) // 2
    inside = (rows.abs() <= radius) & (cols.abs() <= radius)
    r = (rows.clamp(-radius, radius) + radius).long()
    c = (cols.clamp(-radius, radius) + radius).long()
    return table[..., r, c] * inside.to(table.dtype)


def _window_correlation(corr: Tensor, mask: Tensor, k: tuple[int, int], d: tuple[int, int]) -> Tensor:
    # mean correlation over the pairs of a window's values inside the input: (C, L) (0 for n = 1)
    ty, tx = torch.meshgrid(torch.arange(k[0]), torch.arange(k[1]), indexing="ij")
    ty, tx = (ty.reshape(-1) * d[0]).to(corr.device), (tx.reshape(-1) * d[1]).to(corr.device)
    pair = _at_offsets(corr, ty[None, :] - ty[:, None], tx[None, :] - tx[:, None])  # (C, K, K)
    pair = pair * (1.0 - torch.eye(pair.shape[-1], dtype=corr.dtype, device=corr.device))
    total = torch.einsum("ckj,kl,jl->cl", pair, mask, mask)
    n = mask.sum(dim=0)
    return (total / (n * (n - 1)).clamp_min(1.0)).clamp(0.0, 1.0)


def flatten_map_moments(m: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """Feature moments of ``torch.flatten(x, 1)`` of an ``(N, C, H, W)`` tensor: ``(C H W,)``."""
    if m.dim() == 1:
        return m, v
    m, v = torch.broadcast_tensors(m, v)
    return m.permute(2, 0, 1).reshape(-1), v.permute(2, 0, 1).reshape(-1)
