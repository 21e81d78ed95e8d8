"""Turn calibration samples into model inputs (one sample per batch: no padding inside a block)."""

from __future__ import annotations

from casp.calib.data import CalibSample
from casp.models.base import ModelAdapter


def encode_samples(samples: list[CalibSample], processor, adapter: ModelAdapter, max_length: int = 512) -> list[dict]:
    """Model inputs for each sample; text is cut to ``max_length`` tokens (image tokens are never cut)."""
    encoded = []
    for sample in samples:
        image = sample.image if adapter.is_multimodal else None
        answers = [sample.answer] if sample.answer else None
        if image is None:
            batch = adapter.build_inputs(processor, [sample.prompt], None, answers=answers, max_length=max_length)
        else:
            batch = adapter.build_inputs(processor, [sample.prompt], [image], answers=answers)
        encoded.append(dict(batch))
    return encoded
