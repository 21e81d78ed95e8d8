"""AKVQ-VL KV cache: a transformers ``Cache`` of per-layer caches holding 2-bit packed keys and values.

    cache = AKVQCache(model, AKVQConfig(bits=2, profile=KVSaliencyProfile.load(model_dir)))
    out = model.generate(**inputs, past_key_values=cache, max_new_tokens=64)

Every layer keeps its most recent tokens in fp16 (at least ``residual``; when ``residual + block``
are there, the oldest whole ``block``s are quantized) and everything older in packed form, in one of
three precision classes chosen per token by the layer's saliency pattern:

* uniform (and any layer whose switch is off): every old token at ``bits``;
* TSA layers: image tokens at ``bits``, text tokens (prompt text and generated tokens) at ``salient_bits``;
* PSA layers: pivot tokens (massive activations at prefill) in fp16, the rest at ``bits``.

Keys are quantized per token after a Walsh-Hadamard rotation (see casp.kv.rotation for why returning
the un-rotated reconstruction equals rotating the query); values too, rotated either by weights
folded with ``fold_value_rotation`` or, for an unfolded model, online inside the cache.

How the cache learns prefill facts (documented contract): constructing it registers forward
pre-hooks on the model (reads ``input_ids`` of the prefill call -> image-token mask through the model
adapter) and on the decoder blocks of PSA layers (reads the block's input hidden states at prefill ->
pivot tokens). The hooks hold the cache weakly, act only on calls whose ``past_key_values`` is this
cache, and are removed when the cache is garbage-collected or :meth:`AKVQCache.close` is called. For
inputs without ``input_ids`` call :meth:`AKVQCache.prepare` with an ``image_mask`` before prefill.

``update`` returns dequantized full keys/values (the torch path: attention over the quantized cache
dequantizes on the fly); the tokens passed to the current call are returned exactly. With the model's
attention set to "casp_kv" (casp.kv.attention.enable_fused_kv_attention), decode steps instead return
the new states tagged with the layer, and the attention reads the packed store directly (a Triton
kernel on CUDA, its torch reference elsewhere): nothing is dequantized into memory.

On CUDA (fp16/bf16 states, triton installed) quantizing new tokens into the store and dequantizing it
for a prefill chunk run in one Triton launch each (casp.kernels.triton_kv_quant / triton_kv_dequant, same
results as the torch code up to the rotation's summation order); ``AKVQLayer.use_triton`` overrides.
"""

from __future__ import annotations

import dataclasses
import weakref
from collections.abc import Iterator
from functools import partial

import torch
from torch import nn

from casp.kv.quantizer import SUPPORTED_BITS, PackedKV, default_clip, dequantize, kernel_layout_ok, quantize_tokens
from casp.kv.rotation import check_head_dim, is_value_rotation_folded
from casp.kv.saliency import KVSaliencyProfile, pivot_mask
from casp.kv.window import QuantizedKVCache, WindowedQuantLayer, iter_tensors, text_shape

# Quantization classes of old tokens in an AKVQ layer (pivot tokens are kept in fp16 on top, see AKVQLayer).
SALIENT, LOW = 1, 2
# Without a measured profile: LLaVA-1.5-7B's table in the paper (layers 0-1 TSA, the rest PSA).
DEFAULT_TSA_LAYERS = 2
# Quantize at most this many elements at once, so the fp32 temporaries of a long prefill stay small.
_QUANT_SLICE = 1 << 24


@dataclasses.dataclass(frozen=True)
class AKVQConfig:
    """AKVQ-VL cache settings. The ablation uniform -> +rotation -> +TSA -> +PSA is the three switches.

    bits: bits of ordinary old tokens; salient_bits: bits of text tokens in TSA layers; residual: fp16
    recent tokens kept (at least); block: tokens quantized at once when the window overflows; pivots,
    pivot_ratio: at most ``pivots`` tokens whose hidden-state norm exceeds ``pivot_ratio`` x median stay
    fp16 in PSA layers; group: channels per quantization group (the head dim when smaller); clip,
    salient_clip: clip ratios (None: 0.8 at 2 bits, 1.0 above); profile: per-layer TSA/PSA patterns
    (None: the first 2 layers TSA, the rest PSA).
    """

    bits: int = 2
    salient_bits: int = 4
    residual: int = 128
    block: int = 32
    pivots: int = 15
    pivot_ratio: float = 4.0
    group: int = 128
    clip: float | None = None
    salient_clip: float | None = None
    rotate: bool = True
    tsa: bool = True
    psa: bool = True
    profile: KVSaliencyProfile | None = None
    version: int = 1

    def __post_init__(self):
        for name in ("bits", "salient_bits"):
            if getattr(self, name) not in SUPPORTED_BITS:
                raise ValueError(f"AKVQConfig.{name} must be one of {SUPPORTED_BITS}, got {getattr(self, name)}")
        if self.residual < 0:
            raise ValueError(f"AKVQConfig.residual must be >= 0, got {self.residual}")
        if self.block <= 0:
            raise ValueError(f"AKVQConfig.block must be > 0, got {self.block}")
        if self.pivots < 0 or self.pivot_ratio <= 0:
            raise ValueError("AKVQConfig.pivots must be >= 0 and pivot_ratio > 0")
        if self.group <= 0 or self.group % 4:
            raise ValueError(f"AKVQConfig.group must be a positive multiple of 4, got {self.group}")
        for name in ("clip", "salient_clip"):
            value = getattr(self, name)
            if value is not None and not 0.0 < value <= 1.0:
                raise ValueError(f"AKVQConfig.{name} must be in (0, 1] or None, got {value}")
        if self.profile is not None and not isinstance(self.profile, KVSaliencyProfile):
            raise ValueError("AKVQConfig.profile must be a KVSaliencyProfile (KVSaliencyProfile.load(model_dir))")

    def pattern(self, layer: int, num_layers: int) -> str:
        if self.profile is None:
            return "TSA" if layer < DEFAULT_TSA_LAYERS else "PSA"
        if self.profile.num_layers != num_layers:
            raise ValueError(
                f"the KV saliency profile has {self.profile.num_layers} layers, the model {num_layers}; "
                "it was measured on another model"
            )
        return self.profile.patterns[layer]

    def mode(self, layer: int, num_layers: int) -> str:
        """ "tsa", "psa" or "uniform": the layer's pattern if its switch is on."""
        pattern = self.pattern(layer, num_layers)
        if pattern == "TSA" and self.tsa:
            return "tsa"
        if pattern == "PSA" and self.psa:
            return "psa"
        return "uniform"

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data["profile"] = None if self.profile is None else self.profile.to_dict()
        return data


def ablation_configs(bits: int = 2, **common) -> dict[str, AKVQConfig]:
    """The paper's ablation as configs of one class: uniform -> +rotation -> +TSA -> +PSA."""
    return {
        "uniform": AKVQConfig(bits=bits, rotate=False, tsa=False, psa=False, **common),
        "+rotation": AKVQConfig(bits=bits, rotate=True, tsa=False, psa=False, **common),
        "+TSA": AKVQConfig(bits=bits, rotate=True, tsa=True, psa=False, **common),
        "+PSA": AKVQConfig(bits=bits, rotate=True, tsa=True, psa=True, **common),
    }


def _quantize_rows(x: torch.Tensor, bits: int, group: int, clip: float, h: torch.Tensor | None) -> PackedKV:
    """Rows [N, H, d] of quantize_tokens(x H) for tokens x [n, ..., H, d] (N = all leading dims).

    Works on slices of dim 0 so that the rotated copy and the fp32 temporaries stay small, and reads
    ``x`` through views (no full copy of a large prefill)."""
    step = max(1, _QUANT_SLICE // max(1, x[0].numel()))
    parts = []
    for i in range(0, x.shape[0], step):
        part = x[i : i + step]
        p = quantize_tokens(part if h is None else part @ h, bits, group, clip)
        parts.append(PackedKV(p.codes.flatten(0, -4), p.scale.flatten(0, -3), p.zero.flatten(0, -3), bits))
    return parts[0] if len(parts) == 1 else PackedKV.cat(parts)


def _gather_rows(token_class: torch.Tensor, cls: int, index: torch.Tensor) -> torch.Tensor:
    """Row numbers (into class ``cls``'s row store) of the tokens of batch rows ``index``, in storage order.

    Rows are stored in the row-major order of the [S, B] class map, so a token's row number is its rank
    among the class's tokens in that order.
    """
    hit = token_class == cls
    ids = torch.full(hit.shape, -1, dtype=torch.long, device=hit.device)
    ids[hit] = torch.arange(int(hit.sum()), device=hit.device)
    picked = ids[:, index]
    return picked[picked >= 0]


class AKVQLayer(WindowedQuantLayer):
    """One layer of the AKVQ-VL cache, in mode "uniform", "tsa" or "psa" (see the module docstring).

    Old tokens are stored time-major: ``token_class`` [S, B] (int8: SALIENT or LOW) and, per class, the
    rows [N_c, H, ...] of that class's tokens in row-major order of ``token_class``. So per-row (per batch
    element) image positions cost nothing, and appending a block is a concatenation. Pivot tokens
    (PSA) are quantized like the rest and also kept in fp16 in an overlay (``kept_pos`` [P, 2] of
    (position, batch row), ``k_kept``/``v_kept`` [P, H, d]) written over the dequantized tokens: the
    bulk then decodes as one dense block, and the extra cost is P low-bit tokens.
    """

    def __init__(self, config: AKVQConfig, mode: str, rotate_values: bool, head_dim: int):
        super().__init__(config.residual, config.block)
        if mode not in ("uniform", "tsa", "psa"):
            raise ValueError(f"unknown AKVQ layer mode {mode!r}")
        self.mode = mode
        self.group = min(config.group, head_dim)
        if head_dim % self.group:
            raise ValueError(f"head dim {head_dim} is not a multiple of the KV group size {self.group}")
        if config.rotate or rotate_values:
            check_head_dim(head_dim)
        self.bits = {SALIENT: config.salient_bits, LOW: config.bits}
        self.clip = {
            SALIENT: default_clip(config.salient_bits) if config.salient_clip is None else config.salient_clip,
            LOW: default_clip(config.bits) if config.clip is None else config.clip,
        }
        self.rotate_keys = config.rotate
        self.rotate_values = rotate_values  # online; False when the model carries folded V rotation
        self.head_dim = head_dim
        self._init_store()
        self.image_mask: torch.Tensor | None = None  # [B, T_prefill], set by AKVQCache.prepare
        self.pivots: torch.Tensor | None = None  # [B, T_prefill] bool, set at prefill (PSA)
        # Quantize into / dequantize from the store with the Triton kernels (casp.kernels.triton_kv_quant,
        # triton_kv_dequant): None = on CUDA when triton is installed (_use_triton), True = forced, False = never
        self.use_triton: bool | None = None

    def _init_store(self) -> None:
        self.token_class: torch.Tensor | None = None
        self.k_rows: dict[int, PackedKV] = {}
        self.v_rows: dict[int, PackedKV] = {}
        self.kept_pos: torch.Tensor | None = None
        self.k_kept: torch.Tensor | None = None
        self.v_kept: torch.Tensor | None = None
        self.hadamard: torch.Tensor | None = None
        # fused decode: per-class store-row indices and padded kept tokens, rebuilt when the store changes
        self._segments_cache: tuple | None = None

    def reset(self) -> None:
        super().reset()
        self._init_store()
        self.image_mask = self.pivots = None

    def hadamard_matrix(self) -> torch.Tensor:
        """H [d, d] in the cache dtype (symmetric, orthogonal): keys are stored as K H."""
        return self._h()

    def _h(self) -> torch.Tensor:
        if self.hadamard is None:
            from casp.hadamard import hadamard_matrix

            self.hadamard = hadamard_matrix(self.head_dim, dtype=self.dtype, device=self.device)
        return self.hadamard

    def _classes(self, start: int, n: int, batch: int, device) -> torch.Tensor:
        """Quantization class of tokens [start, start + n) of every batch row: int8 [n, B]."""
        cls = torch.full((n, batch), LOW, dtype=torch.int8, device=device)
        if self.mode == "tsa":
            cls.fill_(SALIENT)
            if self.image_mask is not None:
                prefix = self.image_mask[:, start : start + n].to(device).T  # [n', B]
                cls[: prefix.shape[0]][prefix] = LOW
        return cls

    def _kept(self, start: int, n: int, batch: int, device) -> torch.Tensor | None:
        """(position in block, batch row) of the pivot tokens among tokens [start, start + n): [P, 2]."""
        if self.mode != "psa" or self.pivots is None:
            return None
        prefix = self.pivots[:, start : start + n].to(device).T  # [n', B]
        return prefix.nonzero() if bool(prefix.any()) else None

    def _encode(self, rows: torch.Tensor, cls: int, rotate: bool) -> PackedKV:
        h = self._h() if rotate else None
        if self._use_triton(rows):
            from casp.kernels.triton_kv_quant import quantize_rows

            return quantize_rows(rows, self.bits[cls], self.group, self.clip[cls], h)
        return _quantize_rows(rows, self.bits[cls], self.group, self.clip[cls], h)

    def _decode(self, rows: PackedKV, rotate: bool) -> torch.Tensor:
        x = dequantize(rows, self.dtype)
        return x @ self._h() if rotate else x  # H^T = H: back to the model's basis

    def _store(self, keys: torch.Tensor, values: torch.Tensor, start: int) -> None:
        b, _, n, _ = keys.shape
        cls = self._classes(start, n, b, keys.device)
        k_t, v_t = keys.permute(2, 0, 1, 3), values.permute(2, 0, 1, 3)  # [n, B, H, d]
        for c in (SALIENT, LOW):
            hit = cls == c
            if not bool(hit.any()):
                continue
            # all tokens of one class (uniform and PSA layers): quantize straight from the [n, B, H, d] view
            rows_k, rows_v = (k_t, v_t) if bool(hit.all()) else (k_t[hit], v_t[hit])
            new_k = self._encode(rows_k, c, self.rotate_keys)  # rows [N, H, d]
            new_v = self._encode(rows_v, c, self.rotate_values)
            if c in self.k_rows:
                new_k, new_v = PackedKV.cat([self.k_rows[c], new_k]), PackedKV.cat([self.v_rows[c], new_v])
            self.k_rows[c], self.v_rows[c] = new_k, new_v
        self.token_class = cls if self.token_class is None else torch.cat([self.token_class, cls])
        self._segments_cache = None
        kept = self._kept(start, n, b, keys.device)
        if kept is not None:
            k_new, v_new = k_t[kept[:, 0], kept[:, 1]], v_t[kept[:, 0], kept[:, 1]]  # [P, H, d], exact
            kept = kept + torch.tensor([start, 0], device=kept.device)
            if self.kept_pos is None:
                self.kept_pos, self.k_kept, self.v_kept = kept, k_new, v_new
            else:
                self.kept_pos = torch.cat([self.kept_pos, kept])
                self.k_kept, self.v_kept = torch.cat([self.k_kept, k_new]), torch.cat([self.v_kept, v_new])

    def _load_into(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        if self._use_triton(keys):
            self._load_into_triton(keys, values)
        else:
            self._load_into_torch(keys, values)
        if self.kept_pos is not None:
            k_out, v_out = keys.permute(2, 0, 1, 3), values.permute(2, 0, 1, 3)  # [S, B, H, d] views
            k_out[self.kept_pos[:, 0], self.kept_pos[:, 1]] = self.k_kept
            v_out[self.kept_pos[:, 0], self.kept_pos[:, 1]] = self.v_kept

    def _use_triton(self, states: torch.Tensor) -> bool:
        """The Triton kernels quantize and dequantize the store: on CUDA with triton (``use_triton`` None) or
        when forced (True; CPU tensors only under TRITON_INTERPRET=1), where they apply
        (casp.kv.quantizer.kernel_layout_ok)."""
        d = states.shape[-1]
        if self.use_triton is False or not all(kernel_layout_ok(d, b, self.group) for b in self.bits.values()):
            return False
        if self.use_triton:
            return True
        from casp.kernels import triton_available

        return states.is_cuda and states.dtype in (torch.float16, torch.bfloat16) and triton_available()

    def _load_into_triton(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        from casp.kernels.triton_kv_dequant import dequantize_rows_into

        flat = self.token_class.flatten() if len(self.k_rows) > 1 else None
        for c in self.k_rows:
            # flat [S, B] position of each row of the class (rows of a one-class store are in that order)
            dest = None if flat is None else (flat == c).nonzero().squeeze(1).to(torch.int32)
            targets = ((keys, self.k_rows[c], self.rotate_keys), (values, self.v_rows[c], self.rotate_values))
            for out, rows, rotate in targets:
                h = self._h() if rotate else None
                dequantize_rows_into(out, rows.codes, rows.scale, rows.zero, rows.bits, dest, h)

    def _load_into_torch(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        s, b = self.token_class.shape
        h, d = keys.shape[1], keys.shape[-1]
        step = max(1, self.dequant_slice // (b * h * d))  # tokens per slice
        k_out, v_out = keys.permute(2, 0, 1, 3), values.permute(2, 0, 1, 3)  # [S, B, H, d] views
        targets = ((k_out, self.k_rows, self.rotate_keys), (v_out, self.v_rows, self.rotate_values))
        # Row offsets of each class at every token position: rows of tokens [s0, s1) are contiguous.
        if len(self.k_rows) == 1:
            offsets = {c: [t * b for t in range(s + 1)] for c in self.k_rows}
        else:
            offsets = {c: [0, *(self.token_class == c).sum(dim=1).cumsum(0).tolist()] for c in self.k_rows}
        for s0 in range(0, s, step):
            s1 = min(s, s0 + step)
            for out, rows, rotate in targets:
                for c, r in rows.items():
                    lo, hi = offsets[c][s0], offsets[c][s1]
                    if hi == lo:
                        continue
                    part = self._decode(_slice_rows(r, lo, hi), rotate)
                    if hi - lo == (s1 - s0) * b:  # every token of the slice is in this class
                        out[s0:s1] = part.view(s1 - s0, b, h, d)
                    else:
                        out[s0:s1][self.token_class[s0:s1] == c] = part

    def _select_store(self, index: torch.Tensor) -> None:
        self._segments_cache = None
        for c in list(self.k_rows):
            rows = _gather_rows(self.token_class, c, index)
            self.k_rows[c], self.v_rows[c] = self.k_rows[c].select(rows), self.v_rows[c].select(rows)
        self.token_class = self.token_class[:, index]
        if self.pivots is not None:
            self.pivots = self.pivots[index.to(self.pivots.device)]
        if self.kept_pos is not None:
            # every (kept token, new row j) with index[j] == the token's row; repeats copy it
            p, j = (self.kept_pos[:, 1].unsqueeze(1) == index.unsqueeze(0)).nonzero(as_tuple=True)
            self.kept_pos = torch.stack([self.kept_pos[p, 0], j], dim=1)
            self.k_kept, self.v_kept = self.k_kept[p], self.v_kept[p]

    # -- fused decode ------------------------------------------------------------------------------
    def decode_segments(self) -> tuple[list, list]:
        """The layer's tokens for casp.kv.attention.decode_attention: (packed segments, dense segments).

        Packed: one PackedSegment per class, with int32 ``idx`` [B, L] (store row of the batch row's j-th
        token of the class in time order; pivot tokens, held exactly in the kept overlay, are -1) and
        ``pos`` [B, L]. Dense: the kept pivot tokens padded per batch row [B, Hkv, P, d] (PSA), then the
        recent window. The index and the padded kept tokens are rebuilt only when the store changes
        (every ``block`` decode steps), at 8 bytes per token and batch row.
        """
        if self._segments_cache is None:
            self._segments_cache = self._build_segments()
        packed, kept = self._segments_cache
        b, w = self.keys.shape[0], self.keys.shape[-2]
        pos = torch.arange(self.stored, self.stored + w, device=self.keys.device).expand(b, w)
        from casp.kv.attention import DenseSegment

        return packed, [*kept, DenseSegment(self.keys, self.values, pos)]

    def _build_segments(self) -> tuple[list, list]:
        from casp.kv.attention import DenseSegment, PackedSegment

        if not self.stored:
            return [], []
        tc = self.token_class  # [S, B]
        s, b = tc.shape
        keep = torch.ones_like(tc, dtype=torch.bool)
        if self.kept_pos is not None:
            keep[self.kept_pos[:, 0], self.kept_pos[:, 1]] = False
        packed = []
        for c in sorted(self.k_rows):
            hit = tc == c
            rank = (hit.flatten().cumsum(0) - 1).view(s, b)  # store row of each token of the class
            use = hit & keep
            width = int(use.sum(0).max())
            if width == 0:
                continue
            # time order of the used tokens of every batch row first (a stable sort of "not used")
            order = torch.sort((~use).to(torch.uint8), dim=0, stable=True).indices[:width]  # [L, B]
            idx = torch.where(use.gather(0, order), rank.gather(0, order), torch.full_like(order, -1))
            packed.append(
                PackedSegment(
                    self.k_rows[c], self.v_rows[c], idx.T.contiguous().to(torch.int32), order.T.contiguous().int()
                )
            )
        kept = []
        if self.kept_pos is not None:
            pos, row = self.kept_pos[:, 0], self.kept_pos[:, 1]
            order = torch.argsort(row * s + pos)
            pos, row = pos[order], row[order]
            counts = torch.bincount(row, minlength=b)
            first = torch.cumsum(counts, 0) - counts
            slot = torch.arange(row.shape[0], device=row.device) - first[row]
            p = int(counts.max())
            h, d = self.k_kept.shape[1], self.k_kept.shape[2]
            kk = self.k_kept.new_zeros(b, p, h, d)
            vv = self.v_kept.new_zeros(b, p, h, self.v_kept.shape[2])
            kk[row, slot], vv[row, slot] = self.k_kept[order], self.v_kept[order]
            kpos = torch.zeros(b, p, dtype=torch.long, device=row.device)
            valid = torch.zeros(b, p, dtype=torch.bool, device=row.device)
            kpos[row, slot], valid[row, slot] = pos, True
            kept.append(DenseSegment(kk.transpose(1, 2), vv.transpose(1, 2), kpos, valid))
        return packed, kept

    def stored_tensors(self) -> Iterator[torch.Tensor]:
        held = [self.token_class, self.k_rows, self.v_rows, self.kept_pos, self.k_kept, self.v_kept]
        yield from iter_tensors([*held, self.hadamard, self.pivots])
        if self._segments_cache is not None:  # the fused path's index and padded pivots
            packed, kept = self._segments_cache
            yield from iter_tensors([[p.idx, p.pos] for p in packed] + [[k.k, k.v, k.pos, k.valid] for k in kept])
        if self.image_mask is not None:
            yield self.image_mask

    @property
    def num_kept(self) -> int:
        """Tokens (over all batch rows) held exactly in fp16 outside the recent window."""
        return 0 if self.kept_pos is None else self.kept_pos.shape[0]

    def set_pivots(self, hidden_states: torch.Tensor, k: int, ratio: float, extend: bool = False) -> None:
        """Pivot tokens of this layer from its prefill input hidden states [B, T, D]; ``extend``: the states
        of the next chunk of a prompt fed in chunks (its pivots are chosen within the chunk, appended)."""
        # Norms a slice of rows at a time (about 2^26 elements): a full fp32 copy of a large prefill's hidden
        # states is gigabytes, and slices of a few rows cost hundreds of launches per layer at large batch.
        rows = max(1, (1 << 26) // max(1, hidden_states[0].numel()))
        norms = torch.cat([h.float().norm(dim=-1) for h in hidden_states.split(rows)])  # [B, T]
        mask = pivot_mask(norms, k, ratio)
        self.pivots = torch.cat([self.pivots, mask], dim=1) if extend and self.pivots is not None else mask


def _slice_rows(rows: PackedKV, lo: int, hi: int) -> PackedKV:
    return PackedKV(rows.codes[lo:hi], rows.scale[lo:hi], rows.zero[lo:hi], rows.bits)


class AKVQCache(QuantizedKVCache):
    """AKVQ-VL KV cache for ``model`` (see the module docstring). ``adapter`` defaults to get_adapter(model).

    fused: decode steps attend straight over the packed store (casp.kv.attention) instead of a dequantized
    copy. None (default): whenever the model's attention implementation is "casp_kv"
    (casp.kv.attention.enable_fused_kv_attention); False: never; True: required (a forward with another
    attention implementation raises).
    """

    def __init__(self, model: nn.Module, config: AKVQConfig | None = None, adapter=None, fused: bool | None = None):
        from casp.models import get_adapter

        config = config or AKVQConfig()
        adapter = adapter or get_adapter(model)
        num_layers, head_dim = text_shape(model, adapter)
        rotate_values = config.rotate and not is_value_rotation_folded(model)
        layers = [AKVQLayer(config, config.mode(i, num_layers), rotate_values, head_dim) for i in range(num_layers)]
        super().__init__(layers=layers)
        self.config = config
        self.fused = fused
        self.image_mask: torch.Tensor | None = None
        self._handles: list = []
        self._install_hooks(model, adapter)

    # -- prefill facts -----------------------------------------------------------------------------
    def prepare(
        self,
        input_ids: torch.Tensor | None = None,
        image_mask: torch.Tensor | None = None,
        *,
        model: nn.Module | None = None,
        adapter=None,
    ) -> None:
        """Tell the cache which prefill positions are image tokens (before the prefill call).

        Give ``image_mask`` (bool [B, T]) directly, or ``input_ids`` with ``model`` and ``adapter``.
        """
        if self.get_seq_length() > 0:
            raise ValueError("AKVQCache.prepare must be called before the prefill forward (the cache is not empty)")
        if image_mask is None:
            if input_ids is None or model is None or adapter is None:
                raise ValueError("AKVQCache.prepare needs image_mask, or input_ids with model and adapter")
            image_mask = adapter.image_token_mask(model, input_ids)
        if image_mask.dim() != 2:
            raise ValueError(f"image_mask must be bool [B, T], got shape {tuple(image_mask.shape)}")
        self.image_mask = image_mask.to(torch.bool)
        for layer in self.layers:
            layer.image_mask = self.image_mask

    def _set_fused(self, attention_module: nn.Module) -> None:
        from casp.kv.attention import FUSED_ATTENTION, uses_fused_kv_attention

        active = self.fused is not False and uses_fused_kv_attention(attention_module)
        if self.fused and not active:
            raise ValueError(
                f"AKVQCache(fused=True) needs the model's attention implementation {FUSED_ATTENTION!r}: "
                "call casp.kv.attention.enable_fused_kv_attention(model) first"
            )
        for layer in self.layers:
            layer.fused_decode = active

    def _install_hooks(self, model: nn.Module, adapter) -> None:
        ref = weakref.ref(self)
        first_attention = adapter.attention(adapter.decoder_layers(model)[0])

        def on_model(module, args, kwargs):
            cache = ref()
            if cache is None or _cache_argument(kwargs) is not cache:
                return None
            cache._set_fused(first_attention)
            if cache.get_seq_length() > 0:
                return None
            input_ids = kwargs.get("input_ids", args[0] if args else None)
            if cache.image_mask is None and input_ids is not None:
                cache.prepare(image_mask=adapter.image_token_mask(module, input_ids))
            return None

        def on_block(index, module, args, kwargs):
            cache = ref()
            if cache is None or _cache_argument(kwargs) is not cache:
                return None
            layer = cache.layers[index]
            hidden = args[0] if args else kwargs["hidden_states"]
            length = layer.get_seq_length()
            # the prefill, or the next chunk of a prompt prefilled in chunks (never a decode step)
            chunk = length > 0 and hidden.shape[1] > 1 and layer.pivots is not None and layer.pivots.shape[1] == length
            if length == 0 or chunk:
                layer.set_pivots(hidden, cache.config.pivots, cache.config.pivot_ratio, extend=chunk)
            return None

        handles = [model.register_forward_pre_hook(on_model, with_kwargs=True)]
        for i, block in enumerate(adapter.decoder_layers(model)):
            if self.layers[i].mode == "psa" and self.config.pivots > 0:
                handles.append(block.register_forward_pre_hook(partial(on_block, i), with_kwargs=True))
        self._handles = handles
        weakref.finalize(self, _remove_handles, handles)

    def close(self) -> None:
        """Remove the hooks this cache installed on the model (also done when the cache is collected)."""
        _remove_handles(self._handles)

    def tensors(self) -> Iterator[torch.Tensor]:
        yield from super().tensors()
        if self.image_mask is not None:
            yield self.image_mask

    # -- batch bookkeeping shared by the layers ----------------------------------------------------
    def _select_batch(self, index: torch.Tensor) -> None:
        if self.image_mask is not None:
            self.image_mask = self.image_mask[index.to(self.image_mask.device)]
            for layer in self.layers:
                layer.image_mask = self.image_mask

    def reorder_cache(self, beam_idx: torch.LongTensor):
        super().reorder_cache(beam_idx)
        self._select_batch(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor):
        super().batch_select_indices(indices)
        self._select_batch(torch.as_tensor(indices).flatten())

    def batch_repeat_interleave(self, repeats: int):
        super().batch_repeat_interleave(repeats)
        if self.image_mask is not None:
            b = self.image_mask.shape[0]
            self._select_batch(torch.arange(b).repeat_interleave(repeats))

    def reset(self):
        super().reset()
        self.image_mask = None


def _cache_argument(kwargs: dict):
    """The cache a forward call was given: transformers >= 5.25 names it ``cache``, earlier ``past_key_values``."""
    return kwargs["cache"] if "cache" in kwargs else kwargs.get("past_key_values")


def _remove_handles(handles: list) -> None:
    for handle in handles:
        handle.remove()
    handles.clear()
