"""Pure-PyTorch kernel with the MFA bridge's contract, for any device.

It computes blockwise over query rows (never the whole Sq x Sk matrix at once) and
accumulates in fp32 for half types, as a flash kernel does. Registered for "cpu" it runs
the whole accelerated path on Linux. Each block holds whole rows, so the backward
recomputes the softmax exactly from the scores; the natural-log row statistic it returns
as ``lse`` would lose the row sum under masks near ``finfo.min``.
"""

import math

import torch

from .. import dropout as _dropout
from .base import Kernel

_INF = math.inf


class ReferenceKernel(Kernel):
    name = "reference"
    layout = "BHSD"
    dtypes = frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64})
    max_head_dim = 1 << 16
    supports_value_dim_differs = True
    supports_gqa = True
    causal_forward = "any"
    causal_backward = "any"
    mask_forward = True
    mask_backward = True
    mask_per_head = True
    reads_bool_masks = True
    supports_dropout = True
    supports_mask_grad = True
    # Against PyTorch's SDPA in the same dtype: (atol, rtol) for outputs and gradients.
    tolerances = {
        torch.float64: (1e-10, 1e-8),
        torch.float32: (2e-5, 1e-4),
        torch.float16: (4e-3, 4e-3),
        torch.bfloat16: (3e-2, 2e-2),
    }

    def __init__(self, block_size: int = 256):
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.block_size = block_size

    def __repr__(self):
        return f"ReferenceKernel(block_size={self.block_size})"

    def machine(self, device):
        # pure PyTorch: the device is all (stated here so that subclasses that also derive
        # from another kernel, such as tests' MFA look-alikes, keep it)
        return Kernel.machine(self, device)

    @staticmethod
    def _compute_dtype(dtype):
        return dtype if dtype in (torch.float32, torch.float64) else torch.float32

    def _grouped(self, q, k, v, mask):
        """Views that map query head h to key head h // G without copying K or V."""
        batch, q_heads, q_len, head_dim = q.shape
        kv_heads = k.shape[1]
        groups = q_heads // kv_heads
        cdt = self._compute_dtype(q.dtype)
        qg = q.reshape(batch, kv_heads, groups, q_len, head_dim).to(cdt)
        kg = k.unsqueeze(2).to(cdt)
        vg = v.unsqueeze(2).to(cdt)
        if mask is not None:
            if mask.shape[1] == 1:
                mask = mask.unsqueeze(2)
            else:
                mask = mask.unflatten(1, (kv_heads, groups))
        return qg, kg, vg, mask

    def _scores(self, q_block, k, scale, mask, causal, start, stop):
        scores = torch.matmul(q_block, k.transpose(-1, -2)).mul_(scale)
        if mask is not None and mask.dtype == torch.bool:
            scores.masked_fill_(~mask[..., start:stop, :], -_INF)
        elif mask is not None:
            scores.add_(mask[..., start:stop, :])
        if causal:  # PyTorch's is_causal: top-left aligned, row i sees keys 0..i
            rows = torch.arange(start, stop, device=scores.device).unsqueeze(-1)
            cols = torch.arange(k.shape[-2], device=scores.device)
            scores.masked_fill_(cols > rows, -_INF)
        return scores

    def _probs(self, q_block, k, scale, mask, causal, start, stop):
        """Softmax rows of a query block, and their log-sum-exp. Rows with every key masked
        out attend to nothing and give 0, as PyTorch's _safe_softmax does."""
        scores = self._scores(q_block, k, scale, mask, causal, start, stop)
        row_max = scores.amax(dim=-1, keepdim=True)
        row_max.masked_fill_(row_max == -_INF, 0.0)
        probs = torch.exp(scores.sub_(row_max))
        row_sum = probs.sum(dim=-1, keepdim=True)
        lse = (row_max + torch.log(row_sum)).squeeze(-1)
        return probs.div_(row_sum.clamp_min_(torch.finfo(probs.dtype).tiny)), lse

    @staticmethod
    def _dropped(probs, dropout, start, stop):
        """``probs`` (grouped [B, Hk, G, rows, S]) with dropout applied in place: the keep
        decisions of query rows start..stop, kept values scaled by 1/(1-p)."""
        if dropout is None:
            return probs
        p, seed = dropout
        batch, kv_heads, groups, _, columns = probs.shape
        keep = _dropout.keep_mask(seed, p, batch, kv_heads * groups, range(start, stop), columns, probs.device)
        return probs.mul_(keep.view(probs.shape)).mul_(1.0 / (1.0 - p))

    def forward(self, q, k, v, scale, causal, mask, dropout=None):
        batch, q_heads, q_len, _ = q.shape
        qg, kg, vg, mask = self._grouped(q, k, v, mask)
        out = torch.empty(*qg.shape[:-1], v.shape[-1], dtype=q.dtype, device=q.device)
        lse = torch.empty(qg.shape[:-1], dtype=qg.dtype if qg.dtype == torch.float64 else torch.float32, device=q.device)
        for start in range(0, q_len, self.block_size):
            stop = min(start + self.block_size, q_len)
            probs, lse[..., start:stop] = self._probs(qg[..., start:stop, :], kg, scale, mask, causal, start, stop)
            out[..., start:stop, :] = torch.matmul(self._dropped(probs, dropout, start, stop), vg)
        return out.view(batch, q_heads, q_len, -1), lse.view(batch, q_heads, q_len)

    def backward(self, grad_out, q, k, v, out, lse, scale, causal, mask, dropout=None, mask_grad=False):
        batch, q_heads, q_len, head_dim = q.shape
        kv_heads = k.shape[1]
        dmask = _MaskGradient(mask) if mask_grad else None
        qg, kg, vg, mask = self._grouped(q, k, v, mask)
        cdt = qg.dtype
        dog = grad_out.reshape(*qg.shape[:-1], -1).to(cdt)
        # D_i = sum_j P_ij dP_ij = rowsum(dO * O)
        delta = (dog * out.reshape(dog.shape).to(cdt)).sum(-1)
        dq = torch.empty_like(qg)
        dk = torch.zeros(kg.shape[0], kv_heads, kg.shape[-2], head_dim, dtype=cdt, device=q.device)
        dv = torch.zeros(kg.shape[0], kv_heads, vg.shape[-2], vg.shape[-1], dtype=cdt, device=q.device)
        for start in range(0, q_len, self.block_size):
            stop = min(start + self.block_size, q_len)
            q_block = qg[..., start:stop, :]
            do_block = dog[..., start:stop, :]
            probs, _ = self._probs(q_block, kg, scale, mask, causal, start, stop)
            dprobs = torch.matmul(do_block, vg.transpose(-1, -2))
            if dropout is None:
                dv += torch.matmul(probs.transpose(-1, -2), do_block).sum(2)
            else:  # the forward's keep decisions, regenerated: Z = keep / (1 - p)
                dropped = self._dropped(probs.clone(), dropout, start, stop)
                dv += torch.matmul(dropped.transpose(-1, -2), do_block).sum(2)
                dprobs = self._dropped(dprobs, dropout, start, stop)  # dP = (dO V^T) * Z
            # D = rowsum(dO * O) = rowsum(P * dP), with or without dropout
            dscores = probs.mul_(dprobs.sub_(delta[..., start:stop].unsqueeze(-1)))
            if dmask is not None:  # the scores' gradient is the additive mask's
                dmask.add(dscores, start, stop)
            dq[..., start:stop, :] = torch.matmul(dscores, kg).mul_(scale)
            dk += torch.matmul(dscores.transpose(-1, -2), q_block).sum(2).mul_(scale)
        grads = dq.view(batch, q_heads, q_len, head_dim).to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
        return grads if dmask is None else (*grads, dmask.result())


class _MaskGradient:
    """The additive mask's gradient, accumulated block by block at the mask's own size: the
    scores' gradient summed over every dim the mask broadcasts (stride 0)."""

    def __init__(self, mask):
        self.dtype = mask.dtype
        self.broadcast = [stride == 0 or size == 1 for size, stride in zip(mask.shape, mask.stride())]
        shape = [1 if b else size for size, b in zip(mask.shape, self.broadcast)]
        accumulate = torch.float64 if mask.dtype == torch.float64 else torch.float32
        self.grad = torch.zeros(shape, dtype=accumulate, device=mask.device)

    def add(self, dscores, start, stop):
        """``dscores``: grouped [B, Hk, G, rows, S] for query rows start..stop."""
        block = dscores.flatten(1, 2)  # [B, Hq, rows, S]: query head h = kv head * G + group
        dims = [d for d, b in enumerate(self.broadcast) if b]
        block = block.sum(dims, keepdim=True) if dims else block
        if self.broadcast[2]:
            self.grad += block
        else:
            self.grad[:, :, start:stop] += block

    def result(self):
        return self.grad.to(self.dtype)
