"""The fused Lookahead step in Triton: one launch per bucket per step.

`lookahead_step_kernel` does, for every element of every tensor of a bucket, the inner
SGD / Adam / AdamW update of `lookahead_fused.reference` and, on a sync step, Algorithm 1's
lerp of the slow weights, the reset of the fast weights and the inner-state policy, in one
pass over memory. Every variant is a `tl.constexpr` specialisation of this one body; the
per-element math is written once, in the `_sgd`, `_adam`, `_lerp` helpers below.
Hyperparameters that change during training (lr, alpha, the step counters and the bias
corrections derived from them) are runtime values or device scalars, never constexprs.

Many tensors, one launch: the kernel walks a chunk table (int64, TABLE_COLUMNS columns per
row, one row per program), built once per bucket by the backend:
    0  address of the chunk's first parameter element
    1  index of that element in its parameter
    2  number of elements in the chunk (at most the backend's CHUNK)
    3  offset of the chunk's first element in the bucket's flat state buffers
    4  the parameter's slot in the counter vectors (`step`, `lookahead_step`) and in the
       gradient vector
and a gradient vector (int64, one address per parameter, 0 for a parameter without a
gradient this step), rebuilt alone when only gradients move (a new `.grad` after
`zero_grad(set_to_none=True)`). Addresses and offsets are int64, so tensors of 2^31
elements and more are indexed correctly.

Counters. Every program reads the parameter's inner step and the group's lookahead counter
(for the bias corrections, SGD's first-step rule and, on the device path, the sync
decision); none writes them, since a program cannot know when the others of the launch
have read them. `advance_counters_kernel`, a second tiny launch (one element per parameter,
not per weight), advances them afterwards: the only extra launch of a step.

Phases. A plain or sync step is one launch (PHASE_STEP). With adaptive α a sync step needs
the group's α̂ before any slow weight moves, so it takes two: PHASE_INNER_DOTS (the inner
step, plus per-program partial sums of gᵀd and dᵀÂd written to a buffer, no atomics, so
the result is deterministic) and, once α̂ is known, PHASE_SYNC_ONLY (the sync with α̂,
which reads θ and φ once more).

Sync decision (SYNC): SYNC_NEVER / SYNC_NOW when the host knows the counter (a plain step
does not even compile the slow-weight code), SYNC_DEVICE when it lives on the device
(capturable, GradScaler): each program derives it from the counter, and on a plain step its
slow-weight loads and stores are masked off, so they cost no memory traffic.

GradScaler: `found_inf` (a device scalar, a zero tensor when there is none) is read by every
program; a program whose step is skipped masks off every load and store, so every tensor
keeps its bits even with inf/NaN gradients. `grad_scale` divides the gradient in registers;
`.grad` is never written.

Arithmetic is fp32 whatever the storage dtype (bf16/fp16 parameters, state and slow weights
of any float dtype): values are converted after loading and rounded once when stored, which
is also what makes the kernel correct under TRITON_INTERPRET=1 (whose bf16 arithmetic is
wrong). Scalars derived from the counters (bias corrections, step sizes) are computed once
per program in fp64, as torch.optim computes them in Python, then rounded to fp32.
"""

from __future__ import annotations

import triton
import triton.language as tl

TABLE_COLUMNS = 5
PHASE_STEP, PHASE_INNER_DOTS, PHASE_SYNC_ONLY = 0, 1, 2
SYNC_NEVER, SYNC_NOW, SYNC_DEVICE = 0, 1, 2
INNER_STATE_CODES = {"maintain": 0, "reset": 1, "pullback": 2}


@triton.jit
def _lerp(start, end, weight):
    """torch.lerp's formula (ATen/native/Lerp.h): exact at weight 0 and 1 for finite inputs."""
    diff = end - start
    return tl.where(tl.abs(weight) < 0.5, start + weight * diff, end - diff * (1.0 - weight))


@triton.jit
def _round(x, DTYPE: tl.constexpr):
    """fp32 x rounded to the storage dtype, to nearest even. bf16 is rounded by hand: the
    interpreter of triton 3.9 truncates in fp32 -> bf16 casts (tl.store's included), and the
    few integer operations cost nothing in a memory-bound kernel on a GPU."""
    if DTYPE == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        rounded = (bits + (0x7FFF + ((bits >> 16) & 1))) >> 16
        nan = (bits >> 16) | 0x40  # a quiet NaN stays a NaN (never rounded into inf)
        bits16 = tl.where(x != x, nan, rounded).to(tl.uint16)
        return bits16.to(tl.bfloat16, bitcast=True)
    else:
        return x.to(DTYPE)


@triton.jit
def _l2(g, wd, theta):
    """L2 weight decay g + λθ, only when λ ≠ 0 (as torch.optim): 0·θ is NaN for an infinite θ.
    One rounding (a fused multiply-add), as torch's `grad.add(param, alpha=λ)` computes it."""
    return tl.where(wd != 0.0, tl.fma(wd, theta, g), g)


@triton.jit
def _lanes(in_range, flag):
    """in_range & flag for a block (or scalar) mask and a per-program flag. (Written as a where: the
    interpreter of triton 3.9 turns `block & scalar` into an int32 array that tl.load
    rejects as a mask.)"""
    return tl.where(in_range, flag, False)


@triton.jit
def _syncs(lookahead_count, k, ok, SYNC: tl.constexpr):
    """Whether this step syncs: (t + 1) mod k == 0, t the group's counter before the step,
    on a step that is not skipped. Shared by both kernels, so they always agree."""
    if SYNC == 2:  # SYNC_DEVICE
        t = lookahead_count.to(tl.int32) + 1
        return _lanes((t % k) == 0, ok)
    elif SYNC == 1:  # SYNC_NOW
        return ok
    else:
        return _lanes(lookahead_count != lookahead_count, ok)  # false


@triton.jit
def _sgd(
    theta, g, buf, first, momentum, one_minus_dampening, neg_lr, HAS_MOMENTUM: tl.constexpr, NESTEROV: tl.constexpr
):
    """torch.optim.SGD for one block, after weight decay: returns (θ, momentum buffer).
    The first buffer is the gradient itself."""
    if HAS_MOMENTUM:
        buf = tl.where(first, g, buf * momentum + one_minus_dampening * g)
        if NESTEROV:
            d_p = g + momentum * buf
        else:
            d_p = buf
    else:
        d_p = g
    return theta + neg_lr * d_p, buf


@triton.jit
def _adam(
    theta, g, m, v, vmax, one_minus_beta1, beta2, one_minus_beta2, bc2_sqrt, eps, neg_step_size, AMSGRAD: tl.constexpr
):
    """torch.optim.Adam's moment and parameter update for one block, after weight decay:
    returns (θ, m, v, max v). IEEE-rounded sqrt and division, and a NaN-propagating max
    (torch.maximum's), so that the result is torch's to the bit."""
    m = _lerp(m, g, one_minus_beta1)
    v = v * beta2 + one_minus_beta2 * g * g
    if AMSGRAD:
        vmax = tl.maximum(vmax, v, propagate_nan=tl.PropagateNan.ALL)
        denom = tl.div_rn(tl.sqrt_rn(vmax), bc2_sqrt) + eps
    else:
        denom = tl.div_rn(tl.sqrt_rn(v), bc2_sqrt) + eps
    return theta + neg_step_size * tl.div_rn(m, denom), m, v, vmax


@triton.jit
def _block(
    idx,
    in_range,  # None: a full block (no bounds mask at all, so accesses can be vectorised)
    param_row,
    grad_row,
    momentum_row,
    exp_avg_sq_row,
    max_exp_avg_sq_row,
    cached_row,
    slow_row,
    do_inner,
    do_sync,
    do_dots,
    reset,
    pullback,
    first,
    alpha,
    wd,
    decay,
    grad_scale,
    lr32,
    neg_lr,
    momentum,
    one_minus_dampening,
    one_minus_beta1,
    beta2,
    one_minus_beta2,
    bc2_32,
    bc2_sqrt,
    eps,
    neg_step_size,
    PARAM_DTYPE: tl.constexpr,
    ADAM: tl.constexpr,
    DECOUPLED: tl.constexpr,
    HAS_MOMENTUM: tl.constexpr,
    NESTEROV: tl.constexpr,
    MAXIMIZE: tl.constexpr,
    AMSGRAD: tl.constexpr,
    INNER_STATE: tl.constexpr,
    HAS_GRAD_SCALE: tl.constexpr,
    PHASE: tl.constexpr,
    SYNC: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """One block of a chunk: the inner step, the sync and the stores. Returns this block's
    (gᵀd, dᵀÂd) for adaptive α (zeros outside PHASE_INNER_DOTS)."""
    if in_range is None:
        in_range = tl.full([BLOCK], True, tl.int1)
    theta = tl.load(param_row + idx, mask=in_range).to(tl.float32)
    inner = _lanes(in_range, do_inner)
    g = tl.load(grad_row + idx, mask=inner, other=0.0).to(tl.float32)
    if HAS_GRAD_SCALE:
        g = tl.div_rn(g, grad_scale)
    if MAXIMIZE:
        g = -g

    # The inner step (masked off on the elements that take none).
    m = tl.zeros([BLOCK], dtype=tl.float32)
    v = tl.zeros([BLOCK], dtype=tl.float32)
    vmax = tl.zeros([BLOCK], dtype=tl.float32)
    if ADAM:
        if DECOUPLED:
            theta_in = theta * decay
        else:
            theta_in = theta
            g = _l2(g, wd, theta)
        m = tl.load(momentum_row + idx, mask=_lanes(in_range, do_inner | pullback), other=0.0).to(tl.float32)
        v = tl.load(exp_avg_sq_row + idx, mask=inner, other=0.0).to(tl.float32)
        if AMSGRAD:
            vmax = tl.load(max_exp_avg_sq_row + idx, mask=inner, other=0.0).to(tl.float32)
        new_theta, new_m, v, vmax = _adam(
            theta_in, g, m, v, vmax, one_minus_beta1, beta2, one_minus_beta2, bc2_sqrt, eps, neg_step_size, AMSGRAD
        )
    else:
        g = _l2(g, wd, theta)
        if HAS_MOMENTUM:
            m_mask = _lanes(in_range, (do_inner & ~first) | (pullback & ~do_inner))
            m = tl.load(momentum_row + idx, mask=m_mask, other=0.0).to(tl.float32)
        new_theta, new_m = _sgd(theta, g, m, first, momentum, one_minus_dampening, neg_lr, HAS_MOMENTUM, NESTEROV)
    theta = tl.where(do_inner, _round(new_theta, PARAM_DTYPE).to(tl.float32), theta)  # θ as stored
    m = tl.where(do_inner, new_m, m)

    # Adaptive α's sums (reference.adaptive_alpha): d = θ0 − θk, Â = (√v̂ + ε) / lr.
    gd = tl.zeros([], dtype=tl.float64)
    dad = tl.zeros([], dtype=tl.float64)
    if PHASE == 1:
        if ADAM:
            dots = _lanes(in_range, do_dots)
            d = tl.load(slow_row + idx, mask=dots, other=0.0).to(tl.float32) - theta
            d = tl.where(dots, d, 0.0)
            if AMSGRAD:
                v_hat = tl.div_rn(vmax, bc2_32)
            else:
                v_hat = tl.div_rn(v, bc2_32)
            curvature = tl.div_rn(tl.sqrt_rn(v_hat) + eps, lr32)
            gd = tl.sum(g * d, axis=0).to(tl.float64)
            dad = tl.sum((d * curvature) * d, axis=0).to(tl.float64)

    # The sync (Algorithm 1): φ ← φ + α (θ − φ) (eq. 1), θ ← φ, then the inner-state policy.
    if SYNC != 0 and PHASE != 1:
        sync = _lanes(in_range, do_sync)
        slow = tl.load(slow_row + idx, mask=sync, other=0.0).to(tl.float32)
        slow = _round(_lerp(slow, theta, alpha), slow_row.dtype.element_ty)
        tl.store(slow_row + idx, slow, mask=sync)
        theta = tl.where(do_sync, slow.to(tl.float32), theta)  # θ takes φ as stored
        if INNER_STATE == 1:  # reset: the state the inner optimizer has before its first step
            m = tl.where(do_sync, 0.0, m)
            v = tl.where(do_sync, 0.0, v)
            vmax = tl.where(do_sync, 0.0, vmax)
        if INNER_STATE == 2:  # pullback: m ← α m + (1 − α) m_cached, then m_cached ← m
            if ADAM or HAS_MOMENTUM:
                cached = tl.load(cached_row + idx, mask=sync, other=0.0).to(tl.float32)
                m_stored = _round(m, momentum_row.dtype.element_ty).to(tl.float32)
                m_pulled = _round(m_stored * alpha + (1.0 - alpha) * cached, momentum_row.dtype.element_ty)
                tl.store(cached_row + idx, _round(m_pulled.to(tl.float32), cached_row.dtype.element_ty), mask=sync)
                m = tl.where(do_sync, m_pulled.to(tl.float32), m)

    tl.store(param_row + idx, _round(theta, PARAM_DTYPE), mask=in_range)
    if ADAM or HAS_MOMENTUM:
        write_m = _lanes(in_range, do_inner | reset | pullback)
        tl.store(momentum_row + idx, _round(m, momentum_row.dtype.element_ty), mask=write_m)
    if ADAM:
        write_v = _lanes(in_range, do_inner | reset)
        tl.store(exp_avg_sq_row + idx, _round(v, exp_avg_sq_row.dtype.element_ty), mask=write_v)
        if AMSGRAD:
            tl.store(max_exp_avg_sq_row + idx, _round(vmax, max_exp_avg_sq_row.dtype.element_ty), mask=write_v)
    return gd, dad


@triton.jit
def lookahead_step_kernel(
    table_ptr,
    grad_address_ptr,  # int64 per parameter: its gradient's address, 0 when it has none
    momentum_ptr,  # SGD's momentum_buffer or Adam's exp_avg (flat; any tensor when absent)
    exp_avg_sq_ptr,
    max_exp_avg_sq_ptr,
    cached_ptr,  # the pullback cache of momentum_ptr
    slow_ptr,
    step_ptr,  # fp32 per-parameter inner steps, read only
    lookahead_ptr,  # fp32 per-parameter copies of the group's counter, read only
    found_inf_ptr,  # 0-dim: non-zero skips the step
    grad_scale_ptr,  # 0-dim, read when HAS_GRAD_SCALE
    lr_ptr,  # 0-dim, read when LR_ON_DEVICE
    alpha_ptr,  # 0-dim, read when ALPHA_ON_DEVICE (adaptive α)
    partial_ptr,  # fp64 [programs, 2]: gᵀd and dᵀÂd per program (PHASE_INNER_DOTS)
    lr,
    alpha,
    weight_decay,
    momentum,  # SGD
    one_minus_dampening,  # SGD
    log_beta1,  # Adam: bias corrections 1 − β^step = 1 − exp(step · log β), in fp64
    log_beta2,
    one_minus_beta1,
    beta2,
    one_minus_beta2,
    eps,
    k,
    PARAM_DTYPE: tl.constexpr,
    ADAM: tl.constexpr,
    DECOUPLED: tl.constexpr,  # AdamW
    HAS_MOMENTUM: tl.constexpr,  # SGD with momentum != 0
    NESTEROV: tl.constexpr,
    MAXIMIZE: tl.constexpr,
    AMSGRAD: tl.constexpr,
    INNER_STATE: tl.constexpr,  # INNER_STATE_CODES
    HAS_GRAD_SCALE: tl.constexpr,
    LR_ON_DEVICE: tl.constexpr,
    ALPHA_ON_DEVICE: tl.constexpr,
    PHASE: tl.constexpr,
    SYNC: tl.constexpr,
    ALIGNED: tl.constexpr,  # every row's addresses are 16-byte aligned (checked by the host)
    BLOCK: tl.constexpr,
):
    row = table_ptr + tl.program_id(0).to(tl.int64) * 5
    first_index = tl.load(row + 1)
    n = tl.load(row + 2)
    offset = tl.load(row + 3)
    slot = tl.load(row + 4)
    grad_address = tl.load(grad_address_ptr + slot)
    has_grad = grad_address != 0
    param_row = tl.load(row + 0).to(tl.pointer_type(PARAM_DTYPE))
    grad_row = grad_address.to(tl.pointer_type(PARAM_DTYPE)) + first_index
    momentum_row = momentum_ptr + offset
    exp_avg_sq_row = exp_avg_sq_ptr + offset
    max_exp_avg_sq_row = max_exp_avg_sq_ptr + offset
    cached_row = cached_ptr + offset
    slow_row = slow_ptr + offset
    if ALIGNED:
        # The host checked that every row starts 16-byte aligned in every tensor; the hints
        # (on the pointers themselves: an int-to-pointer cast would drop them, and so does a
        # helper's argument) let every full block use 128-bit accesses.
        param_row = tl.multiple_of(param_row, 16)
        grad_row = tl.multiple_of(grad_row, 16)
        momentum_row = tl.multiple_of(momentum_row, 16)
        exp_avg_sq_row = tl.multiple_of(exp_avg_sq_row, 16)
        max_exp_avg_sq_row = tl.multiple_of(max_exp_avg_sq_row, 16)
        cached_row = tl.multiple_of(cached_row, 16)
        slow_row = tl.multiple_of(slow_row, 16)

    ok = tl.load(found_inf_ptr) == 0
    step_before = tl.load(step_ptr + slot)
    syncs = _syncs(tl.load(lookahead_ptr + slot), k, ok, SYNC)
    never = slot != slot  # a false scalar tensor: constexpr flags below switch conditions off
    do_inner = has_grad & ok
    do_sync = syncs
    if PHASE == 1:  # PHASE_INNER_DOTS: the sync comes in a second pass
        do_sync = never
    if PHASE == 2:  # PHASE_SYNC_ONLY: the inner step was the first pass
        do_inner = never
    do_dots = syncs & do_inner
    reset = never  # at a sync, reset rewrites every moment, pullback the first one
    pullback = never
    if INNER_STATE == 1:
        reset = do_sync
    if INNER_STATE == 2:
        pullback = do_sync

    # Per-program scalars, in fp64 where torch.optim computes them in Python.
    if LR_ON_DEVICE:
        lr64 = tl.load(lr_ptr).to(tl.float64)
    else:
        lr64 = tl.cast(lr, tl.float64)
    if ALPHA_ON_DEVICE:
        alpha = tl.load(alpha_ptr).to(tl.float32)
    else:
        alpha = tl.cast(alpha, tl.float32)
    wd = tl.cast(weight_decay, tl.float32)
    step64 = step_before.to(tl.float64) + 1.0
    bc2 = 1.0 - tl.exp(step64 * tl.cast(log_beta2, tl.float64))
    bc2_sqrt = tl.sqrt(bc2).to(tl.float32)  # fp64: always sqrt.rn
    neg_step_size = (-lr64 / (1.0 - tl.exp(step64 * tl.cast(log_beta1, tl.float64)))).to(tl.float32)
    decay = (1.0 - lr64 * tl.cast(weight_decay, tl.float64)).to(tl.float32)  # AdamW: θ ← θ (1 − lr λ)
    first = step_before == 0  # SGD: the first momentum buffer is the gradient itself
    grad_scale = tl.cast(1.0, tl.float32)
    if HAS_GRAD_SCALE:
        grad_scale = tl.load(grad_scale_ptr).to(tl.float32)

    # Full blocks without a bounds mask when ALIGNED (so that accesses are vectorised), then
    # the masked rest: the last partial block, or every block of an unaligned bucket.
    gd = tl.zeros([], dtype=tl.float64)
    dad = tl.zeros([], dtype=tl.float64)
    active = do_inner | do_sync
    n = tl.where(active, n, 0)
    full = 0
    if ALIGNED:
        full = n - n % BLOCK
        for start in range(0, full, BLOCK):
            idx = start + tl.arange(0, BLOCK)
            block_gd, block_dad = _block(
                idx, None, param_row, grad_row, momentum_row, exp_avg_sq_row, max_exp_avg_sq_row, cached_row,
                slow_row, do_inner, do_sync, do_dots, reset, pullback, first, alpha, wd, decay, grad_scale,
                lr64.to(tl.float32), (-lr64).to(tl.float32), momentum, one_minus_dampening, one_minus_beta1, beta2,
                one_minus_beta2, bc2.to(tl.float32), bc2_sqrt, eps, neg_step_size, PARAM_DTYPE, ADAM, DECOUPLED,
                HAS_MOMENTUM, NESTEROV, MAXIMIZE, AMSGRAD, INNER_STATE, HAS_GRAD_SCALE, PHASE, SYNC, BLOCK,
            )  # fmt: skip
            gd += block_gd
            dad += block_dad
    for start in range(full, n, BLOCK):
        idx = start + tl.arange(0, BLOCK)
        block_gd, block_dad = _block(
            idx, idx < n, param_row, grad_row, momentum_row, exp_avg_sq_row, max_exp_avg_sq_row, cached_row,
            slow_row, do_inner, do_sync, do_dots, reset, pullback, first, alpha, wd, decay, grad_scale,
            lr64.to(tl.float32), (-lr64).to(tl.float32), momentum, one_minus_dampening, one_minus_beta1, beta2,
            one_minus_beta2, bc2.to(tl.float32), bc2_sqrt, eps, neg_step_size, PARAM_DTYPE, ADAM, DECOUPLED,
            HAS_MOMENTUM, NESTEROV, MAXIMIZE, AMSGRAD, INNER_STATE, HAS_GRAD_SCALE, PHASE, SYNC, BLOCK,
        )  # fmt: skip
        gd += block_gd
        dad += block_dad

    if PHASE == 1:
        out = partial_ptr + tl.program_id(0).to(tl.int64) * 2
        tl.store(out, gd)
        tl.store(out + 1, dad)


@triton.jit
def advance_counters_kernel(
    step_ptr,
    lookahead_ptr,
    grad_address_ptr,  # int64 per parameter: non-zero when it took an inner step
    found_inf_ptr,
    n,
    k,
    SYNC: tl.constexpr,
    RESET: tl.constexpr,  # inner_state="reset": a sync restarts the inner step counts
    BLOCK: tl.constexpr,
):
    """After the step: inner step += 1 for the parameters with a gradient, lookahead counter
    += 1, and the inner steps back to 0 on a reset sync; nothing on a skipped step. Each
    element reads and writes its own slot (every slot holds the group's counter), so no
    program reads what another writes."""
    idx = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = idx < n
    ok = tl.load(found_inf_ptr) == 0
    count = tl.load(lookahead_ptr + idx, mask=mask, other=0.0)
    steps = tl.load(step_ptr + idx, mask=mask, other=0.0)
    took_step = _lanes(tl.load(grad_address_ptr + idx, mask=mask, other=0) != 0, ok)
    steps = tl.where(took_step, steps + 1.0, steps)
    if RESET:
        steps = tl.where(_syncs(count, k, ok, SYNC), 0.0, steps)
    tl.store(step_ptr + idx, steps, mask=mask)
    tl.store(lookahead_ptr + idx, tl.where(ok, count + 1.0, count), mask=mask)
