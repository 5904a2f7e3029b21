"""write_kv_cache: one program per (token, tile of kv heads) copies the token's k and v rows into the
cache slot `slot_mapping[t]` (-1, or any slot outside the cache, writes nothing), in place, through the
caches' own strides (k_cache and v_cache may be views of one buffer, e.g. `kv[:, 0]` and `kv[:, 1]`)."""
from __future__ import annotations

import triton
import triton.language as tl

TILE = 4096  # elements of one program's [heads, head dim] tile


@triton.jit
def _write_kv_kernel(k_ptr, v_ptr, kc_ptr, vc_ptr, slot_ptr,
                     H, D, DV, NSLOTS, BS, sm_st,
                     k_st, k_sh, k_sd, v_st, v_sh, v_sd,
                     kc_sb, kc_ss, kc_sh, kc_sd, vc_sb, vc_ss, vc_sh, vc_sd,
                     BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    # the slot broadcast over the head tile: the interpreter mistypes `scalar bool & tensor` masks
    slot = tl.load(slot_ptr + t * sm_st + tl.zeros([BLOCK_H], tl.int64)).to(tl.int64)
    ok = (slot >= 0) & (slot < NSLOTS)  # -1 is padding; an unchecked bad slot writes nothing
    slot = tl.where(ok, slot, 0)
    blk = (slot // BS)[:, None]
    off = (slot % BS)[:, None]
    hm = ok & (h < H)

    d = tl.arange(0, BLOCK_D)
    m = hm[:, None] & (d[None, :] < D)
    x = tl.load(k_ptr + t * k_st + h[:, None] * k_sh + d[None, :] * k_sd, mask=m)
    tl.store(kc_ptr + blk * kc_sb + off * kc_ss + h[:, None] * kc_sh + d[None, :] * kc_sd, x, mask=m)

    e = tl.arange(0, BLOCK_DV)
    m = hm[:, None] & (e[None, :] < DV)
    y = tl.load(v_ptr + t * v_st + h[:, None] * v_sh + e[None, :] * v_sd, mask=m)
    tl.store(vc_ptr + blk * vc_sb + off * vc_ss + h[:, None] * vc_sh + e[None, :] * vc_sd, y, mask=m)


def write_kv_cache(k, v, k_cache, v_cache, slot_mapping):
    """Launch the copy; caches are updated in place. Returns None."""
    t, hkv, d = k.shape
    dv = v.shape[2]
    nb, bs = k_cache.shape[:2]
    if t == 0 or nb * bs == 0:
        return None
    block_d, block_dv = triton.next_power_of_2(d), triton.next_power_of_2(dv)
    block_h = max(1, min(triton.next_power_of_2(hkv), TILE // max(block_d, block_dv)))
    _write_kv_kernel[(t, triton.cdiv(hkv, block_h))](
        k_ptr=k, v_ptr=v, kc_ptr=k_cache, vc_ptr=v_cache, slot_ptr=slot_mapping,
        H=hkv, D=d, DV=dv, NSLOTS=nb * bs, BS=bs, sm_st=slot_mapping.stride(0),
        k_st=k.stride(0), k_sh=k.stride(1), k_sd=k.stride(2), v_st=v.stride(0), v_sh=v.stride(1), v_sd=v.stride(2),
        kc_sb=k_cache.stride(0), kc_ss=k_cache.stride(1), kc_sh=k_cache.stride(2), kc_sd=k_cache.stride(3),
        vc_sb=v_cache.stride(0), vc_ss=v_cache.stride(1), vc_sh=v_cache.stride(2), vc_sd=v_cache.stride(3),
        BLOCK_H=block_h, BLOCK_D=block_d, BLOCK_DV=block_dv,
        num_warps=1 if block_h * max(block_d, block_dv) <= 512 else 4)
    return None
