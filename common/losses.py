"""The batched log-prob core: log-probs of response tokens without materializing (B, T, V) logits.

    token_logprobs(hidden (N, d), weight (V, d), targets (N,)) -> (N,)   log softmax(hidden @ weight.T)[targets]
    sequence_logprobs(model, input_ids, attention_mask, response_mask) -> per-token (B, T) float32, sums (B,)

The (N, V) logits are computed tile by tile (linear -> logsumexp -> gather) and recomputed in backward, so one tile is
alive at a time; float32 (float64 for float64 inputs) statistics whatever the compute dtype. Why and how:
docs/internals.md, "Log-probs without (B, T, V) logits"; tested against the naive computation (tests/test_losses.py).
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
    """z = h @ w.T into a contiguous (n, c) view of `buf`."""
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
    def forward(ctx, hidden, weight, targets, chunk_rows, chunk_cols):
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
        ctx.tile, ctx.compute = (R, C), compute
        return z_target - lse

    @staticmethod
    @torch.autograd.function.once_differentiable  # no double backward through the in-place tile loop
    def backward(ctx, g):
        hidden, weight, targets, lse = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        N, V = hidden.shape[0], weight.shape[0]
        compute, acc, (R, C) = ctx.compute, lse.dtype, ctx.tile
        grad_h = hidden.new_empty(hidden.shape) if need_h else None  # (N, d)
        grad_w = None  # (V, d), float32 accumulator; written by the first row chunk, then accumulated
        if need_w:
            grad_w = weight.new_empty(weight.shape, dtype=acc) if N else weight.new_zeros(weight.shape, dtype=acc)
        if need_h or need_w:
            with torch.autocast(hidden.device.type, enabled=False):
                w = weight.to(compute)  # (V, d)
                buf = hidden.new_empty(R, C, dtype=acc)
                buf_c = hidden.new_empty(R, C, dtype=compute) if compute != acc else None
                g = g.to(acc)  # (N,)
                for r0 in range(0, N, R):
                    r1 = min(r0 + R, N)
                    h = hidden[r0:r1].to(compute)  # (n, d)
                    t = targets[r0:r1]
                    if need_w:
                        gh = (hidden[r0:r1].to(acc) * -g[r0:r1, None]).to(compute)  # (n, d) -g * h
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
                        if need_w:  # dW = (onehot - softmax).T @ (g * h) = q.T @ (-g * h)
                            _addmm(grad_w[v0:v1], q.t(), gh, first=r0 == 0)  # (c, d) (+)= (c, n) @ (n, d)
                    if need_h:  # dh = g * (onehot - softmax) @ W
                        grad_h[r0:r1] = gz_h.mul_(-g[r0:r1, None])
        if need_w:
            grad_w = grad_w.to(weight.dtype)
        return grad_h, grad_w, None, None, None


def token_logprobs(hidden, weight, targets, *, chunk_rows=None, chunk_cols=None):
    """Log-probs (N,) of `targets` (N,) long under softmax(hidden (N, d) @ weight (V, d).T), float32 (float64 for
    float64 inputs), differentiable w.r.t. hidden and weight, in tiles of chunk_rows x chunk_cols (default: all rows and
    the widest vocabulary block that fits the byte budget)."""
    if (hidden.dim() != 2 or weight.dim() != 2 or targets.dim() != 1
            or hidden.shape[1] != weight.shape[1] or targets.shape[0] != hidden.shape[0]
            or targets.dtype != torch.long or weight.shape[0] == 0
            or not hidden.is_floating_point() or not weight.is_floating_point()):
        raise ValueError(
            "token_logprobs: expected hidden (N, d) float, weight (V, d) float with V > 0, targets (N,) "
            f"long; got hidden {tuple(hidden.shape)} {hidden.dtype}, weight {tuple(weight.shape)} "
            f"{weight.dtype}, targets {tuple(targets.shape)} {targets.dtype}")
    if (chunk_rows is not None and chunk_rows < 1) or (chunk_cols is not None and chunk_cols < 1):
        raise ValueError(f"token_logprobs: chunk_rows and chunk_cols must be >= 1, got {chunk_rows}, {chunk_cols}")
    return _TokenLogprobs.apply(hidden, weight, targets, chunk_rows, chunk_cols)


def sequence_logprobs(model, input_ids, attention_mask, response_mask, lora=None):
    """Per-token (B, T) float32 and summed (B,) log-probs of the response tokens of a padded batch: input_ids (B, T)
    = left-padded prompt + response + right padding, attention_mask (B, T) or None, response_mask (B, T) 1 on response
    tokens (EOS included; column 0 must be 0: the token at t is scored by the hidden state at t − 1). model has
    hidden_states(input_ids, attention_mask, lora=…) -> (B, T, d) and lm_head_weight (V, d); lora: its adapters, if any.
    Exactly 0 off response_mask."""
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
    hidden = model.hidden_states(input_ids, attention_mask=attention_mask, lora=lora)  # (B, T, d)
    h = hidden[:, :-1][mask[:, 1:]]  # (N, d) states that predict response tokens
    targets = input_ids[:, 1:][mask[:, 1:]]  # (N,)
    logps = token_logprobs(h, model.lm_head_weight, targets)  # (N,)
    # row-major order of mask[:, 1:] equals that of mask (column 0 is all False)
    token_logps = logps.new_zeros(B, T, dtype=torch.float32).masked_scatter(mask, logps.float())  # (B, T)
    return token_logps, token_logps.sum(dim=1)
