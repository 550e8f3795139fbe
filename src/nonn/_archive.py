"""Model archives: uncompressed ``.npy`` members and one JSON document in a zip.

This is the one reader and writer of nonn's model files (detectors and
image systems). The layout is numpy's ``.npz``: each array is a member
``name.npy`` stored without compression, and the JSON metadata is the
``uint8`` array ``__meta__.npy``, so ``np.load`` can inspect a file and an
older nonn can read a newer file's metadata far enough to ask for an
upgrade.

Reading never trusts a size written in the file. Before any data is read:

* the path must be a regular file (a named pipe or a device is refused
  without being opened, so nothing blocks);
* the zip's central directory is located from its end record and must be
  small (``MAX_MEMBERS``, ``MAX_DIRECTORY_BYTES``), every member stored uncompressed (a
  compressed member could expand without bound: a "zip bomb") and
  unencrypted, its data inside the file, and the members' sizes must sum to
  at most the file's size (no two entries sharing one member's data);
* a member's ``.npy`` header must describe a plain numeric array whose
  byte size is exactly the member's data size;
* the metadata member is at most ``MAX_META_BYTES`` and nested at most
  ``MAX_JSON_DEPTH`` deep.

So the memory a read takes is bounded by the file's size: arrays are
allocated at their declared size, which the checks above tie to bytes that
are really in the file, and filled in blocks. Every refusal is a
:class:`ModelFileError` that names the member; none suggests unpickling
(nothing is ever unpickled).
"""

from __future__ import annotations

import io
import json
import math
import os
import stat
import struct
import zipfile

import numpy as np

META = "__meta__"
#: the JSON metadata of a model is a few KiB; more is not a nonn model
MAX_META_BYTES = 1 << 20
#: a model has a dozen members; zipfile's record of each takes ~10x its
#: directory entry, so the directory is capped before zipfile parses it
MAX_MEMBERS = 64
MAX_DIRECTORY_BYTES = 1 << 16
#: nonn's metadata nests 4 levels (parameters -> backend_params -> values)
MAX_JSON_DEPTH = 32
#: array data are read (and checked) in blocks of this many bytes
_BLOCK = 1 << 22
_NUMERIC_KINDS = "biuf"


class ModelFileError(ValueError):
    """A model file that nonn refuses to load."""


# ------------------------------------------------------------------ writing
def write(path, arrays, meta):
    """Write ``arrays`` (``{member name: ndarray}``; names may contain ``/``)
    and the JSON document ``meta`` to ``path`` atomically: a crash or an
    error leaves the previous file (if any) untouched."""
    from ._io import atomic_write

    body = json.dumps(meta, allow_nan=False).encode("utf-8")
    if len(body) > MAX_META_BYTES:
        raise ValueError(f"The model's metadata is {len(body)} bytes; nonn writes at most "
                         f"{MAX_META_BYTES} (large values belong in arrays).")

    def _write(fh):
        with zipfile.ZipFile(fh, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
            for name, arr in arrays.items():
                _write_member(zf, name, np.ascontiguousarray(arr))
            _write_member(zf, META, np.frombuffer(body, dtype=np.uint8))

    return atomic_write(path, _write)


def _write_member(zf, name, arr):
    with zf.open(name + ".npy", "w", force_zip64=True) as out:
        np.lib.format.write_array(out, arr, allow_pickle=False)


# ------------------------------------------------------------------ reading
class _Window(io.RawIOBase):
    """Read-only view of bytes ``[start, start + size)`` of the file ``fh``
    (an archive stored inside another one, read in place)."""

    def __init__(self, fh, start, size):
        super().__init__()
        self._fh, self._start, self._size, self._pos = fh, start, size, 0

    def readable(self):
        return True

    def seekable(self):
        return True

    def tell(self):
        return self._pos

    def seek(self, offset, whence=io.SEEK_SET):
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        if base + offset < 0:
            raise OSError("seek before the start of the embedded archive")
        self._pos = base + offset
        return self._pos

    def readinto(self, buf):
        n = max(min(len(buf), self._size - self._pos), 0)
        if n == 0:
            return 0
        self._fh.seek(self._start + self._pos)
        data = self._fh.read(n)
        buf[:len(data)] = data
        self._pos += len(data)
        return len(data)


def _unreadable(where, what, create, detail):
    return ModelFileError(f"{where} is not a readable nonn {what} file (truncated, corrupted, "
                          f"or not a {what} at all: {detail}). Re-save it with {create}.")


def _json_depth(value):
    """Nesting depth of a parsed JSON value (iterative: no recursion)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        v, depth = stack.pop()
        if isinstance(v, (dict, list)):
            deepest = max(deepest, depth)
            if depth > MAX_JSON_DEPTH:
                break
            stack.extend((x, depth + 1) for x in (v.values() if isinstance(v, dict) else v))
    return deepest


def _end_record(fh, size, unreadable):
    """(member count, central directory size, central directory offset) from
    the zip's end record (zip64 aware), read without trusting them;
    ``unreadable(detail)`` is the error to raise."""
    tail = min(size, 22 + 0xFFFF)
    fh.seek(size - tail)
    data = fh.read(tail)
    pos = data.rfind(b"PK\x05\x06")
    if pos < 0 or len(data) - pos < 22:
        raise unreadable("no zip end record")
    _, disk, cd_disk, _, count, cd_size, cd_offset, _ = struct.unpack(
        "<4s4H2LH", data[pos:pos + 22])
    if 0xFFFF in (disk, cd_disk, count) or 0xFFFFFFFF in (cd_size, cd_offset):
        loc = data[pos - 20:pos] if pos >= 20 else b""
        if loc[:4] != b"PK\x06\x07":
            raise unreadable("a zip64 end record is announced but missing")
        (rec_offset,) = struct.unpack("<Q", loc[8:16])
        if rec_offset + 56 > size:
            raise unreadable("the zip64 end record lies outside the file")
        fh.seek(rec_offset)
        rec = fh.read(56)
        if rec[:4] != b"PK\x06\x06":
            raise unreadable("corrupted zip64 end record")
        count, cd_size, cd_offset = struct.unpack("<3Q", rec[32:56])
    return count, cd_size, cd_offset


class Archive:
    """A model archive opened for checked reading (see the module notes).

    ``where`` names the file in messages, ``what`` the kind of file ("model",
    "image model") and ``create`` how one is made. Use as a context manager.
    """

    def __init__(self, fh, size, where, what="model", create="`nonn fit` / estimator.save()",
                 owns=True):
        self._fh, self._size, self.where, self._owns = fh, size, where, owns
        self.what, self.create = what, create
        self._zip = None
        self._headers = {}
        try:
            self._open_zip()
        except BaseException:
            self.close()
            raise

    # -------------------------------------------------------------- opening
    @classmethod
    def open(cls, path, what="model", create="`nonn fit` / estimator.save()"):
        """Open the ``what`` file at ``path`` (``create`` says how one is made,
        for the messages)."""
        path = os.fspath(path)
        where = repr(path)
        try:
            st = os.stat(path)
        except FileNotFoundError:
            raise FileNotFoundError(f"No {what} file at {where}. Check the path, or create "
                                    f"one with {create}.") from None
        if not stat.S_ISREG(st.st_mode):
            kind = ("a folder" if stat.S_ISDIR(st.st_mode) else
                    "a named pipe" if stat.S_ISFIFO(st.st_mode) else
                    "a device" if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode) else
                    "a socket" if stat.S_ISSOCK(st.st_mode) else "not a regular file")
            raise ModelFileError(f"{where} is {kind}, not a nonn {what} file; give the path "
                                 f"of a file written by {create}.")
        # O_NONBLOCK: should the path have become a pipe since the stat, the
        # open returns at once (and the fstat below refuses it)
        flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)
        fd = os.open(path, flags)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise ModelFileError(f"{where} is not a regular file, not a nonn {what} "
                                     "file.")
            fh = os.fdopen(fd, "rb")
        except BaseException:
            os.close(fd)
            raise
        try:
            head = fh.read(6)
        except BaseException:
            fh.close()
            raise
        if head == b"\x93NUMPY":
            fh.close()
            raise ModelFileError(f"{where} holds a single array, not a nonn {what} file (a "
                                 f"{what} is the .npz archive {create} write).")
        if head[:2] != b"PK":
            fh.close()
            raise _unreadable(where, what, create, "not a zip archive")
        return cls(fh, st.st_size, where, what, create)

    def _unreadable(self, detail):
        return _unreadable(self.where, self.what, self.create, detail)

    def _open_zip(self):
        where, size = self.where, self._size
        count, cd_size, cd_offset = _end_record(self._fh, size, self._unreadable)
        if cd_offset + cd_size > size:
            raise self._unreadable("its zip directory lies outside the file")
        if cd_size > MAX_DIRECTORY_BYTES or count > MAX_MEMBERS:
            raise ModelFileError(f"{where} lists {count} members in a {cd_size}-byte "
                                 "directory; a nonn model has a dozen. It is not a nonn "
                                 "model file.")
        self._fh.seek(0)
        try:
            self._zip = zipfile.ZipFile(self._fh)
        except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError, ValueError,
                NotImplementedError, struct.error) as exc:
            raise self._unreadable(str(exc)) from None
        infos = self._zip.infolist()
        names = [i.filename for i in infos]
        if len(set(names)) != len(names):
            raise ModelFileError(f"{where} lists a member twice; the file is corrupted or "
                                 "crafted.")
        total = 0
        for info in infos:
            name = info.filename
            if info.compress_type != zipfile.ZIP_STORED:
                raise ModelFileError(
                    f"{where}: the member {name!r} is compressed (zip method "
                    f"{info.compress_type}); nonn writes every member uncompressed and "
                    "refuses compressed ones, which could expand without bound. Re-save "
                    "the model with nonn.")
            if info.flag_bits & 0x1:
                raise ModelFileError(f"{where}: the member {name!r} is encrypted; nonn "
                                     "model files never are.")
            if info.compress_size != info.file_size or info.header_offset < 0 or (
                    info.header_offset + 30 + info.file_size > size):
                raise ModelFileError(f"{where}: the member {name!r} declares "
                                     f"{info.file_size} bytes that are not in the "
                                     f"{size}-byte file (truncated or crafted).")
            total += info.file_size
        if total > size:
            raise ModelFileError(f"{where}: its members declare {total} bytes in all, more "
                                 f"than the {size}-byte file holds (entries sharing data: "
                                 "crafted).")
        self._infos = {name[:-4] if name.endswith(".npy") else name: info
                       for name, info in zip(names, infos)}

    @classmethod
    def _embedded(cls, outer, start, size, where):
        return cls(_Window(outer._fh, start, size), size, where, owns=False)

    def close(self):
        if self._zip is not None:
            self._zip.close()
            self._zip = None
        if self._owns and self._fh is not None:
            self._fh.close()
        self._fh = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -------------------------------------------------------------- members
    def names(self):
        """The member names (``.npy`` dropped)."""
        return set(self._infos)

    def __contains__(self, name):
        return name in self._infos

    def _info(self, name):
        info = self._infos.get(name)
        if info is None:
            raise ModelFileError(f"{self.where} lacks the member {name!r}; the file is "
                                 "incomplete.")
        return info

    def _stream(self, name):
        """The member's header (shape, fortran order, dtype, header bytes)
        and a stream positioned at its data."""
        info = self._info(name)
        try:
            fp = self._zip.open(info)
        except (zipfile.BadZipFile, EOFError, OSError, ValueError, NotImplementedError,
                struct.error) as exc:
            raise ModelFileError(f"{self.where}: the member {name!r} is corrupted "
                                 f"({exc}).") from None
        try:
            try:
                version = np.lib.format.read_magic(fp)
                if version == (1, 0):
                    shape, fortran, dtype = np.lib.format.read_array_header_1_0(fp)
                elif version == (2, 0):
                    shape, fortran, dtype = np.lib.format.read_array_header_2_0(fp)
                else:
                    raise ValueError(f"npy format version {version}")
                offset = fp.tell()
            except (ValueError, SyntaxError, TypeError, RecursionError, MemoryError,
                    UnicodeDecodeError, EOFError, OSError, zipfile.BadZipFile,
                    struct.error):
                # numpy's messages here may advise loading unsafely; ours say what is wrong
                raise ModelFileError(f"{self.where}: the member {name!r} has no valid .npy "
                                     "array header; the file is corrupted or not a nonn "
                                     "model.") from None
            if (dtype.kind not in _NUMERIC_KINDS or dtype.names is not None
                    or dtype.subdtype is not None or dtype.hasobject):
                raise ModelFileError(f"{self.where}: the member {name!r} holds dtype "
                                     f"{dtype!s}; nonn model arrays are plain numbers.")
            if any(not isinstance(n, int) or n < 0 for n in shape):
                raise ModelFileError(f"{self.where}: the member {name!r} declares the "
                                     f"invalid shape {shape}.")
            nbytes = math.prod(shape) * dtype.itemsize
            if nbytes != info.file_size - offset:
                raise ModelFileError(
                    f"{self.where}: the member {name!r} declares shape {shape} of "
                    f"{dtype.name} ({nbytes} bytes) but holds {info.file_size - offset} "
                    "bytes; the file is truncated, corrupted or crafted.")
        except BaseException:
            fp.close()
            raise
        return shape, fortran, dtype, offset, fp

    def header(self, name):
        """``(shape, dtype)`` of the array member ``name``, from its ``.npy``
        header (checked against the member's size); no data is read."""
        if name not in self._headers:
            shape, _, dtype, _, fp = self._stream(name)
            fp.close()
            self._headers[name] = (shape, dtype)
        return self._headers[name]

    def read(self, name):
        """The array member ``name`` (native byte order, never pickled)."""
        shape, fortran, dtype, _, fp = self._stream(name)
        with fp:
            arr = np.empty(shape[::-1] if fortran else shape, dtype=dtype)
            buf = memoryview(arr.reshape(-1).view(np.uint8))
            pos, end = 0, len(buf)
            try:
                while pos < end:
                    chunk = fp.read(min(_BLOCK, end - pos))
                    if not chunk:
                        raise EOFError("the member ends early")
                    buf[pos:pos + len(chunk)] = chunk
                    pos += len(chunk)
                if fp.read(1):  # also makes zipfile check the CRC-32
                    raise ValueError("the member holds more bytes than its header declares")
            except (zipfile.BadZipFile, EOFError, OSError, ValueError) as exc:
                raise ModelFileError(f"{self.where}: the array {name!r} is corrupted "
                                     f"({exc}). Re-save the model.") from None
        if fortran:
            arr = arr.T
        if not dtype.isnative:
            arr = arr.byteswap(inplace=True).view(dtype.newbyteorder("="))
        return arr

    def meta(self):
        """The JSON metadata (a dict), size- and depth-capped."""
        where = self.where
        if META not in self._infos:
            raise ModelFileError(f"{where} has no nonn metadata; it is not a nonn model "
                                 "file.")
        if self._infos[META].file_size > MAX_META_BYTES + 4096:
            raise ModelFileError(f"{where}: its metadata is {self._infos[META].file_size} "
                                 f"bytes; nonn's is at most {MAX_META_BYTES}. It is not a "
                                 "nonn model file.")
        shape, dtype = self.header(META)
        if len(shape) != 1 or dtype != np.uint8:
            raise ModelFileError(f"{where}: its metadata member is not a byte string; the "
                                 "file is corrupted.")
        raw = self.read(META).tobytes()
        try:
            meta = json.loads(raw.decode("utf-8"))
        except (ValueError, UnicodeDecodeError, RecursionError) as exc:
            text = "nested too deeply" if isinstance(exc, RecursionError) else exc
            raise ModelFileError(f"{where} has corrupted metadata ({text}).") from None
        if _json_depth(meta) > MAX_JSON_DEPTH:
            raise ModelFileError(f"{where} has metadata nested more than {MAX_JSON_DEPTH} "
                                 "levels deep; it is not a nonn model file.")
        if not isinstance(meta, dict):
            raise ModelFileError(f"{where} is not a nonn model file (its metadata is not a "
                                 "JSON object).")
        return meta

    def embedded(self, name, where):
        """The archive stored as the bytes of the ``uint8`` member ``name``
        (the image-model format 1 nests a model file this way), read in
        place through a window on this file: nothing is copied."""
        shape, fortran, dtype, offset, fp = self._stream(name)
        fp.close()
        if len(shape) != 1 or dtype != np.uint8:
            raise ModelFileError(f"{self.where}: the member {name!r} is not a byte string; "
                                 "the file is corrupted.")
        info = self._info(name)
        self._fh.seek(info.header_offset)
        local = self._fh.read(30)
        if len(local) < 30 or local[:4] != b"PK\x03\x04":
            raise ModelFileError(f"{self.where}: the member {name!r} is corrupted (bad "
                                 "local header).")
        n_name, n_extra = struct.unpack("<2H", local[26:30])
        start = info.header_offset + 30 + n_name + n_extra + offset
        if start + shape[0] > self._size:
            raise ModelFileError(f"{self.where}: the member {name!r} lies outside the "
                                 "file; it is truncated or crafted.")
        return type(self)._embedded(self, start, shape[0], where)
