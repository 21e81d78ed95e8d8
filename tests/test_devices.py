"""Device parsing and the multi-device job map used by the sensitivity pass (exercised with CPU workers)."""

import threading

import pytest
import torch

from casp.compress import compress
from casp.config import CompressionConfig
from casp.devices import map_on_devices, resolve_devices
from tests.fixtures import make_tiny, write_calibration


def test_resolve_devices():
    assert resolve_devices("cpu") == [torch.device("cpu")]
    assert resolve_devices("cpu, cpu") == [torch.device("cpu")] * 2
    assert resolve_devices(["cpu"]) == [torch.device("cpu")]
    with pytest.raises(ValueError, match="cpu or cuda"):
        resolve_devices("meta")
    with pytest.raises(ValueError, match="not a device name"):
        resolve_devices("gpu0")
    with pytest.raises(ValueError, match="comma-separated"):
        resolve_devices("cpu,")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_requested_without_cuda_is_a_clear_error():
    with pytest.raises(ValueError, match="CUDA is not available"):
        resolve_devices("cuda:1")


def test_map_on_devices_keeps_order_and_uses_every_worker():
    seen = set()

    def fn(x, device):
        seen.add(threading.get_ident())
        torch.randn(64, 64) @ torch.randn(64, 64)  # a little work so that both workers get items
        return (x * x, device.type)

    items = list(range(40))
    out = map_on_devices(fn, items, [torch.device("cpu")] * 2)
    assert out == [(x * x, "cpu") for x in items]
    assert map_on_devices(fn, [], [torch.device("cpu")] * 2) == []


def test_map_on_devices_reraises_a_worker_error():
    def fn(x, device):
        if x == 7:
            raise ValueError("bad item 7")
        return x

    with pytest.raises(ValueError, match="bad item 7"):
        map_on_devices(fn, list(range(20)), [torch.device("cpu")] * 3)


def test_compress_on_two_devices_equals_one(tmp_path):
    """The sensitivity jobs spread over two workers give the same allocation and weights as one device."""
    model_dir = make_tiny("llama", tmp_path / "m", num_layers=2, hidden=128)
    calib = write_calibration(tmp_path / "calib", n=2)
    cfg = CompressionConfig(method="casp", quantizer="gptq", bits=2.5, alloc="optimal", samples=2)
    one = compress(model_dir, tmp_path / "one", cfg, calib=calib, device="cpu")
    two = compress(model_dir, tmp_path / "two", cfg, calib=calib, device="cpu,cpu")
    assert one.report["allocation"] == two.report["allocation"]
    assert [r["config"] for r in one.report["layers"]] == [r["config"] for r in two.report["layers"]]
    a, b = one.model.state_dict(), two.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
