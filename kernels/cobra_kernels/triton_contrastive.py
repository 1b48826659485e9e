"""Fused Triton kernels for the in-batch cosine contrastive loss (flash-attention style).

Forward: one program per block of BLOCK_M query rows streams over the keys in blocks of
BLOCK_N, computes the logits tile ``u @ kh^T`` in registers, keeps an online max / sum
per row and picks up the positive's logit; it stores only the per-row log-sum-exp and
positive logit (B,). Backward recomputes the tiles twice, once per output, so that no
atomics are needed (deterministic): ``_contrastive_bwd_queries_kernel`` (one program per
row block) accumulates ``sum_j G_ij kh_j``, ``_contrastive_bwd_keys_kernel`` (one
program per key block) accumulates ``sum_i G_ij u_i``, with ``G = softmax - onehot``.
Memory: O((B + N) * d); nothing of size B x N exists.

L2 normalisation, the 1/temperature scale, the mean and the temperature gradient are
cheap O((B + N) * d) torch ops in ``_common.py`` around the kernels, inside the
``torch.autograd.Function`` below.

Precision: tiles accumulate in fp32. fp32 inputs use ``input_precision="ieee"`` (no
TF32) unless ``allow_tf32=True``. bf16/fp16 inputs are normalised in fp32, then the unit
vectors are cast back to the input dtype for ``tl.dot`` (tensor cores); the softmax
block is cast to that dtype before the gradient ``tl.dot`` (as flash-attention does).

On CPU the kernels run only under ``TRITON_INTERPRET=1``, which must be set before this
module is imported (``@triton.jit`` reads it when the kernels are defined); the
interpreter supports fp32 only.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import as_temperature, check_reduction, finish_backward, finish_loss, prepare_inputs, row_weights

# Whether the kernels below were defined under TRITON_INTERPRET=1 (they then run on CPU
# tensors through Triton's interpreter); the dispatcher refuses CPU tensors otherwise.
INTERPRETED: bool = bool(triton.knobs.runtime.interpret)

# A finite "minus infinity" for the running max: exp(-inf - (-1e30)) = 0, while
# exp(-1e30 - (-1e30)) = 1 keeps a row whose first tiles are all masked NaN-free.
_NEG_BIG = tl.constexpr(-1.0e30)


@triton.jit
def _contrastive_fwd_kernel(
    U,  # (B, D) scaled unit queries u = qh / tau
    K,  # (N, D) unit keys
    POS,  # (B,) int64 positive column per row
    QID,  # (B,) item id per row (read only if HAS_MASK)
    KID,  # (N,) item id per key (read only if HAS_MASK)
    LSE,  # (B,) fp32 out: log-sum-exp over unmasked columns
    POS_LOGIT,  # (B,) fp32 out: logit of the positive column
    B,
    N,
    D,
    stride_u,
    stride_k,
    HAS_MASK: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < B
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < D
    u = tl.load(U + rows[:, None] * stride_u + dims[None, :], mask=row_ok[:, None] & dim_ok[None, :], other=0.0)
    pos = tl.load(POS + rows, mask=row_ok, other=-1)
    if HAS_MASK:
        qid = tl.load(QID + rows, mask=row_ok, other=0)

    m_i = tl.full([BLOCK_M], _NEG_BIG, tl.float32)  # running max
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)  # running sum of exp(s - m_i)
    pos_logit = tl.zeros([BLOCK_M], dtype=tl.float32)
    for start_n in range(0, N, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        col_ok = cols < N
        k = tl.load(K + cols[:, None] * stride_k + dims[None, :], mask=col_ok[:, None] & dim_ok[None, :], other=0.0)
        s = tl.dot(u, tl.trans(k), input_precision=INPUT_PRECISION)  # (BLOCK_M, BLOCK_N) fp32
        is_pos = cols[None, :] == pos[:, None]
        pos_logit += tl.sum(tl.where(is_pos, s, 0.0), axis=1)
        valid = tl.broadcast_to(col_ok[None, :], (BLOCK_M, BLOCK_N))
        if HAS_MASK:
            kid = tl.load(KID + cols, mask=col_ok, other=0)
            # The same item elsewhere in the batch is not a negative; the positive stays.
            valid = valid & ((kid[None, :] != qid[:, None]) | is_pos)
        s = tl.where(valid, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        l_i = l_i * tl.exp(m_i - m_new) + tl.sum(tl.exp(s - m_new[:, None]), axis=1)
        m_i = m_new
    tl.store(LSE + rows, m_i + tl.log(l_i), mask=row_ok)
    tl.store(POS_LOGIT + rows, pos_logit, mask=row_ok)


@triton.jit
def _contrastive_bwd_queries_kernel(
    U,
    K,
    POS,
    QID,
    KID,
    LSE,  # (B,) fp32 from the forward
    W,  # (B,) fp32 row weights dL/dloss_i
    GRAD_U,  # (B, D) fp32 out: w_i sum_j (softmax_ij - [j == pos_i]) kh_j
    B,
    N,
    D,
    stride_u,
    stride_k,
    stride_gu,
    HAS_MASK: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < B
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < D
    u = tl.load(U + rows[:, None] * stride_u + dims[None, :], mask=row_ok[:, None] & dim_ok[None, :], other=0.0)
    pos = tl.load(POS + rows, mask=row_ok, other=-1)
    lse = tl.load(LSE + rows, mask=row_ok, other=0.0)
    if HAS_MASK:
        qid = tl.load(QID + rows, mask=row_ok, other=0)

    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start_n in range(0, N, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        col_ok = cols < N
        k = tl.load(K + cols[:, None] * stride_k + dims[None, :], mask=col_ok[:, None] & dim_ok[None, :], other=0.0)
        s = tl.dot(u, tl.trans(k), input_precision=INPUT_PRECISION)
        is_pos = cols[None, :] == pos[:, None]
        valid = tl.broadcast_to(col_ok[None, :] & row_ok[:, None], (BLOCK_M, BLOCK_N))
        if HAS_MASK:
            kid = tl.load(KID + cols, mask=col_ok, other=0)
            valid = valid & ((kid[None, :] != qid[:, None]) | is_pos)
        p = tl.where(valid, tl.exp(s - lse[:, None]), 0.0)
        g = tl.where(is_pos, p - 1.0, p)  # G = softmax - onehot(positive)
        acc += tl.dot(g.to(k.dtype), k, input_precision=INPUT_PRECISION)
    w = tl.load(W + rows, mask=row_ok, other=0.0)
    acc = acc * w[:, None]
    tl.store(GRAD_U + rows[:, None] * stride_gu + dims[None, :], acc, mask=row_ok[:, None] & dim_ok[None, :])


@triton.jit
def _contrastive_bwd_keys_kernel(
    U,
    K,
    POS,
    QID,
    KID,
    LSE,
    W,  # (B,) fp32 row weights dL/dloss_i
    GRAD_K,  # (N, D) fp32 out: sum_i w_i (softmax_ij - [j == pos_i]) u_i
    B,
    N,
    D,
    stride_u,
    stride_k,
    stride_gk,
    HAS_MASK: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < D
    k = tl.load(K + cols[:, None] * stride_k + dims[None, :], mask=col_ok[:, None] & dim_ok[None, :], other=0.0)
    if HAS_MASK:
        kid = tl.load(KID + cols, mask=col_ok, other=0)

    acc = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for start_m in range(0, B, BLOCK_M):
        rows = start_m + tl.arange(0, BLOCK_M)
        row_ok = rows < B
        u = tl.load(U + rows[:, None] * stride_u + dims[None, :], mask=row_ok[:, None] & dim_ok[None, :], other=0.0)
        pos = tl.load(POS + rows, mask=row_ok, other=-1)
        lse = tl.load(LSE + rows, mask=row_ok, other=0.0)
        w = tl.load(W + rows, mask=row_ok, other=0.0)
        s_t = tl.dot(k, tl.trans(u), input_precision=INPUT_PRECISION)  # (BLOCK_N, BLOCK_M) logits^T
        is_pos = cols[:, None] == pos[None, :]
        valid = tl.broadcast_to(col_ok[:, None] & row_ok[None, :], (BLOCK_N, BLOCK_M))
        if HAS_MASK:
            qid = tl.load(QID + rows, mask=row_ok, other=0)
            valid = valid & ((kid[:, None] != qid[None, :]) | is_pos)
        p = tl.where(valid, tl.exp(s_t - lse[None, :]), 0.0)
        g = tl.where(is_pos, p - 1.0, p) * w[None, :]
        acc += tl.dot(g.to(u.dtype), u, input_precision=INPUT_PRECISION)
    tl.store(GRAD_K + cols[:, None] * stride_gk + dims[None, :], acc, mask=col_ok[:, None] & dim_ok[None, :])


def _block_sizes(
    dim: int, dtype: torch.dtype, block_m: int | None, block_n: int | None
) -> tuple[int, int, int, dict]:
    """(BLOCK_M, BLOCK_N, BLOCK_D, launch options): the whole feature dim sits in one tile.

    Wide fp32 tiles get two pipeline stages so that the keys-gradient kernel stays under
    ~100 KiB of shared memory (sm_80 allows 164 KiB, sm_90 227 KiB); checked by the
    ahead-of-time compile test for sm_90.
    """
    block_d = max(16, triton.next_power_of_2(dim))
    row_bytes = block_d * (4 if dtype == torch.float32 else 2)
    default_n = 64 if block_d <= 128 else 32
    options = {"num_warps": 4 if block_d <= 64 else 8, "num_stages": 2 if row_bytes >= 1024 else 3}
    return block_m or 64, block_n or default_n, block_d, options


class TritonCosineContrastiveLoss(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        queries: torch.Tensor,  # (B, d)
        keys: torch.Tensor,  # (N, d)
        positives: torch.Tensor,  # (B,) long
        temperature: torch.Tensor,  # 0-d
        query_item_ids: torch.Tensor | None,
        key_item_ids: torch.Tensor | None,
        block_m: int | None,
        block_n: int | None,
        allow_tf32: bool,
        reduction: str,
    ) -> torch.Tensor:
        num_rows, dim = queries.shape
        num_cols = keys.shape[0]
        u, k_unit = _kernel_operands(queries, keys, temperature)
        lse = torch.empty(num_rows, dtype=torch.float32, device=u.device)
        pos_logit = torch.empty_like(lse)
        bm, bn, bd, launch = _block_sizes(dim, u.dtype, block_m, block_n)
        has_mask = query_item_ids is not None
        qid = query_item_ids.contiguous() if has_mask else positives
        kid = key_item_ids.contiguous() if has_mask else positives
        positives = positives.contiguous()
        _contrastive_fwd_kernel[(triton.cdiv(num_rows, bm),)](
            u, k_unit, positives, qid, kid, lse, pos_logit,
            num_rows, num_cols, dim, u.stride(0), k_unit.stride(0),
            HAS_MASK=has_mask, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd,
            INPUT_PRECISION=_precision(u.dtype, allow_tf32), **launch,
        )  # fmt: skip
        ctx.save_for_backward(queries, keys, positives, temperature, qid, kid, lse)
        ctx.config = (has_mask, block_m, block_n, allow_tf32, reduction)
        return finish_loss(lse - pos_logit, reduction)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        queries, keys, positives, temperature, qid, kid, lse = ctx.saved_tensors
        has_mask, block_m, block_n, allow_tf32, reduction = ctx.config
        need_q, need_k, _, need_t = ctx.needs_input_grad[:4]
        if not (need_q or need_k or need_t):
            return (None,) * 10
        num_rows, dim = queries.shape
        num_cols = keys.shape[0]
        q_unit, q_norm, k_unit32, k_norm, u32 = prepare_inputs(queries, keys, temperature)
        u, k_unit = _cast_operands(u32, k_unit32, queries.dtype)
        bm, bn, bd, launch = _block_sizes(dim, u.dtype, block_m, block_n)
        meta = dict(
            HAS_MASK=has_mask, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd,
            INPUT_PRECISION=_precision(u.dtype, allow_tf32), **launch,
        )  # fmt: skip
        weights = row_weights(grad_out, num_rows, reduction, torch.float32)  # (B,) dL/dloss_i
        grad_u = grad_k_unit = None
        if need_q or need_t:
            grad_u = torch.empty(num_rows, dim, dtype=torch.float32, device=u.device)
            _contrastive_bwd_queries_kernel[(triton.cdiv(num_rows, bm),)](
                u, k_unit, positives, qid, kid, lse, weights, grad_u,
                num_rows, num_cols, dim, u.stride(0), k_unit.stride(0), grad_u.stride(0), **meta,
            )  # fmt: skip
            grad_u = grad_u.to(u32.dtype)
        if need_k:
            grad_k_unit = torch.empty(num_cols, dim, dtype=torch.float32, device=u.device)
            _contrastive_bwd_keys_kernel[(triton.cdiv(num_cols, bn),)](
                u, k_unit, positives, qid, kid, lse, weights, grad_k_unit,
                num_rows, num_cols, dim, u.stride(0), k_unit.stride(0), grad_k_unit.stride(0), **meta,
            )  # fmt: skip
            grad_k_unit = grad_k_unit.to(u32.dtype)
        grad_q, grad_k, grad_t = finish_backward(grad_u, grad_k_unit, q_unit, q_norm, k_unit32, k_norm, temperature, need_t)
        return (
            grad_q.to(queries.dtype) if need_q else None,
            grad_k.to(keys.dtype) if need_k else None,
            None,
            grad_t.to(temperature.device, temperature.dtype) if need_t else None,
            None, None, None, None, None, None,
        )  # fmt: skip


def _precision(dtype: torch.dtype, allow_tf32: bool) -> str | None:
    """fp32: exact "ieee" unless TF32 is allowed; 16-bit inputs: Triton's default."""
    if dtype != torch.float32:
        return None
    return "tf32" if allow_tf32 else "ieee"


def _cast_operands(u: torch.Tensor, k_unit: torch.Tensor, input_dtype: torch.dtype):
    """Kernel operands: contiguous rows, in the input dtype when it is 16-bit."""
    dtype = input_dtype if input_dtype in (torch.bfloat16, torch.float16) else u.dtype
    return u.to(dtype).contiguous(), k_unit.to(dtype).contiguous()


def _kernel_operands(queries: torch.Tensor, keys: torch.Tensor, temperature: torch.Tensor):
    _, _, k_unit, _, u = prepare_inputs(queries, keys, temperature)
    return _cast_operands(u, k_unit, queries.dtype)


def cosine_contrastive_loss_triton(
    queries: torch.Tensor,
    keys: torch.Tensor,
    positives: torch.Tensor,
    temperature: torch.Tensor | float,
    query_item_ids: torch.Tensor | None = None,
    key_item_ids: torch.Tensor | None = None,
    block_m: int | None = None,
    block_n: int | None = None,
    allow_tf32: bool = False,
    reduction: str = "mean",
) -> torch.Tensor:
    """Same contract as ``cosine_contrastive_loss_reference``; block sizes default from d
    (tests pass 16 to cover many tiles on small shapes)."""
    check_reduction(reduction)
    if (query_item_ids is None) != (key_item_ids is None):
        query_item_ids = key_item_ids = None  # the reference masks only with both
    if queries.dtype == torch.float64:
        raise TypeError("the Triton path computes in fp32/bf16/fp16; use impl='tiled' for float64")
    return TritonCosineContrastiveLoss.apply(
        queries,
        keys,
        positives,
        as_temperature(temperature, queries),
        query_item_ids,
        key_item_ids,
        block_m,
        block_n,
        allow_tf32,
        reduction,
    )


def compile_ahead_of_time(
    dim: int = 256, dtype: str = "fp32", has_mask: bool = True, arch: int = 90
) -> dict[str, int]:
    """Compiles the three kernels to a cubin for ``sm_{arch}`` without a GPU (ptxas ships
    with triton) and returns their shared memory in bytes. Catches what the interpreter
    does not check (compile-time types, constexpr rules, shared-memory budget).
    Needs the module imported *without* TRITON_INTERPRET."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if INTERPRETED:
        raise RuntimeError("compile_ahead_of_time needs the kernels defined without TRITON_INTERPRET")
    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    bm, bn, bd, launch = _block_sizes(dim, torch_dtype, None, None)
    types = {"U": f"*{dtype}", "K": f"*{dtype}", "POS": "*i64", "QID": "*i64", "KID": "*i64"}
    types.update({name: "*fp32" for name in ("LSE", "POS_LOGIT", "W", "GRAD_U", "GRAD_K")})
    constants = dict(
        HAS_MASK=has_mask, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd,
        INPUT_PRECISION=_precision(torch_dtype, allow_tf32=False),
    )  # fmt: skip
    shared = {}
    for kernel in (_contrastive_fwd_kernel, _contrastive_bwd_queries_kernel, _contrastive_bwd_keys_kernel):
        signature = {
            name: "constexpr" if name in constants else types.get(name, "i32") for name in kernel.arg_names
        }
        compiled = triton.compile(
            ASTSource(kernel, signature, constants), target=GPUTarget("cuda", arch, 32), options=launch
        )
        shared[kernel.__name__] = compiled.metadata.shared
    return shared
