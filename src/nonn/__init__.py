"""nonn — k-NNN anomaly detection (nearest neighbours of neighbours).

Nizan & Tal, "k-NNN: Nearest Neighbors of Neighbors for Anomaly Detection",
WACV Workshops 2024. Exact Eq. 2, its baselines, safe persistence.
"""

from ._baselines import KNN, GlobalEigenKNN, LocalEigenKNN
from ._explain import Explanation
from ._knnn import KNNN
from .persistence import ModelFileError, load

__version__ = "0.1.0"

__all__ = ["KNNN", "KNN", "GlobalEigenKNN", "LocalEigenKNN", "Explanation", "load",
           "ModelFileError", "__version__"]
