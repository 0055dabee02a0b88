"""Value and key encoding: the table stores bytes, the codec decides types.

Values carry a one-byte type tag so ``get`` returns the type that was ``set``:

======  =========================================================
tag     payload
======  =========================================================
0       ``bytes`` as is
1       ``str``, UTF-8
2       ``int``: signed little-endian, 8 bytes when it fits in int64
        (so ``incr`` can update it in place), more when it does not
3       ``float``: IEEE 754 double
4       ``numpy.ndarray`` of a plain dtype: header + raw C-order data
5       pickle (protocol 5): everything else, bool and None included
6       the user's ``serializer`` (instead of pickle)
======  =========================================================

Pickle is the trust boundary: unpickling runs whatever code the writer put
in the bytes. A codec with ``allow_pickle=False`` (what :class:`Cache` uses
for a cache that anyone but this user can write) still writes tag 5, but only
through a pickler that refuses every global and reads it back through an
unpickler that refuses every global: plain ``None``, ``bool``, ``int``,
``float``, ``str``, ``bytes``, ``bytearray``, ``list``, ``tuple``, ``dict``,
``set`` and ``frozenset`` values round-trip; anything that needs a class or a
function to rebuild is refused at ``set`` (``TypeError``) and at ``get``
(``PickleRefused``) without running any of it.

Keys are ``str`` (stored as UTF-8) or ``bytes`` (stored behind a 0xFF byte,
which UTF-8 never produces), so ``"a"`` and ``b"a"`` are two different keys and
``keys()`` gives each back with its own type.
"""

from __future__ import annotations

import io
import pickle
import struct

import numpy as np

from .errors import LayoutMismatch, PickleRefused

BYTES, STR, INT, FLOAT, NDARRAY, PICKLE, CUSTOM = range(7)
_F64 = struct.Struct("<d")
_I64 = struct.Struct("<q")
_ND_HEAD = struct.Struct("<BB")  # ndim, len(dtype.str)
_BYTES_KEY = b"\xff"


def encode_key(key) -> bytes:
    """The stored form of a key.

    Raises:
        TypeError: the key is neither str nor bytes.
    """
    t = type(key)
    if t is bytes:
        return _BYTES_KEY + key
    if isinstance(key, str):
        try:  # str.encode, not str(key): a str Enum member is stored by its value
            return str.encode(key)
        except UnicodeEncodeError as e:
            raise ValueError(f"key {key!r} cannot be encoded as UTF-8 ({e.reason}); use a bytes key") from None
    if isinstance(key, (bytes, bytearray, memoryview)):
        return _BYTES_KEY + bytes(key)
    raise TypeError(f"cache keys must be str or bytes, not {t.__name__}")


def decode_key(kb: bytes):
    """The user's key back from its stored form."""
    if kb[:1] == _BYTES_KEY:
        return kb[1:]
    return kb.decode()


def encode_int(n: int) -> bytes:
    """An int's stored form: 8 bytes if it fits in int64, else the fewest that hold it."""
    if -(2**63) <= n < 2**63:
        return _I64.pack(n)
    return n.to_bytes((n.bit_length() + 8) // 8 + 1, "little", signed=True)


class Codec:
    """Encode values to (tag, bytes) and back; ``serializer`` replaces pickle.

    ``serializer`` is any object with ``dumps(obj) -> bytes | str`` and
    ``loads(bytes) -> obj`` (the ``json`` module, ``msgpack``...).
    """

    def __init__(self, serializer=None, allow_pickle: bool = True, where: str = "this cache", why: str = ""):
        if serializer is not None and not (hasattr(serializer, "dumps") and hasattr(serializer, "loads")):
            raise TypeError("serializer must have dumps() and loads(), like the json or pickle modules")
        self.serializer = serializer
        #: False: only global-free pickles are written and read (see the module doc).
        self.allow_pickle = allow_pickle
        #: Name the cache and why it does not trust pickle, in refusals.
        self.where = where
        self.why = why or "allow_pickle=False"
        #: When pickle is allowed only because the segment looked private at
        #: open: a callable saying whether it still is, asked before each full
        #: unpickle (a chmod that later opens it to a group must not leave
        #: this process unpickling what that group writes).
        self.still_trusted = None

    def encode(self, value):
        """(tag, payload) for a value.

        Raises:
            TypeError: the value cannot be pickled / serialized (message says why).
        """
        t = type(value)
        if t is bytes:
            return BYTES, value
        if t is str:
            return STR, value.encode()
        if t is int:
            return INT, encode_int(value)
        if t is float:
            return FLOAT, _F64.pack(value)
        if t is np.ndarray and not value.dtype.hasobject and value.dtype.fields is None:
            return NDARRAY, _encode_array(value)
        return self._other(value)

    def _other(self, value):
        if self.serializer is not None:
            try:
                data = self.serializer.dumps(value)
            except Exception as e:
                raise TypeError(f"serializer could not encode {type(value).__name__}: {e}") from e
            if isinstance(data, str):
                data = data.encode()
            return CUSTOM, data
        if not self.allow_pickle:
            try:
                return PICKLE, _safe_dumps(value)
            except _NeedsGlobal as e:
                raise TypeError(
                    f"{self.where} does not trust pickle ({self.why}), and a "
                    f"{type(value).__name__} value needs {e} to be rebuilt, which would run code on read: "
                    f"store bytes, str, int, float, numpy arrays or plain containers of them, pass "
                    f"serializer= (json, msgpack...), or allow_pickle=True if every writer is trusted"
                ) from None
            except Exception as e:
                raise TypeError(f"cannot pickle value of type {type(value).__name__}: {e}") from e
        try:
            return PICKLE, pickle.dumps(value, protocol=5)
        except Exception as e:
            raise TypeError(f"cannot pickle value of type {type(value).__name__}: {e}") from e

    def decode(self, tag: int, data: bytes):
        """The value back from (tag, payload).

        Raises:
            ValueError: a custom-serialized value read without a serializer.
            LayoutMismatch: an unknown tag (a damaged entry).
            PickleRefused: a pickle that needs a global, with pickle not allowed.
        """
        if tag == BYTES:
            return data
        if tag == STR:
            return data.decode()
        if tag == INT:
            return int.from_bytes(data, "little", signed=True)
        if tag == FLOAT:
            return _F64.unpack(data)[0]
        if tag == NDARRAY:
            return _decode_array(data)
        if tag == PICKLE:
            why = self.why
            if self.allow_pickle:
                if self.still_trusted is None or self.still_trusted():
                    return pickle.loads(data)
                why = "users other than you can write it since it was opened: see its owner and mode"
            return _SafeUnpickler(f"{self.where}, which does not trust pickle ({why})", io.BytesIO(data)).load()
        if tag == CUSTOM:
            if self.serializer is None:
                raise ValueError("value was stored with a custom serializer; open the cache with serializer=")
            return self.serializer.loads(data)
        raise LayoutMismatch(
            f"a stored value has unknown type tag {tag}: its entry is damaged, or was written by a "
            f"newer shmcache; delete the key (or run 'shmcache check')"
        )


class _NeedsGlobal(Exception):
    pass


class _SafePickler(pickle.Pickler):
    """Pickles only values that need no global to rebuild.

    ``reducer_override`` sees every object except None, bools and exact
    int/float/str/bytes/list/tuple/dict/set/frozenset (which pickle by opcode),
    so anything reaching it would be written as a class or a reduce call.
    """

    def reducer_override(self, obj):
        if type(obj) is bytearray:  # protocol 5 has an opcode for it
            return NotImplemented
        t = type(obj)
        raise _NeedsGlobal(f"{t.__module__}.{t.__qualname__}")


def _safe_dumps(value) -> bytes:
    buf = io.BytesIO()
    _SafePickler(buf, protocol=5).dump(value)
    return buf.getvalue()


class _SafeUnpickler(pickle.Unpickler):
    """Reads a pickle only if rebuilding it calls nothing: every global (and
    so every class, function and reduce call) is refused before it is looked
    up. Persistent ids are refused by the base class."""

    def __init__(self, where: str, file):
        super().__init__(file)
        self._where = where

    def find_class(self, module, name):
        raise PickleRefused(
            f"a value in {self._where} is a pickle that needs {module}.{name}; unpickling it would run "
            f"code chosen by whoever wrote it. Open the cache with allow_pickle=True only if every user "
            f"who can write it is trusted"
        )


def _encode_array(a: np.ndarray) -> bytes:
    dt = a.dtype.str.encode()
    head = _ND_HEAD.pack(a.ndim, len(dt)) + dt + struct.pack(f"<{a.ndim}q", *a.shape)
    return head + np.ascontiguousarray(a).tobytes()


def _decode_array(data: bytes) -> np.ndarray:
    ndim, dlen = _ND_HEAD.unpack_from(data, 0)
    o = _ND_HEAD.size
    dt = np.dtype(data[o : o + dlen].decode())
    o += dlen
    shape = struct.unpack_from(f"<{ndim}q", data, o)
    o += 8 * ndim
    out = np.empty(shape, dtype=dt)
    if out.nbytes:
        out.reshape(-1).view(np.uint8)[:] = np.frombuffer(data, dtype=np.uint8, offset=o, count=out.nbytes)
    return out
