"""Per-token log-probabilities of ``hidden @ weight.T`` on devices without Triton.

TRL's ``ChunkedLogProbFunction`` falls back to about fifteen whole-tile torch passes per vocabulary
tile on such devices (its metrics each take their own passes), and on a 2-core CPU that was a third
of a DPO step. This computes the same fields from one projection per tile of tokens, shifted once:
``log_probs`` and ``log_z`` from a max, an exp and a sum, and each optional field (``entropy``,
``log_sum_sq_probs``, ``mean_logits``, ``is_top1``) from one more pass. When a gradient will be
needed and ``exp(logits)`` of all the tokens fits ``KEEP_BYTES``, the forward keeps it and the
backward turns it into the logits gradient in place (one pass, no second projection); otherwise the
backward recomputes each tile.
The projection is split over vocabulary slices (``models.lm_head.project``).

Same outputs, gradients and argument order as TRL's function (tested against it).
"""

from __future__ import annotations

import torch

from ..models.lm_head import project

OPTIONAL_OUTPUTS = ("entropy", "log_sum_sq_probs", "mean_logits", "is_top1")
TOKEN_TILE = 256  # tokens per tile: a 256 x 49152 fp32 tile is 50 MB
KEEP_BYTES = 512 * 2**20  # the forward keeps exp(logits) for the backward up to this size, else recomputes


class TokenLogProbs(torch.autograd.Function):
    """``forward(hidden [N, H], weight [V, H], targets [N], outputs)`` ->
    (log_probs, entropy, log_sum_sq_probs, mean_logits, is_top1), each [N] or None when not asked."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, outputs=("log_probs",)):
        ctx.set_materialize_grads(False)
        n, vocab = hidden.shape[0], weight.shape[0]
        h, w = hidden.float(), weight.float()
        want = {k: k in outputs for k in OPTIONAL_OUTPUTS}
        log_probs = torch.empty(n, dtype=torch.float32, device=hidden.device)
        log_z = torch.empty_like(log_probs)
        extra = {k: torch.empty(n, dtype=torch.bool if k == "is_top1" else torch.float32, device=hidden.device)
                 for k, on in want.items() if on}
        grad = any(ctx.needs_input_grad[:2])  # (grad mode itself is off inside forward)
        kept = (torch.empty((n, vocab), dtype=torch.float32, device=hidden.device)
                if grad and n * vocab * 4 <= KEEP_BYTES else None)
        separate_exp = want["entropy"] or want["log_sum_sq_probs"]  # these read z and exp(z) together

        def scratch():
            return torch.empty((min(n, TOKEN_TILE), vocab), dtype=torch.float32, device=hidden.device)

        # logits go to kept directly unless exp(z) must sit beside them; exp(z) goes to kept when kept
        logit_buf = scratch() if kept is None or separate_exp else None
        exp_buf = scratch() if separate_exp and kept is None else None
        totals = torch.empty_like(log_probs)
        for a in range(0, n, TOKEN_TILE):
            b = min(a + TOKEN_TILE, n)
            z = project(h[a:b], w, kept[a:b] if logit_buf is None else logit_buf[:b - a])
            t = targets[a:b, None]
            top = z.amax(-1)
            z.sub_(top[:, None])  # z <= 0 from here on: exp cannot overflow
            if want["is_top1"]:
                extra["is_top1"][a:b] = z.argmax(-1) == targets[a:b]  # the first maximum, as in TRL
            if want["mean_logits"]:
                extra["mean_logits"][a:b] = z.sum(-1) / vocab + top
            target_z = z.gather(1, t).squeeze(1)
            if separate_exp:
                e = torch.exp(z, out=kept[a:b] if kept is not None else exp_buf[:b - a])
            else:
                e = z.exp_()  # in kept[a:b] when kept
            total = totals[a:b] = e.sum(-1)
            log_total = total.log()
            log_probs[a:b] = target_z - log_total
            log_z[a:b] = top + log_total
            if want["entropy"]:  # H = log Z - sum p z; with z shifted by its max, log Z becomes log(total)
                extra["entropy"][a:b] = log_total - torch.linalg.vecdot(e, z) / total
            if want["log_sum_sq_probs"]:
                extra["log_sum_sq_probs"][a:b] = torch.linalg.vecdot(e, e).log() - 2 * log_total
        entropy = extra.get("entropy")
        ctx.save_for_backward(hidden, weight, targets, log_z, log_z if entropy is None else entropy)
        ctx.has_entropy = entropy is not None
        ctx.kept, ctx.totals = kept, totals  # exp(z - max) of every token, when it fits KEEP_BYTES
        ctx.mark_non_differentiable(*(extra[k] for k in ("log_sum_sq_probs", "mean_logits", "is_top1") if k in extra))
        return (log_probs, entropy, extra.get("log_sum_sq_probs"), extra.get("mean_logits"), extra.get("is_top1"))

    @staticmethod
    def backward(ctx, grad_log_probs, grad_entropy, *_):
        hidden, weight, targets, log_z, entropy = ctx.saved_tensors
        if not ctx.has_entropy:
            grad_entropy = None
        need_h, need_w = ctx.needs_input_grad[:2]
        if (grad_log_probs is None and grad_entropy is None) or not (need_h or need_w):
            return None, None, None, None
        n, vocab = hidden.shape[0], weight.shape[0]
        h, w = hidden.float(), weight.float()
        kept, ctx.kept = ctx.kept, None  # used up in place below: a second backward recomputes
        if grad_entropy is not None:
            kept = None
        grad_h = torch.zeros(h.shape, dtype=torch.float32, device=h.device) if need_h else None
        grad_w = torch.zeros(w.shape, dtype=torch.float32, device=w.device) if need_w else None
        tile = torch.empty((min(n, TOKEN_TILE), vocab), dtype=torch.float32, device=h.device) if kept is None else None
        p_buf = torch.empty_like(tile) if grad_entropy is not None else None
        for a in range(0, n, TOKEN_TILE):
            b = min(a + TOKEN_TILE, n)
            g = grad_log_probs[a:b].float()[:, None] if grad_log_probs is not None else None
            if kept is not None:  # d log p_t / dz_j = 1[j = t] - p_j, with p = exp(z - max) / total
                grad_z = kept[a:b].mul_(-g / ctx.totals[a:b, None])
            elif grad_entropy is None:
                grad_z = project(h[a:b], w, tile[:b - a]).sub_(log_z[a:b, None]).exp_().mul_(-g)
            else:  # and d H / dz_j = -p_j (log p_j + H)
                z = project(h[a:b], w, tile[:b - a]).sub_(log_z[a:b, None])  # log p
                p = torch.exp(z, out=p_buf[:b - a])
                grad_z = z.add_(entropy[a:b, None]).mul_(-grad_entropy[a:b].float()[:, None])
                if g is not None:
                    grad_z.sub_(g)
                grad_z.mul_(p)
            if g is not None:
                grad_z.scatter_add_(1, targets[a:b, None], g)
            if grad_h is not None:
                grad_h[a:b] = grad_z @ w
            if grad_w is not None:
                grad_w.addmm_(grad_z.t(), h[a:b])
        return (None if grad_h is None else grad_h.to(hidden.dtype),
                None if grad_w is None else grad_w.to(weight.dtype), None, None)


def token_log_probs(hidden, weight, targets, outputs=("log_probs",)):
    """The five per-token fields of ``TokenLogProbs`` (None where not in ``outputs``). Always in fp32,
    also under autocast: a softmax over the vocabulary from bf16 logits would lose the log-probs'
    small differences that DPO's loss is made of."""
    with torch.autocast(hidden.device.type, enabled=False):
        return TokenLogProbs.apply(hidden, weight, targets, tuple(outputs))
