"""Attention sparsity (CASP's premise, DESIGN 3.1): how few keys hold most of each query's mass.

Density of a query row = (smallest number of keys whose attention sums to ``mass`` of the row)
/ (number of keys the row can see). Averaged over rows, separately for image-token and text-token
rows; plus the share of attention mass that lands on image tokens.
"""

from __future__ import annotations

import dataclasses

import torch


def row_density(attn: torch.Tensor, visible: torch.Tensor, mass: float = 0.95) -> torch.Tensor:
    """Per-row density of attention probabilities.

    attn: [..., Tq, Tk] rows of probabilities (masked entries are 0); visible: bool [Tq, Tk] (or
    broadcastable) marking the keys each row may see. Returns [..., Tq] in (0, 1].
    """
    attn = attn.float() * visible
    total = attn.sum(-1, keepdim=True)
    sorted_attn = attn.sort(dim=-1, descending=True).values
    cum = sorted_attn.cumsum(-1)
    # Number of entries needed = 1 + number of prefix sums still below the target mass.
    needed = (cum < mass * total - 1e-7).sum(-1) + 1
    n_visible = visible.sum(-1).clamp_min(1)
    return needed.float() / n_visible.float()


def causal_visibility(tq: int, tk: int, device=None) -> torch.Tensor:
    """bool [Tq, Tk]: query i (the last Tq of Tk positions) sees keys 0..(Tk - Tq + i)."""
    q = torch.arange(tq, device=device)[:, None] + (tk - tq)
    k = torch.arange(tk, device=device)[None, :]
    return k <= q


@dataclasses.dataclass
class LayerAttentionStats:
    """Running sums over calibration samples for one layer."""

    num_heads: int = 0
    head_density_sum: torch.Tensor | None = None  # [H]
    rows: int = 0
    image_rows: int = 0
    text_rows: int = 0
    image_density_sum: float = 0.0
    text_density_sum: float = 0.0
    image_mass_sum: float = 0.0
    image_mass_rows: int = 0

    def add(self, attn: torch.Tensor, image_mask: torch.Tensor, mass: float = 0.95) -> None:
        """attn [H, T, T] (one sample, eager probabilities), image_mask [T] bool."""
        heads, tq, tk = attn.shape
        visible = causal_visibility(tq, tk, attn.device)
        dens = row_density(attn, visible, mass)  # [H, T]
        image_mask = image_mask.to(attn.device)
        if self.head_density_sum is None:
            self.num_heads = heads
            self.head_density_sum = torch.zeros(heads)
        self.head_density_sum += dens.sum(-1).cpu()
        self.rows += tq
        per_row = dens.mean(0)
        self.image_density_sum += float(per_row[image_mask].sum())
        self.text_density_sum += float(per_row[~image_mask].sum())
        self.image_rows += int(image_mask.sum())
        self.text_rows += int((~image_mask).sum())
        sees_image = (visible & image_mask[None, :]).any(-1)  # [T]
        if sees_image.any():
            share = (attn.float() * image_mask[None, None, :]).sum(-1) / attn.float().sum(-1).clamp_min(1e-12)
            self.image_mass_sum += float(share.mean(0)[sees_image].sum())
            self.image_mass_rows += int(sees_image.sum())

    def summary(self) -> dict:
        heads = (self.head_density_sum / max(self.rows, 1)).tolist() if self.head_density_sum is not None else []
        return {
            "density": sum(heads) / len(heads) if heads else None,
            "density_image_rows": self.image_density_sum / self.image_rows if self.image_rows else None,
            "density_text_rows": self.text_density_sum / self.text_rows if self.text_rows else None,
            "image_mass": self.image_mass_sum / self.image_mass_rows if self.image_mass_rows else None,
            "head_density": heads,
        }
