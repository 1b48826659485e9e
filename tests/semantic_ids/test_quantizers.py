"""Residual quantisers: RQ maths, k-means init, dead-code re-seeding, determinism, diagnostics."""

import numpy as np
import pytest
import torch

from cobra_scale.errors import DataError
from cobra_scale.semantic_ids.assign import fit_quantizer
from cobra_scale.semantic_ids.configs import QuantizerConfig
from cobra_scale.semantic_ids.diagnostics import diagnose, pack_codes
from cobra_scale.semantic_ids.rkmeans import ResidualKMeans, capped_assign
from cobra_scale.semantic_ids.rqvae import RQVAE, ResidualQuantizer, _reseed_dead_codes, fit_rqvae, kmeans


def clustered(n=600, d=16, centers=12, seed=0):
    rng = np.random.default_rng(seed)
    c = rng.normal(size=(centers, d)).astype(np.float32)
    x = c[rng.integers(centers, size=n)] + 0.15 * rng.normal(size=(n, d)).astype(np.float32)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_residuals_shrink_level_by_level():
    x = torch.from_numpy(clustered())
    rq = ResidualQuantizer(levels=3, codes=8, dim=x.shape[1])
    rq.init_kmeans(x, iters=20, generator=torch.Generator().manual_seed(0))
    _, codes, _, residuals = rq(x)
    norms = [r.pow(2).sum(1).mean().item() for r in residuals]
    final = (x - rq.lookup(codes)).pow(2).sum(1).mean().item()
    assert norms[0] > norms[1] > norms[2] > final
    # lookup of the codes is exactly z minus the last residual
    torch.testing.assert_close(rq.lookup(codes), x - (residuals[-1] - rq.codebooks[2][codes[:, 2]]), atol=1e-5, rtol=1e-5)


def test_kmeans_finds_separated_clusters():
    gen = torch.Generator().manual_seed(0)
    centers = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    x = centers.repeat_interleave(50, 0) + 0.1 * torch.randn(150, 2, generator=gen)
    c = kmeans(x, 3, iters=10, generator=gen)
    dist = torch.cdist(centers, c).min(1).values
    assert (dist < 0.2).all()


def test_dead_codes_are_reseeded_from_residuals():
    rq = ResidualQuantizer(levels=2, codes=4, dim=3)
    usage = torch.tensor([[5.0, 0.0, 3.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    residuals = [torch.full((10, 3), 7.0), torch.zeros(10, 3)]
    before = rq.codebooks.detach().clone()
    n = _reseed_dead_codes(rq, usage, residuals, torch.Generator().manual_seed(0))
    assert n == 2
    after = rq.codebooks.detach()
    torch.testing.assert_close(after[0, [1, 3]], torch.full((2, 3), 7.0), atol=1e-2, rtol=0)
    torch.testing.assert_close(after[0, [0, 2]], before[0, [0, 2]])
    torch.testing.assert_close(after[1], before[1])


def test_fit_rqvae_uses_codes_and_reconstructs_within_reported_error():
    x = clustered(n=800)
    model, report = fit_rqvae(x, levels=2, codes=8, latent_dim=8, hidden_dims=[32], epochs=30, batch_size=200, seed=1, progress=False)
    assert report.steps == 30 * 4
    quantizer_codes = model.encode_codes(torch.from_numpy(x))
    recon = model.decode_codes(quantizer_codes).numpy()
    diag = diagnose(quantizer_codes.numpy(), 8, x, recon)
    assert all(lv["codes_used"] >= 6 for lv in diag["per_level"])
    # decoding the codes reconstructs within the reported error, and much better than the mean vector
    rel = float(((x - recon) ** 2).sum() / (x**2).sum())
    assert rel == pytest.approx(diag["reconstruction"]["relative_error"], abs=1e-4)
    baseline = ((x - x.mean(0)) ** 2).sum() / (x**2).sum()
    assert rel < 0.75 * baseline


def test_rqvae_is_deterministic_under_a_seed():
    x = clustered(n=300)
    a, _ = fit_rqvae(x, 2, 4, 4, [16], epochs=3, batch_size=100, seed=3, progress=False)
    b, _ = fit_rqvae(x, 2, 4, 4, [16], epochs=3, batch_size=100, seed=3, progress=False)
    c, _ = fit_rqvae(x, 2, 4, 4, [16], epochs=3, batch_size=100, seed=4, progress=False)
    xt = torch.from_numpy(x)
    assert torch.equal(a.encode_codes(xt), b.encode_codes(xt))
    assert not all(torch.equal(p, q) for p, q in zip(a.parameters(), c.parameters()))


def test_rkmeans_residuals_shrink_and_balance_caps_buckets():
    x = clustered(n=1000, centers=3)  # 3 natural clusters, 8 codes: uncapped codes are lopsided
    rk = ResidualKMeans(levels=2, codes=8, iters=20, seed=0, balance=True)
    codes = rk.fit_encode(x)
    err1 = ((x - rk.centroids[0][codes[:, 0]]) ** 2).sum()
    err2 = ((x - rk.decode(codes)) ** 2).sum()
    assert err2 < err1 < (x**2).sum()
    balanced = np.bincount(codes[:, 0], minlength=8)
    plain = np.bincount(ResidualKMeans(levels=2, codes=8, iters=20, seed=0, balance=False).fit_encode(x)[:, 0], minlength=8)
    assert (balanced > 0).all()
    assert balanced.max() <= plain.max()
    assert np.array_equal(codes, rk.encode(x))  # training items are encoded like new items
    again = ResidualKMeans(levels=2, codes=8, iters=20, seed=0, balance=True).fit_encode(x)
    assert np.array_equal(codes, again)


def test_capped_assign_respects_cap():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(100, 2)).astype(np.float32)
    centroids = np.array([[0, 0], [50, 50]], dtype=np.float32)  # everyone is nearest to centroid 0
    assign = capped_assign(x, centroids, slack=1.0)
    assert np.bincount(assign).tolist() == [50, 50]


def test_pack_codes_and_diagnose():
    codes = np.array([[0, 1], [0, 1], [1, 0], [3, 3]])
    assert pack_codes(codes, 4).tolist() == [1, 1, 4, 15]
    d = diagnose(codes, 4)
    assert d["distinct_ids"] == 3 and d["items_per_id"]["max"] == 2 and d["items_sharing_an_id"] == 2
    assert d["per_level"][0]["codes_used"] == 3 and d["singleton_ids"] == 2


@pytest.mark.parametrize("kind", ["rqvae", "rkmeans"])
def test_fit_quantizer_rejects_nan_and_too_few_items(kind):
    x = clustered(n=100)
    x[5, 0] = np.nan
    with pytest.raises(DataError, match="NaN"):
        fit_quantizer(x, QuantizerConfig(kind=kind, levels=2, codes=4))
    with pytest.raises(DataError, match="cannot fill"):
        fit_quantizer(clustered(n=3), QuantizerConfig(kind=kind, levels=2, codes=4))


def test_rqvae_state_round_trip():
    m = RQVAE(16, [8], 4, 2, 4)
    n = RQVAE(16, [8], 4, 2, 4)
    n.load_state_dict(m.state_dict())
    x = torch.from_numpy(clustered(n=10))
    assert torch.equal(m.encode_codes(x), n.encode_codes(x))
