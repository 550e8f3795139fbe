"""``DistributedKNNN``: the k-NNN estimator on a Dask cluster.

Fit, with the training rows partitioned across the workers (partition ``j``
owns the global rows ``[lo_j, hi_j)``), runs ``KNNN.fit``'s steps, each
step's statistics summed over the partitions in a tree and handed to the
core's own function:

1. the input transforms: the power-of-two working scale
   (:func:`nonn._data_scale.choose_exponent`), unit rows, and the global
   whitening from the Ledoit-Wolf covariance of the partition sums
   (:func:`nonn._preprocess.ledoit_wolf_from_moments`), applied block by
   block;
2. the counts (:func:`nonn._knnn.resolve_counts`, after ``KNNN``'s
   label-free selection of "auto" values on a sample) and the layout:
   feature order, sets and eigenvalue floors from the column sums, centred
   Gram matrix and squared deviations
   (:func:`nonn._layout.grid_from_statistics`);
3. each partition, on the grid, is indexed on its worker by the chosen
   backend (:class:`~nonn.distributed._tasks.ShardIndex`);
4. the training k-NN graph by sharded search: every partition's rows are
   searched in every shard (their own shard excluding each point by index)
   and the per-shard lists are merged exactly (distance, then id);
5. each partition gathers the rows its points' neighborhoods read (its
   *halo*, :class:`~nonn.distributed._tasks.Halo`) and computes their
   eigen-state where its data live;
6. the held-out scores of the calibration rows
   (:func:`nonn._base.calibration_rows`): each (row, neighbor) pair is
   scored on the neighbor's partition, with the neighbor's neighborhood
   without the row (:func:`nonn._knnn.held_out_groups`), and the threshold
   is the core's (:meth:`nonn._base.BaseDetector._fit_threshold`).

Scoring a query block runs ``KNNN``'s query transforms on a worker, searches
every shard, merges the k nearest, and evaluates Eq. 2 of each (query,
neighbor) pair on the worker that holds the neighbor's eigen-state: the
query row travels, not the eigen-state. In the dual form (L > K') that
worker also holds the rows of the neighbor's neighborhood (the halo kept
after the fit). The per-neighbor sums are then aggregated per query.

All state stays on the cluster (persisted); the fitted arrays are exposed
as dask arrays under ``KNNN``'s attribute names. :meth:`to_knnn` gathers a
single-machine ``KNNN`` (the model file of ``save``).
"""

from __future__ import annotations

import math
import os
import re
import shutil
import tempfile
import time
import weakref

import numpy as np
from sklearn.utils.validation import check_is_fitted

from .. import _data_scale
from .._base import (calibration_rows, conformal_pvalues, floor_spread, merge_smallest_keys,
                     projection_moments, resolve_floor, resolve_floor_ref, resolve_n_jobs,
                     resolve_transforms, whitened_calibration_size)
from .._eq2 import DUAL, eigen_form, eigen_width
from .._io import current_umask
from .._knnn import KNNN, floor_base, floor_local, resolve_counts, search_width
from .._layout import (absolute_floors, floor_scale_from_variance, grid_from_statistics,
                       needs_order, permute, variance_from_sums)
from .._preprocess import l2_rows, ledoit_wolf_from_moments, whiten, whitening_matrix
from .._preprocess import whitening_moments
from .._scaling import (
    apply_column_scaling,
    column_units,
    merged_scaler_statistics,
    partial_scaler,
    scaling_from_statistics,
)
from .._validation import check_array_input
from ..neighbors import resolve_backend
from . import _tasks

#: rows the label-free selection of "auto" parameters sees (on the client)
_AUTO_MAX_ROWS = 100_000
#: partitions merged per task of a reduction tree (Gram sums, top-k merges):
#: bounds a task's inputs while keeping the tree shallow.
_FANIN = 8
#: per-row arrays of a fitted KNNN, kept on the cluster (chunked by
#: partition); the rest of its state is small and kept on the client
_ROW_ARRAYS = ("_fit_X", "neighborhoods_", "eigenvalues_", "eigenvectors_")
#: the fitted input transforms and layout a query goes through
_TRANSFORM_STATE = ("scale_center_", "scale_factor_", "data_scale_exponent_", "normalize_",
                    "whiten_", "whiten_mean_", "whiten_matrix_", "feature_order_")


_NO_ROBUST = ("DistributedKNNN does not support scale='robust': its medians and quartiles "
              "need every row of a column in one place. Use scale='standard' or "
              "scale='minmax', scale the data before fitting, or fit a KNNN with "
              "scale='robust' on one machine (DistributedKNNN.from_knnn can then score "
              "with it on the cluster).")


def _close(resources):
    for res in resources:
        try:
            res.close()
        except Exception:  # pragma: no cover - best effort at shutdown
            pass


def _tree(items, fn, *args):
    """Reduce delayed ``items`` with ``fn(*args, *group)`` in a tree of fan-in
    ``_FANIN``."""
    import dask

    items = list(items)
    while True:  # at least once: a single item is reduced too
        items = [dask.delayed(fn, pure=True)(*args, *items[i:i + _FANIN])
                 for i in range(0, len(items), _FANIN)]
        if len(items) == 1:
            return items[0]


class DistributedKNNN(KNNN):
    """:class:`nonn.KNNN` fitted and scored on a Dask cluster.

    Takes every parameter of :class:`~nonn.KNNN` (same names, defaults and
    meaning) plus ``client``. With an exact backend the scores, the
    held-out calibration scores (``train_scores_``, ``calibration_rows_``,
    ``calibration_scores_``) and ``offset_`` equal a ``KNNN`` fitted on the
    same data, to float rounding. ``scale="robust"`` is not supported by
    ``fit`` (a fitted ``KNNN`` with it can be spread by :meth:`from_knnn`).

    Memory on the workers, per training row (itemsize ``b``, D features in
    S sets of L, neighborhoods of K'): the grid row (D·b) and its share of
    the index; K' int64 neighborhood ids; the eigen-state, S·L·(L + 1)·b
    in the primal form (L <= K'), S·K'·(K' + 1)·b in the dual form (L > K',
    including ``set_size="all"``). The dual form also keeps each
    partition's halo: the rows its points' neighborhoods (and one more
    nearest row each) read, at most min(K' + 1, N / rows per partition)
    grid rows per row of the partition, in practice far fewer (shared
    neighbors), plus (K' + 1) int64 local ids per row. ``memory="lean"``
    keeps the eigen-state on the cluster too (only the model file is
    lean).

    Parameters
    ----------
    client : dask.distributed.Client, str or None, default=None
        The cluster to run on: a client, a scheduler address
        (``"tcp://host:8786"``), or None to start an embedded
        ``LocalCluster`` for this estimator (closed by :meth:`close`, at
        the end of a ``with`` block, or when the estimator is collected).
    **params
        :class:`~nonn.KNNN`'s parameters. ``backend`` and ``backend_params``
        configure each partition's index (an IVF index's lists are per
        partition). ``n_jobs=None`` means each worker's own thread count.

    Attributes
    ----------
    client_ : dask.distributed.Client
        The client in use.
    n_partitions_ : int
        Training partitions (one index each).
    partition_bounds_ : ndarray (n_partitions_ + 1,)
        Partition ``j`` holds the training rows ``[b[j], b[j + 1])``.
    neighborhoods_, eigenvalues_, eigenvectors_ : dask arrays
        As in ``KNNN``, persisted on the workers, chunked by partition.
        Like the dask arrays the scoring methods return, they live on
        ``client_``'s cluster: compute them there
        (``det.client_.compute(a, sync=True)``, or ``a.compute()`` while it
        is the default client).
    train_scores_, calibration_rows_, calibration_scores_ : ndarray
        As in ``KNNN`` (at most ``nonn._base.CALIBRATION_ROWS`` values
        after ``fit``; every training row after ``fit_predict``), on the
        client.
    Others as :class:`~nonn.KNNN` (numpy, on the client).

    Examples
    --------
    >>> import numpy as np
    >>> from nonn.distributed import DistributedKNNN
    >>> X = np.random.default_rng(0).normal(size=(400, 8))
    >>> with DistributedKNNN(n_neighbors_of_neighbors=20) as det:  # doctest: +SKIP
    ...     det.fit(X).predict(10 + X[:2]).tolist()
    [-1, -1]
    """

    def __init__(self, *, client=None, **params):
        # KNNN's own constructor: an unknown parameter is a TypeError, and a
        # parameter added to KNNN is accepted here unchanged.
        super().__init__(**params)
        self.client = client

    @classmethod
    def _get_param_names(cls):
        return sorted(set(KNNN._get_param_names()) | {"client"})

    def knnn_params(self):
        """The parameters of the equivalent single-machine :class:`~nonn.KNNN`."""
        params = self.get_params(deep=False)
        params.pop("client")
        return params

    # ------------------------------------------------------------- cluster
    def _connect(self):
        client = getattr(self, "client_", None)
        if client is not None and client.status == "running":
            return client
        from distributed import Client, LocalCluster

        c = self.client
        if c is None:
            import dask

            # processes (the GIL is not shared); no dashboard port to collide;
            # no work stealing, which would move a partition's index and
            # eigen-state to idle workers instead of the small queries
            with dask.config.set({"distributed.scheduler.work-stealing": False}):
                cluster = LocalCluster(dashboard_address=None)
            client = Client(cluster)
            owned = (client, cluster)
        elif isinstance(c, str):
            client = Client(c)
            owned = (client,)
        elif isinstance(c, Client):
            client, owned = c, ()
        else:
            raise TypeError(
                f"The 'client' parameter of {type(self).__name__} must be a "
                f"dask.distributed.Client, a scheduler address or None. Got {c!r} instead. "
                "For example: DistributedKNNN(client='tcp://scheduler:8786').")
        self.client_ = client
        # what this estimator started, it stops (never a client it was given)
        self._finalizer = weakref.finalize(self, _close, owned)
        return client

    def close(self):
        """Close the client and ``LocalCluster`` this estimator started (a
        client passed in is left open). Fitted state on the cluster is lost
        then; :meth:`to_knnn` first to keep it."""
        fin = getattr(self, "_finalizer", None)
        if fin is not None:
            fin()
        self.client_ = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    # --------------------------------------------------------------- input
    def _as_dask(self, X, reset):
        """``(dask array of row blocks with one column chunk, was_numpy)``."""
        import dask.array as da

        client = self.client_
        if isinstance(X, da.Array):
            if X.ndim != 2:
                raise ValueError(f"Expected 2D array, got an array of shape {X.shape}. Pass a "
                                 "2-D array of shape (n_samples, n_features).")
            if any(math.isnan(c) for c in X.chunks[0]):
                X = X.compute_chunk_sizes()
            if X.dtype.kind not in "biuf":
                raise ValueError(f"Input holds {X.dtype} data. Pass numeric embeddings.")
            dtype = np.dtype(np.float32) if X.dtype == np.float32 else np.dtype(np.float64)
            n, d = X.shape
            if reset:
                if n < 2 or d < 1:
                    raise ValueError(f"Found array with {n} sample(s) and {d} feature(s) while "
                                     "a minimum of 2 samples and 1 feature is required. Pass "
                                     "at least 2 training rows and 1 feature.")
                self.n_features_in_ = d
            elif d != self.n_features_in_:
                raise ValueError(
                    f"X has {d} features, but {type(self).__name__} is expecting "
                    f"{self.n_features_in_} features as input. Pass data embedded exactly "
                    "like the training data (same columns, same order).")
            if len(X.chunks[1]) > 1:
                X = X.rechunk({1: -1})
            if 0 in X.chunks[0] and n:  # an empty partition would hold no index
                X = X.rechunk({0: tuple(c for c in X.chunks[0] if c)})
            return X, dtype, False
        X = check_array_input(self, X, reset=reset)
        if not reset:
            X = X.astype(self.dtype_, copy=False)
        workers = max(len(client.scheduler_info().get("workers", {})), 1)
        rows = max(-(-X.shape[0] // workers), 1)
        return da.from_array(X, chunks=(rows, -1)), X.dtype, True

    # ----------------------------------------------------------------- fit
    def fit(self, X, y=None):
        """Fit on training embeddings ``X`` (a dask array chunked by rows, or
        array-like) on the cluster; returns ``self``. All work is done (and
        its result persisted on the workers) when this returns; a failure
        raises and leaves no fitted state behind."""
        from distributed import futures_of, wait

        self._check_params()
        if self.scale == "robust":
            raise ValueError(_NO_ROBUST)
        for name in ("offset_", "eigenvalues_", "eigenvectors_", "whiten_mean_",
                     "whiten_matrix_", "scale_center_", "scale_factor_"):
            self.__dict__.pop(name, None)
        client = self._connect()
        X, dtype, was_numpy = self._as_dask(X, reset=True)
        n, d = X.shape
        self.n_jobs_ = resolve_n_jobs(self.n_jobs)
        self.dtype_ = dtype
        chunks = [int(c) for c in X.chunks[0]]
        bounds = np.concatenate([[0], np.cumsum(chunks)]).astype(np.int64)
        P = len(chunks)

        # 1. validated blocks (read once, spread over the workers), then the
        # input transforms, fitted from partition sums and applied per block
        workers = sorted(client.scheduler_info().get("workers", {})) or [None]
        where = [workers[j % len(workers)] for j in range(P)]
        raw = client.persist([_at(where, j, _tasks.clean_block, b, dtype)
                              for j, b in enumerate(X.to_delayed().ravel())])
        blocks, transforms, held_rows = self._fit_transforms(client, raw, where, n, d, dtype,
                                                             bounds)
        del raw
        # from now on each partition's work goes where its rows are (a soft
        # preference: a lost worker's partitions are recomputed elsewhere)
        where = _holders(client, blocks, where)

        # 2. counts and layout, by the core's rules from the partition sums
        k, Kp, L = resolve_counts(n, d, self._choose(client, blocks, chunks, d))
        rel = resolve_floor(self.eig_floor, d)
        total, count = client.compute(_tree([_at(where, j, _tasks.column_sums, b)
                                             for j, b in enumerate(blocks)], _tasks.add),
                                      sync=True)
        mean = total / count
        gram, sq = client.compute(
            _tree([_at(where, j, _tasks.grid_moments, b, mean, needs_order(d, L, self.reorder))
                   for j, b in enumerate(blocks)], _tasks.add), sync=True)
        var = variance_from_sums(sq, count, mean, dtype)
        order, sizes, _ = grid_from_statistics(gram, var, L, self.reorder, rel, dtype)
        scale = floor_scale_from_variance(np.asarray(var, dtype=np.float64)[order], sizes, L)

        # 3. the grid and one index per partition
        Xg = [_at(where, j, permute, b, order) for j, b in enumerate(blocks)]
        backend = resolve_backend(self.backend, n, d)
        index = self._indexes(where, Xg, bounds, backend)
        Xg, index = _persist(client, Xg, index)
        del blocks

        # 4. the training k-NN graph, by sharded search and exact merges
        m = search_width(n, k, Kp)
        others = []
        for i in range(P):
            # the rows of partition i travel to every index
            parts = [_at(where, j, _tasks.shard_search, index[j], None if i == j else Xg[i], m)
                     for j in range(P)]
            with _on(where, i):
                merged = _tree(parts, _tasks.merge_topk, m)
            others.append(_at(where, i, _tasks.merged_ids, merged, m, m))
        groups = [_at(where, i, _tasks.partition_neighborhoods, others[i], bounds[i], Kp)
                  for i in range(P)]

        # 5. each partition's halo (its neighborhoods' rows and one more
        # nearest row each, for the held-out scores) and eigen-state
        wide = [_at(where, i, _tasks.halo_ids, others[i], bounds[i], min(m, Kp))
                for i in range(P)]
        halos = _halo_blocks(where, Xg, wide, bounds)
        evals, evecs = self._eigen_blocks(where, halos, Kp, sizes, L)
        # the graph too (until the held-out scores): else their search reruns
        others, groups, halos, evals, evecs = _persist(client, others, groups, halos, evals,
                                                       evecs)
        futures = futures_of(Xg + index + others + groups + halos + evals + evecs)
        wait(futures)
        # a failed partition surfaces here, before any fitted state is set
        for fut in futures:
            if fut.status != "finished":
                fut.result()

        # the floor: "auto" from the neighborhoods' total variances (their
        # eigenvalues' sums), reduced over the partitions
        spread = None
        if self.eig_floor_ref == "auto":
            spread = floor_spread(client.compute(
                _tree([_at(where, j, _tasks.trace_moments_of, e) for j, e in enumerate(evals)],
                      _tasks.add), sync=True))
        ref = resolve_floor_ref(self.eig_floor_ref, d, spread)
        floor = absolute_floors(floor_base(rel, ref), scale, dtype)

        # 6. held-out scores of the calibration rows
        rows = (held_rows if transforms.get("whiten_", 0) else
                calibration_rows(n, getattr(self, "_calibrate_all", False)))
        state = dict(Xg=Xg, evals=evals, evecs=evecs, bounds=bounds, sizes=sizes,
                     set_size=L, floor=(floor, floor_local(rel, ref, len(sizes))), k=k,
                     where=where,
                     halos=halos if eigen_form(L, Kp) == DUAL else [None] * P)
        held = self._held_out(client, state, others, halos, rows, Kp)
        del others

        # fitted state (only now, so that a failed fit leaves none)
        S, r = len(sizes), eigen_width(L, Kp)

        def stack(blocks, tail, dt):
            return _stack(blocks, chunks, tail, dt)

        for name, value in transforms.items():
            setattr(self, name, value)
        self.n_neighbors_ = k
        self.n_neighbors_of_neighbors_ = Kp
        self.eig_floor_rel_ = rel
        self.set_size_ = L
        self.feature_order_ = order
        self.set_sizes_ = sizes
        self.eig_floor_ = floor
        self.eig_floor_ref_ = ref
        self.eig_floor_spread_ = spread
        self.backend_ = backend
        self.n_partitions_ = P
        self.partition_bounds_ = bounds
        self._fit_X = stack(Xg, (d,), dtype)
        self._index = index
        self._shards = state
        self.neighborhoods_ = stack(groups, (Kp,), np.int64)
        self.eigenvalues_ = stack(evals, (S, r), dtype)
        self.eigenvectors_ = stack(evecs, (S, r, r), dtype)
        self.calibration_rows_ = rows
        self._fit_threshold(held, n)  # sets offset_: the fit is complete
        return self

    def _fit_transforms(self, client, blocks, where, n, d, dtype, bounds):
        """``KNNN``'s input transforms (see ``BaseDetector._fit_preprocess``)
        fitted from partition statistics: ``(transformed blocks, fitted
        attributes, calibration rows of a whitened fit)``. Each stage that
        changes the data persists its blocks."""
        fitted = {}
        held = None
        if self.scale is not None:  # column scaling: scikit-learn's scalers, merged
            mx, mn = client.compute(_tree([_at(where, j, _tasks.column_extremes, b)
                                           for j, b in enumerate(blocks)],
                                          _tasks.merge_extremes), sync=True)
            unit = column_units(mx, mn)
            scalers = client.compute([_at(where, j, partial_scaler, b, self.scale, unit,
                                          self.working_memory)
                                      for j, b in enumerate(blocks)], sync=True)
            center, factor = scaling_from_statistics(
                self.scale, *merged_scaler_statistics(self.scale, scalers), unit)
            blocks = client.persist([_at(where, j, apply_column_scaling, b, center, factor,
                                         self.working_memory) for j, b in enumerate(blocks)])
            fitted.update(scale_center_=center, scale_factor_=factor)
        exponent = self._fit_exponent(client, blocks, where, n * d)
        if exponent:
            blocks = client.persist([_at(where, j, _data_scale.scale, b, exponent,
                                         "The training data") for j, b in enumerate(blocks)])
        normalize_, whiten_ = resolve_transforms(self.normalize, self.whiten, d)
        fitted.update(data_scale_exponent_=exponent, normalize_=normalize_, whiten_=whiten_)
        if normalize_ == "l2":
            blocks = client.persist([_at(where, j, l2_rows, b) for j, b in enumerate(blocks)])
        if self.whiten != 0:
            if whiten_:
                # as KNNN: estimated without the calibration rows, the rows of
                # smallest keys (from the values the whitening sees)
                if not getattr(self, "_calibrate_all", False):
                    m = whitened_calibration_size(n)
                    moments = client.compute(_tree([_at(where, j, projection_moments, b)
                                                    for j, b in enumerate(blocks)],
                                                   _tasks.add), sync=True)
                    held = merge_smallest_keys(client.compute(
                        [_at(where, j, _tasks.smallest_row_keys, b, m, int(bounds[j]), moments)
                         for j, b in enumerate(blocks)], sync=True), m)
                est = blocks if held is None else [
                    _at(where, j, _tasks.drop_rows, b,
                        held[(held >= bounds[j]) & (held < bounds[j + 1])] - bounds[j])
                    for j, b in enumerate(blocks)]
                total, count = client.compute(_tree([_at(where, j, _tasks.column_sums, b)
                                                     for j, b in enumerate(est)],
                                                    _tasks.add), sync=True)
                mean = total / count
                gram, norm4 = client.compute(_tree([_at(where, j, whitening_moments, b, mean)
                                                    for j, b in enumerate(est)],
                                                   _tasks.add), sync=True)
                cov, _ = ledoit_wolf_from_moments(count, gram, norm4)
                mu, W = whitening_matrix(mean, cov, whiten_, dtype)
                Wd = _literal(W)
                blocks = client.persist([_at(where, j, whiten, b, mu, Wd)
                                         for j, b in enumerate(blocks)])
            else:  # "auto" chose none: the identity (exact), stored alike
                mu, W = np.zeros(d, dtype=dtype), np.eye(d, dtype=dtype)
            fitted.update(whiten_mean_=mu, whiten_matrix_=W)
        return blocks, fitted, held

    @staticmethod
    def _fit_exponent(client, raw, where, count):
        """:func:`nonn._data_scale.fit_exponent` of the matrix whose row
        blocks are ``raw``: the largest absolute entry (exact) and, only when
        needed, the sum of squares (float64, summed over the partitions)."""
        m = client.compute(_tree([_at(where, j, _data_scale.max_abs, b)
                                  for j, b in enumerate(raw)], _largest), sync=True)

        def sum_squares_at(e):
            return client.compute(_tree([_at(where, j, _data_scale.sum_squares, b, e)
                                         for j, b in enumerate(raw)], _total), sync=True)

        return _data_scale.choose_exponent(m, count, sum_squares_at)

    def _choose(self, client, blocks, chunks, d):
        """The counts before capping (``KNNN._resolve_auto``): the given
        ones, or those KNNN's label-free selection picks for "auto" values.
        The selection runs on the client, on all (transformed) training rows
        up to ``_AUTO_MAX_ROWS`` (then it picks exactly what ``KNNN``
        picks), else on a seeded random sample of that many rows."""
        import dask.array as da

        from .._knnn import AUTO_GRID

        if all(getattr(self, name) != "auto" for name in AUTO_GRID):
            return self._resolve_auto(None)  # reads no data without "auto" values
        n = int(sum(chunks))
        Xa = _stack(blocks, chunks, (d,), self.dtype_)
        if n > _AUTO_MAX_ROWS:
            rng = np.random.default_rng(self.random_state)
            Xa = Xa[np.sort(rng.choice(n, _AUTO_MAX_ROWS, replace=False))]
        return self._resolve_auto(client.compute(Xa, sync=True))

    def _indexes(self, where, Xg, bounds, backend):
        params = dict(self.backend_params or {})
        params.setdefault("working_memory", self.working_memory)
        params.setdefault("verbose", False)
        n_jobs = params.pop("n_jobs", self.n_jobs)
        return [_at(where, j, _tasks.ShardIndex, Xg[j], bounds[j], backend, self.metric, params,
                    n_jobs) for j in range(len(Xg))]

    def _eigen_blocks(self, where, halos, Kp, sizes, L):
        """Delayed eigen-state (values, vectors) per partition, from its halo."""
        import dask

        evals, evecs = [], []
        for i, halo in enumerate(halos):
            with _on(where, i):
                eig = dask.delayed(_tasks.block_eigen, pure=True, nout=2)(
                    halo, Kp, sizes, L, self.n_jobs, self.working_memory)
            evals.append(eig[0])
            evecs.append(eig[1])
        return evals, evecs

    def _held_out(self, client, state, others, halos, rows, Kp):
        """``KNNN._held_out_scores`` of the calibration ``rows`` (None: all),
        as one array in row order: each (row, neighbor) pair is scored on
        the neighbor's partition, the row travelling to it."""
        bounds, where, k = state["bounds"], state["where"], state["k"]
        P = len(bounds) - 1
        out = []
        for i in range(P):
            lo, hi = bounds[i], bounds[i + 1]
            loc = (np.arange(hi - lo) if rows is None
                   else rows[(rows >= lo) & (rows < hi)] - lo)
            if not len(loc):
                continue
            cal = _at(where, i, _tasks.calibration_block, state["Xg"][i], others[i], lo, loc, k)
            parts = []
            for j in range(P):
                req = _at(where, i, _tasks.calibration_requests, cal, bounds[j], bounds[j + 1])
                parts.append(_at(where, j, _tasks.held_out_pair_scores, halos[j], req, Kp,
                                 state["sizes"], state["set_size"], state["floor"], self.n_jobs,
                                 self.working_memory))
            out.append(_at(where, i, _tasks.assemble, len(loc), k, self.aggregate, *parts))
        # unoptimized: the array optimizer's fusion would drop the tasks'
        # worker annotations (dask/dask#7036)
        return np.concatenate(client.compute(out, sync=True, optimize_graph=False))

    # ------------------------------------------------------------- scoring
    def _transform_model(self):
        """A ``KNNN`` holding only this model's fitted input transforms and
        feature order: what a query block goes through on a worker."""
        model = KNNN(**self.knnn_params())
        for name in _TRANSFORM_STATE:
            if hasattr(self, name):
                setattr(model, name, getattr(self, name))
        return model

    def _query_blocks(self, X):
        """Delayed grid blocks of the validated dask query array ``X``."""
        import dask

        transform = _literal(self._transform_model())
        return [dask.delayed(_tasks.query_grid, pure=True)(b, self.dtype_, transform)
                for b in X.to_delayed().ravel()]

    def _score_blocks(self, state, Qg, ids, lengths):
        """Delayed anomaly scores of the query blocks ``Qg`` whose neighbors
        are ``ids`` (one (q, k) array per block): Eq. 2 of each pair on the
        neighbor's partition, then aggregated per query."""
        import dask

        bounds = state["bounds"]
        P = len(bounds) - 1
        where = state.get("where")
        out = []
        for Q, idx, q in zip(Qg, ids, lengths):
            parts = []
            for j in range(P):
                req = dask.delayed(_tasks.pair_requests, pure=True)(Q, idx, bounds[j],
                                                                   bounds[j + 1])
                parts.append(_at(where, j, _tasks.pair_scores, state["Xg"][j],
                                 state["evals"][j], state["evecs"][j], state["halos"][j], req,
                                 state["sizes"], state["set_size"], state["floor"], self.n_jobs,
                                 self.working_memory))
            out.append(dask.delayed(_tasks.assemble, pure=True)(q, state["k"], self.aggregate,
                                                                *parts))
        return out

    def _lazy_scores(self, X):
        import dask
        import dask.array as da

        P = self.n_partitions_
        k = self.n_neighbors_
        Qg = self._query_blocks(X)
        ids = []
        where = self._shards.get("where")
        for Q in Qg:
            parts = [_at(where, j, _tasks.shard_search, self._index[j], Q, k) for j in range(P)]
            ids.append(dask.delayed(_tasks.merged_ids, pure=True)(
                _tree(parts, _tasks.merge_topk, k), k, k))
        lengths = [int(c) for c in X.chunks[0]]
        blocks = self._score_blocks(self._shards, Qg, ids, lengths)
        if not blocks:
            return da.zeros((0,), dtype=self.dtype_)
        return _stack(blocks, lengths, (), self.dtype_)

    def _check_fitted(self):
        check_is_fitted(self, "offset_")
        client = getattr(self, "client_", None)
        if client is None or client.status != "running":
            raise RuntimeError(
                f"This {type(self).__name__}'s cluster was closed, and its fitted state with "
                "it. Fit again, or keep a single-machine model with to_knnn() before close().")
        return client

    def _validate_query(self, X):
        """The validated query rows as a dask array of row blocks (their
        input transforms run on the workers, in :meth:`_query_blocks`)."""
        self._check_fitted()
        return self._as_dask(X, reset=False)[0]

    def _anomaly_score(self, X):
        """Scores of a validated dask query array, computed on the cluster
        and gathered here."""
        # unoptimized: the array optimizer's low-level fusion would drop the
        # tasks' worker annotations (dask/dask#7036)
        return self.client_.compute(self._lazy_scores(X), optimize_graph=False).result()

    def _training_rows(self, X):
        """Which rows of a validated dask query array are exactly training
        rows (after the input transforms), checked on each partition."""
        import dask

        where = self._shards.get("where")
        out = []
        for Q in self._query_blocks(X):
            parts = [_at(where, j, _tasks.training_rows, Q, Xg)
                     for j, Xg in enumerate(self._shards["Xg"])]
            out.append(dask.delayed(_tasks.any_of, pure=True)(*parts))
        if not out:
            return np.zeros(0, dtype=bool)
        return np.concatenate(self.client_.compute(out, sync=True, optimize_graph=False))

    def anomaly_score(self, X):
        """The paper's anomaly score AS(f) (higher = more anomalous).

        A dask array for dask input (lazy), else an ndarray. Compute the
        lazy array with ``det.client_.compute(a, optimize_graph=False)``, or
        write it with :meth:`write_scores`: Dask's array optimization drops
        the placement of the per-partition tasks (dask/dask#7036), and Dask
        may then move a partition's eigen-state to the queries rather than
        the queries to it."""
        self._check_fitted()
        Xd, _, was_numpy = self._as_dask(X, reset=False)
        if not was_numpy:
            return self._lazy_scores(Xd)
        return self._to_user_units(self._anomaly_score(Xd))

    def pvalue(self, X):
        """As :meth:`nonn.KNNN.pvalue`; an ndarray for dask input too (the
        scores are gathered here)."""
        scores = self._to_user_units(self._anomaly_score(self._validate_query(X)))
        return conformal_pvalues(scores, self.calibration_scores_)

    def write_scores(self, X, path):
        """Score ``X`` and write the table without gathering it on the client.

        ``path`` ending in ``.zarr``: a Zarr (format 3) group with three 1-D
        arrays of one row per query, ``anomaly_score`` and ``score_samples``
        (in the fitted dtype) and ``label`` (int64, +1 / -1 as
        :meth:`predict`), all chunked alike: one chunk per query block (the
        largest block's row count when the blocks differ), and the threshold
        in the group's attribute ``offset``. Needs zarr >= 3. Otherwise a
        folder of Parquet part files ``part-00000.parquet``, ... (one per
        query block; columns ``index``, ``anomaly_score``, ``score_samples``,
        ``label`` as ``nonn score``).

        The workers write into a hidden temporary folder beside ``path``,
        which is renamed to ``path`` once every block is written: ``path``
        holds the complete table or nothing new. A previous score output
        there (a folder of only part files, or a Zarr group of only these
        three arrays, or an empty folder) is replaced whole; anything else
        at ``path`` is refused with ``FileExistsError`` before any work. On
        failure the temporary folder is removed and ``path`` is left as it
        was. ``path`` must be on a file system that this process and all
        workers share. Returns the number of rows written.
        """
        import dask

        client = self._check_fitted()
        path = os.fspath(path)
        zarr_out = path.rstrip("/" + os.sep).endswith(".zarr")
        if zarr_out:
            _zarr_module()  # fail before any work without it
        target = _output_target(path, zarr_out)
        Xd, _, _ = self._as_dask(X, reset=False)
        scores = self._lazy_scores(Xd)
        offset = self.offset_
        if zarr_out:
            # one zarr chunk per block: two blocks never write the same chunk
            # (concurrent read-modify-writes of a chunk would lose rows)
            step = max(max(scores.chunks[0], default=0), 1)
            scores = scores.rechunk({0: step})
        starts = np.concatenate([[0], np.cumsum(scores.chunks[0])[:-1]]).astype(np.int64)
        # unoptimized, to keep the tasks' worker annotations (dask/dask#7036)
        blocks = scores.to_delayed(optimize_graph=False).ravel()
        tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(target)}.nonn-", suffix=".tmp",
                               dir=os.path.dirname(target))
        futures = []
        try:
            # mkdtemp makes the folder private (0700); the output gets the
            # permissions of any new folder there
            os.chmod(tmp, 0o777 & ~current_umask())
            if zarr_out:
                _create_score_group(tmp, len(scores), step, scores.dtype, offset)
                parts = [dask.delayed(_tasks.write_zarr_block)(tmp, int(starts[b]), blk, offset)
                         for b, blk in enumerate(blocks) if scores.chunks[0][b]]
            else:
                parts = [dask.delayed(_tasks.write_parquet_part)(
                         os.path.join(tmp, f"part-{b:05d}.parquet"), int(starts[b]), blk,
                         offset) for b, blk in enumerate(blocks)]
            futures = client.compute(parts)
            n = int(sum(client.gather(futures)))
            _publish(tmp, target)
        except BaseException:
            _abandon(client, futures)
            _remove(tmp)
            raise
        return n

    # --------------------------------------------------------- single node
    @classmethod
    def from_knnn(cls, model, client=None, n_partitions=None):
        """Spread a fitted single-machine :class:`~nonn.KNNN` (e.g. one read
        with :func:`nonn.load`) over a cluster, to score large query arrays
        there. Its per-row state is cut into ``n_partitions`` row partitions
        (default: one per worker), each indexed on its worker; a
        ``memory="lean"`` model gets its eigen-state computed on the
        cluster, and a dual-form model (L > K') each partition's halo."""
        from distributed import futures_of, wait

        check_is_fitted(model, "offset_")
        if type(model) is not KNNN:
            raise TypeError(f"from_knnn takes a fitted KNNN; got {type(model).__name__}.")
        det = cls(client=client, **model.get_params())
        client = det._connect()
        n = model._fit_X.shape[0]
        if n_partitions is None:
            n_partitions = max(len(client.scheduler_info().get("workers", {})), 1)
        rows = max(-(-n // int(n_partitions)), 1)
        chunks = [min(rows, n - s) for s in range(0, n, rows)]
        bounds = np.concatenate([[0], np.cumsum(chunks)]).astype(np.int64)
        P = len(chunks)
        workers = sorted(client.scheduler_info().get("workers", {})) or [None]
        where = [workers[j % len(workers)] for j in range(P)]

        def spread(A):
            """Row blocks of ``A`` copied onto their partition's worker."""
            return [_at(where, j, np.ascontiguousarray, A[bounds[j]:bounds[j + 1]])
                    for j in range(P)]

        (Xg,) = _persist(client, spread(model._fit_X))
        where = _holders(client, Xg, where)
        index = det._indexes(where, Xg, bounds, model.backend_)
        groups = spread(model.neighborhoods_)
        Kp, L = model.n_neighbors_of_neighbors_, model.set_size_
        dual = eigen_form(L, Kp) == DUAL
        lean = not hasattr(model, "eigenvectors_")
        halos = _halo_blocks(where, Xg, groups, bounds) if dual or lean else [None] * P
        if lean:
            evals, evecs = det._eigen_blocks(where, halos, Kp, model.set_sizes_, L)
        else:
            evals, evecs = spread(model.eigenvalues_), spread(model.eigenvectors_)
        if not dual:
            halos = [None] * P
        index, groups, evals, evecs = _persist(client, index, groups, evals, evecs)
        if dual:
            (halos,) = _persist(client, halos)
        wait(futures_of(Xg + index + groups + evals + evecs + (halos if dual else [])))
        params = model.get_params()
        small = [a for a in KNNN._state_arrays_for(params) if a not in _ROW_ARRAYS]
        for name in small + list(KNNN._state_scalars) + [
                "n_features_in_", "dtype_", "auto_table_", "feature_names_in_"]:
            if hasattr(model, name):
                setattr(det, name, getattr(model, name))
        # a model saved before the working scale existed was fitted unscaled
        det.data_scale_exponent_ = model._data_scale_exponent()
        det.n_jobs_ = resolve_n_jobs(det.n_jobs)
        det.n_partitions_ = P
        det.partition_bounds_ = bounds
        det._index = index
        det._shards = dict(Xg=Xg, evals=evals, evecs=evecs, halos=halos, bounds=bounds,
                           sizes=model.set_sizes_, set_size=L,
                           floor=(model.eig_floor_, model._floor_local()),
                           k=model.n_neighbors_, where=where)
        S, r, dt = len(model.set_sizes_), eigen_width(L, Kp), model.dtype_
        det._fit_X = _stack(Xg, chunks, (model._fit_X.shape[1],), dt)
        det.neighborhoods_ = _stack(groups, chunks, (Kp,), np.int64)
        det.eigenvalues_ = _stack(evals, chunks, (S, r), dt)
        det.eigenvectors_ = _stack(evecs, chunks, (S, r, r), dt)
        return det

    def to_knnn(self):
        """Gather the fitted state into a single-machine :class:`~nonn.KNNN`
        (same parameters, same scores). It must fit in this process's memory."""
        self._check_fitted()
        client = self.client_
        est = KNNN(**self.knnn_params())
        names = KNNN._state_arrays_for(self.knnn_params())
        arrays = {name: getattr(self, name) for name in names}
        lazy = {k: v for k, v in arrays.items() if not isinstance(v, np.ndarray)}
        computed = dict(zip(lazy, client.compute(list(lazy.values()), sync=True)))
        for name in names:
            setattr(est, name, np.asarray(computed.get(name, arrays[name])))
        for name in list(KNNN._state_scalars) + ["auto_table_", "feature_names_in_"]:
            if hasattr(self, name):
                setattr(est, name, getattr(self, name))
        est.n_features_in_ = self.n_features_in_
        est.dtype_ = self.dtype_
        est.n_jobs_ = resolve_n_jobs(est.n_jobs)
        est._search = est._make_backend(est._fit_X, name=self.backend_)
        return est

    def save(self, path):
        """Save as a regular ``KNNN`` model file (gathered with
        :meth:`to_knnn`); :func:`nonn.load` reads it back as a ``KNNN``."""
        return self.to_knnn().save(path)


# ---------------------------------------------------------------------------


def _largest(*values):
    return max(values)


def _total(*values):
    return sum(values)


def _literal(value):
    """``value`` (an array, a small model) as one node of the task graph,
    shared by every task that takes it (not copied into each)."""
    import dask

    return dask.delayed(value, pure=True)


def _stack(blocks, chunks, tail, dtype):
    """A dask array of the delayed row ``blocks`` of ``chunks`` rows each."""
    import dask.array as da

    return da.concatenate([da.from_delayed(b, (c,) + tuple(tail), dtype=dtype)
                           for b, c in zip(blocks, chunks)])


def _halo_blocks(where, Xg, ids, bounds):
    """Delayed :class:`~nonn.distributed._tasks.Halo` per partition: each
    partition asks every other for the rows of the global ``ids`` (one
    (n_j, w) array per partition) it needs, unique ids only."""
    import dask

    P = len(bounds) - 1
    halos = []
    for i in range(P):
        pieces = []
        for j in range(P):
            loc = _at(where, i, _tasks.requested_rows, ids[i], bounds[j], bounds[j + 1])
            rows = _at(where, j, _tasks.take_rows, Xg[j], loc)
            pieces.append(_at(where, i, tuple, [bounds[j], loc, rows]))
        with _on(where, i):
            halos.append(dask.delayed(_tasks.gather_halo, pure=True)(ids[i], *pieces))
    return halos


def _on(where, j):
    """Prefer partition ``j``'s worker for the tasks built in this block."""
    import contextlib

    import dask

    if not where or where[j] is None:
        return contextlib.nullcontext()
    return dask.annotate(workers=[where[j]], allow_other_workers=True)


def _at(where, j, fn, *args):
    """``delayed(fn)(*args)`` preferring partition ``j``'s worker."""
    import dask

    with _on(where, j):
        return dask.delayed(fn, pure=True)(*args)


def _holders(client, persisted, planned):
    """The worker holding each persisted block, once computed (``planned[j]``
    where Dask names none). Persisting returns at once: asked before the
    blocks exist, Dask names no holder, and the tasks placed by :func:`_on`
    would carry no placement at all (Dask then places them by its own
    estimates, and may move a partition's eigen-state to the queries)."""
    from distributed import wait

    futures = futures_of_list(persisted)
    wait(futures)
    who = client.who_has(futures)
    return [(who.get(d.key) or [planned[j]])[0] for j, d in enumerate(persisted)]


def futures_of_list(persisted):
    from distributed import futures_of

    return futures_of(persisted)


def _persist(client, *lists):
    """Persist lists of delayed objects; the same lists, of persisted ones."""
    flat = client.persist([d for lst in lists for d in lst])
    out, start = [], 0
    for lst in lists:
        out.append(list(flat[start:start + len(lst)]))
        start += len(lst)
    return out


def _zarr_module():
    """zarr (>= 3), or an ImportError that says what to install."""
    try:
        import zarr
    except ImportError as exc:
        raise ImportError("Writing scores to Zarr needs zarr >= 3: pip install zarr. "
                          "Or give a folder name for Parquet parts.") from exc
    if int(zarr.__version__.split(".")[0]) < 3:
        raise ImportError(f"Writing scores to Zarr needs zarr >= 3; this is zarr "
                          f"{zarr.__version__}. Upgrade it with pip install -U zarr, or give "
                          "a folder name for Parquet parts.")
    return zarr


#: what a previous score output may hold (and so may be replaced)
_ZARR_OUTPUT = frozenset(_tasks.SCORE_COLUMNS) | {"zarr.json"}
_PARQUET_PART = re.compile(r"part-\d{5}\.parquet")


def _output_target(path, zarr_out):
    """The absolute path a score output goes to, after checking that it is
    new, empty or a previous score output of the same kind."""
    if "://" in path:
        raise ValueError(f"Cannot write scores to {path!r}: write_scores writes to a file "
                         "system path (shared by this process and the workers), not a URL.")
    target = os.path.abspath(path)
    parent = os.path.dirname(target)
    if not os.path.isdir(parent):
        raise FileNotFoundError(f"Cannot write {path!r}: the folder {parent!r} does not exist.")
    if not os.path.lexists(target):
        return target
    if not os.path.isdir(target) or os.path.islink(target):
        raise FileExistsError(f"Cannot write scores to {path!r}: it is a file (or a link), "
                              "not a previous score output. Give a new path, or remove it.")
    names = os.listdir(target)
    if zarr_out:
        other = [n for n in names if n not in _ZARR_OUTPUT]
    else:
        other = [n for n in names if not _PARQUET_PART.fullmatch(n)]
    if other:
        kind = "Zarr score store" if zarr_out else "folder of Parquet score parts"
        raise FileExistsError(
            f"Cannot write scores to {path!r}: it holds {sorted(other)[:3]!r}, so it is not a "
            f"previous score output (a {kind}) that may be replaced. Give a new path, or "
            "remove it.")
    return target


def _create_score_group(folder, n, step, dtype, offset):
    """The empty score arrays the workers fill, block by block."""
    zarr = _zarr_module()
    group = zarr.open_group(folder, mode="w", zarr_format=3)
    group.attrs["offset"] = float(offset)
    for name, dt in zip(_tasks.SCORE_COLUMNS, (dtype, dtype, np.int64)):
        group.create_array(name, shape=(n,), chunks=(step,), dtype=dt)


def _abandon(client, futures, timeout=60.0):
    """Cancel the write tasks and wait until no worker knows any of them: a
    block being written when the failure came finishes first, so that the
    temporary folder, removed after this, is not re-created by a late
    write (zarr creates the folders it writes into)."""
    if not futures:
        return
    keys = {f.key for f in futures}
    client.cancel(futures)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            left = client.run(_tasks.known_keys, keys)
        except Exception:  # pragma: no cover - a worker lost meanwhile
            return
        if not any(left.values()):
            return
        time.sleep(0.05)


def _publish(tmp, target):
    """Rename the finished ``tmp`` to ``target``, replacing what is there (a
    previous output, checked by :func:`_output_target`). Two renames: a
    reader sees the old output, none, or the new one, never a partial one."""
    if not os.path.lexists(target):
        os.rename(tmp, target)
        return
    old = tmp + ".old"
    os.rename(target, old)
    try:
        os.rename(tmp, target)
    except BaseException:
        os.rename(old, target)
        raise
    _remove(old)


def _remove(folder):
    """Remove ``folder``, first renamed away: should a worker still write a
    block (:func:`_abandon` timed out), it finds the folder gone and fails."""
    if not os.path.lexists(folder):
        return
    gone = folder + ".gone"
    try:
        os.rename(folder, gone)
    except OSError:
        gone = folder
    shutil.rmtree(gone, ignore_errors=True)


def read_shards(folder, key=None):
    """A dask array over a folder of ``.npy`` / ``.parquet`` shards, one
    block per file in name order; each file is read on a worker when needed
    (only its header or metadata is read here)."""
    import dask
    import dask.array as da

    from .. import _io

    blocks, width = [], None
    for path in _io.shard_paths(folder):
        n, d, dt = _io.shard_info(path, key)
        if width is not None and d != width:
            raise ValueError(f"The shard {path!r} has {d} features where the earlier shards "
                             f"of {os.fspath(folder)!r} have {width}; expected one width.")
        width = d
        read = dask.delayed(_io.read_matrix, pure=True)(path, key=key)
        if n:  # an empty shard holds no partition
            blocks.append(da.from_delayed(read, (n, d), dtype=dt))
    if not blocks:
        raise ValueError(f"The shards of {os.fspath(folder)!r} hold no rows.")
    return da.concatenate(blocks)
