"""The flash forward kernel of attention and paged_attention: grid (query heads, query tiles, visited
key tiles), online softmax in VMEM scratch, the key tiles of each query tile fetched through tables
in SMEM (scalar prefetch, as splash attention does), so skipped tiles are never read.

Keys come in one of two layouts, both `[tiles, block_k, Hkv * Dp]` read in `(block_k, Dp)` blocks:
packed keys re-cut into per-sequence tiles (`gather_keys`), or a paged cache read in place, one page
per tile (`block_k` = page size), when its pages already fit the TPU's tiling.

Options that are numbers (scale, softcap, causal, window) reach the kernel as SMEM scalars, and shapes
and tile counts are padded to buckets (buckets.py), so that one compiled kernel serves many calls.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from . import buckets, compat, plan, softmax, tuning
from .compat import pl, pltpu
from .tuning import LANES

ROW = LANES  # running max and sum are kept lane-broadcast, [bq, 128]


@dataclasses.dataclass(frozen=True)
class Static:
    """Everything the kernel is specialised on."""
    bq: int
    bk: int
    heads: int          # Hq
    group: int          # Hq // Hkv
    mask_heads: int     # heads of the block-mask tables (1 when no mask or the mask has one)
    nqt: int
    nv: int             # grid steps per query tile (the most key tiles one visits)
    has_softcap: bool
    has_mask: bool
    has_sinks: bool
    return_lse: bool


def _kernel(st: Static, opts_ref, p0_ref, hi_ref, cnt_ref, kvj_ref, tile_ref, part_ref, *refs):
    del tile_ref  # only the index maps read it
    refs = list(refs)
    nums_ref, q_ref, k_ref, v_ref = refs[:4]
    del refs[:4]
    pm_ref = refs.pop(0) if st.has_mask else None
    sink_ref = refs.pop(0) if st.has_sinks else None
    o_ref = refs.pop(0)
    lse_ref = refs.pop(0) if st.return_lse else None
    m_sc, l_sc, acc_sc = refs
    h, w, n = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    t = (h if st.mask_heads > 1 else 0) * st.nqt + w

    @pl.when(n == 0)
    def _init():
        m_sc[...] = jnp.full(m_sc.shape, -jnp.inf, jnp.float32)
        l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
        acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

    @pl.when(n < cnt_ref[t])
    def _step():
        s = softmax.scores(q_ref[...], k_ref[...], nums_ref[0], nums_ref[1] if st.has_softcap else None)
        p = p0_ref[w] + jax.lax.broadcasted_iota(jnp.int32, s.shape, 0)                  # query positions
        j = kvj_ref[t * st.nv + n] * st.bk + jax.lax.broadcasted_iota(jnp.int32, s.shape, 1)  # key positions
        left, right = opts_ref[1], opts_ref[2]
        visible = ((j < hi_ref[w]) & ((opts_ref[0] == 0) | (j <= p)) & ((left < 0) | (j >= p - left))
                   & ((right < 0) | (j <= p + right)))
        if st.has_mask:
            visible &= (part_ref[t * st.nv + n] < 0) | (pm_ref[...] != 0)
        # a masked weight is 0, but 0 * NaN is NaN: non-finite values (a page's slots past seqused_k, keys a
        # block mask hides) must not reach the product
        v = v_ref[...]
        v = jnp.where(jnp.isfinite(v.astype(jnp.float32)), v, 0)  # Mosaic's finiteness test takes float32 only
        m, l, acc = softmax.update(s, visible, v, m_sc[...][:, :1], l_sc[...][:, :1], acc_sc[...])
        m_sc[...] = jnp.broadcast_to(m, m_sc.shape)
        l_sc[...] = jnp.broadcast_to(l, l_sc.shape)
        acc_sc[...] = acc

    @pl.when(n == st.nv - 1)
    def _finish():
        sink = sink_ref[h] if st.has_sinks else None
        o, lse = softmax.finish(m_sc[...][:, :1], l_sc[...][:, :1], acc_sc[...], sink)
        o_ref[...] = o.astype(o_ref.dtype)
        if st.return_lse:
            lse_ref[...] = jnp.broadcast_to(lse, lse_ref.shape)


def call(st: Static, tables, nums, q_t, k_t, v_t, part_tiles, sinks):
    """q_t [Hq, NQT * bq, Dp]; k_t, v_t [tiles, bk, Hkv * Dp]; tables (int32, SMEM): opts [causal, left,
    right], p0, hi, count, kv_j, kv_tile, part; nums float32 [scale, softcap].
    Returns o_t [Hq, NQT * bq, Dvp] (and lse_t [Hq, NQT * bq, 128])."""
    bq, bk, nv, g = st.bq, st.bk, st.nv, st.group
    dp, dvp = q_t.shape[2], v_t.shape[2] // (st.heads // g)
    mh = st.mask_heads > 1

    def at(h, w, n):
        return ((h if mh else 0) * st.nqt + w) * nv + n

    def q_map(h, w, n, *tables):
        return h, w, 0

    def kv_map(h, w, n, opts, p0, hi, cnt, kvj, tile, part):
        return tile[at(h, w, n)], 0, jax.lax.div(h, g)   # h // g without floor's sign fix-up

    def pm_map(h, w, n, opts, p0, hi, cnt, kvj, tile, part):
        return jnp.maximum(part[at(h, w, n)], 0), 0, 0

    smem = pl.BlockSpec(memory_space=pltpu.SMEM)
    in_specs = [smem, pl.BlockSpec((None, bq, dp), q_map), pl.BlockSpec((None, bk, dp), kv_map),
                pl.BlockSpec((None, bk, dvp), kv_map)]
    args = [nums, q_t, k_t, v_t]
    if st.has_mask:
        in_specs.append(pl.BlockSpec((None, bq, bk), pm_map))
        args.append(part_tiles)
    if st.has_sinks:
        in_specs.append(smem)
        args.append(sinks)
    rows = q_t.shape[1]
    out_specs = [pl.BlockSpec((None, bq, dvp), q_map)]
    out_shape = [jax.ShapeDtypeStruct((st.heads, rows, dvp), q_t.dtype)]
    if st.return_lse:
        out_specs.append(pl.BlockSpec((None, bq, ROW), q_map))
        out_shape.append(jax.ShapeDtypeStruct((st.heads, rows, ROW), jnp.float32))
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=len(tables), grid=(st.heads, st.nqt, nv), in_specs=in_specs, out_specs=out_specs,
        scratch_shapes=[pltpu.VMEM((bq, ROW), jnp.float32), pltpu.VMEM((bq, ROW), jnp.float32),
                        pltpu.VMEM((bq, dvp), jnp.float32)])
    return pl.pallas_call(
        functools.partial(_kernel, st), grid_spec=grid_spec, out_shape=out_shape,
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
        interpret=compat.interpret(), name="portable_attn_flash")(*tables, *args)


# ---- host side: keys, tables, re-layout --------------------------------------------------------

@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Keys:
    """Where the keys of sequence s live: packed rows from `start[s]` (attention), or the pages
    `table[s]` of a cache (paged_attention)."""
    k: jax.Array              # [Tk, Hkv, D] or [NB, BS, Hkv, D]
    v: jax.Array
    start: jax.Array | None = None   # int32 [S]
    table: jax.Array | None = None   # int32 [S, max_blocks]

    @property
    def paged(self) -> bool:
        return self.table is not None

    def bound(self, bk: int) -> int:
        """The most key tiles a sequence can have, from the shapes alone."""
        keys = self.table.shape[1] * self.k.shape[1] if self.paged else self.k.shape[0]
        return -(-keys // bk)

    def tile_count(self, lk, bk: int) -> int:
        """The key tiles of all sequences together (gather_keys' buffer): from the shapes for packed keys;
        from the data for pages (sequences may share them), or the bound while traced."""
        if not self.paged:
            return -(-self.k.shape[0] // bk) + lk.shape[0]
        if compat.is_tracer(lk):
            return lk.shape[0] * self.bound(bk)
        return int((-(-lk // bk)).sum())

    def native(self, mask_block) -> bool:
        """A paged cache the kernel reads in place: pages fit the tiling and the head dims the lanes."""
        bs = self.k.shape[1]
        return (self.paged and bs % tuning.SUBLANES == 0 and self.k.shape[3] % LANES == 0
                and self.v.shape[3] % LANES == 0 and (mask_block is None or mask_block[1] % bs == 0))


def _pad_lanes(x, dp):
    return jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, dp - x.shape[-1])])


def gather_keys(keys: Keys, lk, *, bk: int, nkt: int, dp: int, dvp: int):
    """Per-sequence key tiles [nkt, bk, Hkv * Dp] of k and v, and the first tile of each sequence."""
    ntile = -(-lk // bk)
    ends = jnp.cumsum(ntile)
    starts = (ends - ntile).astype(jnp.int32)
    u = jnp.arange(nkt, dtype=jnp.int32)
    s = jnp.clip(jnp.searchsorted(ends, u, side="right"), 0, max(lk.shape[0] - 1, 0))
    pos = ((u - starts[s]) * bk)[:, None] + jnp.arange(bk, dtype=jnp.int32)[None, :]   # [nkt, bk]
    ok = (pos < lk[s][:, None]) & (u < ends[-1])[:, None]
    if keys.paged:
        nb, bs = keys.k.shape[:2]
        page = jnp.clip(keys.table[s[:, None], jnp.clip(pos // bs, 0, keys.table.shape[1] - 1)], 0, nb - 1)
        rows, flat = page * bs + pos % bs, nb * bs
    else:
        rows, flat = keys.start[s][:, None] + pos, keys.k.shape[0]
    rows = jnp.clip(rows, 0, max(flat - 1, 0)).reshape(-1)
    ok = ok.reshape(-1, 1, 1)

    def cut(x, width):
        x = x.reshape((flat,) + x.shape[-2:])
        x = jnp.where(ok, x[rows], 0)
        return _pad_lanes(x, width).reshape(nkt, bk, -1)

    return cut(keys.k, dp), cut(keys.v, dvp), starts


@functools.partial(jax.jit, static_argnames=("bq", "bk", "nqt", "nk", "mask_block"))
def _work(lq, lk, opts, layout, partial_index, *, bq, bk, nqt, nk, mask_block):
    mask = None if mask_block is None else plan.Mask(mask_block, layout, partial_index, None)
    return plan.work(lq, lk, opts, bq=bq, bk=bk, nqt=nqt, nk=nk, mask=mask)


@functools.partial(jax.jit, static_argnames=("st", "nkt", "native", "dp", "dvp"))
def _run(st: Static, wk: plan.Work, opts, nums, q, cu_q, lq, lk, keys: Keys, sinks, part_tiles, *, nkt, native,
         dp, dvp):
    tq = q.shape[0]
    rows, ok = plan.query_rows(wk, cu_q[:-1], st.bq)
    q_t = jnp.where(ok[:, None, None], q[jnp.clip(rows, 0, max(tq - 1, 0))], 0)
    q_t = _pad_lanes(q_t, dp).transpose(1, 0, 2)                                   # [Hq, NQT*bq, Dp]
    kv_j = wk.kv_j[:, :st.nv]
    seq = jnp.tile(wk.seq, st.mask_heads)[:, None]
    if native:
        nb = keys.k.shape[0]
        k_t, v_t = keys.k.reshape(nb, st.bk, -1), keys.v.reshape(nb, st.bk, -1)
        tile = jnp.clip(keys.table[seq, jnp.clip(kv_j, 0, keys.table.shape[1] - 1)], 0, nb - 1)
    else:
        k_t, v_t, starts = gather_keys(keys, lk, bk=st.bk, nkt=nkt, dp=dp, dvp=dvp)
        tile = jnp.clip(starts[seq] + kv_j, 0, nkt - 1)
    tables = (opts, wk.p0, wk.hi, wk.count, kv_j.reshape(-1), tile.reshape(-1).astype(jnp.int32),
              wk.part[:, :st.nv].reshape(-1))
    outs = call(st, tables, nums, q_t, k_t, v_t, part_tiles, sinks)
    at = plan.tile_rows(wk, cu_q, lq, lk, st.bq, tq)
    o = outs[0][:, at, :keys.v.shape[-1]].transpose(1, 0, 2)
    return (o, outs[1][:, at, 0]) if st.return_lse else (o, None)


def forward(q, cu_q, lq, lk, keys: Keys, *, causal, window_size, softcap, sinks, softmax_scale, block_mask,
            return_lse, max_q=None, max_k=None, table=None):
    """o [Tq, Hq, Dv] (and lse [Hq, Tq]) of the sequences `cu_q` (int32 [S+1]) with `lk` keys each.
    `max_q`/`max_k` are host hints; `table` overrides the tuning row (tests). The fronts pad the input
    shapes to buckets (buckets.py); the tile counts are bucketed here."""
    tq, hq, d = q.shape
    hkv, dv = keys.k.shape[-2], keys.v.shape[-1]
    mask_block = None if block_mask is None else tuple(block_mask.block_size)
    native = keys.native(mask_block)
    tiles = tuning.flash_tiles(max_q=max_q, head_dim=d, head_dim_v=dv, mask_block=mask_block,
                               page_size=keys.k.shape[1] if native else None, table=table)
    assert not isinstance(tiles, str), tiles   # support.py refuses these calls first
    bq, bk = tiles.block_q, tiles.block_k
    nseq = lq.shape[0]
    if tq == 0 or keys.bound(bk) == 0 or keys.k.shape[0] == 0:  # no query, or no key anywhere (nothing to index)
        o = jnp.zeros((tq, hq, dv), q.dtype)
        lse = jnp.full((hq, tq), -jnp.inf, jnp.float32) if sinks is None else \
            jnp.broadcast_to(sinks.astype(jnp.float32)[:, None], (hq, tq))
        return (o, lse) if return_lse else o
    # static sizes from the (bucketed) shapes alone, so that they add no compiled variants; only the
    # grid's key steps per query tile (nv) follow the data, bucketed
    nk = keys.bound(bk) if max_k is None else min(keys.bound(bk), -(-max_k // bk))
    nqt, nk = buckets.size(plan.query_bound(tq, nseq, bq)), buckets.size(nk)
    mask = None if block_mask is None else plan.mask_for(block_mask, bq, bk)
    opts = jnp.array([int(causal), window_size[0], window_size[1]], jnp.int32)
    wk = _work(lq, lk, opts, None if mask is None else mask.layout, None if mask is None else mask.partial_index,
               bq=bq, bk=bk, nqt=nqt, nk=nk, mask_block=mask_block)
    nv = nk if compat.is_tracer(wk.count) else buckets.size(int(wk.count.max()))
    st = Static(bq=bq, bk=bk, heads=hq, group=hq // hkv, mask_heads=1 if mask is None else mask.heads, nqt=nqt,
                nv=nv, has_softcap=softcap > 0, has_mask=mask is not None, has_sinks=sinks is not None,
                return_lse=return_lse)
    nums = jnp.array([softmax_scale, softcap], jnp.float32)
    o, lse = _run(st, wk, opts, nums, q, cu_q, lq, lk, keys, None if sinks is None else sinks.astype(jnp.float32),
                  None if mask is None else mask.tiles, nkt=buckets.size(keys.tile_count(lk, bk)), native=native, dp=tiles.head_dim,
                  dvp=tiles.head_dim_v)
    return (o, lse) if return_lse else o
