"""Independent reference implementations the tests compare the code against (not used by the code)."""

import math

import torch


def naive_dct_matrix(n: int) -> torch.Tensor:
    """Orthonormal DCT-II from its definition, one entry at a time."""
    d = torch.empty(n, n, dtype=torch.float64)
    for k in range(n):
        scale = math.sqrt(1.0 / n) if k == 0 else math.sqrt(2.0 / n)
        for i in range(n):
            d[k, i] = scale * math.cos(math.pi * (2 * i + 1) * k / (2 * n))
    return d


# ---------------------------------------------------------------- ANP, one official iteration


def bn_batch_stats(h: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """BatchNorm in training mode from its definition: per channel, the batch's mean and biased variance."""
    mean = h.mean(dim=(0, 2, 3), keepdim=True)
    var = ((h - mean) ** 2).mean(dim=(0, 2, 3), keepdim=True)
    return (h - mean) / torch.sqrt(var + eps) * gamma.view(1, -1, 1, 1) + beta.view(1, -1, 1, 1)


def tiny_bn_net(w: dict, x: torch.Tensor, scale: dict, shift: dict) -> torch.Tensor:
    """The forward of tests' ``TinyBN`` (conv-BN-ReLU twice, mean pool, linear) written out, with
    each BN's weight multiplied by ``scale[bn]`` and its bias by ``shift[bn]`` (per channel)."""
    h = x
    for conv, bn, stride in (("conv1", "bn1", 1), ("conv2", "bn2", 2)):
        h = torch.nn.functional.conv2d(h, w[conv + ".weight"], stride=stride, padding=1)
        h = torch.relu(bn_batch_stats(h, w[bn + ".weight"] * scale[bn], w[bn + ".bias"] * shift[bn]))
    return h.mean(dim=(2, 3)) @ w["linear.weight"].T + w["linear.bias"]


def anp_official_iteration(w: dict, x: torch.Tensor, y: torch.Tensor, masks: dict, noise0: dict, buf: dict | None, *,
                           eps: float, steps: int, alpha: float, lr: float, momentum: float) -> tuple[dict, dict, dict]:
    """One iteration of ANP's mask optimisation as the official code runs it (csdongxian/ANP_backdoor,
    ``optimize_mask_cifar.py``: ``mask_train``; ``models/anp_batchnorm.py``), restated from its algorithm:

    - the perturbations of every BN, delta (weight) and xi (bias), start at ``noise0[bn] = (delta, xi)``
      (the official code draws them uniformly from [-eps, eps]); BN uses batch statistics (train mode);
    - ``steps`` times: g = d CE(perturbed) / d (delta, xi), where the perturbed BN has weight
      gamma * (m + delta) and bias beta * (1 + xi); then (delta, xi) += eps / steps * sign(g), no projection;
    - the mask loss alpha * CE(clean: weight gamma * m, bias beta) + (1 - alpha) * CE(perturbed);
      heavy-ball SGD on the masks (buf = g on the first step, else momentum * buf + g; m -= lr * buf);
      then every mask is clipped to [0, 1].

    Returns (noise after the ascent, masks after the step, momentum buffers).
    """
    w = {k: v.detach() for k, v in w.items()}
    m = {k: v.detach().clone().requires_grad_(True) for k, v in masks.items()}
    d = {k: [t.detach().clone() for t in pair] for k, pair in noise0.items()}
    for _ in range(steps):
        leaves = [t.requires_grad_(True) for pair in d.values() for t in pair]
        out = tiny_bn_net(w, x, {k: m[k].detach() + d[k][0] for k in m}, {k: 1 + d[k][1] for k in m})
        grads = torch.autograd.grad(torch.nn.functional.cross_entropy(out, y), leaves)
        d = {k: [t.detach() for t in pair] for k, pair in d.items()}
        for t, g in zip([t for pair in d.values() for t in pair], grads):
            t += eps / steps * torch.sign(g)
    rob = torch.nn.functional.cross_entropy(tiny_bn_net(w, x, {k: m[k] + d[k][0] for k in m}, {k: 1 + d[k][1] for k in m}), y)
    nat = torch.nn.functional.cross_entropy(tiny_bn_net(w, x, dict(m), {k: 1.0 for k in m}), y)
    grads = torch.autograd.grad(alpha * nat + (1 - alpha) * rob, list(m.values()))
    new_buf, new_m = {}, {}
    for (k, mk), g in zip(m.items(), grads):
        new_buf[k] = g.clone() if buf is None else momentum * buf[k] + g
        new_m[k] = (mk.detach() - lr * new_buf[k]).clamp(0.0, 1.0)
    return d, new_m, new_buf
