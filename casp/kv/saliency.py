"""Per-layer saliency patterns of AKVQ-VL: Text-Salient (TSA) vs Pivot-Token-Salient (PSA) attention.

* TSA: text tokens receive more attention than image tokens (early layers of LLaVA). The cache keeps
  text tokens at higher precision there.
* PSA: attention piles onto a few pivot tokens, found without attention scores from massive
  activations: tokens whose residual-stream hidden state has a norm far above the median.

:func:`measure_saliency` decides the pattern of every layer once per model on calibration inputs and
returns a JSON-serializable :class:`KVSaliencyProfile`, stored with the model.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from torch import nn

PATTERNS = ("TSA", "PSA")
PROFILE_FILE = "casp_kv_profile.json"
PROFILE_VERSION = 1


def attention_by_kind(
    attn: torch.Tensor,
    image_mask: torch.Tensor,
    skip_first: int = 5,
    valid_mask: torch.Tensor | None = None,
) -> tuple[float, float]:
    """(mean attention per text token, mean attention per image token) of one layer.

    attn: [B, Hq, T, T] softmax attention. A key token's received attention is averaged over heads and
    over the query rows that play the role of decoding queries: the rows after the last image token
    (all rows when there is none), each query counting only the keys it can see (causal). The first
    ``skip_first`` positions (attention sinks such as BOS) and invalid (padding) positions are left out.
    Returns NaN for a kind with no token.
    """
    if attn.dim() != 4 or attn.shape[-1] != attn.shape[-2]:
        raise ValueError(f"attention maps must be [B, H, T, T], got {tuple(attn.shape)}")
    b, _, t, _ = attn.shape
    if image_mask.shape != (b, t):
        raise ValueError(f"image_mask must be [B, T] = {(b, t)}, got {tuple(image_mask.shape)}")
    image_mask = image_mask.to(attn.device, torch.bool)
    valid = torch.ones_like(image_mask) if valid_mask is None else valid_mask.to(attn.device, torch.bool)
    pos = torch.arange(t, device=attn.device)
    received = attn.float().mean(dim=1)  # [B, Tq, Tk]
    text_sum = image_sum = 0.0
    text_n = image_n = 0
    for i in range(b):
        img = image_mask[i] & valid[i]
        last_image = int(pos[img].max()) if img.any() else -1
        queries = valid[i] & (pos > last_image)
        if not queries.any():
            queries = valid[i]
        rows = received[i, queries]  # [nq, Tk]
        seen = (pos[queries].unsqueeze(1) >= pos.unsqueeze(0)).float().sum(dim=0)  # queries seeing each key
        per_key = rows.sum(dim=0) / seen.clamp_min(1)
        keys = valid[i] & (pos >= skip_first) & (seen > 0)
        text_keys, image_keys = keys & ~image_mask[i], keys & image_mask[i]
        text_sum += float(per_key[text_keys].sum())
        text_n += int(text_keys.sum())
        image_sum += float(per_key[image_keys].sum())
        image_n += int(image_keys.sum())
    return (text_sum / text_n if text_n else math.nan, image_sum / image_n if image_n else math.nan)


def pattern_from_means(text_mean: float, image_mean: float) -> str:
    """TSA when text tokens get more attention per token than image tokens; PSA otherwise.

    Without image tokens the text/image distinction is void: PSA (pivot tokens kept) is the rule then.
    """
    if math.isnan(image_mean) or math.isnan(text_mean):
        return "PSA"
    return "TSA" if text_mean > image_mean else "PSA"


def detect_patterns(
    attn_maps: Sequence[torch.Tensor],
    image_mask: torch.Tensor,
    skip_first: int = 5,
    valid_mask: torch.Tensor | None = None,
) -> list[str]:
    """The pattern "TSA" or "PSA" per layer from attention maps [B, H, T, T] (one per layer) and image_mask [B, T]."""
    return [pattern_from_means(*attention_by_kind(a, image_mask, skip_first, valid_mask)) for a in attn_maps]


def pivot_mask(norms: torch.Tensor, k: int = 15, ratio: float = 4.0) -> torch.Tensor:
    """Bool [B, T]: at most ``k`` tokens per row whose norm exceeds ``ratio`` x the row's median norm."""
    if norms.dim() != 2:
        raise ValueError(f"norms must be [B, T], got {tuple(norms.shape)}")
    norms = norms.float()
    mask = torch.zeros_like(norms, dtype=torch.bool)
    if k <= 0 or norms.shape[1] == 0:
        return mask
    median = norms.median(dim=1, keepdim=True).values
    top = norms.topk(min(k, norms.shape[1]), dim=1)
    above = top.values > ratio * median
    mask.scatter_(1, top.indices, above)
    return mask


def find_pivot_tokens(hidden_states: torch.Tensor, k: int = 15, ratio: float = 4.0) -> torch.Tensor:
    """Positions (ascending LongTensor) of at most ``k`` pivot tokens of one sequence.

    hidden_states: [T, D] residual-stream hidden states (a decoder block's input). A pivot token has
    massive activations: its L2 norm is more than ``ratio`` times the median norm.
    """
    if hidden_states.dim() != 2:
        raise ValueError(f"hidden_states must be [T, D], got {tuple(hidden_states.shape)}")
    mask = pivot_mask(hidden_states.float().norm(dim=-1).unsqueeze(0), k, ratio)[0]
    return mask.nonzero().flatten()


@dataclasses.dataclass(frozen=True)
class KVSaliencyProfile:
    """Per-layer saliency of one model, measured on calibration inputs (stored with the model as JSON)."""

    patterns: tuple[str, ...]
    text_attention: tuple[float, ...] = ()  # mean attention per text token, per layer
    image_attention: tuple[float, ...] = ()  # mean attention per image token, per layer
    pivot_count: tuple[float, ...] = ()  # mean number of pivot tokens per sample, per layer
    pivot_in_image: tuple[float, ...] = ()  # share of pivot tokens that are image tokens, per layer
    pivot_at_first: tuple[float, ...] = ()  # share of pivot tokens at position 0, per layer
    samples: int = 0
    skip_first: int = 5
    pivot_ratio: float = 4.0
    version: int = PROFILE_VERSION

    def __post_init__(self):
        bad = [p for p in self.patterns if p not in PATTERNS]
        if bad:
            raise ValueError(f"patterns must be 'TSA' or 'PSA', got {bad}")
        object.__setattr__(self, "patterns", tuple(self.patterns))
        for field in ("text_attention", "image_attention", "pivot_count", "pivot_in_image", "pivot_at_first"):
            values = tuple(float(v) for v in getattr(self, field))
            if values and len(values) != len(self.patterns):
                raise ValueError(f"{field} has {len(values)} entries for {len(self.patterns)} layers")
            object.__setattr__(self, field, values)

    @property
    def num_layers(self) -> int:
        return len(self.patterns)

    def to_dict(self) -> dict:
        # NaN (a kind with no token) is not JSON: store None.
        def clean(v):
            return None if isinstance(v, float) and math.isnan(v) else v

        return {k: [clean(x) for x in v] if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict) -> KVSaliencyProfile:
        if data.get("version", PROFILE_VERSION) > PROFILE_VERSION:
            raise ValueError(f"KV saliency profile version {data['version']} is newer than this casp supports")
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - fields
        if unknown:
            raise ValueError(f"unknown KV saliency profile fields {sorted(unknown)}")
        data = {
            k: tuple(math.nan if x is None else x for x in v) if isinstance(v, list) else v for k, v in data.items()
        }
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_json(cls, text: str) -> KVSaliencyProfile:
        return cls.from_dict(json.loads(text))

    def save(self, path: str | Path) -> Path:
        """Write to ``path`` (a model directory gets PROFILE_FILE inside it)."""
        path = Path(path)
        if path.is_dir():
            path = path / PROFILE_FILE
        path.write_text(self.to_json())
        return path

    @classmethod
    def load(cls, path: str | Path) -> KVSaliencyProfile:
        path = Path(path)
        if path.is_dir():
            path = path / PROFILE_FILE
        if not path.is_file():
            raise FileNotFoundError(f"no KV saliency profile at {path}; run `casp kv-analyze` on the model first")
        return cls.from_json(path.read_text())


def _pivot_stats(hidden: torch.Tensor, image_mask: torch.Tensor, valid: torch.Tensor, k: int, ratio: float):
    """(pivots, in image, at position 0) counts of one layer input [B, T, D]."""
    norms = hidden.float().norm(dim=-1).masked_fill(~valid, 0.0)
    # Padding is masked to norm 0; the median is taken over valid tokens only, one row at a time.
    total = in_image = first = 0
    for i in range(norms.shape[0]):
        row = norms[i, valid[i]].unsqueeze(0)
        mask = pivot_mask(row, k, ratio)[0]
        pos = valid[i].nonzero().flatten()[mask]
        total += int(mask.sum())
        in_image += int(image_mask[i, pos].sum())
        first += int((pos == 0).sum())
    return total, in_image, first


@torch.no_grad()
def measure_saliency(
    model: nn.Module,
    adapter,
    calib_inputs: Iterable[dict],
    skip_first: int = 5,
    pivots: int = 15,
    pivot_ratio: float = 4.0,
) -> KVSaliencyProfile:
    """Run ``model`` on calibration inputs (dicts for ``model(**inputs)``) with eager attention and
    ``output_attentions`` and measure every layer's pattern and pivot-token statistics.

    The model's attention implementation is switched to eager for the run and restored afterwards.
    """
    previous = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        text_sum = image_sum = None
        text_n = image_n = None
        piv = None
        samples = 0
        for inputs in calib_inputs:
            out = model(**inputs, output_attentions=True, output_hidden_states=True, use_cache=False)
            attentions = out.attentions
            # VLM outputs carry the language model's hidden states: embeddings + one per block.
            hidden = out.hidden_states
            if not attentions:
                raise ValueError("the model returned no attention maps; it must support output_attentions")
            input_ids = inputs["input_ids"]
            image_mask = adapter.image_token_mask(model, input_ids).cpu()
            valid = inputs.get("attention_mask")
            valid = torch.ones_like(image_mask) if valid is None else valid.cpu().bool()
            n = len(attentions)
            if text_sum is None:
                text_sum, image_sum = [0.0] * n, [0.0] * n
                text_n, image_n = [0] * n, [0] * n
                piv = [[0, 0, 0] for _ in range(n)]
            for layer, attn in enumerate(attentions):
                t, m = attention_by_kind(attn.cpu(), image_mask, skip_first, valid)
                b = input_ids.shape[0]
                if not math.isnan(t):
                    text_sum[layer] += t * b
                    text_n[layer] += b
                if not math.isnan(m):
                    image_sum[layer] += m * b
                    image_n[layer] += b
                counts = _pivot_stats(hidden[layer].cpu(), image_mask, valid, pivots, pivot_ratio)
                piv[layer] = [x + y for x, y in zip(piv[layer], counts)]
            samples += input_ids.shape[0]
    finally:
        model.set_attn_implementation(previous)
    if samples == 0:
        raise ValueError("measure_saliency got no calibration inputs")
    text = [s / c if c else math.nan for s, c in zip(text_sum, text_n)]
    image = [s / c if c else math.nan for s, c in zip(image_sum, image_n)]
    return KVSaliencyProfile(
        patterns=tuple(pattern_from_means(t, m) for t, m in zip(text, image)),
        text_attention=tuple(text),
        image_attention=tuple(image),
        pivot_count=tuple(p[0] / samples for p in piv),
        pivot_in_image=tuple(p[1] / p[0] if p[0] else 0.0 for p in piv),
        pivot_at_first=tuple(p[2] / p[0] if p[0] else 0.0 for p in piv),
        samples=samples,
        skip_first=skip_first,
        pivot_ratio=pivot_ratio,
    )
