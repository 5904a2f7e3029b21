"""Brute-force recurrent ops in NumPy float64, written from docs/spec.md independently of the reference.

Explicit loops over sequences, heads and tokens; no vectorisation beyond one head's small matrices.
Every function takes NumPy arrays, `cu` as a list of ints (None: one sequence) and `init` as a list
with one initial state (an array) or None (zero) per sequence; it returns `(out, finals)`, `finals`
the list of final states per sequence.
"""
from __future__ import annotations

import math

import numpy as np


def _bounds(cu, n_tok):
    cu = [0, n_tok] if cu is None else list(cu)
    return [(cu[i], cu[i + 1]) for i in range(len(cu) - 1)]


def _start(init, i, shape):
    if init is None or init[i] is None:
        return np.zeros(shape)
    return np.array(init[i], dtype=np.float64, copy=True)


def linear_attention(q, k, v, g=None, scale=None, cu=None, init=None):
    """S_t = diag(exp(g_t)) S_{t-1} + k_t^T v_t;  o_t = scale q_t S_t (per head)."""
    n_tok, H, K = q.shape
    V = v.shape[2]
    scale = 1.0 / math.sqrt(K) if scale is None else scale
    out = np.zeros((n_tok, H, V))
    finals = []
    for i, (s, e) in enumerate(_bounds(cu, n_tok)):
        fin = np.zeros((H, K, V))
        start = _start(init, i, (H, K, V))
        for h in range(H):
            S = start[h].copy()
            for t in range(s, e):
                if g is not None:
                    decay = np.exp(g[t, h]) * np.ones(K) if g.ndim == 2 else np.exp(g[t, h, :])
                    for a in range(K):
                        S[a, :] = decay[a] * S[a, :]
                for a in range(K):
                    for b in range(V):
                        S[a, b] += k[t, h, a] * v[t, h, b]
                for b in range(V):
                    out[t, h, b] = scale * sum(q[t, h, a] * S[a, b] for a in range(K))
            fin[h] = S
        finals.append(fin)
    return out, finals


def gated_delta_rule(q, k, v, g, beta, scale=None, cu=None, init=None, use_qk_l2norm=False):
    """Per value head h (q/k head h // (Hv // H)): S' = diag(exp g) S; u = beta (v - S'^T k);
    S = S' + k u^T; o = scale S^T q."""
    n_tok, H, K = q.shape
    Hv, V = v.shape[1], v.shape[2]
    group = Hv // H
    scale = 1.0 / math.sqrt(K) if scale is None else scale
    out = np.zeros((n_tok, Hv, V))
    finals = []
    for i, (s, e) in enumerate(_bounds(cu, n_tok)):
        fin = np.zeros((Hv, K, V))
        start = _start(init, i, (Hv, K, V))
        for h in range(Hv):
            hk = h // group
            S = start[h].copy()
            for t in range(s, e):
                qt, kt = q[t, hk].copy(), k[t, hk].copy()
                if use_qk_l2norm:
                    qt = qt / np.sqrt(np.sum(qt ** 2) + 1e-6)
                    kt = kt / np.sqrt(np.sum(kt ** 2) + 1e-6)
                decay = np.exp(g[t, h]) * np.ones(K) if g.ndim == 2 else np.exp(g[t, h, :])
                S = decay[:, None] * S
                pred = np.array([sum(S[a, b] * kt[a] for a in range(K)) for b in range(V)])
                u = beta[t, h] * (v[t, h] - pred)
                S = S + np.outer(kt, u)
                out[t, h] = scale * np.array([sum(S[a, b] * qt[a] for a in range(K)) for b in range(V)])
            fin[h] = S
        finals.append(fin)
    return out, finals


def softplus(x):
    return np.logaddexp(0.0, x)


def ssd(x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False, dt_limit=(0.0, math.inf), cu=None,
        init=None):
    """Per head h (group h // (H // G)): d = clamp(f(dt + bias)); h = exp(d A) h + d x B^T; y = h C + D x;
    y *= silu(z)."""
    n_tok, H, P = x.shape
    G, N = B.shape[1], B.shape[2]
    group = H // G
    out = np.zeros((n_tok, H, P))
    finals = []
    for i, (s, e) in enumerate(_bounds(cu, n_tok)):
        fin = np.zeros((H, P, N))
        start = _start(init, i, (H, P, N))
        for h in range(H):
            gr = h // group
            st = start[h].copy()
            for t in range(s, e):
                d = dt[t, h] + (dt_bias[h] if dt_bias is not None else 0.0)
                if dt_softplus:
                    d = softplus(d)
                d = min(max(d, dt_limit[0]), dt_limit[1])
                a = math.exp(d * A[h])
                for p in range(P):
                    for n in range(N):
                        st[p, n] = a * st[p, n] + d * x[t, h, p] * B[t, gr, n]
                for p in range(P):
                    y = sum(st[p, n] * C[t, gr, n] for n in range(N))
                    if D is not None:
                        y += (D[h] if D.ndim == 1 else D[h, p]) * x[t, h, p]
                    if z is not None:
                        zz = z[t, h, p]
                        y *= zz / (1.0 + math.exp(-zz))
                    out[t, h, p] = y
            fin[h] = st
        finals.append(fin)
    return out, finals


def causal_conv1d(x, weight, bias=None, activation=None, cu=None, init=None):
    """y_t[c] = act(bias[c] + sum_i weight[c, i] x_{t-W+1+i}[c]); positions < 0 read the initial state
    (oldest first: state column j is position j - (W - 1)). Final state: the last W - 1 inputs."""
    n_tok, Ch = x.shape
    W = weight.shape[1]
    out = np.zeros((n_tok, Ch))
    finals = []
    for i, (s, e) in enumerate(_bounds(cu, n_tok)):
        L = e - s
        st = _start(init, i, (Ch, W - 1))
        fin = np.zeros((Ch, W - 1))
        for c in range(Ch):
            def at(pos):
                return x[s + pos, c] if pos >= 0 else st[c, W - 1 + pos]

            for t in range(L):
                y = sum(weight[c, j] * at(t - W + 1 + j) for j in range(W))
                if bias is not None:
                    y += bias[c]
                if activation == "silu":
                    y = y / (1.0 + math.exp(-y))
                out[s + t, c] = y
            for j in range(W - 1):
                fin[c, j] = at(L - (W - 1) + j)
        finals.append(fin)
    return out, finals
