"""nonn — k-NNN anomaly detection (nearest neighbors of neighbors).

Nizan & Tal, "k-NNN: Nearest Neighbors of Neighbors for Anomaly Detection",
WACV Workshops 2024. Exact Eq. 2, its baselines, safe persistence.
"""

from ._baselines import KNN, GlobalEigenKNN, LocalEigenKNN
from ._explain import Explanation
from ._knnn import KNNN
from ._model_file import register as _register
from .persistence import ModelFileError, load

# the detectors a model file may hold, looked up by name when it is loaded
_register(KNNN, KNN, GlobalEigenKNN, LocalEigenKNN)

__version__ = "0.1.0"

__all__ = ["KNNN", "KNN", "GlobalEigenKNN", "LocalEigenKNN", "Explanation", "load",
           "ModelFileError", "__version__"]
