"""Crafting hostile model files from a saved model (test helper).

A model file is a zip of ``.npy`` members plus ``__meta__.npy`` (JSON bytes).
"Rewriting a member" reads the zip, swaps the bytes of ``name.npy`` for
``np.save`` of a new array (optionally announcing the new shape and dtype in
the JSON, as a careful attacker would), and writes a new zip.

The zip writer below is deliberately minimal and hand-made, so that it can
write what ``zipfile`` refuses to: deflated members whose data is streamed
from precompressed pieces (a 1 GiB bomb in about 1 MB, built in
milliseconds), central-directory entries sharing one member's data, and
sizes that lie.
"""

from __future__ import annotations

import io
import json
import struct
import zipfile
import zlib

import numpy as np

META = "__meta__.npy"


# ----------------------------------------------------------------- reading
def members(data):
    """``{name: bytes}`` of every member of the zip ``data`` (bytes or path)."""
    src = io.BytesIO(data) if isinstance(data, (bytes, bytearray)) else data
    with zipfile.ZipFile(src) as zf:
        return {info.filename: zf.read(info) for info in zf.infolist()}


def npy_bytes(arr):
    """The ``.npy`` serialisation of ``arr`` (never pickled)."""
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.asanyarray(arr), allow_pickle=False)
    return buf.getvalue()


def meta_of(data):
    """The JSON metadata of a model file (bytes or path)."""
    return json.loads(npy_array(members(data)[META]).tobytes().decode())


def npy_array(raw):
    return np.lib.format.read_array(io.BytesIO(raw), allow_pickle=False)


def meta_bytes(meta):
    return npy_bytes(np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8))


def raw_meta_bytes(text):
    """A ``__meta__.npy`` member holding ``text`` (str or bytes) verbatim."""
    text = text.encode() if isinstance(text, str) else text
    return npy_bytes(np.frombuffer(text, dtype=np.uint8))


# ----------------------------------------------------------------- writing
class Entry:
    """One zip member: ``pieces`` (an iterable of bytes, the member's data as
    stored), ``method`` (0 stored, 8 deflated), the CRC-32 and uncompressed
    size it declares, and the offset of an earlier entry whose local header
    and data it shares (``alias_of``: a name), if any."""

    def __init__(self, name, pieces, method=0, crc=None, size=None, alias_of=None):
        self.name = name
        self.pieces = pieces
        self.method = method
        self.crc = crc
        self.size = size
        self.alias_of = alias_of


def stored(name, data):
    return Entry(name, [data], 0, zlib.crc32(data), len(data))


def write_zip(path, entries):
    """Write ``entries`` as a zip (no zip64: every size below 4 GiB)."""
    central = []
    offsets = {}
    with open(path, "wb") as fh:
        for e in entries:
            name = e.name.encode()
            if e.alias_of is not None:
                off, crc, csize, size, method = offsets[e.alias_of]
                central.append((name, off, crc, csize, size, method))
                continue
            off = fh.tell()
            pieces = list(e.pieces)
            csize = sum(len(p) for p in pieces)
            crc = e.crc if e.crc is not None else zlib.crc32(b"".join(pieces))
            size = e.size if e.size is not None else csize
            fh.write(struct.pack("<4s5H3L2H", b"PK\x03\x04", 20, 0, e.method, 0, 0x21,
                                 crc, csize, size, len(name), 0))
            fh.write(name)
            for p in pieces:
                fh.write(p)
            offsets[e.name] = (off, crc, csize, size, e.method)
            central.append((name, off, crc, csize, size, e.method))
        cd_start = fh.tell()
        for name, off, crc, csize, size, method in central:
            fh.write(struct.pack("<4s6H3L5H2L", b"PK\x01\x02", 20, 20, 0, method, 0, 0x21,
                                 crc, csize, size, len(name), 0, 0, 0, 0, 0, off))
            fh.write(name)
        cd_size = fh.tell() - cd_start
        fh.write(struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, len(central), len(central),
                             cd_size, cd_start, 0))
    return path


def rewrite(src, dst, arrays=None, meta=None, drop=(), raw=None, announce=True,
            prefix=""):
    """Copy the model ``src`` to ``dst`` with members replaced.

    ``arrays``: ``{name: ndarray}`` swapped in as ``name.npy`` (under
    ``prefix``, e.g. ``"detector/"``); with ``announce`` the JSON's array
    table is updated to the new shape and dtype (the consistent lie).
    ``meta``: a dict merged into the JSON, or a function editing it in place.
    ``drop``: member names (without ``.npy``) removed. ``raw``: ``{member
    file name: bytes}`` written verbatim (e.g. a hand-made ``__meta__.npy``).
    """
    files = members(src)
    table = json.loads(npy_array(files[META]).tobytes().decode())
    arrays_meta = table
    if prefix:
        arrays_meta = table[prefix.rstrip("/")]
    for name, arr in (arrays or {}).items():
        arr = np.asanyarray(arr)
        files[f"{prefix}{name}.npy"] = npy_bytes(arr)
        if announce:
            arrays_meta.setdefault("arrays", {})[name] = {"shape": list(arr.shape),
                                                          "dtype": arr.dtype.str}
    for name in drop:
        files.pop(f"{prefix}{name}.npy", None)
    if callable(meta):
        meta(table)
    elif meta:
        table.update(meta)
    files[META] = meta_bytes(table)
    files.update(raw or {})
    return write_zip(dst, [stored(n, b) for n, b in files.items()])


# ------------------------------------------------------------------- bombs
_CHUNK = 1 << 20


def _deflate(data, finish):
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    return c.compress(data) + c.flush(zlib.Z_FINISH if finish else zlib.Z_FULL_FLUSH)


def _crc_zero_byte(r):
    for _ in range(8):
        r = (r >> 1) ^ (0xEDB88320 & -(r & 1))
    return r


def _gf2_apply(cols, v):
    out = i = 0
    while v:
        if v & 1:
            out ^= cols[i]
        v >>= 1
        i += 1
    return out


def crc32_zeros(crc, n):
    """CRC-32 of some data (whose CRC-32 is ``crc``) followed by ``n`` zero
    bytes, without the zeros: the register update of a zero byte is linear,
    so ``n`` of them are one 32 x 32 matrix power over GF(2)."""
    cols = [_crc_zero_byte(1 << i) for i in range(32)]
    r = crc ^ 0xFFFFFFFF
    while n:
        if n & 1:
            r = _gf2_apply(cols, r)
        cols = [_gf2_apply(cols, c) for c in cols]
        n >>= 1
    return r ^ 0xFFFFFFFF


def deflated_zeros(name, header, n_zeros):
    """A deflated member: ``header`` then ``n_zeros`` zero bytes, as a valid
    deflate stream of identical precompressed 1 MiB blocks (each ends with a
    full flush, so they concatenate): about 1 KB per MiB, built at once."""
    q, rem = divmod(n_zeros, _CHUNK)
    block = _deflate(bytes(_CHUNK), finish=False)
    head = _deflate(header, finish=False)
    tail = _deflate(bytes(rem), finish=True)

    def pieces():
        yield head
        for _ in range(q):
            yield block
        yield tail

    crc = crc32_zeros(zlib.crc32(header), n_zeros)
    return Entry(name, pieces(), method=8, crc=crc, size=len(header) + n_zeros)


def npy_header(shape, dtype):
    """The ``.npy`` header (format 1.0, or 2.0 when needed) of an array of
    ``shape`` and ``dtype``, without its data."""
    buf = io.BytesIO()
    d = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False,
         "shape": tuple(shape)}
    try:
        np.lib.format.write_array_header_1_0(buf, d)
    except ValueError:  # a header over 64 KiB
        np.lib.format.write_array_header_2_0(buf, d)
    return buf.getvalue()


def deflate_bomb(src, dst, member, shape, dtype, announce=False, prefix=""):
    """``src`` with the member ``member`` (a file name such as
    ``"__meta__.npy"``) replaced by a deflated ``.npy`` of zeros of
    ``shape``/``dtype``; with ``announce`` the JSON declares that shape."""
    files = members(src)
    if announce:
        table = json.loads(npy_array(files[META]).tobytes().decode())
        target = table[prefix.rstrip("/")] if prefix else table
        target["arrays"][member[len(prefix):-4]] = {"shape": list(shape),
                                                    "dtype": np.dtype(dtype).str}
        files[META] = meta_bytes(table)
    nbytes = int(np.prod(shape, dtype=object)) * np.dtype(dtype).itemsize
    entries = [stored(n, b) for n, b in files.items() if n != member]
    entries.append(deflated_zeros(member, npy_header(shape, dtype), nbytes))
    return write_zip(dst, entries)


def header_bomb(src, dst, member, shape, dtype="<f8"):
    """``src`` with the ``.npy`` header of ``member`` declaring ``shape``
    (stored, its data bytes unchanged: far fewer than the header claims)."""
    files = members(src)
    old = files[member]
    data = old[len(npy_header(npy_array(old).shape, npy_array(old).dtype)):]
    files[member] = npy_header(shape, dtype) + data
    return write_zip(dst, [stored(n, b) for n, b in files.items()])


def alias_bomb(src, dst, member, copies):
    """``src`` plus ``copies`` central-directory entries that all share the
    data of ``member``: the declared total far exceeds the file."""
    files = members(src)
    entries = [stored(n, b) for n, b in files.items()]
    entries += [Entry(f"copy{i}.npy", None, alias_of=member) for i in range(copies)]
    return write_zip(dst, entries)


def nested_json(depth):
    """Valid JSON nested ``depth`` lists deep."""
    return "[" * depth + "]" * depth
