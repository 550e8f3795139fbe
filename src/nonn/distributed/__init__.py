"""k-NNN past one machine: fit and score on a Dask cluster.

``DistributedKNNN`` takes exactly :class:`nonn.KNNN`'s parameters plus
``client=`` (a ``dask.distributed.Client``, a scheduler address, or None for
an embedded ``LocalCluster``). It fits on a ``dask.array`` (or numpy) of
training embeddings partitioned across the workers and scores query arrays
block by block; with an exact backend its scores equal ``KNNN``'s.

Needs Dask: ``pip install "nonn[distributed]"``. The rest of nonn imports
without it; only this subpackage does not.
"""

from __future__ import annotations

_HINT = ('nonn.distributed needs Dask and dask.distributed, which are not installed. '
         'Install them with pip install "nonn[distributed]" '
         '(or pip install "dask[array]" distributed pyarrow).')

try:
    import dask  # noqa: F401
    import dask.array  # noqa: F401
    import distributed  # noqa: F401
except ImportError as exc:  # pragma: no cover - exercised only without dask
    raise ImportError(_HINT) from exc

from ._estimator import DistributedKNNN, read_shards  # noqa: E402

__all__ = ["DistributedKNNN", "read_shards"]
