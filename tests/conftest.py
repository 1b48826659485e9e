"""Test-wide settings: loopback-only Ray, offline model files, caches under the repo."""

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))


def _find_beauty() -> Path:
    """The shared Amazon Beauty folder: $COBRA_BEAUTY_DIR, else ../shared next to the checkout."""
    candidates = [os.environ.get("COBRA_BEAUTY_DIR"), ROOT.parent / "shared" / "datasets" / "amazon-beauty", "/work/shared/datasets/amazon-beauty"]
    for c in candidates:
        if c and (Path(c) / "sequences.txt").is_file():
            return Path(c)
    return ROOT.parent / "shared" / "datasets" / "amazon-beauty"


BEAUTY = _find_beauty()
