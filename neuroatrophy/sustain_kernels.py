"""Compiled kernels of SuStaIn: stage likelihoods, E-M passes and MCMC, in log space.

The models of :mod:`neuroatrophy.sustain` reduce to one question asked millions of
times: *what is the data's log-likelihood if one event of one subtype moves?* These
kernels answer it incrementally. For every subtype ``c``, stage ``k`` and subject
``j`` the engine keeps the stage log-density ``L[c, k, j]``, a per-subject offset
``m[j]`` and ``E = exp(L - m)`` with its prefix and suffix sums over stages. A move
changes the model parameters of only some stages (the z-score means of the
biomarkers whose knots moved, or the event sets of the stages between the old and
new positions); only those stages are recomputed, and the stage sum reuses the
stored prefix and suffix sums (additions only, so no cancellation). Subjects whose
new densities leave the offset's safe range fall back to an exact log-sum-exp, and
offsets are re-based after every accepted move, so nothing underflows however
extreme the data: the results equal a direct log-space evaluation of the model.

All functions are ``nogil``, so start points, folds and chains run in parallel on
threads. Random numbers are drawn by the caller (numpy ``Generator``) and passed in,
so results depend on the seed only, never on scheduling.

Model kinds (``kind``): 0 = z-score (Gaussian around a piecewise-linear trajectory),
1 = event-based mixture (event / no-event likelihoods).
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

ZSCORE = 0
MIXTURE = 1

# Offsets are re-based when a subject's stored sums leave [exp(-REBASE), exp(REBASE)];
# candidate densities more than SLOW_PATH above the offset take the exact path.
REBASE = 300.0
SLOW_PATH = 300.0
_TINY = 1e-280

_jit = njit(cache=True, nogil=True)


# ---------------------------------------------------------------- model parameters


@_jit
def positions_of(seq, pos):
    """``pos[e]`` = position of event ``e`` in ``seq``."""
    for i in range(seq.size):
        pos[seq[i]] = i


@_jit
def zscore_means(pos, ev_z, zmax, bio_events, bio_n, points, mu):
    """Mean z of every biomarker at every stage for a sequence given by ``pos``.

    Biomarker ``b`` follows the piecewise-linear curve through the knots
    ``(0, 0), (pos(E(b, z1)) + 1, z1), ..., (N + 1, zmax[b])`` over the points
    ``0..N+1``; the mean at stage ``k`` is the midpoint ``(point(k) + point(k+1)) / 2``
    (pySuStaIn's ZscoreSustain approximation).
    """
    n_events = pos.size
    for b in range(zmax.size):
        x0 = 0
        v0 = 0.0
        for t in range(bio_n[b] + 1):
            if t < bio_n[b]:
                e = bio_events[b, t]
                x1 = pos[e] + 1
                v1 = ev_z[e]
            else:
                x1 = n_events + 1
                v1 = zmax[b]
            step = (v1 - v0) / (x1 - x0)
            for p in range(x0, x1 + 1):
                points[p] = v0 + step * (p - x0)
            x0 = x1
            v0 = v1
        for k in range(n_events + 1):
            mu[b, k] = 0.5 * points[k] + 0.5 * points[k + 1]


@_jit
def zscore_row(X, W, mu, k, out):
    """``out[j] = -1/2 sum_b W[b, j] (X[b, j] - mu[b, k])^2`` (one stage, all subjects)."""
    n_subjects = X.shape[1]
    for j in range(n_subjects):
        out[j] = 0.0
    for b in range(X.shape[0]):
        m = mu[b, k]
        for j in range(n_subjects):
            d = X[b, j] - m
            out[j] -= 0.5 * W[b, j] * d * d


@_jit
def mixture_rows(D, base, seq, k_stop, rows):
    """Stage log-densities ``base + sum_{i<k} D[seq[i]]`` for stages ``0..k_stop-1``."""
    n_subjects = D.shape[1]
    for j in range(n_subjects):
        rows[0, j] = base[j]
    for k in range(1, k_stop):
        e = seq[k - 1]
        for j in range(n_subjects):
            rows[k, j] = rows[k - 1, j] + D[e, j]


@_jit
def stage_rows(kind, X, W, D, base, ev_z, zmax, bio_events, bio_n, seq, pos, points, mu, rows):
    """All stage log-densities (N+1, M) of one sequence (without subject constants)."""
    n_stages = seq.size + 1
    positions_of(seq, pos)
    if kind == ZSCORE:
        zscore_means(pos, ev_z, zmax, bio_events, bio_n, points, mu)
        for k in range(n_stages):
            zscore_row(X, W, mu, k, rows[k])
    else:
        mixture_rows(D, base, seq, n_stages, rows)


@_jit
def changed_rows(kind, X, W, D, base, ev_z, zmax, bio_events, bio_n,
                 seq_new, pos_old, pos_new, points, mu_old, mu_new, L_c, rows, flags):
    """Recompute only the stages whose parameters differ from the current sequence.

    ``L_c`` holds the current stage log-densities of this subtype. Sets ``flags[k]`` for
    every changed stage, fills ``rows[k]`` for those, and returns the span ``(k0, k1)``
    (``k0 == k1`` when nothing changed). For z-scores only the biomarkers whose mean
    moved are updated: -1/2 W (X - m')^2 - (-1/2 W (X - m)^2) = W (m' - m)(X - (m + m')/2).
    """
    n_stages = seq_new.size + 1
    n_subjects = rows.shape[1]
    positions_of(seq_new, pos_new)
    k0 = n_stages
    k1 = 0
    if kind == ZSCORE:
        zscore_means(pos_new, ev_z, zmax, bio_events, bio_n, points, mu_new)
        for k in range(n_stages):
            changed = False
            for b in range(mu_new.shape[0]):
                new = mu_new[b, k]
                old = mu_old[b, k]
                if new == old:
                    continue
                if not changed:
                    changed = True
                    for j in range(n_subjects):
                        rows[k, j] = L_c[k, j]
                step = new - old
                half = 0.5 * (new + old)
                for j in range(n_subjects):
                    rows[k, j] += W[b, j] * step * (X[b, j] - half)
            flags[k] = changed
            if changed:
                if k < k0:
                    k0 = k
                k1 = k + 1
    else:
        # Stage k holds the events at positions < k: it changes iff some moved event
        # crosses k.
        lo = n_stages
        hi = -1
        for e in range(seq_new.size):
            if pos_new[e] != pos_old[e]:
                lo = min(lo, pos_new[e], pos_old[e])
                hi = max(hi, pos_new[e], pos_old[e])
        for k in range(n_stages):
            flags[k] = False
        if hi >= 0:
            mixture_rows(D, base, seq_new, hi + 1, rows)
            for k in range(lo + 1, hi + 1):
                flags[k] = True
            k0 = lo + 1
            k1 = hi + 1
    if k1 <= k0:
        return 0, 0
    return k0, k1


# ---------------------------------------------------------------- mixture state


# exp(x) for a whole vector, written so that LLVM vectorises it (numba's PyPI builds
# have no vector math library, and exp is most of SuStaIn's time): range reduction
# x = k ln2 + r, |r| <= ln2/2, a degree-12 Taylor polynomial for exp(r) (relative
# error < 3e-16), and 2^k assembled in the exponent bits. Inputs are clamped to
# [-708, 708]; smaller values give ~1e-308 instead of 0, which no sum here can see.
_LOG2E = 1.4426950408889634
_LN2_HI = 0.693145751953125
_LN2_LO = 1.4286068203094173e-06
_ROUND = 6755399441055744.0  # 1.5 * 2**52: adding it rounds to an integer in the low bits
_BIAS_BITS = 0x4338000000000000  # bits of _ROUND


@njit(cache=True, nogil=True, fastmath={"contract"})
def vexp(x, out, scratch):
    """``out[:] = exp(x)`` (``scratch`` is a float64 work array of the same size)."""
    n = x.size
    for j in range(n):
        v = min(max(x[j], -708.0), 708.0)
        kf = (v * _LOG2E + _ROUND) - _ROUND
        r = (v - kf * _LN2_HI) - kf * _LN2_LO
        p = 1.0 / 479001600.0
        p = p * r + 1.0 / 39916800.0
        p = p * r + 1.0 / 3628800.0
        p = p * r + 1.0 / 362880.0
        p = p * r + 1.0 / 40320.0
        p = p * r + 1.0 / 5040.0
        p = p * r + 1.0 / 720.0
        p = p * r + 1.0 / 120.0
        p = p * r + 1.0 / 24.0
        p = p * r + 1.0 / 6.0
        p = p * r + 0.5
        p = p * r + 1.0
        p = p * r + 1.0
        out[j] = p
        scratch[j] = kf + (_ROUND + 1023.0)
    bits = scratch.view(np.int64)
    for j in range(n):
        bits[j] = (bits[j] - _BIAS_BITS) << 52
    for j in range(n):
        out[j] *= scratch[j]


@_jit
def _sums(E, P, Q, c):
    """Prefix (P) and suffix (Q) sums over the stages of subtype ``c``, all subjects."""
    n_stages, n_subjects = E.shape[1], E.shape[2]
    for j in range(n_subjects):
        P[c, 0, j] = 0.0
        Q[c, n_stages, j] = 0.0
    for k in range(n_stages):
        for j in range(n_subjects):
            P[c, k + 1, j] = P[c, k, j] + E[c, k, j]
    for k in range(n_stages - 1, -1, -1):
        for j in range(n_subjects):
            Q[c, k, j] = Q[c, k + 1, j] + E[c, k, j]


@_jit
def rebase_subject(L, E, P, Q, m, j):
    """Set subject ``j``'s offset to its largest stage log-density and refresh its sums."""
    n_sub, n_stages = L.shape[0], L.shape[1]
    best = -np.inf
    for c in range(n_sub):
        for k in range(n_stages):
            if L[c, k, j] > best:
                best = L[c, k, j]
    m[j] = best
    for c in range(n_sub):
        for k in range(n_stages):
            E[c, k, j] = math.exp(L[c, k, j] - best)
        P[c, 0, j] = 0.0
        for k in range(n_stages):
            P[c, k + 1, j] = P[c, k, j] + E[c, k, j]
        Q[c, n_stages, j] = 0.0
        for k in range(n_stages - 1, -1, -1):
            Q[c, k, j] = Q[c, k + 1, j] + E[c, k, j]


@_jit
def init_state(L, E, P, Q, m):
    """Offsets and sums for stage log-densities ``L`` (K, N+1, M) already filled."""
    for j in range(L.shape[2]):
        rebase_subject(L, E, P, Q, m, j)


@_jit
def accept_rows(L, E, P, Q, m, c_new, rows, flags, spans, expbuf, n_new):
    """Make the candidate of :func:`candidate_loglik` current (its exps are reused),
    then re-base subjects whose sums drifted out of the safe range."""
    n_stages, n_subjects = L.shape[1], L.shape[2]
    for t in range(n_new):
        if spans[t, 0] == spans[t, 1]:
            continue
        c = c_new[t]
        for k in range(n_stages):
            if flags[t, k]:
                for j in range(n_subjects):
                    L[c, k, j] = rows[t, k, j]
                    E[c, k, j] = expbuf[t, k, j]
        _sums(E, P, Q, c)
    low = math.exp(-REBASE)
    high = math.exp(REBASE)
    for j in range(n_subjects):
        largest = 0.0
        for cc in range(L.shape[0]):
            largest = max(largest, P[cc, n_stages, j])
        if not (low < largest < high):
            rebase_subject(L, E, P, Q, m, j)


@_jit
def _slot_of(c_new, n_new, c):
    """Index of subtype ``c`` among the changed subtypes ``c_new[:n_new]``, or -1."""
    for t in range(n_new):
        if c_new[t] == c:
            return t
    return -1


@_jit
def _exact_value(L, j, c, k, slot, rows_new, flags_new):
    if slot >= 0 and flags_new[slot, k]:
        return rows_new[slot, k, j]
    return L[c, k, j]


@_jit
def subject_loglik_exact(L, f, j, c_new, rows_new, flags_new, n_new):
    """Exact log sum_{c,k} f_c exp(L) for subject ``j`` (slow path), with the first
    ``n_new`` subtypes listed in ``c_new`` replaced on their flagged stages."""
    n_sub, n_stages = L.shape[0], L.shape[1]
    best = -np.inf
    for c in range(n_sub):
        if f[c] > 0.0:
            slot = _slot_of(c_new, n_new, c)
            for k in range(n_stages):
                best = max(best, _exact_value(L, j, c, k, slot, rows_new, flags_new) + math.log(f[c]))
    if best == -np.inf:
        return -np.inf
    total = 0.0
    for c in range(n_sub):
        if f[c] > 0.0:
            slot = _slot_of(c_new, n_new, c)
            for k in range(n_stages):
                total += math.exp(_exact_value(L, j, c, k, slot, rows_new, flags_new) + math.log(f[c]) - best)
    return best + math.log(total)


@_jit
def current_loglik(L, E, P, m, f, const):
    """Log-likelihood of the current state under fractions ``f``."""
    n_sub, n_stages, n_subjects = L.shape[0], L.shape[1], L.shape[2]
    total = 0.0
    c_none = np.zeros(1, dtype=np.int64)
    rows_none = np.zeros((1, 1, 1))
    flags_none = np.zeros((1, 1), dtype=np.bool_)
    for j in range(n_subjects):
        s = 0.0
        for c in range(n_sub):
            s += f[c] * P[c, n_stages, j]
        if s > _TINY:
            total += math.log(s) + m[j] + const[j]
        else:
            total += subject_loglik_exact(L, f, j, c_none, rows_none, flags_none, 0) + const[j]
    return total


@_jit
def candidate_loglik(L, E, P, Q, m, f, const, c_new, rows_new, flags_new, spans, n_new,
                     expbuf, sums, tmp, scratch, slow):
    """Log-likelihood if subtypes ``c_new[:n_new]`` took their new flagged stage rows.

    ``spans[t] = (k0, k1)`` bounds the flagged stages of slot ``t``. Unchanged stages
    come from the stored prefix/suffix sums; only flagged stages are exponentiated
    (into ``expbuf``, which :func:`accept_rows` reuses). Work arrays: ``sums`` (K, M),
    ``tmp``, ``scratch`` (M,), ``slow`` (M,) bool.
    """
    n_sub, n_stages, n_subjects = L.shape[0], L.shape[1], L.shape[2]
    for c in range(n_sub):
        for j in range(n_subjects):
            sums[c, j] = P[c, n_stages, j]
    for j in range(n_subjects):
        slow[j] = False
    for t in range(n_new):
        k0 = spans[t, 0]
        k1 = spans[t, 1]
        if k0 == k1:
            continue
        c = c_new[t]
        for j in range(n_subjects):
            sums[c, j] = P[c, k0, j] + Q[c, k1, j]
        for k in range(k0, k1):
            if flags_new[t, k]:
                for j in range(n_subjects):
                    tmp[j] = rows_new[t, k, j] - m[j]
                for j in range(n_subjects):
                    if tmp[j] > SLOW_PATH:
                        slow[j] = True
                vexp(tmp, expbuf[t, k], scratch)
                for j in range(n_subjects):
                    sums[c, j] += expbuf[t, k, j]
            else:
                for j in range(n_subjects):
                    sums[c, j] += E[c, k, j]
    total = 0.0
    for j in range(n_subjects):
        s = 0.0
        for c in range(n_sub):
            s += f[c] * sums[c, j]
        if slow[j] or not s > _TINY:
            total += subject_loglik_exact(L, f, j, c_new, rows_new, flags_new, n_new) + const[j]
        else:
            total += math.log(s) + m[j] + const[j]
    return total


@_jit
def work_buffers(n_slots, n_sub, n_stages, n_subjects):
    """Work arrays of :func:`candidate_loglik` for ``n_slots`` changed subtypes."""
    rows = np.empty((n_slots, n_stages, n_subjects))
    flags = np.zeros((n_slots, n_stages), dtype=np.bool_)
    spans = np.zeros((n_slots, 2), dtype=np.int64)
    expbuf = np.empty((n_slots, n_stages, n_subjects))
    sums = np.empty((n_sub, n_subjects))
    tmp = np.empty(n_subjects)
    scratch = np.empty(n_subjects)
    slow = np.zeros(n_subjects, dtype=np.bool_)
    return rows, flags, spans, expbuf, sums, tmp, scratch, slow


@_jit
def responsibilities_fraction(P, f, out):
    """E-step: ``out[c]`` = mean over subjects of the posterior probability of subtype c."""
    n_sub, n_stages, n_subjects = P.shape[0], P.shape[1] - 1, P.shape[2]
    for c in range(n_sub):
        out[c] = 0.0
    for j in range(n_subjects):
        s = 0.0
        for c in range(n_sub):
            s += f[c] * P[c, n_stages, j]
        s += 1e-250
        for c in range(n_sub):
            out[c] += f[c] * P[c, n_stages, j] / s
    norm = 0.0
    for c in range(n_sub):
        norm += out[c]
    for c in range(n_sub):
        out[c] /= norm


# ---------------------------------------------------------------- shared move helpers


@_jit
def allowed_range(seq, pos, e, ev_prev, ev_next):
    """Insertion indices ``[lo, hi]`` for event ``e`` in the sequence without ``e``.

    ``ev_prev[e]``/``ev_next[e]`` are the same biomarker's neighbouring z-events
    (-1 when none): ``e`` must stay after the former and before the latter.
    """
    n = seq.size
    lo = 0
    hi = n - 1
    if ev_prev[e] >= 0:
        lo = pos[ev_prev[e]] + 1
    if ev_next[e] >= 0:
        hi = pos[ev_next[e]] - 1
    return lo, hi


@_jit
def move_event(seq, e, u, p, out):
    """``out`` = ``seq`` with event ``e`` (at position ``u``) re-inserted at index ``p``."""
    n = seq.size
    i = 0
    for t in range(n):
        if t == u:
            continue
        if i == p:
            out[i] = e
            i += 1
        out[i] = seq[t]
        i += 1
    if i == p:
        out[i] = e


# ---------------------------------------------------------------- E-M


@_jit
def em_pass(kind, X, W, D, base, ev_z, zmax, bio_events, bio_n, ev_prev, ev_next, const,
            seqs, f, L, E, P, Q, m, mus, order_c, order_e):
    """One pass of SuStaIn's E-M (pySuStaIn ``_optimise_parameters`` semantics).

    E-step for the fractions; then, for every subtype (in ``order_c``) and event (in
    ``order_e[c]``), every allowed position is tried and the first maximum kept; then
    the fractions once more. ``seqs``, ``f`` and the state are updated in place.
    Returns the log-likelihood.
    """
    n_sub, n_events = seqs.shape[0], seqs.shape[1]
    n_stages = n_events + 1
    n_subjects = L.shape[2]
    f_new = np.empty(n_sub)
    responsibilities_fraction(P, f, f_new)
    f[:] = f_new
    pos = np.empty(n_events, dtype=np.int64)
    pos_new = np.empty(n_events, dtype=np.int64)
    cand = np.empty(n_events, dtype=np.int64)
    best_seq = np.empty(n_events, dtype=np.int64)
    points = np.empty(n_stages + 1)
    mu_new = np.empty((mus.shape[1], mus.shape[2]))
    rows, flags, spans, expbuf, sums, tmp, scratch, slow = work_buffers(1, n_sub, n_stages, n_subjects)
    c_new = np.zeros(1, dtype=np.int64)
    for ci in range(n_sub):
        c = order_c[ci]
        c_new[0] = c
        for ei in range(n_events):
            e = order_e[c, ei]
            seq = seqs[c]
            positions_of(seq, pos)
            u = pos[e]
            lo, hi = allowed_range(seq, pos, e, ev_prev, ev_next)
            best = -np.inf
            best_p = u
            for p in range(lo, hi + 1):
                if p == u:
                    value = current_loglik(L, E, P, m, f, const)
                else:
                    move_event(seq, e, u, p, cand)
                    k0, k1 = changed_rows(kind, X, W, D, base, ev_z, zmax, bio_events, bio_n,
                                          cand, pos, pos_new, points, mus[c], mu_new, L[c], rows[0], flags[0])
                    spans[0, 0] = k0
                    spans[0, 1] = k1
                    value = candidate_loglik(L, E, P, Q, m, f, const, c_new, rows, flags, spans, 1,
                                             expbuf, sums, tmp, scratch, slow)
                if value > best:
                    best = value
                    best_p = p
            if best_p != u:
                move_event(seq, e, u, best_p, best_seq)
                k0, k1 = changed_rows(kind, X, W, D, base, ev_z, zmax, bio_events, bio_n,
                                      best_seq, pos, pos_new, points, mus[c], mu_new, L[c], rows[0], flags[0])
                spans[0, 0] = k0
                spans[0, 1] = k1
                candidate_loglik(L, E, P, Q, m, f, const, c_new, rows, flags, spans, 1,
                                 expbuf, sums, tmp, scratch, slow)
                accept_rows(L, E, P, Q, m, c_new, rows, flags, spans, expbuf, 1)
                seqs[c, :] = best_seq
                mus[c, :, :] = mu_new
    responsibilities_fraction(P, f, f_new)
    f[:] = f_new
    return current_loglik(L, E, P, m, f, const)


# ---------------------------------------------------------------- MCMC


@_jit
def _proposal_norm(u, lo, hi, sigma):
    """Normaliser of the truncated discrete Gaussian proposal centred on ``u``."""
    z = 0.0
    for p in range(lo, hi + 1):
        d = (p - u) / sigma
        z += math.exp(-0.5 * d * d)
    return z


@_jit
def _draw_position(u, lo, hi, sigma, r):
    """Position in ``[lo, hi]`` drawn with weights exp(-((p-u)/sigma)^2/2) by inversion."""
    z = _proposal_norm(u, lo, hi, sigma)
    target = r * z
    acc = 0.0
    for p in range(lo, hi + 1):
        d = (p - u) / sigma
        acc += math.exp(-0.5 * d * d)
        if acc >= target:
            return p
    return hi


@_jit
def mcmc(kind, X, W, D, base, ev_z, zmax, bio_events, bio_n, ev_prev, ev_next, const,
         seqs, f, L, E, P, Q, m, mus, seq_sigma, f_sigma, loglik,
         r_pos, r_new, r_f, r_acc, out_seq, out_f, out_loglik, start):
    """Metropolis-Hastings over sequences and fractions, ``r_acc.size`` iterations.

    Each iteration proposes, for every subtype, one event moved to a position drawn
    from a discrete Gaussian around its current one (restricted to the positions its
    biomarker's other z-events allow), and a random walk of the fractions in additive
    log-ratio coordinates; the joint proposal is accepted with the Metropolis-Hastings
    ratio, including the proposal asymmetry and the Jacobian of the log-ratio map
    (flat prior on the simplex). Samples are written to ``out_*[start + i]``.
    Returns ``(loglik, n_accepted)``.
    """
    n_sub, n_events = seqs.shape[0], seqs.shape[1]
    n_stages = n_events + 1
    n_subjects = L.shape[2]
    n_iter = r_acc.size
    pos = np.empty(n_events, dtype=np.int64)
    pos_new = np.empty(n_events, dtype=np.int64)
    points = np.empty(n_stages + 1)
    new_seqs = np.empty_like(seqs)
    new_mus = np.empty_like(mus)
    rows, flags, spans, expbuf, sums, tmp, scratch, slow = work_buffers(n_sub, n_sub, n_stages, n_subjects)
    c_new = np.arange(n_sub)
    f_new = np.empty(n_sub)
    n_accepted = 0
    for it in range(n_iter):
        log_hastings = 0.0
        for c in range(n_sub):
            seq = seqs[c]
            positions_of(seq, pos)
            u = min(int(r_pos[it, c] * n_events), n_events - 1)
            e = seq[u]
            lo, hi = allowed_range(seq, pos, e, ev_prev, ev_next)
            sigma = seq_sigma[c, e]
            v = _draw_position(u, lo, hi, sigma, r_new[it, c])
            # q(v|u) / q(u|v) differ only through the normalisers around u and v.
            log_hastings += math.log(_proposal_norm(u, lo, hi, sigma)) - math.log(_proposal_norm(v, lo, hi, sigma))
            if v == u:
                new_seqs[c, :] = seq
                new_mus[c] = mus[c]
                spans[c, 0] = 0
                spans[c, 1] = 0
                for k in range(n_stages):
                    flags[c, k] = False
            else:
                move_event(seq, e, u, v, new_seqs[c])
                k0, k1 = changed_rows(kind, X, W, D, base, ev_z, zmax, bio_events, bio_n,
                                      new_seqs[c], pos, pos_new, points, mus[c], new_mus[c],
                                      L[c], rows[c], flags[c])
                spans[c, 0] = k0
                spans[c, 1] = k1
        log_jacobian = 0.0
        if n_sub > 1:
            last = math.log(f[n_sub - 1])
            norm = 1.0
            for c in range(n_sub - 1):
                f_new[c] = math.exp(math.log(f[c]) - last + f_sigma[c] * r_f[it, c])
                norm += f_new[c]
            f_new[n_sub - 1] = 1.0
            for c in range(n_sub):
                f_new[c] /= norm
                log_jacobian += math.log(f_new[c]) - math.log(f[c])
        else:
            f_new[0] = 1.0
        value = candidate_loglik(L, E, P, Q, m, f_new, const, c_new, rows, flags, spans, n_sub,
                                 expbuf, sums, tmp, scratch, slow)
        log_ratio = value - loglik + log_hastings + log_jacobian
        if log_ratio >= 0.0 or math.log(r_acc[it]) < log_ratio:
            n_accepted += 1
            accept_rows(L, E, P, Q, m, c_new, rows, flags, spans, expbuf, n_sub)
            for c in range(n_sub):
                seqs[c, :] = new_seqs[c]
                mus[c, :, :] = new_mus[c]
                f[c] = f_new[c]
            loglik = value
        out_seq[start + it] = seqs
        out_f[start + it] = f
        out_loglik[start + it] = loglik
    return loglik, n_accepted


# ---------------------------------------------------------------- staging


@_jit
def stage_posteriors(kind, X, W, D, base, ev_z, zmax, bio_events, bio_n, const,
                     samples_seq, samples_f, prob_subtype_stage, loglik_out):
    """Average over samples of the joint posterior P(stage k, subtype c | x_j).

    ``prob_subtype_stage`` (M, N+1, K) accumulates the f-weighted joint posterior of
    every sample (then divided by the number of samples); ``loglik_out[s, j]`` is
    subject j's log-likelihood under sample s (for cross-validation).
    """
    n_samples, n_sub, n_events = samples_seq.shape
    n_stages = n_events + 1
    n_subjects = prob_subtype_stage.shape[0]
    pos = np.empty(n_events, dtype=np.int64)
    points = np.empty(n_stages + 1)
    mu = np.empty((zmax.size, n_stages))
    rows = np.empty((n_sub, n_stages, n_subjects))
    seq = np.empty(n_events, dtype=np.int64)
    for s in range(n_samples):
        for c in range(n_sub):
            for i in range(n_events):
                seq[i] = samples_seq[s, c, i]
            stage_rows(kind, X, W, D, base, ev_z, zmax, bio_events, bio_n, seq, pos, points, mu, rows[c])
        for j in range(n_subjects):
            best = -np.inf
            for c in range(n_sub):
                lf = math.log(samples_f[s, c]) if samples_f[s, c] > 0 else -np.inf
                for k in range(n_stages):
                    v = rows[c, k, j] + lf
                    if v > best:
                        best = v
            total = 0.0
            for c in range(n_sub):
                lf = math.log(samples_f[s, c]) if samples_f[s, c] > 0 else -np.inf
                for k in range(n_stages):
                    total += math.exp(rows[c, k, j] + lf - best)
            for c in range(n_sub):
                lf = math.log(samples_f[s, c]) if samples_f[s, c] > 0 else -np.inf
                for k in range(n_stages):
                    prob_subtype_stage[j, k, c] += math.exp(rows[c, k, j] + lf - best) / total
            loglik_out[s, j] = best + math.log(total) + const[j]
    for j in range(n_subjects):
        for k in range(n_stages):
            for c in range(n_sub):
                prob_subtype_stage[j, k, c] /= n_samples
