"""The Triton kernel of workers.attention_paged (module docstring there): imported only when that backend
runs, so that CPU installs never import Triton. Triton decides at its own import whether `triton.jit`
compiles or interprets (TRITON_INTERPRET=1); tests/conftest.py sets the interpreter on machines without
CUDA before anything imports Triton."""

import triton
import triton.language as tl


@triton.jit
def _attend(q, kt, vt, seen, scale, m_i, l_i, acc, IEEE: tl.constexpr):
    """One key tile into the online softmax (FlashAttention-2's recurrence, float32): q [M, D], kt/vt
    [N, D], seen [M, N] -> the updated running max m_i [M], sum l_i [M] and unnormalised output acc [M, D].
    A row that has seen nothing yet keeps m_i = -inf and l_i = 0."""
    if IEEE:
        s = tl.dot(q, tl.trans(kt), input_precision="ieee")
    else:
        s = tl.dot(q, tl.trans(kt))
    s = tl.where(seen, s * scale, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp(s - m_use[:, None])
    alpha = tl.exp(m_i - m_use)
    if IEEE:
        pv = tl.dot(p, vt.to(tl.float32), input_precision="ieee")
    else:
        pv = tl.dot(p.to(vt.dtype), vt)
    return m_new, l_i * alpha + tl.sum(p, 1), acc * alpha[:, None] + pv


@triton.jit(do_not_specialize=["max_blocks", "split_len"])
def paged_attention(q_ptr, k_ptr, v_ptr, kc_ptr, vc_ptr, out_ptr, part_ptr, lse_ptr, slot_ptr,
                    query_start_ptr, query_len_ptr, context_len_ptr, tables_ptr, branch_ptr,
                    scale, max_blocks, split_len,
                    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
                    stride_ct, stride_ch, stride_ot, stride_oh, stride_ps, stride_ls, stride_lt,
                    HEADS_PER_KV: tl.constexpr, GROUP: tl.constexpr, BLOCK_Q: tl.constexpr,
                    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
                    PAGE: tl.constexpr, SPLITS: tl.constexpr, IEEE: tl.constexpr):
    b = tl.program_id(0)
    h = tl.program_id(1)
    q0 = (tl.program_id(2) // SPLITS) * BLOCK_Q
    split = tl.program_id(2) % SPLITS
    q_len = tl.load(query_len_ptr + b)
    if q0 < q_len:
        start = tl.load(query_start_ptr + b)
        ctx = tl.load(context_len_ptr + b)
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d < HEAD_DIM
        # This tile's own K/V rows, written to their slots by the first split (module docstring).
        qr = q0 + tl.arange(0, BLOCK_Q)
        qr_ok = qr < tl.where(split == 0, q_len, 0)
        w_mask = qr_ok[:, None] & d_ok[None, :]
        slots = tl.load(slot_ptr + start + qr, mask=qr_ok, other=0)
        k_rows = tl.load(k_ptr + (start + qr)[:, None] * stride_kt + h * stride_kh + offs_d[None, :], mask=w_mask)
        v_rows = tl.load(v_ptr + (start + qr)[:, None] * stride_vt + h * stride_vh + offs_d[None, :], mask=w_mask)
        tl.store(kc_ptr + slots[:, None] * stride_ct + h * stride_ch + offs_d[None, :], k_rows, mask=w_mask)
        tl.store(vc_ptr + slots[:, None] * stride_ct + h * stride_ch + offs_d[None, :], v_rows, mask=w_mask)

        # Folded rows: row m is query q0 + m // GROUP of head h * HEADS_PER_KV + m % GROUP.
        offs_m = tl.arange(0, BLOCK_Q * GROUP)
        qi = q0 + offs_m // GROUP
        gi = offs_m % GROUP
        row_ok = (qi < q_len) & (gi < HEADS_PER_KV)
        rows = start + qi
        heads = h * HEADS_PER_KV + gi
        q = tl.load(q_ptr + rows[:, None] * stride_qt + heads[:, None] * stride_qh + offs_d[None, :],
                    mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        m_i = tl.full((BLOCK_Q * GROUP,), float("-inf"), dtype=tl.float32)
        l_i = tl.full((BLOCK_Q * GROUP,), 0.0, dtype=tl.float32)
        acc = tl.full((BLOCK_Q * GROUP, BLOCK_D), 0.0, dtype=tl.float32)
        offs_n = tl.arange(0, BLOCK_N)

        # (1) this split's part of the committed context, through the block table.
        lo = split * split_len
        hi = tl.minimum(ctx, lo + split_len)
        for n0 in range(lo, hi, BLOCK_N):
            pos = n0 + offs_n
            n_ok = pos < hi
            blk = tl.load(tables_ptr + b * max_blocks + pos // PAGE, mask=n_ok, other=0)
            kv_off = (blk * PAGE + pos % PAGE)[:, None] * stride_ct + h * stride_ch + offs_d[None, :]
            kv_mask = n_ok[:, None] & d_ok[None, :]
            kt = tl.load(kc_ptr + kv_off, mask=kv_mask, other=0.0)
            vt = tl.load(vc_ptr + kv_off, mask=kv_mask, other=0.0)
            m_i, l_i, acc = _attend(q, kt, vt, n_ok[None, :], scale, m_i, l_i, acc, IEEE)

        # (2) the step's own tokens j with branch_start[i] <= j <= i (the first split only).
        branch = tl.load(branch_ptr + rows, mask=row_ok, other=0)
        q_end = tl.where(split == 0, tl.minimum(q_len, q0 + BLOCK_Q), 0)
        for j0 in range(0, q_end, BLOCK_N):
            j = j0 + offs_n
            j_ok = j < q_end
            new_off = (start + j)[:, None]
            kv_mask = j_ok[:, None] & d_ok[None, :]
            kt = tl.load(k_ptr + new_off * stride_kt + h * stride_kh + offs_d[None, :], mask=kv_mask, other=0.0)
            vt = tl.load(v_ptr + new_off * stride_vt + h * stride_vh + offs_d[None, :], mask=kv_mask, other=0.0)
            seen = (j[None, :] <= qi[:, None]) & (j[None, :] >= branch[:, None]) & j_ok[None, :] & row_ok[:, None]
            m_i, l_i, acc = _attend(q, kt, vt, seen, scale, m_i, l_i, acc, IEEE)

        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        o_mask = row_ok[:, None] & d_ok[None, :]
        if SPLITS == 1:
            tl.store(out_ptr + rows[:, None] * stride_ot + heads[:, None] * stride_oh + offs_d[None, :],
                     out.to(out_ptr.dtype.element_ty), mask=o_mask)
        else:  # this split's normalised output and log-sum-exp, merged by the caller
            tl.store(part_ptr + split * stride_ps + rows[:, None] * stride_ot + heads[:, None] * stride_oh
                     + offs_d[None, :], out, mask=o_mask)
            lse = tl.where(l_i > 0, m_i + tl.log(tl.where(l_i > 0, l_i, 1.0)), float("-inf"))
            tl.store(lse_ptr + split * stride_ls + rows * stride_lt + heads, lse, mask=row_ok)


@triton.jit
def merge_splits(part_ptr, lse_ptr, out_ptr, rows, stride_ps, stride_ls,
                 SPLITS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr):
    """The context splits' partial outputs into one (flash-decoding's reduction), one launch per layer:
    part [SPLITS, rows, HEAD_DIM] float32 (each split's normalised output), lse [SPLITS, rows] float32
    (its log-sum-exp; -inf for a split that saw no key) -> out [rows, HEAD_DIM] in out's dtype, with
    rows = T x Hq, all three contiguous in their last dimensions:
        out = sum_s w_s * part_s / sum_s w_s,  w_s = exp(lse_s - max_s lse_s)
    which is sum_s exp(lse_s - logsumexp_s lse_s) * part_s. A row no split saw keeps weight 0 and
    gets 0."""
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    r_ok = r < rows
    offs_d = tl.arange(0, BLOCK_D)
    mask = r_ok[:, None] & (offs_d < HEAD_DIM)[None, :]
    m = tl.full((BLOCK_R,), float("-inf"), dtype=tl.float32)
    for s in tl.static_range(SPLITS):
        m = tl.maximum(m, tl.load(lse_ptr + s * stride_ls + r, mask=r_ok, other=float("-inf")))
    m = tl.where(m == float("-inf"), 0.0, m)
    acc = tl.full((BLOCK_R, BLOCK_D), 0.0, dtype=tl.float32)
    total = tl.full((BLOCK_R,), 0.0, dtype=tl.float32)
    for s in tl.static_range(SPLITS):
        w = tl.exp(tl.load(lse_ptr + s * stride_ls + r, mask=r_ok, other=float("-inf")) - m)
        part = tl.load(part_ptr + s * stride_ps + r[:, None] * HEAD_DIM + offs_d[None, :], mask=mask, other=0.0)
        acc += w[:, None] * part
        total += w
    out = acc / tl.where(total > 0, total, 1.0)[:, None]
    tl.store(out_ptr + r[:, None] * HEAD_DIM + offs_d[None, :], out.to(out_ptr.dtype.element_ty), mask=mask)
