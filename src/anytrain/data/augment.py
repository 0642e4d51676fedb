"""Batch-level training augmentations written with plain torch ops (no per-sample Python loop).

An augmentation is a callable ``augment(x, generator) -> x`` on a batch ``x`` of shape ``(B, C, H, W)``; all
its randomness comes from ``generator``, so a batch's augmentation is reproducible from the generator's seed.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def _draw(fn: str, generator: torch.Generator, device: torch.device, *args, **kwargs) -> Tensor:
    # Draw on the generator's own device (a CUDA generator cannot feed a CPU op and vice versa), then move.
    out = getattr(torch, fn)(*args, generator=generator, device=generator.device, **kwargs)
    return out.to(device, non_blocking=True)


def crop_flip(x: Tensor, offsets_y: Tensor, offsets_x: Tensor, flip: Tensor, padding: int, fill: Tensor) -> Tensor:
    """Deterministic core of :class:`RandomCropFlip`.

    Pads ``x`` (B, C, H, W) by ``padding`` on each side with the per-channel value ``fill``, takes for sample
    ``b`` the H×W window whose top-left corner is ``(offsets_y[b], offsets_x[b])`` in the padded image, and
    mirrors it horizontally where ``flip[b]``. One advanced-indexing gather does crop and flip together.
    """
    b, c, h, w = x.shape
    p = padding
    if p > 0:
        padded = x.new_empty(b, c, h + 2 * p, w + 2 * p)
        padded.copy_(fill.to(x.dtype).reshape(1, c, 1, 1).expand_as(padded))
        padded[:, :, p : p + h, p : p + w] = x
    else:
        padded = x
    ar_h = torch.arange(h, device=x.device)
    ar_w = torch.arange(w, device=x.device)
    rows = offsets_y.reshape(b, 1) + ar_h  # (B, H)
    # A flipped window reads its columns right to left: column j takes padded column ox + (W - 1 - j).
    cols = offsets_x.reshape(b, 1) + torch.where(flip.reshape(b, 1), (w - 1) - ar_w, ar_w)  # (B, W)
    bi = torch.arange(b, device=x.device).reshape(b, 1, 1, 1)
    ci = torch.arange(c, device=x.device).reshape(1, c, 1, 1)
    return padded[bi, ci, rows.reshape(b, 1, h, 1), cols.reshape(b, 1, 1, w)]


class RandomCropFlip:
    """Random crop with zero padding plus random horizontal flip (the usual CIFAR training augmentation).

    Each sample independently gets a crop offset uniform in ``{0, ..., 2*padding}`` per axis and is mirrored
    with probability ``flip_prob``. ``fill`` is the per-channel padding value *in the normalised space* of the
    batch: pass ``-mean/std`` to pad with black, as padding the raw image with zeros before normalising does.
    """

    def __init__(self, padding: int = 4, flip_prob: float = 0.5, fill: Sequence[float] | float = 0.0) -> None:
        if padding < 0:
            raise ValueError(f"padding must be >= 0, got {padding}")
        if not 0.0 <= flip_prob <= 1.0:
            raise ValueError(f"flip_prob must be in [0, 1], got {flip_prob}")
        self.padding = int(padding)
        self.flip_prob = float(flip_prob)
        self.fill = torch.as_tensor(fill, dtype=torch.float32).reshape(-1)

    def __call__(self, x: Tensor, generator: torch.Generator) -> Tensor:
        if x.dim() != 4:
            raise ValueError(f"RandomCropFlip expects (B, C, H, W), got shape {tuple(x.shape)}")
        b, c = x.shape[:2]
        fill = self.fill.to(x.device)
        if fill.numel() == 1:
            fill = fill.expand(c)
        elif fill.numel() != c:
            raise ValueError(f"fill has {fill.numel()} values for {c} channels")
        hi = 2 * self.padding + 1
        oy = _draw("randint", generator, x.device, 0, hi, (b,))
        ox = _draw("randint", generator, x.device, 0, hi, (b,))
        flip = _draw("rand", generator, x.device, (b,)) < self.flip_prob
        return crop_flip(x, oy, ox, flip, self.padding, fill)

    def __repr__(self) -> str:
        return f"RandomCropFlip(padding={self.padding}, flip_prob={self.flip_prob})"
