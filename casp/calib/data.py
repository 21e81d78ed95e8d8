"""Calibration data: image+text conversations (LLaVA JSONL + image folder) or plain text.

JSONL rows look like ``{"image": "rel/path.jpg", "conversations": [{"from": "human", "value":
"<image>\\n..."}, {"from": "gpt", "value": "..."}]}``; image paths are relative to the JSONL's folder
(or to ``image_root``). Bad rows are reported with file:line and skipped; no usable row is an error.
A ``.txt`` file is split into paragraphs, each a text-only sample.
"""

from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path

from PIL import Image

from casp.errors import CalibrationDataError


@dataclasses.dataclass
class CalibSample:
    prompt: str
    answer: str | None = None
    image: Image.Image | None = None
    source: str = ""  # file:line, for messages


@dataclasses.dataclass
class CalibData:
    samples: list[CalibSample]
    skipped: list[str]  # one "file:line: reason" per bad row


def load_calibration(
    path: str | Path,
    num_samples: int = 128,
    seed: int = 0,
    image_root: str | Path | None = None,
    text_only: bool = False,
) -> CalibData:
    """Read up to ``num_samples`` samples (a seeded random subset) from a JSONL or a text file."""
    path = Path(path)
    if not path.is_file():
        raise CalibrationDataError(f"calibration file {str(path)!r} does not exist; pass a .jsonl or .txt file")
    if num_samples < 1:
        raise CalibrationDataError(f"--samples must be at least 1, got {num_samples}")
    if path.suffix == ".jsonl":
        samples, skipped = _read_jsonl(path, Path(image_root) if image_root else path.parent, text_only)
    else:
        samples, skipped = _read_text(path), []
    if not samples:
        reason = f" ({len(skipped)} bad rows, first: {skipped[0]})" if skipped else " (the file is empty)"
        raise CalibrationDataError(f"no usable calibration sample in {path}{reason}")
    random.Random(seed).shuffle(samples)
    return CalibData(samples[:num_samples], skipped)


def _read_jsonl(path: Path, image_root: Path, text_only: bool) -> tuple[list[CalibSample], list[str]]:
    samples, skipped = [], []
    for lineno, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            skipped.append(f"{where}: not valid JSON ({err.msg})")
            continue
        turns = row.get("conversations") or []
        human = next((t.get("value", "") for t in turns if t.get("from") == "human"), "")
        answer = next((t.get("value", "") for t in turns if t.get("from") == "gpt"), None)
        prompt = human.replace("<image>", "").strip()
        if not prompt:
            skipped.append(f"{where}: empty human turn")
            continue
        image = None
        if row.get("image") and not text_only:
            image_path = image_root / row["image"]
            if not image_path.is_file():
                skipped.append(f"{where}: image {str(image_path)!r} not found")
                continue
            image = _open_image(image_path)
            if image is None:
                skipped.append(f"{where}: image {str(image_path)!r} is not a readable image")
                continue
        samples.append(CalibSample(prompt=prompt, answer=answer or None, image=image, source=where))
    return samples, skipped


def _open_image(path: Path) -> Image.Image | None:
    # PIL signals unreadable files only by raising; keep that at this one boundary.
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except OSError:
        return None


def _read_text(path: Path) -> list[CalibSample]:
    paragraphs = [p.strip() for p in path.read_text(errors="replace").split("\n\n")]
    return [CalibSample(prompt=p, source=f"{path}") for p in paragraphs if p]
