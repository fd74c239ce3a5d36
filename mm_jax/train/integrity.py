"""Per-array digests of a train state: written with every checkpoint, verified on restore.

Orbax checks no content: a flipped byte in an array file restores silently (and a NaN
there poisons every later step). So each checkpoint carries, per array, a 64-bit digest of
its bits and whether it is finite, computed on device from the state being saved and
recomputed from the restored arrays.

The digest is two wrapping uint32 sums over the array's flat bit patterns,
`sum(bits_i * (2i + 1))` and `sum(bits_i * ((i * 0x9E3779B1) | 1))` (mod 2^32). Integer
addition mod 2^32 is associative and commutative, so the sums do not depend on how the
array is sharded or in which order XLA reduces: a checkpoint written on 8 devices verifies
when restored onto 1. Changing any one byte changes bits_i by d * 2^k (0 < d < 256,
k <= 24), which times an odd weight is never 0 mod 2^32: every single-byte corruption is
detected.

Around the digests, the record (`record`) holds what else a resume reads: a digest of
each process's data position (grain writes it as JSON beside the state), the run's
counters and config, the LoRA base's digest, and a digest of the whole record, so that
a changed byte anywhere a resume reads is found, not trusted.
"""

from __future__ import annotations

import hashlib
import json

import jax
import jax.numpy as jnp
import numpy as np

_UNSIGNED = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}


def path_name(path) -> str:
  """`params/decoder/embedding/value` for a pytree key path."""
  return jax.tree_util.keystr(path, simple=True, separator="/")


def _bits(x: jax.Array) -> jax.Array:
  """uint32[n]: each element's bit pattern (bool and 8/16-bit types widened)."""
  x = x.reshape(-1)
  if x.dtype == jnp.bool_:
    x = x.astype(jnp.uint8)
  size = jnp.dtype(x.dtype).itemsize
  if size not in _UNSIGNED:
    raise TypeError(f"integrity: no digest for dtype {x.dtype} (itemsize {size})")
  return jax.lax.bitcast_convert_type(x, _UNSIGNED[size]).astype(jnp.uint32)


def _leaf_summary(x: jax.Array) -> jax.Array:
  """uint32[3]: the two digest sums and 1 if every value is finite."""
  bits = _bits(x)
  i = jax.lax.iota(jnp.uint32, bits.shape[0])
  d1 = jnp.sum(bits * (2 * i + 1), dtype=jnp.uint32)
  d2 = jnp.sum(bits * ((i * jnp.uint32(0x9E3779B1)) | 1), dtype=jnp.uint32)
  finite = (jnp.all(jnp.isfinite(x)) if jnp.issubdtype(x.dtype, jnp.inexact)
            else jnp.bool_(True))
  return jnp.stack([d1, d2, finite.astype(jnp.uint32)])


@jax.jit
def _summaries(leaves: list[jax.Array]) -> jax.Array:
  return jnp.stack([_leaf_summary(x) for x in leaves]) if leaves else jnp.zeros((0, 3),
                                                                               jnp.uint32)


def summarise(tree) -> dict[str, dict]:
  """{array path: {"digest": 16 hex digits, "finite": bool}} for every array in `tree`
  (None subtrees have no arrays). One jit over the whole tree; the result is replicated,
  so every process gets the same dict."""
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  names = [path_name(p) for p, _ in flat]
  rows = np.asarray(jax.device_get(_summaries([x for _, x in flat])))
  return {name: {"digest": f"{int(r[0]):08x}{int(r[1]):08x}", "finite": bool(r[2])}
          for name, r in zip(names, rows, strict=True)}


def nonfinite(summary: dict[str, dict]) -> list[str]:
  return [name for name, s in summary.items() if not s["finite"]]


def mismatches(stored: dict[str, dict], restored: dict[str, dict]) -> list[str]:
  """Restored arrays whose digest differs from the stored one, or that have none. The
  restored tree may be a part of the stored one (eval reads only the weights)."""
  return [name for name, s in restored.items()
          if name not in stored or stored[name]["digest"] != s["digest"]]


RECORD_VERSION = 2


def json_digest(value) -> str | None:
  """16 hex digits of sha256 over `value`'s canonical JSON (key order and spacing free, so
  a file's pretty-printed copy has the digest of the dict it came from); None for None."""
  if value is None:
    return None
  text = json.dumps(value, sort_keys=True, separators=(",", ":"))
  return hashlib.sha256(text.encode()).hexdigest()[:16]


def data_digests(local_state) -> list[str]:
  """The digest of every process's data-position state, in process order (each process
  passes its own; every process gets the whole list)."""
  mine = json_digest(local_state)
  if jax.process_count() == 1:
    return [mine]
  from jax.experimental import multihost_utils

  rows = multihost_utils.process_allgather(np.frombuffer(bytes.fromhex(mine), np.uint8))
  return [bytes(np.asarray(row, np.uint8)).hex() for row in np.asarray(rows)]


def record(arrays: dict, *, data: list[str], counters: dict, config: dict | None,
           base: dict | None) -> dict:
  """A checkpoint's integrity record, sealed by the digest of everything else in it."""
  body = {"version": RECORD_VERSION, "arrays": arrays, "data": data, "counters": counters,
          "config": config, "base": json_digest(base)}
  return {**body, "digest": json_digest(body)}


def check_record(stored: dict) -> str | None:
  """Why a record read back cannot be trusted, or None."""
  if not isinstance(stored, dict) or "arrays" not in stored:
    return "integrity record malformed"
  if "digest" not in stored:
    return ("integrity record from an older mm_jax (its data position, counters and config "
            "have no digest); --config.checkpoint.allow_unverified=True resumes from it")
  body = {k: v for k, v in stored.items() if k != "digest"}
  if json_digest(body) != stored["digest"]:
    return "integrity record does not match its own digest (edited or corrupt)"
  return None
