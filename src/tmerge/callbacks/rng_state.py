"""Carries the random generators through a checkpoint, so a resumed run draws what it would have."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from typing_extensions import override


class RngState(Callback):
    """Carries the Python, NumPy and torch generators through a checkpoint, so a resumed run
    draws the patches and dropout masks it would have drawn (Lightning saves loops, optimisers
    and callbacks, not the generators). Stored as tensors and ints: loadable with
    ``weights_only=True``.

    State: ``torch`` (the CPU generator, a uint8 tensor), ``numpy_keys`` ``(624,)`` int64 and
    ``numpy_pos`` (NumPy's MT19937), ``python`` (``random.getstate()`` as lists) and, once CUDA
    is initialised, ``cuda`` (one uint8 tensor per device).
    """

    @override
    def state_dict(self) -> dict[str, Any]:
        np_state = np.random.get_state()
        py_version, py_state, py_gauss = random.getstate()
        state: dict[str, Any] = {
            "torch": torch.get_rng_state(),
            "numpy_keys": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
            "numpy_pos": int(np_state[2]),
            "python": [py_version, list(py_state), py_gauss],
        }
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        torch.set_rng_state(state_dict["torch"])
        keys = state_dict["numpy_keys"].numpy().astype(np.uint32)
        np.random.set_state(("MT19937", keys, state_dict["numpy_pos"], 0, 0.0))
        version, py_state, gauss = state_dict["python"]
        random.setstate((version, tuple(py_state), gauss))
        if "cuda" in state_dict and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state_dict["cuda"])
