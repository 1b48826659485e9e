"""The tiled PyTorch path against the reference: loss and every gradient."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cobra_kernels import cosine_contrastive_loss
from cobra_kernels.reference import cosine_contrastive_loss_reference
from cobra_kernels.tiled_contrastive import TiledCosineContrastiveLoss, auto_chunk_size, cosine_contrastive_loss_tiled

from .helpers import loss_and_grads, make_batch, per_row_loss_and_grads


def assert_matches_reference(batch, atol, rtol, **kwargs):
    expected = loss_and_grads(cosine_contrastive_loss_reference, *batch)
    actual = loss_and_grads(cosine_contrastive_loss_tiled, *batch, **kwargs)
    for name, a, e in zip(("loss", "grad_queries", "grad_keys", "grad_temperature"), actual, expected):
        assert a.dtype == e.dtype or name == "loss", name
        torch.testing.assert_close(a.float(), e.float(), atol=atol, rtol=rtol, msg=lambda m: f"{name}: {m}")


# (B, N, d, num_items, chunk_size, dtype, atol, rtol). num_items: None = no mask; small =
# items repeat in the batch, so the mask removes same-item false negatives.
CASES = [
    (37, 53, 24, None, 8, torch.float32, 1e-5, 1e-4),  # odd shapes, several partial chunks
    (37, 53, 24, 7, 5, torch.float32, 1e-5, 1e-4),  # mask, heavy item duplication
    (37, 53, 24, 7, None, torch.float32, 1e-5, 1e-4),  # automatic chunk: one block
    (1, 1, 3, 1, None, torch.float32, 1e-5, 1e-4),  # a single row and key
    (5, 300, 7, 3, 2, torch.float32, 1e-5, 1e-4),  # wide: N >> B
    (129, 17, 33, None, 64, torch.float32, 1e-5, 1e-4),  # tall: B >> N, positives repeat
    (64, 64, 16, 64, 16, torch.float64, 1e-10, 1e-8),  # fp64 computes in fp64 (gradcheck)
    (31, 45, 40, 9, 8, torch.bfloat16, 1e-2, 5e-2),  # bf16 inputs, fp32 compute
]


@pytest.mark.parametrize("batch_size, num_keys, dim, num_items, chunk_size, dtype, atol, rtol", CASES)
def test_tiled_matches_reference(batch_size, num_keys, dim, num_items, chunk_size, dtype, atol, rtol):
    batch = make_batch(batch_size, num_keys, dim, num_items=num_items, dtype=dtype)
    if dtype == torch.float64:
        # The reference casts to fp32 (``.float()``); hold fp64 to an fp64 copy of it.
        expected = _reference_fp64(*batch)
        actual = loss_and_grads(cosine_contrastive_loss_tiled, *batch, chunk_size=chunk_size)
        for a, e in zip(actual, expected):
            torch.testing.assert_close(a, e, atol=atol, rtol=rtol)
        return
    assert_matches_reference(batch, atol, rtol, chunk_size=chunk_size)


def _reference_fp64(queries, keys, positives, temperature, query_ids, key_ids):
    """The reference's maths in float64 (it casts its inputs to float32 itself)."""
    q = torch.nn.functional.normalize(queries, dim=-1)
    k = torch.nn.functional.normalize(keys, dim=-1)
    logits = q @ k.T / temperature
    if query_ids is not None:
        same = query_ids[:, None] == key_ids[None, :]
        same[torch.arange(len(positives)), positives] = False
        logits = logits.masked_fill(same, float("-inf"))
    loss = torch.nn.functional.cross_entropy(logits, positives)
    return (loss, *torch.autograd.grad(loss, [queries, keys, temperature]))


@settings(max_examples=20, deadline=None, derandomize=True)  # reproducible in CI; see kernels/README.md on dim=1 rounding
@given(
    batch_size=st.integers(1, 40),
    num_keys=st.integers(1, 40),
    dim=st.integers(1, 33),
    chunk_size=st.integers(1, 50),
    num_items=st.one_of(st.none(), st.integers(1, 12)),
    seed=st.integers(0, 2**16),
)
def test_tiled_matches_reference_random_shapes(batch_size, num_keys, dim, chunk_size, num_items, seed):
    batch = make_batch(batch_size, num_keys, dim, num_items=num_items, seed=seed)
    assert_matches_reference(batch, atol=1e-5, rtol=1e-4, chunk_size=chunk_size)


def test_gradcheck_float64():
    queries, keys, positives, temperature, query_ids, key_ids = make_batch(
        6, 9, 5, num_items=4, dtype=torch.float64, temperature=0.5
    )

    def fn(q, k, t):
        return TiledCosineContrastiveLoss.apply(q, k, positives, t, query_ids, key_ids, 4, "mean")

    assert torch.autograd.gradcheck(fn, (queries, keys, temperature))


def test_gradcheck_float64_no_mask_one_row_chunks():
    queries, keys, positives, temperature, _, _ = make_batch(5, 4, 3, dtype=torch.float64, temperature=0.3)

    def fn(q, k, t):
        return TiledCosineContrastiveLoss.apply(q, k, positives, t, None, None, 1, "mean")

    assert torch.autograd.gradcheck(fn, (queries, keys, temperature))


def test_temperature_gradient_matches_finite_difference():
    queries, keys, positives, temperature, query_ids, key_ids = make_batch(
        20, 30, 8, num_items=10, dtype=torch.float64, temperature=0.2
    )
    loss = cosine_contrastive_loss_tiled(queries, keys, positives, temperature, query_ids, key_ids, chunk_size=7)
    (grad_t,) = torch.autograd.grad(loss, [temperature])
    eps = 1e-6
    with torch.no_grad():
        up = cosine_contrastive_loss_tiled(queries, keys, positives, temperature + eps, query_ids, key_ids)
        down = cosine_contrastive_loss_tiled(queries, keys, positives, temperature - eps, query_ids, key_ids)
    torch.testing.assert_close(grad_t, (up - down) / (2 * eps), atol=1e-7, rtol=1e-6)
    assert grad_t.shape == ()


def test_float_temperature_and_partial_requires_grad():
    queries, keys, positives, _, _, _ = make_batch(11, 13, 6)
    keys = keys.detach()  # e.g. a frozen item table
    loss = cosine_contrastive_loss_tiled(queries, keys, positives, 0.07, chunk_size=4)
    expected = cosine_contrastive_loss_reference(queries, keys, positives, 0.07)
    torch.testing.assert_close(loss, expected)
    (grad,) = torch.autograd.grad(loss, [queries])
    (expected_grad,) = torch.autograd.grad(expected, [queries])
    torch.testing.assert_close(grad, expected_grad, atol=1e-6, rtol=1e-5)


def test_zero_and_scaled_rows_follow_f_normalize():
    queries, keys, positives, temperature, _, _ = make_batch(6, 6, 4)
    with torch.no_grad():
        queries[2] = 0.0  # norm clamped to eps: F.normalize's other branch
        keys[1] *= 1e3
    assert_matches_reference((queries, keys, positives, temperature, None, None), 1e-5, 1e-4, chunk_size=4)


def test_upstream_gradient_is_applied():
    batch = make_batch(9, 12, 5, num_items=4)
    loss = cosine_contrastive_loss_tiled(*batch, chunk_size=4)
    grads = torch.autograd.grad(3.0 * loss, [batch[0], batch[1], batch[3]])
    loss_ref = cosine_contrastive_loss_reference(*batch)
    grads_ref = torch.autograd.grad(3.0 * loss_ref, [batch[0], batch[1], batch[3]])
    for a, e in zip(grads, grads_ref):
        torch.testing.assert_close(a, e, atol=1e-5, rtol=1e-4)


def test_no_batch_by_keys_tensor_is_saved():
    """The memory contract: what autograd keeps between forward and backward is O((B+N) d)."""
    batch_size, num_keys, dim = 96, 80, 4
    batch = make_batch(batch_size, num_keys, dim, num_items=20)
    saved_sizes = []

    def pack(tensor):
        saved_sizes.append(tensor.numel())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        cosine_contrastive_loss_tiled(*batch, chunk_size=16)
    assert saved_sizes and max(saved_sizes) <= max(batch_size, num_keys) * dim

    saved_sizes.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        cosine_contrastive_loss_reference(*batch)
    assert max(saved_sizes) >= batch_size * num_keys  # the reference keeps the full matrix


def test_auto_chunk_size():
    assert auto_chunk_size(16384, 16384) == 1024
    assert auto_chunk_size(100, 16384) == 100
    assert auto_chunk_size(10**6, 2**20) == 32  # never fewer rows than MIN_AUTO_CHUNK
    assert auto_chunk_size(10**6, 1000) == 16777
    assert auto_chunk_size(5, 0) == 5


def test_dispatcher_tiled_forwards_chunk_size():
    batch = make_batch(10, 12, 6, num_items=5)
    torch.testing.assert_close(
        cosine_contrastive_loss(*batch, impl="tiled", chunk_size=3),
        cosine_contrastive_loss_reference(*batch),
    )


@pytest.mark.parametrize("num_items, chunk_size", [(None, 8), (7, 5), (7, None)])
def test_tiled_per_row_losses_match_reference(num_items, chunk_size):
    """reduction="none": the per-row losses and a per-row-weighted backward (the dense repeat bias builds on them)."""
    batch = make_batch(37, 53, 24, num_items=num_items, seed=3)
    expected = per_row_loss_and_grads(cosine_contrastive_loss_reference, *batch)
    actual = per_row_loss_and_grads(cosine_contrastive_loss_tiled, *batch, chunk_size=chunk_size)
    for name, a, e in zip(("losses", "grad_queries", "grad_keys", "grad_temperature"), actual, expected):
        torch.testing.assert_close(a, e, atol=1e-5, rtol=1e-4, msg=lambda m: f"{name}: {m}")
    mean = cosine_contrastive_loss_tiled(*batch, chunk_size=chunk_size)
    torch.testing.assert_close(actual[0].mean(), mean)


def test_tiled_per_row_gradcheck():
    queries, keys, positives, temp, qids, kids = make_batch(9, 13, 5, num_items=4, dtype=torch.float64, seed=1)
    fn = lambda q, k, t: cosine_contrastive_loss_tiled(q, k, positives, t, qids, kids, chunk_size=4, reduction="none")  # noqa: E731
    assert torch.autograd.gradcheck(fn, (queries, keys, temp))


@pytest.mark.parametrize("impl", ["reference", "tiled"])
def test_unknown_reduction_is_refused(impl):
    with pytest.raises(ValueError, match="reduction must be one of"):
        cosine_contrastive_loss(*make_batch(4, 5, 3), impl=impl, reduction="sum")
