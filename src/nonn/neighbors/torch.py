"""Exact search with PyTorch matrix products, on CPU or CUDA.

Per block of queries: one GEMM for the ranking values ``|x|^2 - 2 q.x``
(the squared distance less the per-row constant ``|q|^2``: the same order)
against all training rows, ``topk`` of the smallest, then (unless
``return_distance=False``) the selected candidates' distances recomputed
exactly from the differences and sorted, all on the device. Training points
are excluded from their own search by index (their own column is set to
+inf), so exact duplicates stay neighbors.

``torch`` is imported only here; install it with ``pip install torch``.
"""

from __future__ import annotations

import warnings

import numpy as np

from .._chunks import chunk_rows, progress
from .. import _torch
from .._threads import pool_threads
from ._base import check_metric, check_n_neighbors, squared_to_metric, unit_rows


def import_torch():
    """``torch``, or an ImportError that says how to install it."""
    return _torch.import_torch("The 'torch' backend (or use backend='brute')")

# Without a working_memory setting, a CUDA block may use this share of the
# free device memory (GEMM blocks much larger than the CPU default keep the
# GPU busy), capped so several searches can share a device.
_CUDA_SHARE = 0.25
_CUDA_CAP_MIB = 8192


class TorchBackend:
    """Exact k-NN by batched matrix products in PyTorch.

    Parameters
    ----------
    metric : {"euclidean", "cosine"}
    device : {"auto", "cpu", "cuda"} or a torch device string such as "cuda:1"
        "auto" = CUDA when ``torch.cuda.is_available()``, else the CPU.
    batch_size : int, optional
        Queries per block; default from the memory budget.
    n_jobs : int, optional
        CPU threads for torch during a search (restored afterwards); None
        leaves torch's setting alone.
    working_memory : float, optional
        MiB for one block (None: scikit-learn's setting on the CPU, a quarter
        of the free device memory up to 8 GiB on CUDA).
    verbose : bool, default=False

    Attributes
    ----------
    device_ : str
        The device the training rows live on.
    """

    name = "torch"
    exact = True

    def __init__(self, metric="euclidean", device="auto", batch_size=None, n_jobs=None,
                 working_memory=None, verbose=False):
        self.metric = check_metric(metric)
        self.device = _torch.check_device(device, "the torch backend")
        self.batch_size = batch_size
        self.n_jobs = n_jobs
        self.working_memory = working_memory
        self.verbose = verbose

    def fit(self, X):
        torch = import_torch()
        X = np.asarray(X)
        if X.dtype not in (np.float32, np.float64):
            X = X.astype(np.float64)
        self._X = np.ascontiguousarray(unit_rows(X) if self.metric == "cosine" else X)
        self.device_ = _torch.resolve_device(self.device, "the torch backend")
        self._Xt = _as_tensor(torch, self._X, self.device_)
        self._sqnorm = (self._Xt * self._Xt).sum(dim=1)
        return self

    @property
    def n_samples_fit_(self):
        return self._X.shape[0]

    def _block_rows(self, torch, row_bytes):
        if self.batch_size is not None:
            return max(int(self.batch_size), 1)
        budget = self.working_memory
        if budget is None and self.device_.startswith("cuda"):
            free, _ = torch.cuda.mem_get_info(torch.device(self.device_))
            budget = min(_CUDA_SHARE * free / 2**20, _CUDA_CAP_MIB)
        return chunk_rows(row_bytes, budget)

    def kneighbors(self, X=None, n_neighbors=1, return_distance=True):
        torch = import_torch()
        Xt = self._Xt
        n_train, d = self._X.shape
        self_query = X is None
        k = check_n_neighbors(n_neighbors, n_train, self_query)
        if self_query:
            Q = None
            nq = n_train
        else:
            Q = np.asarray(X, dtype=self._X.dtype)
            if self.metric == "cosine":
                Q = unit_rows(Q)
            Q = np.ascontiguousarray(Q)
            nq = Q.shape[0]
        item = self._X.dtype.itemsize
        # distance row, topk's working copy, gathered candidates + differences
        row_bytes = 2 * n_train * item + 2 * k * d * item + d * item + k * 24
        step = self._block_rows(torch, row_bytes)
        dist = np.empty((nq, k), dtype=self._X.dtype) if return_distance else None
        ind = np.empty((nq, k), dtype=np.int64)
        with pool_threads(torch.get_num_threads, torch.set_num_threads, self.n_jobs), \
                torch.no_grad():
            for start in progress(range(0, nq, step), self.verbose, "torch k-NN search",
                                  total=-(-nq // step)):
                stop = min(start + step, nq)
                q = Xt[start:stop] if self_query else _as_tensor(
                    torch, Q[start:stop], self.device_)
                # ranking values: |q|^2 is constant along a row, left out
                sq = torch.addmm(self._sqnorm[None, :], q, Xt.T, beta=1, alpha=-2)
                if self_query:
                    rows = torch.arange(stop - start, device=sq.device)
                    sq[rows, start + rows] = float("inf")
                if not return_distance:
                    # ids only: topk's own order (by the expansion)
                    _, cand = torch.topk(sq, k, dim=1, largest=False, sorted=True)
                    del sq
                    ind[start:stop] = cand.cpu().numpy()
                    continue
                _, cand = torch.topk(sq, k, dim=1, largest=False, sorted=False)
                del sq
                diff = Xt[cand]
                diff -= q[:, None, :]
                exact_sq = (diff * diff).sum(dim=2)
                del diff
                exact_sq, order = torch.sort(exact_sq, dim=1, stable=True)
                cand = torch.gather(cand, 1, order)
                dist[start:stop] = squared_to_metric(exact_sq.cpu().numpy(), self.metric)
                ind[start:stop] = cand.cpu().numpy()
        return (dist, ind) if return_distance else ind

    def refine_neighbors(self, X, ind, graph):
        """``ind`` as it is: an exact search has nothing to refine (see
        :mod:`nonn.neighbors._base`)."""
        return ind


def _as_tensor(torch, a, device):
    # from_numpy shares the memory on the CPU (no copy); it warns on read-only
    # arrays although nothing here writes to them
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        t = torch.from_numpy(a)
    return t.to(device) if device != "cpu" else t
