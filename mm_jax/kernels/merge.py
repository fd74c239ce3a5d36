"""Multimodal token merge: media rows replace placeholder embeddings.

`merge_tokens(text_emb float[B, T, D], media_emb float[M, D], media_index int32[B, T])`
returns float[B, T, D] where row (b, t) is `media_emb[media_index[b, t]]` if that index is
>= 0, else `text_emb[b, t]`.

The Pallas path moves only media rows. The forward writes the M media rows into the text
buffer in place (input/output aliasing: when `text_emb` is dead afterwards, as inside the
model, XLA reuses its buffer). The backward zeroes the same rows of the output gradient
in place (the text gradient) and gathers them into the media gradient; each media row is
used at most once, so no atomics. Rows are addressed through `dest` int32[M], the flat
position b * T + t of each media row (-1: unused), built once from `media_index`.
Backends: Triton on GPU and the interpreter on CPU share one kernel (dynamic row stores
into the whole buffer); TPU copies rows by DMA with `dest` prefetched into SMEM.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from mm_jax import target
from mm_jax.kernels.compat import interpret_for, pl, pltpu, triton_params

ROWS = 8  # media rows per grid step


def _chunk(d: int) -> int:
  """Columns per grid step: the largest power of two (<= 1024) dividing D. Triton loads
  power-of-two shapes only, so D = 5120 (13B) runs as 5 steps of 1024."""
  return min(d & -d, 1024)


def merge_tokens_reference(text_emb: jax.Array, media_emb: jax.Array,
                           media_index: jax.Array) -> jax.Array:
  """XLA where+gather merge; differentiable through jnp."""
  if media_emb.shape[0] == 0:
    return text_emb
  rows = jnp.take(media_emb, jnp.maximum(media_index, 0), axis=0).astype(text_emb.dtype)
  return jnp.where((media_index >= 0)[..., None], rows, text_emb)


def destinations(media_index: jax.Array, m: int) -> jax.Array:
  """int32[M]: flat position b * T + t that media row m fills, -1 if none."""
  flat = media_index.reshape(-1)
  slot = jnp.where(flat >= 0, flat, m)  # text tokens scatter out of bounds and are dropped
  pos = jnp.arange(flat.shape[0], dtype=jnp.int32)
  return jnp.full((m,), -1, jnp.int32).at[slot].set(pos, mode="drop")


# ----------------------------------------------------------------------------- kernels


def _put_rows_kernel(dest_ref, src_ref, base_ref, out_ref):
  """out[dest[r], cols] = src[r] for this step's rows and columns; out aliases base."""
  del base_ref
  dc = src_ref.shape[1]
  cols = pl.ds(pl.program_id(1) * dc, dc)
  for r in range(ROWS):
    d = dest_ref[r]

    @pl.when(d >= 0)
    def _(r=r, d=d):
      out_ref[pl.ds(d, 1), cols] = src_ref[pl.ds(r, 1), :]


def _take_rows_kernel(dest_ref, src_ref, out_ref):
  """out[r, cols] = src[dest[r], cols] (0 where dest < 0)."""
  dc = out_ref.shape[1]
  cols = pl.ds(pl.program_id(1) * dc, dc)
  for r in range(ROWS):
    d = dest_ref[r]
    row = src_ref[pl.ds(jnp.maximum(d, 0), 1), cols]
    out_ref[pl.ds(r, 1), :] = jnp.where(d >= 0, row, jnp.zeros_like(row))


def _packing(dtype) -> int:
  """Rows per 32-bit TPU sublane: 1 for float32, 2 for bf16/fp16. Mosaic tiles 16-bit HBM
  arrays (8, 128)(2, 1), a row pair per 32-bit word, so a DMA moves whole pairs only."""
  return max(1, 4 // jnp.dtype(dtype).itemsize)


def _pair_start(d, pack: int):
  # lax.rem, not %: floor modulo lowers through `sign`, which Mosaic resolves per chip.
  return pl.multiple_of(d - jax.lax.rem(d, pack), pack)


def _dma(src, dst, sem):
  copy = pltpu.make_async_copy(src, dst, sem)
  copy.start()
  copy.wait()


def _put_rows_tpu_kernel(dest_ref, src_ref, base_ref, out_ref, buf_ref, sem, *, pack):
  """out[dest[r]] = src[r] by DMA. 16-bit rows: read the row's pair, replace the row in
  VMEM, write the pair back (one row at a time: two media rows may share a pair)."""
  del base_ref
  i = pl.program_id(0)
  src = src_ref[...].astype(jnp.float32) if pack > 1 else None
  for r in range(ROWS):
    d = dest_ref[i * ROWS + r]

    @pl.when(d >= 0)
    def _(r=r, d=d):
      if pack == 1:
        _dma(src_ref.at[pl.ds(r, 1)], out_ref.at[pl.ds(d, 1)], sem)
        return
      start = _pair_start(d, pack)
      window = out_ref.at[pl.ds(start, pack)]
      _dma(window, buf_ref, sem)
      rows = buf_ref[...].astype(jnp.float32)  # [pack, D]
      which = jax.lax.broadcasted_iota(jnp.int32, rows.shape, 0) == d - start
      buf_ref[...] = jnp.where(which, src[r:r + 1], rows).astype(buf_ref.dtype)
      _dma(buf_ref, window, sem)


def _take_rows_tpu_kernel(dest_ref, src_ref, out_ref, bufs_ref, sem, *, pack):
  """out[r] = src[dest[r]] (0 where dest < 0): every row's DMA (its pair, for 16-bit rows)
  in flight at once, then one whole-block store."""
  i = pl.program_id(0)
  dests = [dest_ref[i * ROWS + r] for r in range(ROWS)]
  copies = []
  for r, d in enumerate(dests):
    start = _pair_start(jnp.maximum(d, 0), pack) if pack > 1 else jnp.maximum(d, 0)
    copies.append(pltpu.make_async_copy(src_ref.at[pl.ds(start, pack)], bufs_ref.at[r], sem))

    @pl.when(d >= 0)
    def _(copy=copies[-1]):
      copy.start()

  # All waits before any read: the copies share one semaphore, so a wait proves only that
  # some copy of that size landed, and all of them only once every started one has.
  for d, copy in zip(dests, copies, strict=True):

    @pl.when(d >= 0)
    def _(copy=copy):
      copy.wait()

  shape = (ROWS, out_ref.shape[1])
  out = jnp.zeros(shape, jnp.float32)
  row_ids = jax.lax.broadcasted_iota(jnp.int32, shape, 0)
  for r, d in enumerate(dests):
    pair = bufs_ref[r].astype(jnp.float32)  # [pack, D]
    if pack > 1:
      which = jax.lax.broadcasted_iota(jnp.int32, pair.shape, 0) == jax.lax.rem(d, pack)
      pair = jnp.where(which, pair, 0.0).sum(axis=0, keepdims=True)
    out = jnp.where((row_ids == r) & (d >= 0), pair, out)
  out_ref[...] = out.astype(out_ref.dtype)


def _tpu(interpret) -> bool:
  """TPU kernels: compiled for a TPU target, or run by the TPU interpreter (tests pass
  `pltpu.InterpretParams()` as `interpret`)."""
  return (target.current().platform == "tpu" and not interpret) or isinstance(
      interpret, pltpu.InterpretParams)


def _put_rows(base, src, dest, *, interpret):
  """base float[R, D] with rows dest[m] replaced by src[m], in place."""
  m_pad, d = src.shape
  if _tpu(interpret):
    pack = _packing(base.dtype)
    rows = base.shape[0]
    if rows % pack:  # the last row's pair must exist: pad (a copy, for odd B * T only)
      grown = jnp.pad(base, ((0, pack - rows % pack), (0, 0)))
      return _put_rows(grown, src, dest, interpret=interpret)[:rows]
    spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=1, grid=(m_pad // ROWS,),
        in_specs=[pl.BlockSpec((ROWS, d), lambda i, dest: (i, 0)),
                  pl.BlockSpec(memory_space=pl.ANY)],
        out_specs=pl.BlockSpec(memory_space=pl.ANY),
        scratch_shapes=[pltpu.VMEM((pack, d), base.dtype), pltpu.SemaphoreType.DMA(())])
    return pl.pallas_call(
        functools.partial(_put_rows_tpu_kernel, pack=pack), grid_spec=spec,
        out_shape=jax.ShapeDtypeStruct(base.shape, base.dtype),
        input_output_aliases={2: 0}, interpret=interpret or False,
        name="merge_put_rows")(dest, src, base)
  dc = _chunk(d)
  return pl.pallas_call(
      _put_rows_kernel, grid=(m_pad // ROWS, d // dc),
      in_specs=[pl.BlockSpec((ROWS,), lambda i, c: (i,)),
                pl.BlockSpec((ROWS, dc), lambda i, c: (i, c)),
                pl.BlockSpec(memory_space=pl.ANY)],
      out_specs=pl.BlockSpec(memory_space=pl.ANY),
      out_shape=jax.ShapeDtypeStruct(base.shape, base.dtype),
      input_output_aliases={2: 0}, interpret=interpret,
      compiler_params=None if interpret else triton_params(num_warps=4, num_stages=1),
      name="merge_put_rows")(dest, src, base)


def _take_rows(src, dest, *, interpret):
  """float[M_pad, D]: rows dest[m] of src (0 where dest < 0)."""
  m_pad, d = dest.shape[0], src.shape[1]
  out_shape = jax.ShapeDtypeStruct((m_pad, d), src.dtype)
  if _tpu(interpret):
    pack = _packing(src.dtype)
    if src.shape[0] % pack:  # the last row's pair must exist
      return _take_rows(jnp.pad(src, ((0, pack - src.shape[0] % pack), (0, 0))), dest,
                        interpret=interpret)
    spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=1, grid=(m_pad // ROWS,),
        in_specs=[pl.BlockSpec(memory_space=pl.ANY)],
        out_specs=pl.BlockSpec((ROWS, d), lambda i, dest: (i, 0)),
        scratch_shapes=[pltpu.VMEM((ROWS, pack, d), src.dtype), pltpu.SemaphoreType.DMA(())])
    return pl.pallas_call(functools.partial(_take_rows_tpu_kernel, pack=pack), grid_spec=spec,
                          out_shape=out_shape, interpret=interpret or False,
                          name="merge_take_rows")(dest, src)
  dc = _chunk(d)
  return pl.pallas_call(
      _take_rows_kernel, grid=(m_pad // ROWS, d // dc),
      in_specs=[pl.BlockSpec((ROWS,), lambda i, c: (i,)), pl.BlockSpec(memory_space=pl.ANY)],
      out_specs=pl.BlockSpec((ROWS, dc), lambda i, c: (i, c)),
      out_shape=out_shape, interpret=interpret,
      compiler_params=None if interpret else triton_params(num_warps=4, num_stages=1),
      name="merge_take_rows")(dest, src)


# ----------------------------------------------------------------------------- API


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _merge(text_emb, media_emb, dest, interpret):
  return _merge_fwd(text_emb, media_emb, dest, interpret)[0]


def _merge_fwd(text_emb, media_emb, dest, interpret):
  b, t, d = text_emb.shape
  m = media_emb.shape[0]
  media = jnp.pad(media_emb.astype(text_emb.dtype), ((0, dest.shape[0] - m), (0, 0)))
  out = _put_rows(text_emb.reshape(b * t, d), media, dest, interpret=interpret)
  like_media = jnp.zeros((m, 0), media_emb.dtype)  # carries M and the dtype, no bytes
  return out.reshape(b, t, d), (dest, like_media)


def _merge_bwd(interpret, res, g):
  dest, like_media = res
  b, t, d = g.shape
  flat = g.reshape(b * t, d)
  d_media = _take_rows(flat, dest, interpret=interpret)[: like_media.shape[0]]
  d_media = d_media.astype(like_media.dtype)
  zeros = jnp.zeros((dest.shape[0], d), g.dtype)
  d_text = _put_rows(flat, zeros, dest, interpret=interpret).reshape(b, t, d)
  return d_text, d_media, None


_merge.defvjp(_merge_fwd, _merge_bwd)


def merge_tokens_pallas(text_emb: jax.Array, media_emb: jax.Array, media_index: jax.Array,
                        *, interpret: bool | None = None) -> jax.Array:
  m = media_emb.shape[0]
  if m == 0:
    return text_emb
  m_pad = -(-m // ROWS) * ROWS
  dest = jnp.pad(destinations(media_index, m), (0, m_pad - m), constant_values=-1)
  return _merge(text_emb, media_emb, dest, interpret_for(interpret))


def merge_tokens(text_emb: jax.Array, media_emb: jax.Array, media_index: jax.Array, *,
                 impl: str = "auto", interpret: bool | None = None) -> jax.Array:
  """`impl`: xla (where+gather), pallas, or auto (kernels/choice.py's pick for the target).

  XLA cannot partition a Pallas call: under a multi-device mesh call this inside
  shard_map with shard-local `media_index` (as MultimodalModel does).
  """
  if impl == "auto":
    from mm_jax.kernels import choice

    impl = choice.merge(target.current()).impl
  with jax.named_scope(f"merge_tokens_{impl}"):
    if impl == "pallas":
      return merge_tokens_pallas(text_emb, media_emb, media_index, interpret=interpret)
    return merge_tokens_reference(text_emb, media_emb, media_index)
