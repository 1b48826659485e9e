"""``cobra_kernels`` lives in ``kernels/cobra_kernels/`` so that it never shadows Hugging
Face's ``kernels`` package, which ``transformers`` probes for (``is_kernels_available``)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]


def test_cobra_kernels_imports_from_any_directory(tmp_path):
    code = (
        "import importlib.util, cobra_kernels\n"
        "print(cobra_kernels.__file__)\n"
        "spec = importlib.util.find_spec('kernels')\n"
        "print(spec.origin if spec else None)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True)
    cobra_file, kernels_origin = out.stdout.split()
    assert Path(cobra_file) == ROOT / "kernels" / "cobra_kernels" / "__init__.py"
    # From outside the checkout, `kernels` is either absent or a real (HF) package.
    assert kernels_origin == "None" or not kernels_origin.startswith(str(ROOT))


def test_cobra_kernels_is_not_importable_as_kernels():
    """From the repo root (on sys.path under pytest) the folder ``kernels/`` is at most an
    empty namespace package: it has no ``__init__.py`` and exposes nothing of ours."""
    assert not (ROOT / "kernels" / "__init__.py").exists()
    spec = importlib.util.find_spec("kernels")
    if spec is not None and spec.origin is None:  # PEP 420 namespace: our folder
        module = importlib.import_module("kernels")
        assert getattr(module, "__file__", None) is None
        assert not hasattr(module, "cosine_contrastive_loss")
    assert importlib.util.find_spec("kernels.cosine_contrastive_loss") is None


def test_transformers_builds_a_tiny_model_with_cobra_kernels_installed():
    import cobra_kernels  # noqa: F401  (installed and imported first, on purpose)
    import transformers
    from transformers.utils.import_utils import is_kernels_available

    assert not is_kernels_available() or importlib.util.find_spec("kernels").origin is not None
    config = transformers.BertConfig(
        vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=16,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.BertModel(config).eval()
    with torch.no_grad():
        out = model(input_ids=torch.randint(0, 64, (2, 5)), attention_mask=torch.ones(2, 5, dtype=torch.long))
    assert out.last_hidden_state.shape == (2, 5, 16)
    assert torch.isfinite(out.last_hidden_state).all()
