"""The ``nonn`` command line: a thin layer over the library.

::

    nonn fit TRAIN -o MODEL [--detector knnn|knn|global|local] [--scale none|standard|...]
             [--header auto|yes|no] [--cluster ADDRESS|local] [options]
    nonn score MODEL QUERIES -o SCORES [--fdr Q] [--header auto|yes|no]
               [--cluster ADDRESS|local]
    nonn calibrate MODEL NORMALS... [--false-alarm-rate A] [-o MODEL2]
    nonn info MODEL [--verify]      (also image models from `nonn fit-images`)
    nonn explain MODEL QUERIES -o EXPLANATIONS.csv|.npz [--top N] [--plot DIR]
    nonn update MODEL NEW_NORMALS [-o MODEL2]
    nonn demo [--out DIR] [--seeds N] [--sizes 100,200,...] [--quick]
              (synthetic Table 5, then one-class 8x8 digits)
    nonn bench [--suite NAME] [--out DIR]   (needs NONN_DATA)
    nonn fit-images / score-images / eval-images / make-defects / export   (the vision extra)

TRAIN and QUERIES are a matrix file or a folder of .npy/.parquet shards;
``--cluster`` runs fit and score on Dask (``nonn.distributed``). Column
names (a CSV header, Parquet columns) are stored in the model and QUERIES
are matched to them by name.

Every command has ``--help``. Errors print one ``nonn: error: ...`` line on
stderr, phrased in flags, and exit with status 2; success exits with 0;
SIGTERM removes any partial output and exits with 143. Progress bars are
drawn only when stderr is a terminal (``--progress`` / ``--no-progress``).

One package: :mod:`nonn.cli.detectors` (fit, score, calibrate, info, demo,
bench), :mod:`nonn.cli.explain` (explain, update), :mod:`nonn.cli.images`
(the image commands) and :mod:`nonn.cli._common` (what they share); this
module builds the parser and runs a command.
"""

from __future__ import annotations

import argparse
import functools
import signal
import sys
import threading
import warnings

from .. import __version__
from . import detectors, explain, images
from ._common import in_flags, note

__all__ = ["main", "build_parser", "in_flags"]


def build_parser():
    """The argparse parser of the ``nonn`` command."""
    parser = argparse.ArgumentParser(
        prog="nonn",
        description="k-NNN anomaly detection (nearest neighbors of neighbors; "
        "Nizan & Tal, WACV Workshops 2024).",
    )
    parser.add_argument("--version", action="version", version=f"nonn {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    detectors.register(sub)
    # per-feature explanations, new normal samples
    explain.register(sub)
    # the image commands import without torch and load it when one runs
    images.register(sub)
    return parser


def _runs_kernels(argv):
    """Whether the command line ``argv`` can run nonn's compiled kernels
    (every command but those that only read metadata or print help)."""
    argv = [str(a) for a in argv]
    words = [a for a in argv if not a.startswith("-")]
    if {"--help", "-h", "--version"} & set(argv):
        return False
    return not (words[:1] == ["info"] and "--verify" not in argv)


class _CompileNotice:
    """One line on stderr when numba compiles nonn's kernels (the first use
    after installing or upgrading, ~20 s); nothing when it loads them from
    its cache. Numba signals real compilations only ("numba:compile" events
    are not sent for cache hits)."""

    def __init__(self, argv):
        self.said = False
        self.listener = None
        self.argv = argv

    def __enter__(self):
        if "numba" not in sys.modules and not _runs_kernels(self.argv):
            return self  # e.g. `nonn info`: no kernel, no need to import numba
        try:
            from numba.core import event
        except ImportError:  # pragma: no cover - numba is a dependency
            return self
        notice = self

        class Listener(event.Listener):
            def on_start(self, ev):
                dispatcher = (ev.data or {}).get("dispatcher")
                module = getattr(getattr(dispatcher, "py_func", None), "__module__", "") or ""
                if not notice.said and module.startswith("nonn."):
                    notice.said = True
                    note("compiling kernels (first use, ~20 s)")

            def on_end(self, ev):
                pass

        self.listener = Listener()
        event.register("numba:compile", self.listener)
        return self

    def __exit__(self, *exc):
        if self.listener is not None:
            from numba.core import event

            event.unregister("numba:compile", self.listener)


def _one_line(exc):
    if isinstance(exc, OSError) and exc.filename is not None and exc.strerror:
        text = f"{exc.filename}: {exc.strerror}"
    else:
        text = str(exc) or type(exc).__name__
    return " ".join(text.split())


def _show_warning(message, category, filename, lineno, file=None, line=None):
    print(f"nonn: warning: {in_flags(' '.join(str(message).split()))}", file=sys.stderr)


class Terminated(BaseException):
    """SIGTERM, raised in the main thread so that every clean-up runs (a
    BaseException, like KeyboardInterrupt, so no ``except Exception``
    swallows it)."""


def _clean_exit_on_sigterm(main):
    """Run ``main`` with SIGTERM turned into :class:`Terminated`: temporary
    files are removed as on any error, one line is printed, and the status is
    143 (128 + SIGTERM), what a shell reports for a process SIGTERM ended."""
    @functools.wraps(main)
    def run(argv=None):
        if threading.current_thread() is not threading.main_thread():
            return main(argv)

        def terminate(signum, frame):
            # a second SIGTERM must not interrupt the clean-up of the first
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            raise Terminated

        previous = signal.signal(signal.SIGTERM, terminate)
        try:
            with _CompileNotice(sys.argv[1:] if argv is None else argv):
                return main(argv)
        except Terminated:
            print("nonn: terminated (SIGTERM); no partial output was left", file=sys.stderr)
            return 128 + signal.SIGTERM
        finally:
            signal.signal(signal.SIGTERM, previous)
    return run


@_clean_exit_on_sigterm
def main(argv=None):
    """Run the ``nonn`` command with ``argv`` (default: ``sys.argv[1:]``).

    Returns the exit status: 0 on success, 2 on a usage or input error.
    """
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, or a usage error
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _show_warning
            return args.handler(args)
    except (OSError, ValueError, ImportError) as exc:
        # ModelFileError is a ValueError; a missing optional dependency an ImportError.
        print(f"nonn: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("nonn: interrupted", file=sys.stderr)
        return 130
    except MemoryError as exc:
        print(f"nonn: error: out of memory ({_one_line(exc)}). Use a smaller input, or a "
              "machine with more memory.", file=sys.stderr)
        return 2
    except RecursionError:
        print("nonn: error: an input is nested too deeply to process.", file=sys.stderr)
        return 2
    except Exception as exc:  # noqa: BLE001 - the CLI's promise: one line, exit 2
        print(f"nonn: error: unexpected {type(exc).__name__}: {_one_line(exc)} (this is a "
              "bug in nonn; please report it with the command that gave it)", file=sys.stderr)
        return 2
