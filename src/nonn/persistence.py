"""Safe, versioned model files: the public face of nonn's persistence.

``estimator.save(path)`` writes a model file and :func:`load` reads it back;
:func:`read_meta` gives its metadata without reading the arrays. A ``.nonn``
file is a zip (numpy ``.npz``) of the fitted arrays and one JSON document;
nothing is ever unpickled, and a truncated, corrupted, crafted or newer file
is refused with a :class:`ModelFileError` naming what is wrong. The format
and its checks are described in :mod:`nonn._model_file` (the detectors'
file) and :mod:`nonn._archive` (the container, shared with the image
models of :mod:`nonn.vision`).
"""

from __future__ import annotations

from ._archive import ModelFileError
from ._model_file import FORMAT, FORMAT_VERSION, load, model_classes, read_meta
from ._model_file import save_detector as save
# for code written against this module before the format moved into the core
from ._model_file import check_array_table, check_meta, load_detector  # noqa: F401
from ._model_file import detector_state as state  # noqa: F401

__all__ = ["ModelFileError", "save", "load", "read_meta", "FORMAT", "FORMAT_VERSION"]


def _registry():
    """``{name: class}`` of the detectors a model file may hold (all of them
    imported: importing nonn imports them)."""
    return model_classes()
