"""The public operators of docs/spec.md: check the arguments once, pick a backend, run it.

Each op takes `backend=` (a name or a priority list) on top of SPEC's arguments. Sequence forms of
the recurrent ops return `(out, final_state)` (final_state None unless `output_final_state`); step
forms return `out` and update `state` in place. The ops are inference ops: a tensor argument that
requires grad while grad mode is on is refused with `NotSupported` (SPEC "Autograd").
"""
from __future__ import annotations

import math
import re
import textwrap

from . import dispatch
from .dispatch import make_call  # noqa: F401  (tools and tests build checked calls with it)

INF = math.inf


# Argument descriptions several ops share: a docstring line `{name}` stands for _SHARED[name] (`_public`).
_SHARED = {
    "max_seqlen": "max_seqlen_q, max_seqlen_k: optional host ints, at least the longest query / key count (a grid "
                  "size\n    without a device-to-host sync; default None).",
    "window_size": "window_size: (left, right) ints, each >= -1 (-1 = unbounded; default (-1, -1)): keys\n"
                   "    p - left <= j <= p + right. Hugging Face's sliding_window=W is (W - 1, 0) with causal=True.",
    "softcap": "softcap: float >= 0 (default 0.0 = off): scores become softcap * tanh(s / softcap).",
    "sinks": "sinks: float32 or activation-dtype [Hq] (default None): one logit per head that joins only the\n"
             "    softmax denominator (gpt-oss); -inf = no sink for that head.",
    "softmax_scale": "softmax_scale: float (default None = 1/sqrt(D); 0.0 is a value).",
    "block_mask": "block_mask: portable_attn.BlockMask over positions, on the inputs' device (default None).",
    "return_lse": "return_lse: bool (default False): also return the float32 log-sum-exp (the sink included).",
    "output_final_state": "output_final_state: bool (default False): return the final states.",
    "state_indices": "state_indices: int32 [S] (default None): sequence i starts from cache row state_indices[i] "
                     "and\n    writes its final state there; -1 = no row (zero start, nothing written); no row twice.",
    "has_initial_state": "has_initial_state: bool [S] (default None: all True), only with state_indices: False "
                         "starts that\n    sequence from zeros.",
    "cu_seqlens": "cu_seqlens: int32 [S+1] sequence boundaries of the packed axis 0 (default None: one sequence).",
    "step_state_indices": "state_indices: int32 [bsz] (default None: rows 0..bsz-1); -1 = no row (zero state, "
                          "nothing\n    written); no row twice.",
    "backend": "backend: a backend name or a priority list (default None: the platform's default).",
}
_SHARED["attention_options"] = "\n".join(_SHARED[n] for n in ("window_size", "softcap", "sinks", "softmax_scale",
                                                               "block_mask", "return_lse"))
_SHARED["sequence_states"] = "\n".join(_SHARED[n] for n in ("output_final_state", "state_indices", "has_initial_state",
                                                             "cu_seqlens"))


def _public(fn):
    """The public op declared by `fn`: its signature and docstring (each `{name}` line replaced by
    _SHARED[name], at that line's indent), the function itself generated from the op table
    (dispatch.entry: check, select, run)."""
    fn.__doc__ = re.sub(r"^( *)\{(\w+)\}$", lambda m: textwrap.indent(_SHARED[m[2]], m[1]), fn.__doc__,
                        flags=re.MULTILINE)
    return dispatch.entry(fn, _compiled)


def _compiled(op: str, args: dict):
    from .library import compiled  # the torch.library ops are registered on first use
    return compiled(op, args)


@_public
def attention(q, k, v, *, cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=None, max_seqlen_k=None,
              causal=False, window_size=(-1, -1), softcap=0.0, sinks=None, softmax_scale=None, block_mask=None,
              return_lse=False, out=None, backend=None):
    """Scaled dot-product attention over packed varlen sequences (full, causal, sliding window, block mask).

    `o_t = sum_j softmax_j(scale * <q_t, k_j>) v_j` over the keys query t sees; grouped heads: query head h
    reads kv head h // (Hq // Hkv). A query that sees nothing gets o = 0 and lse = -inf (or its sink).

    Args:
        q [Tq, Hq, D], k [Tk, Hkv, D], v [Tk, Hkv, Dv]: activations of one dtype (float32, float16 or
            bfloat16; float64 on the reference), Hkv dividing Hq, head dims at least 1.
        cu_seqlens_q, cu_seqlens_k: int32 [S+1] sequence boundaries of the packed axis 0, both or neither
            (default None: one sequence each).
        {max_seqlen}
        causal: bool (default False): query t of a sequence with Lq queries and Lk keys sits at position
            p = t + Lk - Lq (bottom-right aligned) and sees keys j <= p.
        {attention_options}
        out: [Tq, Hq, Dv] tensor of q's dtype to write into (default None: a new one); must not overlap an
            input.
        {backend}

    Returns:
        `o [Tq, Hq, Dv]` in q's dtype, or `(o, lse)` with `lse [Hq, Tq]` (float32) when return_lse.

    Example:
        >>> import torch, portable_attn as pa
        >>> q, k, v = torch.randn(6, 4, 16), torch.randn(6, 2, 16), torch.randn(6, 2, 16)
        >>> cu = torch.tensor([0, 2, 6], dtype=torch.int32)  # two sequences: 2 and 4 tokens
        >>> o, lse = pa.attention(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu, causal=True,
        ...                       window_size=(1, 0), return_lse=True)
        >>> o.shape, lse.shape
        (torch.Size([6, 4, 16]), torch.Size([4, 6]))
    """


@_public
def paged_attention(q, k_cache, v_cache, block_table, seqused_k, *, cu_seqlens_q=None, max_seqlen_q=None,
                    max_seqlen_k=None, causal=True, window_size=(-1, -1), softcap=0.0, sinks=None,
                    softmax_scale=None, block_mask=None, return_lse=False, out=None, backend=None):
    """Attention over a paged KV cache: decode (one query per sequence) or chunked prefill.

    Key j of sequence i is `k_cache[block_table[i, j // BS], j % BS]` for j < seqused_k[i]; otherwise
    exactly `attention` (queries bottom-right aligned, so decode's query sees every cached key).

    Args:
        q [Tq, Hq, D]: queries; Tq = S when cu_seqlens_q is None (decode).
        k_cache [NB, BS, Hkv, D], v_cache [NB, BS, Hkv, Dv]: the cache, q's dtype, any block size BS >= 1
            (views of one buffer are fine); read only.
        block_table: int32 [S, max_blocks], the block ids of each sequence's keys, in [0, NB).
        seqused_k: int32 [S], each sequence's key count (0 gives o = 0, lse = -inf or the sink).
        cu_seqlens_q: int32 [S+1] query boundaries (default None: decode, one query per sequence).
        {max_seqlen}
        causal: bool (default True): query t of a sequence with Lq queries and Lk keys sits at position
            p = t + Lk - Lq (bottom-right aligned) and sees keys j <= p.
        {attention_options}
        out: [Tq, Hq, Dv] tensor of q's dtype to write into (default None: a new one); must not overlap an
            input.
        {backend}

    Returns:
        `o [Tq, Hq, Dv]`, or `(o, lse)` with `lse [Hq, Tq]` (float32) when return_lse.

    Example:
        >>> import torch, portable_attn as pa
        >>> k_cache, v_cache = torch.randn(8, 16, 2, 64), torch.randn(8, 16, 2, 64)  # 8 blocks of 16 slots
        >>> block_table = torch.tensor([[3, 0], [5, 7]], dtype=torch.int32)
        >>> seqused_k = torch.tensor([20, 9], dtype=torch.int32)
        >>> q = torch.randn(2, 8, 64)                                               # one query per sequence
        >>> pa.paged_attention(q, k_cache, v_cache, block_table, seqused_k).shape
        torch.Size([2, 8, 64])
    """


@_public
def write_kv_cache(k, v, k_cache, v_cache, slot_mapping, *, backend=None):
    """Write new keys and values into a paged KV cache, in place (vLLM's reshape_and_cache).

    Token t goes to `k_cache[s // BS, s % BS]` and `v_cache[s // BS, s % BS]` for s = slot_mapping[t];
    -1 skips the token (padding); every other slot is left untouched.

    Args:
        k [T, Hkv, D], v [T, Hkv, Dv]: the new tokens, in the caches' dtype (float32, float16 or bfloat16).
        k_cache [NB, BS, Hkv, D], v_cache [NB, BS, Hkv, Dv]: the caches, updated in place.
        slot_mapping: int32 or int64 [T], slots in [-1, NB * BS), no slot twice.
        {backend}

    Returns:
        None (the caches are updated in place).

    Example:
        >>> import torch, portable_attn as pa
        >>> k_cache, v_cache = torch.zeros(4, 16, 2, 64), torch.zeros(4, 16, 2, 64)
        >>> k, v = torch.randn(3, 2, 64), torch.randn(3, 2, 64)
        >>> pa.write_kv_cache(k, v, k_cache, v_cache, torch.tensor([17, -1, 40], dtype=torch.int64))
        >>> torch.equal(k_cache[1, 1], k[0]), torch.equal(v_cache[2, 8], v[2])
        (True, True)
    """


@_public
def sparse_attention(q, k, v, indices, *, cu_seqlens_q=None, cu_seqlens_k=None, softcap=0.0, sinks=None,
                     softmax_scale=None, return_lse=False, out=None, backend=None):
    """Top-k / index-selected attention (DeepSeek DSA, NSA's selection branch).

    Query t, head h attends to exactly the keys listed in `indices[t, h // (Hq // Hkv)]` (positions inside
    its own sequence; -1 = unused slot) with the attention formula; causality is the caller's choice of
    indices. No key listed (or topk = 0) gives o = 0 and lse = -inf (or the sink).

    Args:
        q [Tq, Hq, D], k [Tk, Hkv, D], v [Tk, Hkv, Dv]: activations of one dtype (float32, float16 or
            bfloat16), Hkv dividing Hq.
        indices: int32 [Tq, Hkv, topk], key positions in [-1, Lk) of the query's sequence, none twice.
        cu_seqlens_q, cu_seqlens_k: int32 [S+1], both or neither (default None: one sequence each).
        softcap: float >= 0 (default 0.0 = off).
        sinks: float32 or activation-dtype [Hq] (default None).
        softmax_scale: float (default None = 1/sqrt(D)).
        return_lse: bool (default False): also return the float32 log-sum-exp.
        out: [Tq, Hq, Dv] tensor of q's dtype to write into (default None); must not overlap an input.
        {backend}

    Returns:
        `o [Tq, Hq, Dv]`, or `(o, lse)` with `lse [Hq, Tq]` (float32) when return_lse.

    Example:
        >>> import torch, portable_attn as pa
        >>> q, k, v = torch.randn(4, 4, 32), torch.randn(4, 1, 32), torch.randn(4, 1, 32)
        >>> indices = torch.tensor([[[0, -1]], [[0, 1]], [[2, 0]], [[3, 1]]], dtype=torch.int32)  # topk = 2
        >>> pa.sparse_attention(q, k, v, indices).shape
        torch.Size([4, 4, 32])
    """


@_public
def merge_attention_states(o_a, lse_a, o_b, lse_b, *, sinks=None, return_lse=False, out=None, backend=None):
    """Merge two attention results over disjoint key sets of the same queries by their lse (vLLM's
    merge_attn_states): context-parallel attention, prefix + suffix of chunked prefill, cascade attention.

    `o = (exp(lse_a) o_a + exp(lse_b) o_b) / Z` with `Z = exp(lse_a) + exp(lse_b) + exp(sinks)`,
    `lse = log Z`. A part with lse = -inf (it saw no key) adds nothing and its o row is not read; where
    both are -inf and there is no sink, o = 0 and lse = -inf. Sinks count once: compute the parts
    without them and pass them here (or let one part carry them and pass none). Merging is associative.

    Args:
        o_a [T, H, Dv], o_b [T, H, Dv]: the two partial outputs, one dtype (float32, float16 or bfloat16;
            float64 on the reference), e.g. `attention(..., return_lse=True)[0]` of each key set.
        lse_a [H, T], lse_b [H, T]: their float32 log-sum-exps (-inf for a part that saw nothing).
        sinks: float32 or activation-dtype [H] (default None): one logit per head joining only the
            denominator (gpt-oss), added here once; -inf = no sink for that head.
        return_lse: bool (default False): also return the merged float32 lse.
        out: [T, H, Dv] tensor of o_a's dtype to write into (default None: a new one); must not overlap an
            input.
        {backend}

    Returns:
        `o [T, H, Dv]` in o_a's dtype, or `(o, lse)` with `lse [H, T]` (float32) when return_lse.

    Example:
        >>> import torch, portable_attn as pa
        >>> q, k, v = torch.randn(5, 4, 16), torch.randn(12, 2, 16), torch.randn(12, 2, 16)
        >>> o_a, lse_a = pa.attention(q, k[:7], v[:7], return_lse=True)   # keys 0..6
        >>> o_b, lse_b = pa.attention(q, k[7:], v[7:], return_lse=True)   # keys 7..11
        >>> o = pa.merge_attention_states(o_a, lse_a, o_b, lse_b)
        >>> torch.allclose(o, pa.attention(q, k, v), atol=1e-5)
        True
    """


@_public
def linear_attention(q, k, v, *, g=None, scale=None, initial_state=None, output_final_state=False,
                     state_indices=None, has_initial_state=None, cu_seqlens=None, out=None, backend=None):
    """(Gated) linear attention: linear attention, RetNet / lightning (constant g), simple GLA, GLA.

    Per head: `S_t = diag(exp(g_t)) S_{t-1} + k_t^T v_t` (no g: no decay), `o_t = scale * q_t S_t`,
    with the state S [K, V] carried through each sequence.

    Args:
        q [T, H, K], k [T, H, K], v [T, H, V]: activations of one dtype (float32, float16 or bfloat16).
        g: log-decay [T, H] (one per head) or [T, H, K] (per key dim, GLA), float32 or the activation
            dtype, at most 0 (-inf resets the state; default None: no decay).
        scale: float (default None = 1/sqrt(K)).
        initial_state: float32 or activation-dtype [S, H, K, V] (default None: zeros); with state_indices, a
            state cache [slots, H, K, V] whose rows are read and written back in place.
        {sequence_states}
        out: [T, H, V] tensor of the activation dtype to write into (default None: a new one); must not
            overlap an input.
        {backend}

    Returns:
        `(out, final_state)`: `out [T, H, V]` in the activation dtype; `final_state` is None unless
        output_final_state, then `[S, H, K, V]` (a new tensor in initial_state's dtype, else float32), or the
        cache itself with state_indices.

    Example:
        >>> import torch, portable_attn as pa
        >>> q, k, v = torch.randn(10, 2, 16), torch.randn(10, 2, 16), torch.randn(10, 2, 32)
        >>> g = -torch.rand(10, 2)                                  # log-decays, one per token and head
        >>> cu = torch.tensor([0, 4, 10], dtype=torch.int32)
        >>> o, state = pa.linear_attention(q, k, v, g=g, cu_seqlens=cu, output_final_state=True)
        >>> o.shape, state.shape
        (torch.Size([10, 2, 32]), torch.Size([2, 2, 16, 32]))
    """


@_public
def linear_attention_step(q, k, v, *, state, g=None, scale=None, state_indices=None, out=None, backend=None):
    """One decode token per sequence of `linear_attention`; the state cache is updated in place.

    Args:
        q [bsz, H, K], k [bsz, H, K], v [bsz, H, V]: one token per sequence, one activation dtype.
        state: state cache [slots, H, K, V], float32 or the activation dtype, updated in place at
            state_indices.
        {step_state_indices}
        g: log-decay [bsz, H] or [bsz, H, K] (default None: no decay).
        scale: float (default None = 1/sqrt(K)).
        out: [bsz, H, V] tensor of the activation dtype to write into (default None: a new one); must not
            overlap an input.
        {backend}

    Returns:
        `out [bsz, H, V]`.

    Example:
        >>> import torch, portable_attn as pa
        >>> state = torch.zeros(8, 2, 16, 32)                       # a cache of 8 sequences' states
        >>> q, k, v = torch.randn(3, 2, 16), torch.randn(3, 2, 16), torch.randn(3, 2, 32)
        >>> rows = torch.tensor([5, 0, 2], dtype=torch.int32)
        >>> pa.linear_attention_step(q, k, v, state=state, state_indices=rows).shape
        torch.Size([3, 2, 32])
    """


@_public
def gated_delta_rule(q, k, v, g, beta, *, scale=None, initial_state=None, output_final_state=False,
                     state_indices=None, has_initial_state=None, cu_seqlens=None, use_qk_l2norm=False, out=None,
                     backend=None):
    """Gated delta rule: Gated DeltaNet (Qwen3-Next), DeltaNet (g = 0), KDA (per-key-dim g).

    Per value head: `S' = diag(exp(g_t)) S_{t-1}`, `u_t = beta_t (v_t - S'^T k_t)`, `S_t = S' + k_t u_t^T`,
    `o_t = scale * S_t^T q_t`; value head h reads q/k head h // (Hv // H).

    Args:
        q [T, H, K], k [T, H, K], v [T, Hv, V]: activations of one dtype (float32, float16 or bfloat16),
            H dividing Hv.
        g: log-decay [T, Hv] or [T, Hv, K] (KDA), float32 or the activation dtype, at most 0; required
            (zeros for DeltaNet).
        beta: [T, Hv], float32 or the activation dtype (the write strength).
        scale: float (default None = 1/sqrt(K)).
        initial_state: float32 or activation-dtype [S, Hv, K, V] (default None: zeros); with state_indices, a
            state cache [slots, Hv, K, V] whose rows are read and written back in place.
        {sequence_states}
        use_qk_l2norm: bool (default False): L2-normalise q and k over K (in float32) first.
        out: [T, Hv, V] tensor of the activation dtype to write into (default None: a new one); must not
            overlap an input.
        {backend}

    Returns:
        `(out, final_state)`: `out [T, Hv, V]` in the activation dtype; `final_state` is None unless
        output_final_state, then `[S, Hv, K, V]` (a new tensor in initial_state's dtype, else float32), or the
        cache itself with state_indices.

    Example (a prefill continued by decode steps through a state cache):
        >>> import torch, portable_attn as pa
        >>> T, H, K, V = 12, 2, 16, 16
        >>> q, k, v = torch.randn(T, H, K), torch.randn(T, H, K), torch.randn(T, H, V)
        >>> g, beta = -torch.rand(T, H), torch.rand(T, H)
        >>> cache, row = torch.zeros(4, H, K, V), torch.tensor([1], dtype=torch.int32)
        >>> o, _ = pa.gated_delta_rule(q, k, v, g, beta, initial_state=cache, state_indices=row,
        ...                            use_qk_l2norm=True)
        >>> o.shape, bool(cache[1].abs().sum() > 0)             # row 1 now holds the final state
        (torch.Size([12, 2, 16]), True)
    """


@_public
def gated_delta_rule_step(q, k, v, g, beta, *, state, scale=None, state_indices=None, use_qk_l2norm=False,
                          out=None, backend=None):
    """One decode token per sequence of `gated_delta_rule`; the state cache is updated in place.

    Args:
        q [bsz, H, K], k [bsz, H, K], v [bsz, Hv, V]: one token per sequence, one activation dtype.
        g: log-decay [bsz, Hv] or [bsz, Hv, K]; beta: [bsz, Hv] (float32 or the activation dtype).
        state: state cache [slots, Hv, K, V], float32 or the activation dtype, updated in place at
            state_indices.
        {step_state_indices}
        scale: float (default None = 1/sqrt(K)).
        use_qk_l2norm: bool (default False): L2-normalise q and k over K first.
        out: [bsz, Hv, V] tensor of the activation dtype to write into (default None: a new one); must not
            overlap an input.
        {backend}

    Returns:
        `out [bsz, Hv, V]`.

    Example:
        >>> import torch, portable_attn as pa
        >>> state = torch.randn(4, 2, 16, 16)                     # a cache of 4 sequences' states
        >>> q, k, v = torch.randn(2, 2, 16), torch.randn(2, 2, 16), torch.randn(2, 2, 16)
        >>> g, beta = -torch.rand(2, 2), torch.rand(2, 2)
        >>> rows = torch.tensor([3, 0], dtype=torch.int32)
        >>> pa.gated_delta_rule_step(q, k, v, g, beta, state=state, state_indices=rows).shape
        torch.Size([2, 2, 16])
    """


@_public
def ssd(x, dt, A, B, C, *, D=None, z=None, dt_bias=None, dt_softplus=False, dt_limit=(0.0, INF), initial_state=None,
        output_final_state=False, state_indices=None, has_initial_state=None, cu_seqlens=None, out=None,
        backend=None):
    """Mamba-2's state-space duality scan (Mamba-2, Granite 4.0-H, Nemotron-H, Zamba2, Falcon-H1).

    `d_t = clamp(f(dt_t + dt_bias), dt_limit)`, `h_t = exp(d_t A) h_{t-1} + d_t x_t B_t^T` (state [P, N]),
    `y_t = h_t C_t + D x_t`, then `y_t *= silu(z_t)` if z; head h reads B/C group h // (H // G).

    Args:
        x [T, H, P]: input, activation dtype (float32, float16 or bfloat16).
        dt [T, H], A [H]: step sizes and (negative) decay rates, float32 or the activation dtype.
        B [T, G, N], C [T, G, N]: input / output projections, activation dtype, G dividing H.
        D: skip term [H] or [H, P] (default None), float32 or the activation dtype.
        z: gate [T, H, P] in the activation dtype (default None): y *= silu(z).
        dt_bias: [H] (default None), added to dt before f.
        dt_softplus: bool (default False): f = softplus, else identity.
        dt_limit: (low, high) floats (default (0.0, inf)): d is clamped to it, always.
        initial_state: float32 or activation-dtype [S, H, P, N] (default None: zeros); with state_indices, a
            state cache [slots, H, P, N] whose rows are read and written back in place.
        {sequence_states}
        out: [T, H, P] tensor of the activation dtype to write into (default None: a new one); must not
            overlap an input.
        {backend}

    Returns:
        `(out, final_state)`: `out [T, H, P]` in the activation dtype; `final_state` is None unless
        output_final_state, then `[S, H, P, N]` (a new tensor in initial_state's dtype, else float32), or the
        cache itself with state_indices.

    Example (states kept in an engine's cache at rows 7 and 2):
        >>> import torch, portable_attn as pa
        >>> T, H, P, N = 10, 4, 16, 32
        >>> x, dt, A = torch.randn(T, H, P), torch.randn(T, H), -torch.rand(H)
        >>> B, C = torch.randn(T, 1, N), torch.randn(T, 1, N)
        >>> cache = torch.zeros(8, H, P, N)
        >>> y, _ = pa.ssd(x, dt, A, B, C, D=torch.ones(H), dt_softplus=True, initial_state=cache,
        ...               state_indices=torch.tensor([7, 2], dtype=torch.int32),
        ...               cu_seqlens=torch.tensor([0, 3, 10], dtype=torch.int32))
        >>> y.shape
        torch.Size([10, 4, 16])
    """


@_public
def ssd_step(x, dt, A, B, C, *, state, D=None, z=None, dt_bias=None, dt_softplus=False, dt_limit=(0.0, INF),
             state_indices=None, out=None, backend=None):
    """One decode token per sequence of `ssd` (mamba's selective_state_update); the state cache is updated
    in place.

    Args:
        x [bsz, H, P]: one token per sequence, activation dtype.
        dt [bsz, H], A [H]: float32 or the activation dtype.
        B [bsz, G, N], C [bsz, G, N]: activation dtype, G dividing H.
        state: state cache [slots, H, P, N], float32 or the activation dtype, updated in place at
            state_indices.
        {step_state_indices}
        D: skip term [H] or [H, P] (default None), float32 or the activation dtype.
        z: gate [bsz, H, P] in the activation dtype (default None): y *= silu(z).
        dt_bias: [H] (default None), added to dt before f.
        dt_softplus: bool (default False): f = softplus, else identity.
        dt_limit: (low, high) floats (default (0.0, inf)): d is clamped to it, always.
        out: [bsz, H, P] tensor of the activation dtype to write into (default None: a new one); must not
            overlap an input.
        {backend}

    Returns:
        `out [bsz, H, P]`.

    Example:
        >>> import torch, portable_attn as pa
        >>> state = torch.randn(6, 4, 16, 32)
        >>> x, dt, A = torch.randn(2, 4, 16), torch.randn(2, 4), -torch.rand(4)
        >>> B, C = torch.randn(2, 1, 32), torch.randn(2, 1, 32)
        >>> pa.ssd_step(x, dt, A, B, C, state=state, dt_softplus=True,
        ...             state_indices=torch.tensor([4, 1], dtype=torch.int32)).shape
        torch.Size([2, 4, 16])
    """


@_public
def causal_conv1d(x, weight, bias=None, *, activation=None, initial_state=None, output_final_state=False,
                  state_indices=None, has_initial_state=None, cu_seqlens=None, out=None, backend=None):
    """Depthwise causal conv1d over packed sequences (the short convolution before Mamba / delta-rule mixers).

    `y_t[c] = act(bias[c] + sum_{i<W} weight[c, i] * x_{t-W+1+i}[c])`; positions before a sequence's start
    read its initial state (or zeros). The state holds the last W - 1 inputs, oldest first.

    Args:
        x [T, C]: input, activation dtype (float32, float16 or bfloat16).
        weight [C, W]: taps, W >= 1, float32 or the activation dtype.
        bias [C]: float32 or the activation dtype (default None).
        activation: None or "silu" (default None).
        initial_state: [S, C, W-1] in the activation dtype (default None: zeros); with state_indices, a
            state cache [slots, C, W-1] whose rows are read and written back in place.
        {sequence_states}
        out: [T, C] tensor of the activation dtype to write into (default None: a new one); must not
            overlap an input.
        {backend}

    Returns:
        `(out, final_state)`: `out [T, C]` in the activation dtype; `final_state` is None unless
        output_final_state, then `[S, C, W-1]` (a new tensor in initial_state's dtype, else the activation
        dtype), or the cache itself with state_indices.

    Example:
        >>> import torch, portable_attn as pa
        >>> x, weight, bias = torch.randn(9, 64), torch.randn(64, 4), torch.randn(64)
        >>> y, state = pa.causal_conv1d(x, weight, bias, activation="silu", output_final_state=True)
        >>> y.shape, state.shape
        (torch.Size([9, 64]), torch.Size([1, 64, 3]))
    """


@_public
def causal_conv1d_step(x, weight, bias=None, *, state, activation=None, state_indices=None, out=None,
                       backend=None):
    """One decode token per sequence of `causal_conv1d`; the state cache is updated in place (shifted by one).

    Args:
        x [bsz, C]: one token per sequence, activation dtype.
        weight [C, W], bias [C] (default None): float32 or the activation dtype.
        state: state cache [slots, C, W-1] in the activation dtype, updated in place at state_indices.
        activation: None or "silu" (default None).
        {step_state_indices}
        out: [bsz, C] tensor of the activation dtype to write into (default None: a new one); must not
            overlap an input.
        {backend}

    Returns:
        `out [bsz, C]`.

    Example:
        >>> import torch, portable_attn as pa
        >>> x, weight = torch.randn(5, 64), torch.randn(64, 4)
        >>> y, state = pa.causal_conv1d(x, weight, output_final_state=True)    # prefill
        >>> y_next = pa.causal_conv1d_step(torch.randn(1, 64), weight, state=state)  # then decode
        >>> y_next.shape, state.shape
        (torch.Size([1, 64]), torch.Size([1, 64, 3]))
    """
