"""The Triton kernels against the reference, on CPU through Triton's interpreter.

TRITON_INTERPRET=1 must be set before *triton itself* is first imported (its standard
library, e.g. ``tl.max``, is made of ``@triton.jit`` functions too) and it would leak into
every other test of the session, so ``test_cases_under_interpreter`` re-runs this file
in a subprocess with the variable set; there, and on a CUDA machine, the case tests
run, elsewhere they skip. The interpreter runs fp32 only and is slow, so shapes stay
small; block sizes of 16 make them span several row and column tiles with ragged edges.
The slow-marked test compiles the real kernels for sm_90 without a GPU.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from cobra_kernels import cosine_contrastive_loss
from cobra_kernels.reference import cosine_contrastive_loss_reference

from .helpers import loss_and_grads, make_batch, per_row_loss_and_grads

INTERPRETER = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cpu" if INTERPRETER or not torch.cuda.is_available() else "cuda"
needs_triton_runtime = pytest.mark.skipif(
    not (INTERPRETER or torch.cuda.is_available()),
    reason="runs under TRITON_INTERPRET=1 (see test_cases_under_interpreter) or on CUDA",
)


@pytest.fixture(scope="module")
def triton_contrastive():
    pytest.importorskip("triton")
    from cobra_kernels import triton_contrastive

    assert triton_contrastive.INTERPRETED == INTERPRETER
    return triton_contrastive


def _on_device(batch):
    """make_batch's leaves moved to DEVICE (still leaves that require grad)."""
    moved = []
    for t in batch:
        if t is None:
            moved.append(None)
        elif t.requires_grad:
            moved.append(t.detach().to(DEVICE).requires_grad_())
        else:
            moved.append(t.to(DEVICE))
    return tuple(moved)


@pytest.mark.skipif(INTERPRETER, reason="this is the subprocess")
def test_cases_under_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    out = subprocess.run(
        [sys.executable, "-m", "pytest", __file__, "-q", "-m", "not slow", "-p", "no:cacheprovider"],
        env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout[-5000:] + out.stderr[-2000:]
    assert f"{len(CASES) + 3} passed" in out.stdout, out.stdout[-2000:]

# (B, N, d, num_items, block_m, block_n, atol, rtol)
CASES = [
    (37, 53, 24, None, 16, 16, 1e-5, 1e-5),  # odd: partial row, column and feature tiles
    (37, 53, 24, 7, 16, 16, 1e-5, 1e-5),  # mask + duplicated items
    (16, 16, 16, None, 16, 16, 1e-5, 1e-5),  # exact tiles
    (5, 70, 8, 2, 16, 32, 1e-5, 1e-5),  # almost every column masked
    (1, 1, 1, None, 16, 16, 1e-5, 1e-5),  # degenerate
    (33, 20, 40, 5, 32, 16, 1e-5, 1e-5),  # B > N, d not a power of two
]


@needs_triton_runtime
@pytest.mark.parametrize("batch_size, num_keys, dim, num_items, block_m, block_n, atol, rtol", CASES)
def test_triton_matches_reference(triton_contrastive, batch_size, num_keys, dim, num_items, block_m, block_n,
                                  atol, rtol):
    batch = _on_device(make_batch(batch_size, num_keys, dim, num_items=num_items, seed=batch_size))
    expected = loss_and_grads(cosine_contrastive_loss_reference, *batch)
    actual = loss_and_grads(
        triton_contrastive.cosine_contrastive_loss_triton, *batch, block_m=block_m, block_n=block_n
    )
    for name, a, e in zip(("loss", "grad_queries", "grad_keys", "grad_temperature"), actual, expected):
        torch.testing.assert_close(a, e, atol=atol, rtol=rtol, msg=lambda m: f"{name}: {m}")


@needs_triton_runtime
def test_triton_through_dispatcher_default_blocks(triton_contrastive):
    batch = _on_device(make_batch(20, 70, 12, num_items=9))
    expected = loss_and_grads(cosine_contrastive_loss_reference, *batch)
    actual = loss_and_grads(cosine_contrastive_loss, *batch, impl="triton")
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, atol=1e-5, rtol=1e-5)


@needs_triton_runtime
def test_triton_only_queries_need_grad(triton_contrastive):
    queries, keys, positives, _, query_ids, key_ids = _on_device(make_batch(18, 21, 8, num_items=6))
    keys = keys.detach()
    loss = triton_contrastive.cosine_contrastive_loss_triton(queries, keys, positives, 0.05, query_ids, key_ids,
                                                             block_m=16, block_n=16)
    expected = cosine_contrastive_loss_reference(queries, keys, positives, 0.05, query_ids, key_ids)
    torch.testing.assert_close(loss, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.autograd.grad(loss, queries)[0], torch.autograd.grad(expected, queries)[0],
                               atol=1e-5, rtol=1e-5)


@needs_triton_runtime
def test_triton_per_row_losses(triton_contrastive):
    """reduction="none": per-row losses, and the backward's per-row weights in both gradient kernels."""
    batch = _on_device(make_batch(37, 53, 24, num_items=7, seed=5))
    expected = per_row_loss_and_grads(cosine_contrastive_loss_reference, *batch)
    actual = per_row_loss_and_grads(triton_contrastive.cosine_contrastive_loss_triton, *batch, block_m=16, block_n=16)
    for name, a, e in zip(("losses", "grad_queries", "grad_keys", "grad_temperature"), actual, expected):
        torch.testing.assert_close(a, e, atol=1e-5, rtol=1e-5, msg=lambda m: f"{name}: {m}")


@pytest.mark.slow
def test_kernels_compile_for_sm90_without_gpu(tmp_path):
    """What the interpreter does not check: the real compiler (Triton -> PTX -> cubin via
    the ptxas bundled with triton): bf16 at d=256 with the mask, fp32 ("ieee") at d=64
    without. fp32 at d=256 (~20 s more) compiled too when written: <= 107 KiB shared."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")
    code = (
        "from cobra_kernels.triton_contrastive import compile_ahead_of_time as c\n"
        "for dim, dtype, mask in [(256, 'bf16', True), (64, 'fp32', False)]:\n"
        "    shared = c(dim, dtype, mask)\n"
        "    assert max(shared.values()) <= 160 * 1024, shared\n"
        "    print(dim, dtype, shared)\n"
    )
    out = subprocess.run([sys.executable, "-W", "ignore", "-c", code], env=env, capture_output=True, text=True,
                         timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]


# (B, N, d, num_items, dtype, relative tolerance of max |expected|): CUDA only, the
# interpreter has no bf16. 16-bit operands feed tl.dot, so the error is bf16 rounding.
CUDA_CASES = [
    (1000, 1531, 64, None, torch.bfloat16, 2e-2),
    (777, 777, 256, 100, torch.bfloat16, 2e-2),
    (513, 1025, 128, 50, torch.float32, 1e-5),
]


@pytest.mark.skipif(not torch.cuda.is_available() or INTERPRETER, reason="needs CUDA")
@pytest.mark.parametrize("batch_size, num_keys, dim, num_items, dtype, rel_tol", CUDA_CASES)
def test_triton_cuda_dtypes(triton_contrastive, batch_size, num_keys, dim, num_items, dtype, rel_tol):
    batch = _on_device(make_batch(batch_size, num_keys, dim, num_items=num_items, dtype=dtype))
    expected = loss_and_grads(cosine_contrastive_loss_reference, *batch)
    actual = loss_and_grads(triton_contrastive.cosine_contrastive_loss_triton, *batch)
    for a, e in zip(actual, expected):
        scale = e.float().abs().max().item()
        torch.testing.assert_close(a.float(), e.float(), atol=rel_tol * scale, rtol=rel_tol)
