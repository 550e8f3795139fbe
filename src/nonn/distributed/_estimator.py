"""``DistributedKNNN``: the k-NNN estimator on a Dask cluster.

Fit, with the training rows partitioned across the workers (partition ``j``
owns the global rows ``[lo_j, hi_j)``):

1. global statistics in two passes over the partitions (column sums, then
   the centred Gram matrix and squared deviations), summed in a tree: the
   feature order, the sets and the eigenvalue floor, as ``KNNN`` computes
   them from the whole matrix;
2. each partition, re-ordered onto the grid, is indexed on its worker by the
   chosen backend (:class:`~nonn.distributed._tasks.ShardIndex`);
3. the training k-NN graph by sharded search: every partition's rows are
   searched in every shard (their own shard excluding each point by index)
   and the per-shard top-K' lists are merged exactly (distance, then id);
4. the neighbourhood eigen-state, partition by partition where the data
   lives: each partition gathers its neighbourhoods' rows from the others;
5. the leave-one-out scores and the threshold ``offset_`` (an exact
   percentile from the partitions' lower tails).

Scoring a query block searches every shard, merges the k nearest, and
evaluates Eq. 2 of each (query, neighbour) pair on the worker that holds the
neighbour's eigen-state: the query row travels, not the eigen-state (L + 1
times larger). The per-neighbour sums are then aggregated per query.

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

from .. import _data_scale, _knnn, _local_eigen, _partition
from .._base import cap, resolve_n_jobs
from .._io import _umask
from .._knnn import KNNN
from .._validation import check_array_input
from ..neighbors import resolve_backend
from . import _tasks

#: rows the label-free selection of "auto" parameters sees (on the client)
_AUTO_MAX_ROWS = 100_000
#: partitions merged per task of a reduction tree (Gram sums, top-k merges,
#: threshold tails): bounds a task's inputs while keeping the tree shallow.
_FANIN = 8


_NO_SCALE = ("DistributedKNNN does not support the 'scale' option yet: scale the data "
             "before fitting (for example with dask-ml's StandardScaler), or fit and score "
             "a KNNN with scale on one machine.")


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
    leave-one-out training scores and ``offset_`` equal a ``KNNN`` fitted on
    the same data, to float rounding.

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
    train_scores_ : ndarray or dask array
        Leave-one-out ``score_samples``: numpy when fitted on numpy.
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
        import dask
        import dask.array as da
        from distributed import futures_of, wait

        self._check_params()
        if self.scale is not None:
            raise ValueError(_NO_SCALE)
        for name in ("offset_", "eigenvalues_"):
            self.__dict__.pop(name, None)
        client = self._connect()
        X, dtype, was_numpy = self._as_dask(X, reset=True)
        n, d = X.shape
        self.n_jobs_ = resolve_n_jobs(self.n_jobs)
        self.dtype_ = dtype
        bounds = np.concatenate([[0], np.cumsum(X.chunks[0])]).astype(np.int64)
        P = len(X.chunks[0])
        self.partition_bounds_ = bounds
        self.n_partitions_ = P
        delayed = dask.delayed

        # 1. validated blocks (read once, spread over the workers), global
        # statistics -> the grid
        workers = sorted(client.scheduler_info().get("workers", {})) or [None]
        where = [workers[j % len(workers)] for j in range(P)]
        raw = []
        for j, b in enumerate(X.to_delayed().ravel()):
            with _on(where, j):
                raw.append(delayed(_tasks.clean_block, pure=True)(b, dtype))
        raw = client.persist(raw)
        # the power-of-two working scale, from the partitions' statistics as
        # KNNN computes it from the whole matrix; the statistics below and
        # everything after see the scaled blocks, as KNNN's fit does
        exponent = self._fit_exponent(client, raw, where, n * d)
        if exponent:
            raw = client.persist([_at(where, j, _data_scale.scale, b, exponent,
                                      "The training data") for j, b in enumerate(raw)])
        # from now on each partition's work goes where its rows are (a soft
        # preference: a lost worker's partitions are recomputed elsewhere)
        where = _holders(client, raw, where)
        chosen, auto_params_, auto_table_ = self._choose(client, raw, X.chunks[0], d)
        n_neighbors_ = cap(chosen["n_neighbors"], n - 1, "n_neighbors",
                           "the number of other training points")
        Kp = cap(chosen["n_neighbors_of_neighbors"], n, "n_neighbors_of_neighbors",
                 "the number of training points")
        sums = _tree([_at(where, j, _tasks.column_sums, b) for j, b in enumerate(raw)],
                     _tasks.add)
        total, count = client.compute(sums).result()
        mean = total / count
        set_size_ = cap(chosen["set_size"], d, "set_size", "the number of features")
        need_gram = self.reorder != "none" and d > 2
        moments = _tree([_at(where, j, _tasks.centred_moments, b, mean, need_gram)
                         for j, b in enumerate(raw)], _tasks.add)
        gram, sq = client.compute(moments).result()
        order = (_partition.greedy_order(_partition.abs_correlation_from_gram(gram), set_size_)
                 if need_gram else np.arange(d, dtype=np.int64))
        var = _variance(sq, count, mean, dtype)[order]
        sizes = _partition.set_sizes(d, set_size_)
        rel = max(float(chosen["eig_floor"]), 10 * np.finfo(dtype).eps)
        eig_floor_ = (rel * _local_eigen.floor_scale_from_variance(var, sizes, set_size_)
                      ).astype(dtype)

        # 2. the grid and one index per partition
        Xg = [_at(where, j, _tasks.permute, b, order) for j, b in enumerate(raw)]
        backend = resolve_backend(self.backend, n, d)
        params = dict(self.backend_params or {})
        params.setdefault("working_memory", self.working_memory)
        params.setdefault("verbose", False)
        n_jobs = params.pop("n_jobs", self.n_jobs)
        index = [_at(where, j, _tasks.ShardIndex, Xg[j], bounds[j], backend, self.metric, params,
                     n_jobs) for j in range(P)]
        Xg, index = _persist(client, Xg, index)
        del raw, sums, moments

        # 3. the training k-NN graph, by sharded search and exact merges
        m = max(Kp - 1, n_neighbors_)
        others = []
        for i in range(P):
            # the rows of partition i travel to every index
            parts = [_at(where, j, _tasks.shard_search, index[j], None if i == j else Xg[i], m)
                     for j in range(P)]
            with _on(where, i):
                merged = _tree(parts, _tasks.merge_topk, m)
            others.append(_at(where, i, _tasks.merged_ids, merged, m, m))
        groups = [_at(where, i, _tasks.neighbourhoods, others[i], bounds[i], Kp)
                  for i in range(P)]

        # 4. eigen-state where the data lives, from the gathered rows
        evals, evecs = _eigen_blocks(where, Xg, groups, bounds, sizes, set_size_, self.n_jobs,
                                     self.working_memory)
        groups, evals, evecs = _persist(client, groups, evals, evecs)

        # 5. leave-one-out scores (a point is not its own neighbour)
        state = dict(Xg=Xg, evals=evals, evecs=evecs, bounds=bounds, sizes=sizes,
                     floor=eig_floor_, k=n_neighbors_, where=where)
        loo_ids = [_at(where, i, _tasks.first_columns, o, n_neighbors_)
                   for i, o in enumerate(others)]
        loo = self._score_blocks(state, Xg, loo_ids, [int(c) for c in X.chunks[0]], where)
        train = [_at(where, i, _tasks.negate, s) for i, s in enumerate(loo)]
        (train,) = _persist(client, train)
        futures = futures_of(Xg + index + groups + evals + evecs + train)
        wait(futures)
        # a failed partition surfaces here, before any fitted state is set
        for fut in futures:
            if fut.status != "finished":
                fut.result()

        contamination_ = 0.01 if self.contamination == "auto" else float(self.contamination)
        offset_ = _exact_percentile(client, train, n, 100.0 * contamination_)

        # fitted state (only now, so that a failed fit leaves none)
        chunks = X.chunks[0]
        S, L = len(sizes), set_size_

        def stack(blocks, tail, dt):
            return da.concatenate([da.from_delayed(b, (c,) + tail, dtype=dt)
                                   for b, c in zip(blocks, chunks)])

        self.data_scale_exponent_ = exponent
        self.n_neighbors_ = n_neighbors_
        self.eig_floor_rel_ = float(chosen["eig_floor"])
        self.auto_params_ = auto_params_
        self.auto_table_ = auto_table_
        self.n_neighbors_of_neighbors_ = Kp
        self.set_size_ = set_size_
        self.feature_order_ = order
        self.set_sizes_ = sizes
        self.eig_floor_ = eig_floor_
        self.backend_ = backend
        self._fit_X = stack(Xg, (d,), dtype)
        self._index = index
        self._shards = state
        self.neighborhoods_ = stack(groups, (Kp,), np.int64)
        self.eigenvalues_ = stack(evals, (S, L), dtype)
        self.eigenvectors_ = stack(evecs, (S, L, L), dtype)
        train_scores = stack(train, (), dtype)
        self.train_scores_ = client.compute(train_scores).result() if was_numpy else train_scores
        self.contamination_ = contamination_
        self.offset_ = offset_
        self.threshold_source_ = "training (leave-one-out)"
        return self

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

    def _choose(self, client, raw, chunks, d):
        """The counts and floor to use: the given ones, or those KNNN's
        label-free selection picks for "auto" parameters. The selection runs
        on the client, on all training rows up to ``_AUTO_MAX_ROWS`` (then
        it picks exactly what ``KNNN`` picks), else on a seeded random sample
        of that many rows."""
        grid = getattr(_knnn, "AUTO_GRID", None) or {
            name: None for name in ("n_neighbors", "n_neighbors_of_neighbors", "set_size",
                                    "eig_floor")}
        auto = [name for name in grid if getattr(self, name) == "auto"]
        if not auto:
            return {name: getattr(self, name) for name in grid}, None, None
        import dask.array as da

        n = int(sum(chunks))
        Xa = da.concatenate([da.from_delayed(b, (c, d), dtype=self.dtype_)
                             for b, c in zip(raw, chunks)])
        if n > _AUTO_MAX_ROWS:
            rng = np.random.default_rng(self.random_state)
            Xa = Xa[np.sort(rng.choice(n, _AUTO_MAX_ROWS, replace=False))]
        Xs = client.compute(Xa, sync=True)
        chosen, table = self._select_auto(Xs, auto)
        if "set_size" in auto:  # a chosen size is capped silently, as in KNNN
            chosen["set_size"] = min(chosen["set_size"], d)
        return chosen, {name: chosen[name] for name in auto}, table

    # ------------------------------------------------------------- scoring
    def _aggregate(self):
        # KNNN without an aggregate parameter sums (the paper's Eq. 2)
        return getattr(self, "aggregate", "sum")

    def _score_blocks(self, state, Qg, ids, lengths, qwhere=None):
        """Delayed anomaly scores of the query blocks ``Qg`` whose neighbours
        are ``ids`` (one (q, k) array per block): Eq. 2 of each pair on the
        neighbour's partition, then aggregated per query."""
        import dask

        delayed = dask.delayed
        bounds = state["bounds"]
        P = len(bounds) - 1
        how = self._aggregate()
        where = state.get("where")
        out = []
        for b, (Q, idx) in enumerate(zip(Qg, ids)):
            parts = []
            for j in range(P):
                req = _at(qwhere, b, _tasks.pair_requests, Q, idx, bounds[j], bounds[j + 1])
                parts.append(_at(where, j, _tasks.pair_scores, state["Xg"][j],
                                 state["evals"][j], state["evecs"][j], req, state["sizes"],
                                 state["floor"], self.n_jobs, self.working_memory))
            out.append(_at(qwhere, b, _tasks.assemble, lengths[b], state["k"], how, *parts))
        return out

    def _lazy_scores(self, X):
        import dask
        import dask.array as da

        delayed = dask.delayed
        P = self.n_partitions_
        k = self.n_neighbors_
        exponent = self._data_scale_exponent()
        Qg = [delayed(_scaled_grid, pure=True)(b, self.dtype_, self.feature_order_, exponent)
              for b in X.to_delayed().ravel()]
        ids = []
        where = self._shards.get("where")
        for Q in Qg:
            parts = [_at(where, j, _tasks.shard_search, self._index[j], Q, k) for j in range(P)]
            ids.append(delayed(_tasks.merged_ids, pure=True)(
                _tree(parts, _tasks.merge_topk, k), k, k))
        lengths = [int(c) for c in X.chunks[0]]
        blocks = self._score_blocks(self._shards, Qg, ids, lengths)
        if not blocks:
            return da.zeros((0,), dtype=self.dtype_)
        return da.concatenate([da.from_delayed(s, (c,), dtype=self.dtype_)
                               for s, c in zip(blocks, lengths)])

    def _check_fitted(self):
        check_is_fitted(self, "offset_")
        client = getattr(self, "client_", None)
        if client is None or client.status != "running":
            raise RuntimeError(
                f"This {type(self).__name__}'s cluster was closed, and its fitted state with "
                "it. Fit again, or keep a single-machine model with to_knnn() before close().")
        return client

    def anomaly_score(self, X):
        """The paper's anomaly score AS(f) (higher = more anomalous).

        A dask array for dask input (lazy), else an ndarray. Compute the
        lazy array with ``det.client_.compute(a, optimize_graph=False)``, or
        write it with :meth:`write_scores`: Dask's array optimization drops
        the placement of the per-partition tasks (dask/dask#7036), and Dask
        may then move a partition's eigen-state to the queries rather than
        the queries to it."""
        client = self._check_fitted()
        Xd, _, was_numpy = self._as_dask(X, reset=False)
        scores = self._lazy_scores(Xd)
        if not was_numpy:
            return scores
        # unoptimized: the array optimizer's low-level fusion would drop the
        # tasks' worker annotations (dask/dask#7036)
        return self._to_user_units(client.compute(scores, optimize_graph=False).result())

    def calibrate(self, X_normal, false_alarm_rate=0.01):
        """As :meth:`nonn.KNNN.calibrate`; a dask ``X_normal`` (held-out
        normal data, usually small) is scored on the cluster and its scores
        gathered here for the percentile."""
        client = self._check_fitted()
        import dask.array as da

        if isinstance(X_normal, da.Array):
            X_normal = client.compute(X_normal, sync=True)
        return super().calibrate(X_normal, false_alarm_rate)

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
            os.chmod(tmp, 0o777 & ~_umask())
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
        there. Its state is cut into ``n_partitions`` row partitions (default:
        one per worker), each indexed on its worker; a ``memory="lean"``
        model gets its eigen-state computed on the cluster."""
        import dask
        import dask.array as da
        from distributed import futures_of, wait

        check_is_fitted(model, "offset_")
        if type(model) is not KNNN:
            raise TypeError(f"from_knnn takes a fitted KNNN; got {type(model).__name__}.")
        if getattr(model, "scale_center_", None) is not None:
            raise ValueError(_NO_SCALE)
        det = cls(client=client, **model.get_params())
        client = det._connect()
        n, d = model._fit_X.shape
        if n_partitions is None:
            n_partitions = max(len(client.scheduler_info().get("workers", {})), 1)
        rows = max(-(-n // int(n_partitions)), 1)
        Xd = da.from_array(model._fit_X, chunks=(rows, -1))
        chunks = Xd.chunks[0]
        bounds = np.concatenate([[0], np.cumsum(chunks)]).astype(np.int64)
        P = len(chunks)
        workers = sorted(client.scheduler_info().get("workers", {})) or [None]
        where = [workers[j % len(workers)] for j in range(P)]

        def spread(A):
            """Row blocks of ``A`` copied onto their partition's worker."""
            blocks = da.from_array(A, chunks=(rows,) + A.shape[1:]).to_delayed().ravel()
            return [_at(where, j, np.ascontiguousarray, blk) for j, blk in enumerate(blocks)]

        (Xg,) = _persist(client, spread(model._fit_X))
        where = _holders(client, Xg, where)
        params = dict(det.backend_params or {})
        params.setdefault("working_memory", det.working_memory)
        params.setdefault("verbose", False)
        n_jobs = params.pop("n_jobs", det.n_jobs)
        index = [_at(where, j, _tasks.ShardIndex, Xg[j], bounds[j], model.backend_, det.metric,
                     params, n_jobs) for j in range(P)]
        groups = spread(model.neighborhoods_)
        if hasattr(model, "eigenvectors_"):
            evals, evecs = spread(model.eigenvalues_), spread(model.eigenvectors_)
        else:
            evals, evecs = _eigen_blocks(where, Xg, groups, bounds, model.set_sizes_,
                                         model.set_size_, det.n_jobs, det.working_memory)
        index, groups, evals, evecs = _persist(client, index, groups, evals, evecs)
        wait(futures_of(Xg + index + groups + evals + evecs))
        for name in KNNN._state_scalars:
            setattr(det, name, getattr(model, name, None))
        # a model saved before the working scale existed was fitted unscaled
        det.data_scale_exponent_ = model._data_scale_exponent()
        for name in ("n_features_in_", "dtype_", "feature_order_", "set_sizes_", "eig_floor_",
                     "train_scores_", "auto_table_"):
            if hasattr(model, name):
                setattr(det, name, getattr(model, name))
        det.n_jobs_ = resolve_n_jobs(det.n_jobs)
        det.n_partitions_ = P
        det.partition_bounds_ = bounds
        det._index = index
        det._shards = dict(Xg=Xg, evals=evals, evecs=evecs, bounds=bounds,
                           sizes=model.set_sizes_, floor=model.eig_floor_, k=model.n_neighbors_,
                           where=where)
        S, L = len(model.set_sizes_), model.set_size_

        def stack(blocks, tail, dt):
            return da.concatenate([da.from_delayed(b, (c,) + tail, dtype=dt)
                                   for b, c in zip(blocks, chunks)])

        det._fit_X = stack(Xg, (d,), model.dtype_)
        det.neighborhoods_ = stack(groups, (model.neighborhoods_.shape[1],), np.int64)
        det.eigenvalues_ = stack(evals, (S, L), model.dtype_)
        det.eigenvectors_ = stack(evecs, (S, L, L), model.dtype_)
        return det

    def to_knnn(self):
        """Gather the fitted state into a single-machine :class:`~nonn.KNNN`
        (same parameters, same scores). It must fit in this process's memory."""
        self._check_fitted()
        client = self.client_
        est = KNNN(**self.knnn_params())
        params = self.knnn_params()
        names = (KNNN._state_arrays_for(params) if hasattr(KNNN, "_state_arrays_for")
                 else KNNN._state_arrays)
        arrays = {}
        for name in names:
            if not hasattr(self, name):  # pragma: no cover - state added to KNNN later
                raise NotImplementedError(f"DistributedKNNN has no {name!r} to gather.")
            arrays[name] = getattr(self, name)
        lazy = {k: v for k, v in arrays.items() if not isinstance(v, np.ndarray)}
        computed = dict(zip(lazy, client.compute(list(lazy.values()), sync=True)))
        for name in names:
            setattr(est, name, np.asarray(computed.get(name, arrays[name])))
        for name in KNNN._state_scalars:
            setattr(est, name, getattr(self, name))
        if hasattr(self, "auto_table_"):
            est.auto_table_ = self.auto_table_
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
# The variance below is nonn._local_eigen.column_variance's formula fed with
# sums over the partitions instead of one in-memory matrix.


def _largest(*values):
    return max(values)


def _total(*values):
    return sum(values)


def _scaled_grid(X, dtype, order, exponent):
    """A validated query block at the model's working scale, on the grid."""
    return _tasks.permute(_data_scale.scale(_tasks.clean_block(X, dtype), exponent), order)


def _variance(sq, n, mean, dtype):
    shift = mean - mean.astype(dtype)
    return np.maximum(sq / max(n, 1) - shift * shift, 0.0)


def _eigen_blocks(where, Xg, groups, bounds, sizes, set_size, n_jobs, working_memory):
    """Delayed eigen-state (values, vectors) per partition: each partition
    asks every other for the rows of its neighbourhoods, then decomposes."""
    import dask

    P = len(bounds) - 1
    evals, evecs = [], []
    for i in range(P):
        pieces = []
        for j in range(P):
            loc = _at(where, i, _tasks.requested_rows, groups[i], bounds[j], bounds[j + 1])
            rows = _at(where, j, _tasks.take_rows, Xg[j], loc)
            pieces.append(_at(where, i, tuple, [bounds[j], loc, rows]))
        with _on(where, i):
            eig = dask.delayed(_tasks.block_eigen, pure=True, nout=2)(
                groups[i], sizes, set_size, n_jobs, working_memory, *pieces)
            evals.append(eig[0])
            evecs.append(eig[1])
    return evals, evecs


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


def _exact_percentile(client, blocks, n, percentile):
    """``np.percentile(concatenate(blocks), percentile)`` (linear), from the
    partitions' lower tails: only the ``ceil(h) + 1`` smallest values travel."""
    h = (n - 1) * (percentile / 100.0)
    lo, hi = int(math.floor(h)), int(math.ceil(h))
    tail = client.compute(_tree(blocks, _tasks.smallest, hi + 1), sync=True)
    a, b = np.float64(tail[lo]), np.float64(tail[hi])
    t = h - lo
    # numpy's _lerp, for the same rounding as np.percentile
    diff = b - a
    return float(b - diff * (1 - t) if t >= 0.5 else a + diff * t)


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
