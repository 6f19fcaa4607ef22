"""The on-disk form of a checkpoint: one dict of tensors and plain values, read without running code.

A checkpoint is a ``torch.save`` zip of a dict that holds only tensors and JSON-like values (str,
int, float, bool, None, lists and dicts of them keyed by str or int): the config as a dict, the encoder and
loss weights, the caption encoder's settings, fingerprints, the epoch and the metrics. It is read
with ``torch.load(weights_only=True)``, so loading one never runs code. A checkpoint holding other
pickled Python objects is refused. Older checkpoints held numpy scalars and arrays: the environment
variable ``RETRIEVAL_TRUST_PICKLED_CHECKPOINTS=1`` admits exactly those, still through
``weights_only=True`` (torch's allowlist of globals), so even a trusted file never runs other code.
"""

from __future__ import annotations

import importlib
import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from retrieval.errors import DataError

TRUST_PICKLED_CHECKPOINTS = "RETRIEVAL_TRUST_PICKLED_CHECKPOINTS"
CHECKPOINT_FIELDS = ("config", "encoder", "loss", "caption_encoder", "vectors_fingerprint", "epoch", "metrics")


def plain_value(value: Any, field: str) -> Any:
    """``value`` as what ``torch.load(weights_only=True)`` reads back: tensors, str, int, float, bool, None and
    lists and dicts of them keyed by str or int. numpy arrays become tensors, numpy scalars Python numbers, tuples lists
    and paths strings; anything else is a ``TypeError`` naming ``field``."""
    if value is None:
        return value
    if isinstance(value, np.generic):  # before the plain types: np.float64 is a float subclass that pickles as numpy
        return plain_value(value.item(), field)
    for plain in (bool, int, float, str):  # subclasses (enums, numpy) become the plain type
        if isinstance(value, plain):
            return plain(value)
    if isinstance(value, torch.Tensor):
        return value.detach()
    if isinstance(value, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(value))
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, (list, tuple)):
        return [plain_value(item, f"{field}[{i}]") for i, item in enumerate(value)]
    if isinstance(value, dict):  # int keys too: an optimizer's state is keyed by parameter number
        if not all(isinstance(key, (str, int)) and not isinstance(key, bool) for key in value):
            raise TypeError(f"checkpoint field {field} has a key that is neither a string nor an integer")
        return {key: plain_value(item, f"{field}.{key}") for key, item in value.items()}
    raise TypeError(f"checkpoint field {field} holds a {type(value).__name__}; a checkpoint stores only tensors "
                    "and str, int, float, bool, None, lists and dicts of them")


def tensor_state(state: dict, field: str) -> dict:
    """A module's ``state_dict`` checked to hold only tensors (its OrderedDict and version metadata are kept)."""
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"checkpoint field {field}.{key} holds a {type(value).__name__}, not a tensor")
    return state



def pickled_checkpoints_trusted() -> bool:
    """Whether ``RETRIEVAL_TRUST_PICKLED_CHECKPOINTS=1`` allows checkpoints holding pickled Python objects."""
    return os.environ.get(TRUST_PICKLED_CHECKPOINTS, "").strip() == "1"


def pickled_globals(file: Path) -> list[str]:
    """The Python objects (``module.name``) that unpickling a ``torch.save`` zip would import and call beyond
    plain tensors and values; read from the pickle's opcodes, nothing is run. Empty for other files."""
    find = getattr(torch.serialization, "get_unsafe_globals_in_checkpoint", None)
    if find is None:  # torch < 2.5 cannot list them
        return ["objects this torch version cannot list"]
    try:
        return sorted(find(file))
    except Exception:  # not a torch zip: torch raises ValueError, RuntimeError and others
        return []


def numpy_data_globals(names: list[str]) -> list[Any] | None:
    """The numpy objects that rebuild numpy scalars, arrays and dtypes, for the ``names`` a checkpoint pickles;
    None when any name is something else (which could run code when called)."""
    found = []
    for name in names:
        module, _, attribute = name.rpartition(".")
        if not (module == "numpy" or module.startswith("numpy.")):
            return None
        if attribute not in ("scalar", "_reconstruct", "ndarray", "dtype") and not attribute.endswith("DType"):
            return None
        try:
            found.append(getattr(importlib.import_module(module), attribute))
        except (ImportError, AttributeError):
            return None
    # unpickling a numpy dtype builds its class (numpy.dtypes.Float64DType, ...), which torch does not list
    return found + [cls for name, cls in vars(np.dtypes).items() if name.endswith("DType")]


def read_checkpoint_state(file: Path, device: str = "cpu") -> dict:
    """The dict a checkpoint holds, read without running code; a damaged or foreign file is a one-line
    ``DataError`` naming it. Pickled Python objects are loaded only when :func:`pickled_checkpoints_trusted`."""
    not_a_checkpoint = f"checkpoint {file} is not a checkpoint written by `retrieval train`"
    try:
        if not zipfile.is_zipfile(file):  # torch.save writes a zip; anything else is damaged or a bare pickle
            raise DataError(f"{not_a_checkpoint} (not a torch zip file: damaged, truncated or foreign)")
        state = torch.load(file, map_location=device, weights_only=True)
    except pickle.UnpicklingError:
        objects = pickled_globals(file)
        if not objects:
            raise DataError(f"{not_a_checkpoint} (damaged)") from None
        numpy_data = numpy_data_globals(objects)
        if not pickled_checkpoints_trusted():
            raise DataError(f"checkpoint {file} holds pickled Python objects ({', '.join(objects[:3])}) that loading "
                            f"could run as code; only if you trust its source, set {TRUST_PICKLED_CHECKPOINTS}=1 "
                            "to load its numpy values") from None
        if numpy_data is None:
            raise DataError(f"checkpoint {file} holds pickled Python objects other than numpy values "
                            f"({', '.join(objects[:3])}); they are never loaded, even when trusted") from None
        try:
            with torch.serialization.safe_globals(numpy_data):
                state = torch.load(file, map_location=device, weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as error:
            raise DataError(f"{not_a_checkpoint} ({type(error).__name__})") from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as error:
        raise DataError(f"{not_a_checkpoint} ({type(error).__name__}: damaged or not a torch file)") from None
    if not isinstance(state, dict):
        raise DataError(f"{not_a_checkpoint} (it holds a {type(state).__name__}, not a dict)")
    missing = [name for name in CHECKPOINT_FIELDS if name not in state]
    if missing:
        raise DataError(f"{not_a_checkpoint} (missing {', '.join(missing)})")
    for name in ("config", "encoder", "loss", "caption_encoder", "metrics"):
        if not isinstance(state[name], dict):
            raise DataError(f"{not_a_checkpoint} (field {name} is a {type(state[name]).__name__}, not a dict)")
    return state
