"""The windowed layer and cache base shared by casp's quantized KV caches (AKVQ-VL in casp.kv.cache, the KIVI
and uniform baselines in casp.kv.kivi).

``WindowedQuantLayer`` is one layer's cache: the most recent tokens in an fp16 window, older ones in a
quantized store that a subclass defines (``_store`` / ``_load_into``); ``update`` returns the full keys and
values (old ones dequantized) or, on a fused decode step, the new token's states tagged with the layer.
``QuantizedKVCache`` is a transformers ``Cache`` of such layers with memory accounting.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn
from transformers.cache_utils import Cache, CacheLayerMixin

from casp.kv.quantizer import PackedKV


def iter_tensors(obj) -> Iterator[torch.Tensor]:
    """Every tensor in ``obj``: a tensor, a PackedKV, or dicts/lists/tuples of them (None and others skipped)."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, PackedKV):
        yield from obj.tensors()
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from iter_tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from iter_tensors(v)


def unique_nbytes(tensors) -> int:
    """Total bytes of distinct tensors (a tensor held twice counts once)."""
    seen, total = set(), 0
    for t in tensors:
        key = (t.data_ptr(), t.nbytes) if t.numel() else id(t)
        if key not in seen:
            seen.add(key)
            total += t.nbytes
    return total


class WindowedQuantLayer(CacheLayerMixin):
    """One layer's cache: an fp16 recent window (``self.keys``/``self.values`` [B, H, W, d]) in front of a
    quantized store of older tokens that subclasses define through ``_store`` and ``_load_into``.
    """

    is_compileable = False
    is_sliding = False
    is_croppable = False
    dequant_slice = 1 << 26  # dequantize about this many elements at once into the output K/V

    def __init__(self, residual: int, block: int):
        # The window buffers first: keys/values are views into them, so a walk over the attributes
        # meets each buffer whole before its view.
        self._kbuf = self._vbuf = None
        super().__init__()
        self.residual, self.block = residual, block
        self.length = 0  # tokens seen
        self.stored = 0  # tokens moved into the quantized store (always the oldest ones)
        # Set by the cache per forward: decode steps return tagged new states (fused attention reads the store).
        self.fused_decode = False

    # -- subclass hooks ----------------------------------------------------------------------------
    def _store(self, keys: torch.Tensor, values: torch.Tensor, start: int) -> None:
        """Quantize tokens [start, start + n) given as [B, H, n, d]."""
        raise NotImplementedError

    def _load_into(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Write the dequantized stored tokens into ``keys``/``values`` [B, H, stored, d] (views of the
        output), a slice of tokens at a time so that temporaries stay small."""
        raise NotImplementedError

    def _select_store(self, index: torch.Tensor) -> None:
        """Keep batch rows ``index`` of the store."""
        raise NotImplementedError

    def stored_tensors(self) -> Iterator[torch.Tensor]:
        raise NotImplementedError

    # -- transformers CacheLayerMixin API ----------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self._kbuf = self._vbuf = None  # window buffers [B, H, residual + block, d]; keys/values are views
        self.keys = key_states[:, :, :0].clone()
        self.values = value_states[:, :, :0].clone()
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Append [B, H, T, d] states; return all keys/values (old ones dequantized, new ones exact).

        On a fused decode step (``fused_decode`` set by the cache and T == 1) nothing is dequantized: the
        new token's states come back tagged with this layer (casp.kv.attention.LAZY_LAYER_ATTR) and the
        attention function reads the packed store itself.

        Window bookkeeping: the fp16 window lives in a buffer of ``residual + block`` slots (after a
        prefill: just the prompt's tail, grown once on decoding), so appending a token copies nothing
        else. When the window reaches ``residual + block`` tokens its oldest whole blocks are quantized:
        right after the output is built on the torch path, and at the start of the next update on a
        fused decode step, so both paths attend over exactly the same tokens at every step.
        """
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self._flush()
        b, h, t, d = key_states.shape
        lazy = self.fused_decode and t == 1
        if not lazy:
            # One output buffer per call, as DynamicLayer's cat makes; the packed store is decoded into it.
            s, w = self.stored, self.keys.shape[-2]
            out_k = key_states.new_empty(b, h, s + w + t, d)
            out_v = value_states.new_empty(b, h, s + w + t, value_states.shape[-1])
            if s:
                self._load_into(out_k[:, :, :s], out_v[:, :, :s])
            out_k[:, :, s : s + w], out_v[:, :, s : s + w] = self.keys, self.values
            out_k[:, :, s + w :], out_v[:, :, s + w :] = key_states, value_states
        self.length += t
        self._append(key_states, value_states)
        if not lazy:  # the output is built: quantize what is due now
            self._flush()
        if lazy:
            from casp.kv.attention import LAZY_LAYER_ATTR

            out_k, out_v = key_states.view_as(key_states), value_states.view_as(value_states)
            setattr(out_k, LAZY_LAYER_ATTR, self)
            setattr(out_v, LAZY_LAYER_ATTR, self)
        return out_k, out_v

    @property
    def window_capacity(self) -> int:
        return self.residual + self.block

    def _due(self, w: int) -> int:
        """Tokens to quantize out of a window of ``w``: whole blocks, keeping at least ``residual``."""
        return max(0, (w - self.residual) // self.block * self.block)

    def _set_window(self, w: int) -> None:
        self.keys, self.values = self._kbuf[:, :, :w], self._vbuf[:, :, :w]

    def _flush(self) -> None:
        """Quantize the window's due tokens (oldest first) and move the rest to the buffer's front."""
        w = self.keys.shape[-2]
        n = self._due(w)
        if n == 0:
            return
        self._store(self._kbuf[:, :, :n], self._vbuf[:, :, :n], start=self.stored)
        self.stored += n
        # clone: source and destination overlap
        self._kbuf[:, :, : w - n] = self._kbuf[:, :, n:w].clone()
        self._vbuf[:, :, : w - n] = self._vbuf[:, :, n:w].clone()
        self._set_window(w - n)

    def _append(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        w, t = self.keys.shape[-2], key_states.shape[-2]
        cap = 0 if self._kbuf is None else self._kbuf.shape[-2]
        if cap < w + t <= self.window_capacity:  # grow once to the steady-state window size
            kbuf, vbuf = self._new_buffers(key_states, value_states, self.window_capacity)
            kbuf[:, :, :w], vbuf[:, :, :w] = self.keys, self.values
            self._kbuf, self._vbuf, cap = kbuf, vbuf, self.window_capacity
        if w + t <= cap:
            self._kbuf[:, :, w : w + t], self._vbuf[:, :, w : w + t] = key_states, value_states
            self._set_window(w + t)
            return
        # A prompt or chunk larger than the window: quantize straight from the states (no copy of a
        # possibly huge prompt), then keep the tail in a buffer of just its size (the memory a prefilled
        # cache holds; the first decode steps grow it to residual + block slots).
        if w:
            window_k = torch.cat([self.keys, key_states], dim=-2)
            window_v = torch.cat([self.values, value_states], dim=-2)
        else:
            window_k, window_v = key_states, value_states
        n = self._due(window_k.shape[-2])
        if n:
            self._store(window_k[:, :, :n], window_v[:, :, :n], start=self.stored)
            self.stored += n
        rest = window_k.shape[-2] - n  # < residual + block
        self._kbuf, self._vbuf = self._new_buffers(key_states, value_states, rest)
        self._kbuf[:, :, :rest], self._vbuf[:, :, :rest] = window_k[:, :, n:], window_v[:, :, n:]
        self._set_window(rest)

    @staticmethod
    def _new_buffers(key_states: torch.Tensor, value_states: torch.Tensor, slots: int):
        b, h, _, d = key_states.shape
        return key_states.new_empty(b, h, slots, d), value_states.new_empty(b, h, slots, value_states.shape[-1])

    def get_mask_sizes(self, query_length) -> tuple[int, int]:
        if isinstance(query_length, torch.Tensor):  # older transformers passed cache_position
            query_length = query_length.shape[0]
        return self.length + query_length, 0

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return -1

    def get_max_cache_shape(self) -> int:  # name used by transformers < 5.16
        return -1

    def reset(self) -> None:
        self.keys = self.values = self._kbuf = self._vbuf = None
        self.is_initialized = False
        self.length = self.stored = 0

    def offload(self):  # the packed store stays where it is; offloading is not supported
        return None

    def prefetch(self):
        return None

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("a quantized KV cache cannot be cropped; use the fp16 cache for assisted decoding")

    def _select_batch(self, index: torch.Tensor) -> None:
        if not self.is_initialized:
            return
        index = index.to(self.keys.device)
        w = self.keys.shape[-2]
        if self._kbuf is None:
            self.keys, self.values = self.keys.index_select(0, index), self.values.index_select(0, index)
        else:
            self._kbuf, self._vbuf = self._kbuf.index_select(0, index), self._vbuf.index_select(0, index)
            self._set_window(w)
        if self.stored:
            self._select_store(index)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._select_batch(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._select_batch(torch.as_tensor(indices).flatten())

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            b = self.keys.shape[0]
            self._select_batch(torch.arange(b, device=self.keys.device).repeat_interleave(repeats))

    def tensors(self) -> Iterator[torch.Tensor]:
        """Every tensor this layer holds (for memory accounting)."""
        if self.is_initialized:
            yield self.keys if self._kbuf is None else self._kbuf
            yield self.values if self._vbuf is None else self._vbuf
            yield from self.stored_tensors()


class QuantizedKVCache(Cache):
    """Base of casp's quantized caches: a Cache of WindowedQuantLayer objects with memory accounting."""

    def tensors(self) -> Iterator[torch.Tensor]:
        for layer in self.layers:
            yield from layer.tensors()

    def memory_bytes(self) -> int:
        """Bytes of every tensor the cache holds: packed codes, fp16 scales/zeros, fp16 window and kept
        tokens, class maps and masks (each distinct tensor once)."""
        return unique_nbytes(self.tensors())

    def dense_bytes(self) -> int:
        """Bytes the same tokens would take in a plain (DynamicCache) cache of the model's dtype."""
        total = 0
        for layer in self.layers:
            if layer.is_initialized:
                b, h, _, d = layer.keys.shape
                total += 2 * b * h * layer.get_seq_length() * d * layer.keys.element_size()
        return total


def text_shape(model: nn.Module, adapter) -> tuple[int, int]:
    """(num decoder layers, head dim) of the language model."""
    layers = adapter.decoder_layers(model)
    return len(layers), adapter.attention(layers[0]).head_dim
