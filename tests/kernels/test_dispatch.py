"""The dispatcher: impl resolution, logging once, errors."""

from __future__ import annotations

import logging
import os

import pytest
import torch

import cobra_kernels
from cobra_kernels import ContrastiveImpl, cosine_contrastive_loss, resolve_impl
from cobra_kernels.reference import cosine_contrastive_loss_reference

from .helpers import make_batch


@pytest.mark.parametrize(
    "impl, device, expected",
    [
        ("auto", "cpu", "tiled"),
        (ContrastiveImpl.AUTO, torch.device("cpu"), "tiled"),
        ("reference", "cpu", "reference"),
        ("TILED", "cuda", "tiled"),
        (ContrastiveImpl.TRITON, "cpu", "triton"),
        ("auto", "cuda", "triton"),
    ],
)
def test_resolve_impl(impl, device, expected):
    assert resolve_impl(impl, device) == expected


def test_unknown_impl_is_rejected():
    with pytest.raises(ValueError):
        resolve_impl("flash", "cpu")


@pytest.mark.parametrize("impl", ["auto", "reference", "tiled", ContrastiveImpl.TILED])
def test_every_cpu_impl_agrees_with_reference(impl):
    batch = make_batch(13, 17, 9, num_items=5)
    torch.testing.assert_close(cosine_contrastive_loss(*batch, impl=impl), cosine_contrastive_loss_reference(*batch))


def test_choice_is_logged_once(caplog, monkeypatch):
    monkeypatch.setattr(cobra_kernels, "_logged", set())
    batch = make_batch(4, 5, 3)
    with caplog.at_level(logging.INFO, logger="cobra_kernels"):
        for _ in range(3):
            cosine_contrastive_loss(*batch)
    messages = [r.getMessage() for r in caplog.records if r.name == "cobra_kernels"]
    assert messages == ["cosine_contrastive_loss: impl=tiled (requested auto) on cpu"]


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="the interpreter runs CPU tensors")
def test_triton_on_cpu_tensors_needs_the_interpreter():
    pytest.importorskip("triton")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        cosine_contrastive_loss(*make_batch(4, 5, 3), impl="triton")
