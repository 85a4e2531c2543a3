"""
Shared, tested loss code: the batched log-prob core (contract 5 of DESIGN.md).

What it computes. For N token positions with final hidden states `hidden` (N, d), the LM-head
weight (V, d) and the tokens that follow them `targets` (N,):

    token_logprobs[i] = log softmax(hidden[i] @ weight.T / temperature)[targets[i]]
                      = z[i, targets[i]] - logsumexp_v z[i, v],    z = hidden @ weight.T / temperature

Why. Every DPO-style trainer needs the log-probs of response tokens under the policy and the
reference. The naive `log_softmax(model(x).logits).gather(...)` materializes (B, T, V) logits, and
with a 150k vocabulary (Qwen2.5) those logits plus their log_softmax and its gradient (all the same
size) are the memory peak of training: 1024 tokens x 151936 x 4 bytes = 622 MB per copy, and
autograd keeps several copies. Here only response positions reach the LM head, and the (N, V)
logits are computed tile by tile (linear -> logsumexp -> gather), so one tile is alive at a time.

Tiles. A tile is (rows, cols) = a chunk of rows x a block of the vocabulary, with at most
CHUNK_BYTES of logits (CPU_CHUNK_BYTES on CPU, where a tile that stays in cache makes the
elementwise passes cheap; on a GPU larger tiles mean fewer, larger kernels). By default a tile spans
all N rows and as many vocab columns as fit; rows are chunked only when the block would be narrower
than MIN_CHUNK_COLS. Each tile's logsumexp over its columns, (rows,), is kept and combined over the
blocks at the end (exact: the logsumexp of the blocks' logsumexps). Blocking the vocabulary rather
than the rows keeps every matmul large in its row dimension (a BLAS call with ~100 rows re-reads and
re-packs the whole (V, d) weight; measured ~1.3x slower on CPU for a 150k vocabulary), and
grad_weight is written block by block instead of re-read and re-written once per row chunk.

Cost. Forward saves only its inputs and the per-row logsumexp (N,). Backward recomputes each tile's
logits (one extra matmul of the size of the forward one: 4 matmuls instead of 3 for forward +
backward) and turns them into the softmax in place, with z = hidden @ weight.T / temperature:
    dL/dz = g * (onehot(targets) - softmax(z))    # (rows, cols) per tile, never all of (N, V)
    grad_hidden += dL/dz @ weight / temperature    # (rows, d)
    grad_weight += dL/dz.T @ hidden / temperature  # (cols, d)
The one-hot is never built: 1 is subtracted at the target column by a scatter. Extra memory is
O(CHUNK_BYTES + N * d) instead of O(N * V); the elementwise passes over (N, V) that the naive path
makes pay for part of the recomputation. Measured by bench/bench_logprobs.py on 2 shared CPU cores
(N = 1024, d = 896, V = 151936, fp32): extra peak memory 0.02-0.06x the naive path's; time
1.29-1.37x for forward + backward and 0.90-1.05x for a no_grad forward (medians over runs, noisy).

Precision. The logsumexp and the softmax are done in float32 (float64 for float64 inputs) even
when the inputs are bf16/fp16. The matmuls run in the "compute dtype": the autocast dtype when
autocast is enabled for the inputs' device (e.g. inside torch.autocast("cuda", torch.bfloat16)),
otherwise the promoted dtype of hidden and weight. Returned log-probs are float32 (float64 for
float64 inputs); returned gradients have the dtypes of hidden and weight. For a low-precision
compute dtype the gradients are accumulated over tiles in float32, and a compute-dtype copy of the
weight is made per call (as autocast itself does for a matmul).

No host synchronization happens inside the tile loop (sequence_logprobs syncs once, to select
the response positions with a boolean mask).

Public functions:
    token_logprobs(hidden, weight, targets, temperature=1.0, *, chunk_rows=None, chunk_cols=None) -> (N,)
    sequence_logprobs(model, input_ids, attention_mask, response_mask, temperature=1.0)
        -> token_logps (B, T) float32, summed (B,)
"""

import torch

CHUNK_BYTES = 64 * 2**20  # byte budget of one logits tile (float32 + compute-dtype copy) on GPUs: big kernels
CPU_CHUNK_BYTES = 16 * 2**20  # on CPU: a tile that mostly stays in the last-level cache between matmul and exp
MIN_CHUNK_COLS = 2048  # vocabulary block width below which rows are split instead


def _tile(N, V, bytes_per_logit, budget, chunk_rows=None, chunk_cols=None):
    """(rows, cols) of one logits tile: all rows and the widest vocab block the budget allows."""
    N = max(N, 1)
    cols = chunk_cols or min(V, max(MIN_CHUNK_COLS, budget // (N * bytes_per_logit)))
    rows = chunk_rows or min(N, max(1, budget // (cols * bytes_per_logit)))
    return min(rows, N), min(cols, V)


def _dtypes(hidden, weight):
    """(compute dtype of the matmuls, accumulation dtype of logsumexp/softmax)."""
    device = hidden.device.type
    if torch.is_autocast_enabled(device):
        compute = torch.get_autocast_dtype(device)
    else:
        compute = torch.promote_types(hidden.dtype, weight.dtype)
    return compute, torch.promote_types(compute, torch.float32)


def _logits(h, w, buf, buf_c):
    """z = h @ w.T (h already scaled by 1/temperature) into a contiguous (n, c) view of `buf`."""
    n, c = h.shape[0], w.shape[0]
    out = buf.view(-1)[: n * c].view(n, c)  # (n, c), contiguous even for the last, narrower block
    if buf_c is None:
        return torch.mm(h, w.t(), out=out)
    return out.copy_(torch.mm(h, w.t(), out=buf_c.view(-1)[: n * c].view(n, c)))  # low-precision matmul


def _addmm(acc, a, b, first):
    """acc = a @ b if first else acc + a @ b; acc stays float32 even when a, b are bf16/fp16."""
    if acc.dtype == a.dtype:
        return torch.mm(a, b, out=acc) if first else acc.addmm_(a, b)
    return acc.copy_(torch.mm(a, b)) if first else acc.add_(torch.mm(a, b))


def _block_index(t, v0, v1):
    """Column of each target inside the vocab block [v0, v1) (clamped) and whether it is in it; (n, 1) each."""
    i = t[:, None] - v0
    return i.clamp(0, v1 - v0 - 1), (i >= 0) & (i < v1 - v0)


class _TokenLogprobs(torch.autograd.Function):
    """Tiles: row chunks [r0, r1) x vocab blocks [v0, v1); one (rows, cols) logits tile alive at a time."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature, chunk_rows, chunk_cols):
        N, V = hidden.shape[0], weight.shape[0]
        compute, acc = _dtypes(hidden, weight)
        bpl = acc.itemsize + (compute.itemsize if compute != acc else 0)  # bytes per logit in the buffers
        budget = CPU_CHUNK_BYTES if hidden.device.type == "cpu" else CHUNK_BYTES
        R, C = _tile(N, V, bpl, budget, chunk_rows, chunk_cols)
        with torch.autocast(hidden.device.type, enabled=False):  # dtypes are handled explicitly
            w = weight.to(compute)  # (V, d), a no-op unless autocast / mixed dtypes
            buf = hidden.new_empty(R, C, dtype=acc)  # the logits tile, reused
            buf_c = hidden.new_empty(R, C, dtype=compute) if compute != acc else None
            lse = hidden.new_empty(N, dtype=acc)  # (N,)
            z_target = hidden.new_zeros(N, dtype=acc)  # (N,)
            for r0 in range(0, N, R):
                r1 = min(r0 + R, N)
                h = hidden[r0:r1].to(compute)  # (n, d)
                if temperature != 1.0:
                    h = h / temperature  # scaling (n, d) is cheaper than scaling (n, V)
                t = targets[r0:r1]  # (n,)
                lse_blocks = []  # per vocab block logsumexp, each (n,)
                for v0 in range(0, V, C):
                    v1 = min(v0 + C, V)
                    z = _logits(h, w[v0:v1], buf, buf_c)  # (n, c)
                    i, in_block = _block_index(t, v0, v1)  # (n, 1) each
                    z_target[r0:r1] += torch.where(in_block, z.gather(1, i), 0).squeeze(1)
                    m, j = z.max(dim=1, keepdim=True)  # (n, 1) row max and its column
                    # one fused kernel, in place (each element is read before it is written; the tests check
                    # it on CPU): z - m - log(sum(exp(z - m)))
                    torch.log_softmax(z, dim=1, out=z)
                    lse_blocks.append((m - z.gather(1, j)).squeeze(1))  # logsumexp of the block, (n,)
                lse[r0:r1] = torch.logsumexp(torch.stack(lse_blocks, dim=1), dim=1)  # (n, blocks) -> (n,)
        ctx.save_for_backward(hidden, weight, targets, lse)
        ctx.temperature, ctx.tile, ctx.compute = temperature, (R, C), compute
        return z_target - lse

    @staticmethod
    @torch.autograd.function.once_differentiable  # no double backward through the in-place tile loop
    def backward(ctx, g):
        hidden, weight, targets, lse = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        N, V = hidden.shape[0], weight.shape[0]
        compute, acc, (R, C), T = ctx.compute, lse.dtype, ctx.tile, ctx.temperature
        grad_h = hidden.new_empty(hidden.shape) if need_h else None  # (N, d)
        grad_w = None  # (V, d), float32 accumulator; written by the first row chunk, then accumulated
        if need_w:
            grad_w = weight.new_empty(weight.shape, dtype=acc) if N else weight.new_zeros(weight.shape, dtype=acc)
        if need_h or need_w:
            with torch.autocast(hidden.device.type, enabled=False):
                w = weight.to(compute)  # (V, d)
                buf = hidden.new_empty(R, C, dtype=acc)
                buf_c = hidden.new_empty(R, C, dtype=compute) if compute != acc else None
                g = g.to(acc) / T  # (N,) the 1/T of dz/dh and dz/dW folded into the upstream gradient
                for r0 in range(0, N, R):
                    r1 = min(r0 + R, N)
                    h = hidden[r0:r1].to(compute)  # (n, d)
                    if T != 1.0:
                        h = h / T
                    t = targets[r0:r1]
                    if need_w:
                        gh = (hidden[r0:r1].to(acc) * -g[r0:r1, None]).to(compute)  # (n, d) -g/T * h
                    gz_h = hidden.new_empty(r1 - r0, hidden.shape[1], dtype=acc) if need_h else None  # (n, d)
                    for v0 in range(0, V, C):
                        v1 = min(v0 + C, V)
                        z = _logits(h, w[v0:v1], buf, buf_c)  # (n, c)
                        q = z.sub_(lse[r0:r1, None]).exp_()  # (n, c) softmax, in place
                        i, in_block = _block_index(t, v0, v1)
                        q.scatter_add_(1, i, -in_block.to(acc))  # q = softmax - onehot = -dlogp/dz
                        if buf_c is not None:
                            q = buf_c.view(-1)[: q.numel()].view(q.shape).copy_(q)  # low precision for matmuls
                        if need_h:
                            _addmm(gz_h, q, w[v0:v1], first=v0 == 0)  # (n, d) (+)= (n, c) @ (c, d)
                        if need_w:  # dW = (onehot - softmax).T @ (g/T * h) = q.T @ (-g/T * h)
                            _addmm(grad_w[v0:v1], q.t(), gh, first=r0 == 0)  # (c, d) (+)= (c, n) @ (n, d)
                    if need_h:  # dh = g/T * (onehot - softmax) @ W
                        grad_h[r0:r1] = gz_h.mul_(-g[r0:r1, None])
        if need_w:
            grad_w = grad_w.to(weight.dtype)
        return grad_h, grad_w, None, None, None, None


def token_logprobs(hidden, weight, targets, temperature=1.0, *, chunk_rows=None, chunk_cols=None):
    """
    Log-probs of `targets` under softmax(hidden @ weight.T / temperature), computed in tiles.

    hidden: (N, d) float, weight: (V, d) float (the LM head; the embedding for tied heads),
    targets: (N,) long in [0, V). Returns (N,) float32 (float64 for float64 inputs),
    differentiable w.r.t. hidden and weight. The (N, V) logits are computed in tiles of
    chunk_rows x chunk_cols; by default all rows and the widest vocabulary block whose logits fit in
    CHUNK_BYTES (CPU_CHUNK_BYTES on CPU); rows are split only when that block would be narrower
    than MIN_CHUNK_COLS.
    """
    if (hidden.dim() != 2 or weight.dim() != 2 or targets.dim() != 1
            or hidden.shape[1] != weight.shape[1] or targets.shape[0] != hidden.shape[0]
            or targets.dtype != torch.long or weight.shape[0] == 0
            or not hidden.is_floating_point() or not weight.is_floating_point()):
        raise ValueError(
            "token_logprobs: expected hidden (N, d) float, weight (V, d) float with V > 0, targets (N,) "
            f"long; got hidden {tuple(hidden.shape)} {hidden.dtype}, weight {tuple(weight.shape)} "
            f"{weight.dtype}, targets {tuple(targets.shape)} {targets.dtype}")
    if not temperature > 0:
        raise ValueError(f"token_logprobs: temperature must be > 0, got {temperature}")
    if (chunk_rows is not None and chunk_rows < 1) or (chunk_cols is not None and chunk_cols < 1):
        raise ValueError(f"token_logprobs: chunk_rows and chunk_cols must be >= 1, got {chunk_rows}, {chunk_cols}")
    return _TokenLogprobs.apply(hidden, weight, targets, float(temperature), chunk_rows, chunk_cols)


def sequence_logprobs(model, input_ids, attention_mask, response_mask, temperature=1.0):
    """
    Per-token and summed log-probs of the response tokens of a padded batch.

    input_ids (B, T): prompt + response (prompts may be left-padded, responses right-padded);
    attention_mask (B, T) or None, passed to the model; response_mask (B, T): 1 on the response
    tokens of input_ids (EOS included), 0 elsewhere. The token at position t is scored by the hidden
    state at t - 1, so response_mask[:, 0] must be 0.
    model: has `hidden_states(input_ids, attention_mask=None) -> (B, T, d)` (final normalized hidden
    states) and `lm_head_weight` (V, d).
    Returns token_logps (B, T) float32, exactly 0 where response_mask is 0, and summed (B,).
    """
    B, T = input_ids.shape
    if (response_mask.shape != (B, T) or (attention_mask is not None and attention_mask.shape != (B, T))
            or T < 1):
        raise ValueError(
            f"sequence_logprobs: expected input_ids, attention_mask, response_mask all (B, T) with T >= 1; got "
            f"{tuple(input_ids.shape)}, {None if attention_mask is None else tuple(attention_mask.shape)}, "
            f"{tuple(response_mask.shape)}")
    mask = response_mask.bool()  # (B, T)
    if mask[:, 0].any():  # one host sync; the boolean indexing below syncs anyway
        raise ValueError("sequence_logprobs: response_mask[:, 0] must be 0 (position 0 has no preceding "
                         "hidden state to score it)")
    hidden = model.hidden_states(input_ids, attention_mask=attention_mask)  # (B, T, d)
    h = hidden[:, :-1][mask[:, 1:]]  # (N, d) states that predict response tokens
    targets = input_ids[:, 1:][mask[:, 1:]]  # (N,)
    logps = token_logprobs(h, model.lm_head_weight, targets, temperature)  # (N,)
    # row-major order of mask[:, 1:] equals that of mask (column 0 is all False)
    token_logps = logps.new_zeros(B, T, dtype=torch.float32).masked_scatter(mask, logps.float())  # (B, T)
    return token_logps, token_logps.sum(dim=1)
