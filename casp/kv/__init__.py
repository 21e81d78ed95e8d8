"""AKVQ-VL 2-bit KV cache (with Walsh-Hadamard rotation and TSA/PSA saliency) and its baselines.

from casp.kv import AKVQCache, AKVQConfig, KVSaliencyProfile
cache = AKVQCache(model, AKVQConfig(bits=2, profile=KVSaliencyProfile.load(model_dir)))
model.generate(**inputs, past_key_values=cache)

On a GPU, ``enable_fused_kv_attention(model)`` before building the cache makes decode steps attend over the
packed 2/4-bit cache in one Triton kernel instead of dequantizing it (``casp generate --kv akvq`` does this).
"""

from casp.kv.attention import enable_fused_kv_attention
from casp.kv.cache import AKVQCache, AKVQConfig, AKVQLayer, ablation_configs
from casp.kv.kivi import KIVICache, KIVIConfig, KIVILayer, UniformKVCache
from casp.kv.methods import KV_METHODS, analyze, load_profile, make_cache
from casp.kv.quantizer import (
    PackedKV,
    dequantize,
    dequantize_per_channel,
    quantize_per_channel,
    quantize_tokens,
)
from casp.kv.rotation import fold_value_rotation, is_value_rotation_folded, rotate, rotate_qk
from casp.kv.saliency import (
    PROFILE_FILE,
    KVSaliencyProfile,
    detect_patterns,
    find_pivot_tokens,
    measure_saliency,
    pivot_mask,
)
from casp.kv.window import QuantizedKVCache

__all__ = [
    "AKVQCache",
    "AKVQConfig",
    "AKVQLayer",
    "KIVICache",
    "KIVIConfig",
    "KIVILayer",
    "KV_METHODS",
    "KVSaliencyProfile",
    "PROFILE_FILE",
    "PackedKV",
    "QuantizedKVCache",
    "UniformKVCache",
    "ablation_configs",
    "analyze",
    "dequantize",
    "dequantize_per_channel",
    "enable_fused_kv_attention",
    "detect_patterns",
    "find_pivot_tokens",
    "fold_value_rotation",
    "is_value_rotation_folded",
    "load_profile",
    "make_cache",
    "measure_saliency",
    "pivot_mask",
    "quantize_per_channel",
    "quantize_tokens",
    "rotate",
    "rotate_qk",
]
