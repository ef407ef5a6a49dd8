"""Linear bounds whose rows are local windows of a [C, H, W] node ("patches").

CROWN bounds the pre-activations of a convolutional layer one neuron at a time: the rows of its
backward pass start as unit vectors, and after the convolution each row is nonzero only on the
layer's receptive field of that neuron. Stored densely the rows cost (neurons x elements) per
node; stored as windows they cost (neurons x kernel), linear in the activations. This is the
"patches" mode of auto_LiRPA (Xu et al. 2020, "Automatic perturbation analysis for scalable
certified robustness and beyond"), here for the intermediate bounds of the engine's backward
passes.

Row r of a `Patches` has coefficient `data[b, r, c, i, j]` on element (c, top[r] + i,
left[r] + j) of the node; window entries outside the node's H x W are kept at zero. Through a
convolution of stride s, padding p and dilation d the window is the transposed convolution of
the old one with the kernel, and its origin moves to (top * s - p): the composition of a
window with a kernel is again a window. Element-wise maps (activations' lines, BatchNorm,
residual sums) multiply the windows by their per-element factors gathered at the window's
positions. Anything else (linear layers, reshapes, max pooling) takes the dense rows
(`to_dense`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from propdsl.verify.layers import (
    AffineRule,
    AvgPool2dRule,
    Conv2dRule,
    ElementwiseLinearRule,
    IdentityRule,
)

__all__ = ["Patches", "addcmul", "affine_backward", "times", "unit_patches", "writable"]


@dataclass(frozen=True, eq=False)
class Patches:
    """Rows [B', S] of linear coefficients on a node of per-sample shape (C, H, W), each a
    window: `data` [B', S, C, kh, kw] at origins (top, left) = anchor * stride - padding, with
    anchors `ah`, `aw` [B', S] (long) on a grid of the given stride and padding (the origins
    may be negative: entries outside the node are zero)."""

    data: Tensor
    ah: Tensor
    aw: Tensor
    stride: tuple[int, int]
    padding: tuple[int, int]
    shape: tuple[int, int, int]

    @property
    def top(self) -> Tensor:
        return self.ah * self.stride[0] - self.padding[0]

    @property
    def left(self) -> Tensor:
        return self.aw * self.stride[1] - self.padding[1]

    @property
    def kernel(self) -> tuple[int, int]:
        return self.data.shape[-2], self.data.shape[-1]

    def _indices(self) -> tuple[Tensor, Tensor, tuple[int, int, int, int]]:
        """Window positions [B', S, kh] / [B', S, kw], shifted into a padded image, and the
        padding (left, right, top, bottom) that makes every position valid."""
        kh, kw = self.kernel
        _, height, width = self.shape
        rows = self.top.unsqueeze(-1) + torch.arange(kh, device=self.top.device)
        cols = self.left.unsqueeze(-1) + torch.arange(kw, device=self.left.device)
        pad_top = max(0, -int(rows.min()))
        pad_bottom = max(0, int(rows.max()) - height + 1)
        pad_left = max(0, -int(cols.min()))
        pad_right = max(0, int(cols.max()) - width + 1)
        return rows + pad_top, cols + pad_left, (pad_left, pad_right, pad_top, pad_bottom)

    def gather(self, t: Tensor) -> Tensor:
        """Per-element values t [Bt, St, C, H, W] (Bt in {1, B}, St in {1, S}) at each row's
        window: [max(B', Bt), S, C, kh, kw], zero outside the node."""
        if t.shape[1] == 1 and self.ah.shape[0] == 1:
            return self._gather_grid(t[:, 0])
        if t.shape[1] > 1:
            # One value set per row (alpha-CROWN's slopes): padding would copy all of it, so
            # positions outside the node read a clamped neighbour instead, and are zeroed.
            _, height, width = self.shape
            kh, kw = self.kernel
            rows = self.top.unsqueeze(-1) + torch.arange(kh, device=self.top.device)
            cols = self.left.unsqueeze(-1) + torch.arange(kw, device=self.left.device)
            inside = ((rows >= 0) & (rows < height)).unsqueeze(-1) & (
                (cols >= 0) & (cols < width)
            ).unsqueeze(-2)
            rows, cols = rows.clamp(0, height - 1), cols.clamp(0, width - 1)
        else:
            rows, cols, pad = self._indices()
            t = F.pad(t, pad)
            inside = None
        batch = max(t.shape[0], rows.shape[0])
        b = torch.arange(t.shape[0], device=t.device).reshape(-1, 1, 1, 1)
        s = torch.arange(t.shape[1], device=t.device).reshape(1, -1, 1, 1)
        picked = t[b, s, :, rows.unsqueeze(-1), cols.unsqueeze(-2)]  # [B*, S, kh, kw, C]
        picked = picked.expand(batch, *picked.shape[1:])
        if inside is not None:
            picked = picked * inside.unsqueeze(-1).to(picked.dtype)
        return picked.permute(0, 1, 4, 2, 3)

    def _gather_grid(self, t: Tensor) -> Tensor:
        """gather for values shared by the rows ([Bt, C, H, W]) and rows shared by the batch:
        every window of the grid by one unfold (im2col), then the rows' windows."""
        kh, kw = self.kernel
        (sh, sw), (ph, pw) = self.stride, self.padding
        _, height, width = self.shape
        bottom = max(0, int(self.ah.max()) * sh - ph + kh - height)
        right = max(0, int(self.aw.max()) * sw - pw + kw - width)
        padded = F.pad(t, (pw, right, ph, bottom))
        cols = F.unfold(padded, (kh, kw), stride=(sh, sw)).transpose(1, 2)  # [Bt, L, C kh kw]
        grid_w = (padded.shape[-1] - kw) // sw + 1
        index = (self.ah * grid_w + self.aw)[0]
        picked = cols.index_select(1, index)
        return picked.reshape(t.shape[0], index.shape[0], t.shape[1], kh, kw)

    def masked(self, *, inplace: bool = False) -> Patches:
        """The same rows with the window entries outside the node set to zero (in `data`
        itself with `inplace`, for data the caller has just made)."""
        _, height, width = self.shape
        kh, kw = self.kernel
        rows = self.top.unsqueeze(-1) + torch.arange(kh, device=self.top.device)
        cols = self.left.unsqueeze(-1) + torch.arange(kw, device=self.left.device)
        inside_r = (rows >= 0) & (rows < height)
        inside_c = (cols >= 0) & (cols < width)
        if bool(inside_r.all()) and bool(inside_c.all()):
            return self
        mask = (inside_r.unsqueeze(-1) & inside_c.unsqueeze(-2)).unsqueeze(2)  # [B', S, 1, kh, kw]
        return self.with_data(times(self.data, mask.to(self.data.dtype), owned=inplace))

    def with_data(self, data: Tensor) -> Patches:
        return Patches(data, self.ah, self.aw, self.stride, self.padding, self.shape)

    def to_dense(self) -> Tensor:
        """The rows as a dense tensor [B', S, C, H, W]."""
        rows, cols, pad = self._indices()
        lead = (max(self.data.shape[0], rows.shape[0]), self.data.shape[1])
        channels, height, width = self.shape
        dense = self.data.new_zeros(
            *lead, channels, height + pad[2] + pad[3], width + pad[0] + pad[1]
        )
        b = torch.arange(lead[0], device=rows.device).reshape(-1, 1, 1, 1)
        s = torch.arange(lead[1], device=rows.device).reshape(1, -1, 1, 1)
        values = self.data.expand(*lead, *self.data.shape[2:]).permute(0, 1, 3, 4, 2)
        dense[b, s, :, rows.unsqueeze(-1), cols.unsqueeze(-2)] = values
        return dense[..., pad[2] : pad[2] + height, pad[0] : pad[0] + width]

    def add(self, other: Patches) -> Patches | None:
        """The sum of two sets of rows with the same windows (None when they differ)."""
        same = (self.kernel, self.shape, self.stride, self.padding) == (
            other.kernel,
            other.shape,
            other.stride,
            other.padding,
        )
        if not same:
            return None
        ah, other_ah = torch.broadcast_tensors(self.ah, other.ah)
        aw, other_aw = torch.broadcast_tensors(self.aw, other.aw)
        if not (torch.equal(ah, other_ah) and torch.equal(aw, other_aw)):
            return None
        data = self.data + other.data
        return Patches(data, ah, aw, self.stride, self.padding, self.shape)

    def dot(self, t: Tensor, *, absolute: bool = False) -> Tensor:
        """sum over each row's window of data * t, for t [Bt, St, C, H, W] or a scalar -> [B, S];
        with `absolute`, of |data| * t for t >= 0."""
        if t.dim() == 0:
            data = self.data.abs() if absolute else self.data
            return data.flatten(2).sum(-1) * t
        # The product is written into the gathered values: one window-sized tensor, not two
        # (|data| t = |data t| for t >= 0, so |data| is not made either).
        product = times(self.gather(t), self.data, owned=True)
        if absolute:
            product = product.abs() if product.requires_grad else product.abs_()
        return product.flatten(2).sum(-1)

    def times(self, t: Tensor) -> Tensor:
        """data * (t at each row's window), for t [Bt, St, C, H, W] or a scalar."""
        if t.dim() == 0:
            return self.data * t
        return times(self.gather(t), self.data, owned=True)


def writable(a: Tensor, b: Tensor | float) -> bool:
    """Whether a op b may be written into a: a has the result's shape, no two of its entries
    share memory (no expanded view), and autograd records neither operand."""
    b_grad = isinstance(b, Tensor) and b.requires_grad
    b_shape = b.shape if isinstance(b, Tensor) else ()
    return (
        not (a.requires_grad or b_grad)
        and a.shape == torch.broadcast_shapes(a.shape, b_shape)
        and all(stride or size == 1 for stride, size in zip(a.stride(), a.shape, strict=True))
    )


def times(a: Tensor, b: Tensor | float, *, owned: bool) -> Tensor:
    """a * b, written into a when the caller owns a (made it and holds no other reference to
    it) and that is safe (`writable`). Equal to a * b bit for bit; the point is memory: at
    real sizes the windows' products are the largest tensors of a backward pass."""
    return a.mul_(b) if owned and writable(a, b) else a * b


def addcmul(a: Tensor, b: Tensor, c: Tensor, *, owned: bool) -> Tensor:
    """torch.addcmul(a, b, c) (a + b c, fused), written into a on the terms of `times`."""
    if owned and writable(a, b) and writable(a, c):
        return a.addcmul_(b, c)
    return torch.addcmul(a, b, c)


def unit_patches(shape: tuple[int, int, int], rows: Tensor, like: Tensor) -> Patches:
    """The rows [e_k; -e_k] for the flat neurons `rows` ([m] shared, or [B, m] per sample)."""
    channels, height, width = shape
    rows = rows if rows.dim() == 2 else rows.unsqueeze(0)
    c, h, w = rows // (height * width), (rows // width) % height, rows % width
    eye = F.one_hot(c, channels).to(like.dtype)  # [B', m, C]
    data = torch.cat([eye, -eye], dim=1)[..., None, None]
    return Patches(data, torch.cat([h, h], 1), torch.cat([w, w], 1), (1, 1), (0, 0), shape)


def affine_backward(
    rule: AffineRule, P: Patches
) -> tuple[list[Patches | None], Tensor | None] | None:
    """Backward through an affine rule with windowed rows, or None when the rule's rows are
    not windows (the engine then takes the dense rows)."""
    call = rule.call
    if len(call.out_shape) != 3 or any(len(s) != 3 for s in call.in_shapes):
        return None
    if isinstance(rule, IdentityRule):
        return [P], None
    if isinstance(rule, ElementwiseLinearRule):
        if any(tuple(s) != tuple(call.out_shape) for s in call.in_shapes):
            return None
        out: list[Patches | None] = []
        for scale in rule.scales:
            if scale is None:
                out.append(P)
            else:
                full = scale.expand(call.out_shape).unsqueeze(0).unsqueeze(0)
                out.append(P.with_data(P.times(full)))
        bias = None
        if rule.shift is not None:
            bias = P.dot(rule.shift.expand(call.out_shape).unsqueeze(0).unsqueeze(0))
        return out, bias
    if isinstance(rule, Conv2dRule):
        if rule.padding is None:
            return None
        return _through_kernel(
            P, rule.weight, rule.bias, rule.stride, rule.padding, rule.dilation, rule.groups, call
        )
    if isinstance(rule, AvgPool2dRule):
        if not rule.simple:
            return None
        channels = call.in_shapes[0][0]
        weight = P.data.new_full((channels, 1, *rule.kernel), 1.0 / math.prod(rule.kernel))
        return _through_kernel(P, weight, None, rule.stride, rule.padding, (1, 1), channels, call)
    return None


def _through_kernel(P, weight, bias, stride, padding, dilation, groups, call):
    lead = P.data.shape[:2]
    bias_term = None
    if bias is not None:
        bias_term = P.data.sum((-1, -2)) @ bias
    flat = P.data.reshape(-1, *P.data.shape[2:])
    size = flat[0].numel()
    if flat.shape[0] > size:
        # Many rows of one small window: the transposed convolution of the window's unit
        # basis is a [window x new window] matrix (independent of the image size), and one
        # matrix product applies it to every row.
        basis = torch.eye(size, dtype=flat.dtype, device=flat.device).reshape(size, *flat.shape[1:])
        images = F.conv_transpose2d(basis, weight, None, stride, 0, 0, groups, dilation)
        back = (flat.reshape(-1, size) @ images.reshape(size, -1)).reshape(-1, *images.shape[1:])
    else:
        back = F.conv_transpose2d(flat, weight, None, stride, 0, 0, groups, dilation)
    shape = tuple(call.in_shapes[0])
    # origin * s - p = (anchor * stride - padding) * s - p: the anchors stay, the grid changes
    new_stride = (P.stride[0] * stride[0], P.stride[1] * stride[1])
    new_padding = (P.padding[0] * stride[0] + padding[0], P.padding[1] * stride[1] + padding[1])
    data = back.reshape(*lead, *back.shape[1:])
    # `back` is this function's own: the entries outside the node are zeroed in place.
    new = Patches(data, P.ah, P.aw, new_stride, new_padding, shape).masked(inplace=True)  # type: ignore[arg-type]
    return [new], bias_term
