"""Training-time attacks: APGD (Croce & Hein 2020) and PGD, in the Linf and L2 norms.

These are the training hot path, so they compute input gradients only
(`torch.autograd.grad(loss, x_adv)`: no parameter `.grad` is filled, no parameter flag is
touched), work on the whole batch at once, and keep per-step tensor work small. Models take
images in [0, 1] and return logits; every result lies in the eps-ball around `x` and in [0, 1].
The caller runs them with the model in eval mode (`eval_mode`), as the study generated its
training examples. Mixed precision comes from the caller's `torch.autocast` context (`train.autocast`);
losses are always computed in float32.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from benchmark.errors import RFTBenchError, unknown_choice

NORMS = ("Linf", "L2")
OBJECTIVES = ("ce", "kl")

# (model, x, y, eps, clean_logits) -> x_adv
Attack = Callable[[nn.Module, Tensor, Tensor, float, Tensor | None], Tensor]
# (logits, y) -> per-example loss to maximise
Objective = Callable[[Tensor, Tensor], Tensor]


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put `model` in eval mode; afterwards restore every submodule's own training flag
    (a partly frozen model may keep some submodules in eval mode while training)."""
    flags = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, training in flags:
            module.training = training


def objective_fn(objective: str, clean_logits: Tensor | None = None) -> Objective:
    """The per-example loss an attack maximises.

    ce: cross-entropy with the true label.
    kl: TRADES' inner maximisation, as its reference code computes it,
        `KLDivLoss(log_softmax(adv), softmax(clean))` = sum_c p_clean (log p_clean - log p_adv),
        against the fixed (detached) `clean_logits`. Its gradient vanishes at x itself, so the
        attacks start it where TRADES' code does (see `_start`).
    """
    if objective == "ce":
        return lambda logits, y: F.cross_entropy(logits.float(), y, reduction="none")
    if objective == "kl":
        if clean_logits is None:
            raise ValueError("the kl objective needs the clean logits")
        clean_log_probs = F.log_softmax(clean_logits.detach().float(), dim=1)
        return lambda logits, y: F.kl_div(F.log_softmax(logits.float(), dim=1), clean_log_probs,
                                          reduction="none", log_target=True).sum(1)
    raise unknown_choice("attack objective", objective, OBJECTIVES)


def apgd(model: nn.Module, x: Tensor, y: Tensor, *, eps: float, norm: str, steps: int,
         objective: str = "ce", clean_logits: Tensor | None = None) -> Tensor:
    """APGD (Croce & Hein 2020, Algorithm 1) from `x` itself (no random start; the kl objective
    starts as in TRADES, see `_start`): the point of highest loss seen, per example.

    Step-size and checkpoint logic follow pyautoattack's `APGDAttack.attack_single_run`: first
    step size 2*eps, momentum 0.75 from the second step on, the first checkpoint after
    max(int(0.22*steps), 1) steps and then every k steps, k shrinking by max(int(0.03*steps), 1)
    down to max(int(0.06*steps), 1). At a checkpoint an example's step size is halved, and it
    restarts from its best point, when at most rho=0.75 of the steps since the last checkpoint
    increased its loss, or when its step size was not halved at the previous checkpoint and its
    best loss has not improved since. (The reference compares the first step against a zero
    placeholder; here it is compared against the loss at `x`, as in the paper.)

    The loss is evaluated steps + 1 times, but the last iterate's gradient would never be used:
    that pass runs forward only. Image-sized arithmetic is pyautoattack's, operation for
    operation, done in place in buffers of this call (the result is bit-identical).
    """
    x = x.detach()
    shape = (-1,) + (1,) * (x.dim() - 1)  # broadcasts a per-example value over an image
    loss_of = objective_fn(objective, clean_logits)
    project = _projector(x, eps, norm)
    checkpoint_length = max(int(0.22 * steps), 1)
    min_length, decrement = max(int(0.06 * steps), 1), max(int(0.03 * steps), 1)

    x_adv = _start(x, project, eps, norm, objective, random_start=False)
    loss, grad = _loss_and_grad(model, x_adv, y, loss_of)
    losses = loss.new_empty(steps + 1, x.shape[0])  # losses[i] = loss after i steps
    losses[0] = loss
    x_best, loss_best, grad_best = x_adv.clone(), loss, grad.clone()
    step_size = torch.full((x.shape[0],), 2.0 * eps, device=x.device)
    x_prev = x_adv
    best_at_checkpoint, halved_at_checkpoint = loss_best, torch.ones_like(loss_best, dtype=torch.bool)
    since_checkpoint = 0
    for i in range(steps):
        last, momentum = i == steps - 1, 0.75 if i > 0 else 1.0
        z = project(_ascent_direction(grad, norm).mul_(step_size.view(shape)).add_(x_adv))
        # x_adv + momentum * (z - x_adv) + (1 - momentum) * (x_adv - x_prev), in z's buffer. On
        # the first step x_prev is x_adv: the last term is 0 and adding it would change nothing.
        z.sub_(x_adv).mul_(momentum).add_(x_adv)
        if i > 0:
            z.add_(torch.sub(x_adv, x_prev).mul_(1 - momentum))
        x_prev, x_adv = x_adv, project(z)
        loss, grad = _loss_and_grad(model, x_adv, y, loss_of, with_grad=not last)
        losses[i + 1] = loss
        improved = loss > loss_best
        torch.where(improved.view(shape), x_adv, x_best, out=x_best)
        loss_best = torch.where(improved, loss, loss_best)
        if last:  # the checkpoint below only steers later steps
            break
        torch.where(improved.view(shape), grad, grad_best, out=grad_best)

        since_checkpoint += 1
        if since_checkpoint == checkpoint_length:
            window = losses[i + 1 - checkpoint_length:i + 2]
            increases = (window[1:] > window[:-1]).sum(0)
            halve = (increases <= 0.75 * checkpoint_length) | (~halved_at_checkpoint & (best_at_checkpoint >= loss_best))
            step_size = torch.where(halve, step_size / 2, step_size)
            torch.where(halve.view(shape), x_best, x_adv, out=x_adv)
            grad = torch.where(halve.view(shape), grad_best, grad)  # autograd's tensor: not ours to overwrite
            best_at_checkpoint, halved_at_checkpoint = loss_best, halve
            checkpoint_length = max(checkpoint_length - decrement, min_length)
            since_checkpoint = 0
    return x_best


def pgd(model: nn.Module, x: Tensor, y: Tensor, *, eps: float, norm: str, steps: int, step_size: float,
        random_start: bool, objective: str = "ce", clean_logits: Tensor | None = None) -> Tensor:
    """PGD (Madry et al. 2018): `steps` steepest-ascent steps of fixed size, each projected back
    onto the eps-ball and [0, 1]; returns the last iterate. See `_start` for the start."""
    x = x.detach()
    loss_of = objective_fn(objective, clean_logits)
    project = _projector(x, eps, norm)
    x_adv = _start(x, project, eps, norm, objective, random_start)
    for _ in range(steps):
        _, grad = _loss_and_grad(model, x_adv, y, loss_of)
        x_adv = project(_ascent_direction(grad, norm).mul_(step_size).add_(x_adv))
    return x_adv


def make_attack(attack_cfg: dict[str, Any]) -> Attack:
    """The attack of a loss config's `attack:` node, as `attack(model, x, y, eps, clean_logits)`.

    eps is an argument because the schedule may change it per epoch (the node's own `eps` is the
    schedule's target). Options that the chosen attack would ignore are errors, not silent.
    """
    name, norm, objective = attack_cfg["name"], attack_cfg["norm"], attack_cfg["objective"]
    if norm not in NORMS:
        raise unknown_choice("attack norm", norm, NORMS)
    if objective not in OBJECTIVES:
        raise unknown_choice("attack objective", objective, OBJECTIVES)
    common = {"norm": norm, "steps": attack_cfg["steps"], "objective": objective}
    if name == "apgd":
        if attack_cfg.get("step_size") is not None or attack_cfg.get("random_start"):
            raise RFTBenchError(
                f"attack apgd adapts its own step size and starts at x: set attack.step_size to null "
                f"and attack.random_start to false (got {attack_cfg.get('step_size')!r}, "
                f"{attack_cfg.get('random_start')!r}), or use attack.name=pgd")
        chosen = partial(apgd, **common)
    elif name == "pgd":
        if attack_cfg.get("step_size") is None:
            raise RFTBenchError("attack pgd needs attack.step_size (e.g. eps/4 for 10 steps)")
        chosen = partial(pgd, **common, step_size=attack_cfg["step_size"],
                         random_start=bool(attack_cfg.get("random_start")))
    else:
        raise unknown_choice("attack", name, ("apgd", "pgd"))

    def attack(model: nn.Module, x: Tensor, y: Tensor, eps: float, clean_logits: Tensor | None = None) -> Tensor:
        return chosen(model, x, y, eps=eps, clean_logits=clean_logits)

    return attack


def _loss_and_grad(model: nn.Module, x_adv: Tensor, y: Tensor, loss_of: Objective,
                   with_grad: bool = True) -> tuple[Tensor, Tensor | None]:
    """Per-example loss at `x_adv` and, if `with_grad`, its gradient with respect to `x_adv`
    only. Without it the forward pass still runs under autograd and its graph is dropped: some
    kernels take another algorithm when autograd is off (CoAtNet's fused attention on the CPU
    does), and the loss must equal the one the gradient pass computes, bit for bit."""
    x_adv = x_adv.detach().requires_grad_(True)
    with torch.enable_grad():
        loss = loss_of(model(x_adv), y)
        grad = torch.autograd.grad(loss.sum(), x_adv)[0] if with_grad else None
    return loss.detach(), grad


def _norm(v: Tensor, norm: str) -> Tensor:
    """Per-example norm, shaped to broadcast over `v`."""
    flat = v.flatten(1)
    value = flat.abs().amax(1) if norm == "Linf" else (flat ** 2).sum(1).sqrt()
    return value.view((-1,) + (1,) * (v.dim() - 1))


def _ascent_direction(grad: Tensor, norm: str) -> Tensor:
    """The steepest-ascent step of unit size, in a new tensor: sign for Linf, the normalised
    gradient for L2."""
    return grad.sign() if norm == "Linf" else grad / (_norm(grad, "L2") + 1e-12)


def _projector(x: Tensor, eps: float, norm: str) -> Callable[[Tensor], Tensor]:
    """Projection onto the eps-ball around x, then into [0, 1], overwriting its argument.

    Linf: the two clamps are one clamp to the intersection of the box and the ball, whose
    bounds are computed once (a clamp only selects values, so this is exact for x in [0, 1]).
    L2: the perturbation is rescaled with pyautoattack's exact arithmetic; clipping to [0, 1]
    afterwards only moves coordinates towards x, so the result stays in the ball."""
    if norm == "Linf":
        low, high = (x - eps).clamp_(min=0.0), (x + eps).clamp_(max=1.0)
        return lambda v: v.clamp_(low, high)

    def project_l2(v: Tensor) -> Tensor:
        delta = v.sub_(x)
        length = _norm(delta, "L2")
        return delta.div_(length + 1e-12).mul_(length.clamp(max=eps)).add_(x).clamp_(0.0, 1.0)

    return project_l2


def _start(x: Tensor, project: Callable[[Tensor], Tensor], eps: float, norm: str, objective: str,
           random_start: bool) -> Tensor:
    """The first iterate. A random start is uniform in the Linf ball, or a uniformly random
    direction at radius eps for L2. Otherwise x itself, except for the kl objective, whose
    gradient is zero at x: it starts at x + 0.001 * N(0, 1), as TRADES' reference code does."""
    if random_start:
        if norm == "Linf":
            offset = torch.empty_like(x).uniform_(-eps, eps)
        else:
            direction = torch.randn_like(x)
            offset = eps * direction / (_norm(direction, "L2") + 1e-12)
    elif objective == "kl":
        offset = 0.001 * torch.randn_like(x)
    else:
        return x.clone()
    return project(offset.add_(x))
