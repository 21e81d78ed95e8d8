"""Walsh-Hadamard and Kronecker (Hadamard x Paley/DCT) transforms: exactness and orthogonality."""

import math

import pytest
import torch

from casp.hadamard import dct_matrix, fwht, hadamard_matrix, kron_factor, kron_transform, paley_hadamard


def sylvester(n: int) -> torch.Tensor:
    H = torch.ones(1, 1, dtype=torch.float64)
    while H.shape[0] < n:
        H = torch.cat([torch.cat([H, H], 1), torch.cat([H, -H], 1)], 0)
    return H / math.sqrt(n)


@pytest.mark.parametrize("n", [1, 2, 8, 64])
def test_fwht_matches_dense_sylvester_and_is_involution(n):
    x = torch.randn(5, n, dtype=torch.float64)
    assert torch.allclose(fwht(x), x @ sylvester(n), atol=1e-12)
    assert torch.allclose(fwht(fwht(x)), x, atol=1e-12)
    assert torch.allclose(hadamard_matrix(n, dtype=torch.float64), sylvester(n), atol=1e-12)


def test_fwht_rejects_non_power_of_two():
    with pytest.raises(ValueError, match="power-of-two"):
        fwht(torch.randn(3, 12))


def test_paley_orders_are_hadamard():
    found = [m for m in range(1, 120) if paley_hadamard(m) is not None]
    assert {12, 20, 28, 36, 44, 60, 108} <= set(found)
    for m in found:
        H = paley_hadamard(m)
        assert set(H.unique().tolist()) <= {-1.0, 1.0}
        assert torch.equal(H @ H.T, m * torch.eye(m, dtype=H.dtype)), m


def test_dct_is_orthonormal():
    C = dct_matrix(43)
    assert torch.allclose(C @ C.T, torch.eye(43, dtype=C.dtype), atol=1e-12)


@pytest.mark.parametrize(
    "n, kind",
    [(64, "sylvester"), (12, "paley"), (40, "paley"), (96, "paley"), (576, "paley"), (172, "dct"), (24 * 43, "dct")],
)
def test_kron_transform_is_exactly_orthogonal(n, kind):
    assert kron_factor(n)[0] == kind
    T = kron_transform(torch.eye(n, dtype=torch.float64))  # rows of eye -> T^T
    assert torch.allclose(T @ T.T, torch.eye(n, dtype=torch.float64), atol=1e-12)
    x = torch.randn(3, n, dtype=torch.float64)
    y = kron_transform(x)
    assert torch.allclose(y, x @ T, atol=1e-12)  # x @ T^T of the transform, T^T = the matrix above
    assert torch.allclose(kron_transform(y, transpose=True), x, atol=1e-12)


def test_hadamard_matrix_non_power_of_two_is_pm_one_over_sqrt_n():
    n = 48  # 12 (Paley I) x 4 (Sylvester)
    H = hadamard_matrix(n, dtype=torch.float64)
    assert torch.allclose(H.abs(), torch.full((n, n), 1 / math.sqrt(n), dtype=torch.float64))
    assert torch.allclose(H @ H.T, torch.eye(n, dtype=torch.float64), atol=1e-12)
    with pytest.raises(ValueError, match="kron_transform"):
        hadamard_matrix(172)
