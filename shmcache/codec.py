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

Keys are ``str`` (stored as UTF-8) or ``bytes`` (stored behind a 0xFF byte,
which UTF-8 never produces), so ``"a"`` and ``b"a"`` are two different keys and
``keys()`` gives each back with its own type.
"""

from __future__ import annotations

import pickle
import struct

import numpy as np

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

    def __init__(self, serializer=None):
        if serializer is not None and not (hasattr(serializer, "dumps") and hasattr(serializer, "loads")):
            raise TypeError("serializer must have dumps() and loads(), like the json or pickle modules")
        self.serializer = serializer

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
        try:
            return PICKLE, pickle.dumps(value, protocol=5)
        except Exception as e:
            raise TypeError(f"cannot pickle value of type {type(value).__name__}: {e}") from e

    def decode(self, tag: int, data: bytes):
        """The value back from (tag, payload).

        Raises:
            ValueError: unknown tag, or a custom-serialized value read without
                a serializer.
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
            return pickle.loads(data)
        if tag == CUSTOM:
            if self.serializer is None:
                raise ValueError("value was stored with a custom serializer; open the cache with serializer=")
            return self.serializer.loads(data)
        raise ValueError(f"unknown value type tag {tag}")


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
