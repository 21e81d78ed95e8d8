"""casp: extreme compression of large multimodal models.

CASP weight compression (whitened low-rank Q/K + optimal bit allocation on any quantizer) and the
AKVQ-VL 2-bit KV cache, with calibration, packed checkpoints, kernels and evaluation.
"""

__version__ = "0.1.0"
