"""One generic fit loop: progress bar, seeded and step-addressable batches, checkpoint + resume,
mixed precision on GPU, DDP under torchrun.

Methods plug in two callables instead of subclassing a trainer:

* ``make_batch(step, rank) -> batch``: builds the batch for a global step deterministically (its
  randomness is seeded from ``(seed, step, rank)``), so resuming needs no data-loader state and
  a resumed run reproduces an uninterrupted one exactly.
* ``loss_fn(model, batch) -> scalar tensor``: the method's loss (which lives beside the method).
* optionally ``param_groups(model) -> [{"params": [...], "lr": float, "grad_clip": float}, ...]``:
  per-group learning rates (scaled by the schedule) and per-group gradient clipping.

With ``FitConfig.accumulate = n`` one optimiser step sums the gradients of ``n`` micro-batches
``make_batch(step * n + i, rank)``, i = 0..n-1 (still step-addressable, so resume stays exact).

Only parameters with ``requires_grad`` are optimised and checkpointed here: frozen backbones stay
out of optimiser state and out of ``train_state.pt``.
"""
from __future__ import annotations

import contextlib
import math
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .distributed import DistContext, all_reduce_mean, barrier

TRAIN_STATE_FILE = "train_state.pt"
#: The logged loss curve (``step,loss`` CSV, mean over ``log_every`` steps), rewritten at every save.
LOSS_CURVE_FILE = "loss_curve.csv"


@dataclass
class FitConfig:
    """Optimisation settings (units: steps, not epochs: few-shot sets are tiny).

    Attributes:
        steps: optimiser steps in total.
        lr, weight_decay: AdamW settings.
        warmup_steps: linear warm-up, then cosine decay to ``min_lr_ratio * lr`` (0 disables decay).
        grad_clip: max global grad norm (0 disables).
        seed: base seed; batch ``s`` on rank ``r`` is seeded from ``(seed, s, r)``.
        amp: mixed precision on CUDA (bf16 when supported, else fp16 with a grad scaler); ignored on CPU.
        checkpoint_every: steps between ``train_state.pt`` writes (always written at the end).
        accumulate: micro-batches per optimiser step (gradient accumulation; effective batch =
            micro-batch x accumulate x world size).
        max_seconds: wall-clock budget of this call (0 = none). When the next step would end past
            it, the loop stops cleanly after the current step and writes ``train_state.pt``; the
            run is usable as it is and ``resume=True`` continues to ``steps``.
        eta_after: steps timed before the estimate of the whole run is printed.
    """

    steps: int = 300
    lr: float = 1e-3
    weight_decay: float = 1e-4
    warmup_steps: int = 0
    min_lr_ratio: float = 1.0
    grad_clip: float = 0.0
    seed: int = 0
    amp: bool = True
    checkpoint_every: int = 100
    log_every: int = 10
    accumulate: int = 1
    max_seconds: float = 0.0
    eta_after: int = 3

    def __post_init__(self) -> None:
        if self.max_seconds < 0:
            raise ValueError(f"max_seconds must be >= 0 (0 = no budget), got {self.max_seconds}")
        if self.accumulate < 1:
            raise ValueError(f"accumulate must be >= 1 micro-batch per step, got {self.accumulate}")
        if self.steps <= 0:
            raise ValueError(f"steps must be positive, got {self.steps}")
        if self.lr <= 0:
            raise ValueError(f"lr must be positive, got {self.lr}")


@dataclass
class FitResult:
    """What a fit produced: the loss curve (mean over ranks, every ``log_every`` steps) and timing.

    ``stopped_early`` is True when ``max_seconds`` ended the run at ``end_step`` < ``target_steps``;
    ``eta_seconds`` is the whole run's estimate from the first ``eta_after`` steps (None if fewer ran).
    """

    losses: list[tuple[int, float]] = field(default_factory=list)
    start_step: int = 0
    end_step: int = 0
    target_steps: int = 0
    seconds: float = 0.0
    seconds_per_step: float | None = None
    eta_seconds: float | None = None
    stopped_early: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def write_loss_curve(path: Path, losses: list[tuple[int, float]]) -> None:
    """Write ``losses`` [(step, loss), ...] as a two-column CSV (header ``step,loss``)."""
    lines = ["step,loss"] + [f"{int(step)},{float(loss):.6g}" for step, loss in losses]
    path.write_text("\n".join(lines) + "\n")


def step_seed(seed: int, step: int, rank: int = 0) -> int:
    """A 63-bit seed for one (step, rank): stable across runs and platforms."""
    import numpy as np

    return int(np.random.SeedSequence([seed, step, rank]).generate_state(1, dtype=np.uint64)[0] >> 1)


def _lr_factor(step: int, cfg: FitConfig) -> float:
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.min_lr_ratio >= 1.0:
        return 1.0
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def _trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if not params:
        raise ValueError("the model has no trainable parameters (did you freeze everything?)")
    return params


def _build_groups(
    model: nn.Module,
    params: dict[str, nn.Parameter],
    cfg: FitConfig,
    param_groups: Callable[[nn.Module], list[dict[str, Any]]] | None,
) -> list[dict[str, Any]]:
    """Validated optimiser groups: every trainable parameter exactly once, lr > 0, grad_clip >= 0."""
    if param_groups is None:
        return [{"params": list(params.values()), "lr": cfg.lr, "grad_clip": 0.0}]
    groups = []
    seen: set[int] = set()
    for i, g in enumerate(param_groups(model)):
        ps = [p for p in g["params"] if p.requires_grad]
        lr = float(g.get("lr", cfg.lr))
        clip = float(g.get("grad_clip", 0.0) or 0.0)
        if lr <= 0 or clip < 0:
            raise ValueError(f"param group {i}: lr must be > 0 and grad_clip >= 0, got lr={lr}, grad_clip={clip}")
        for p in ps:
            if id(p) in seen:
                raise ValueError(f"param group {i} repeats a parameter already in an earlier group")
            seen.add(id(p))
        if ps:
            groups.append({"params": ps, "lr": lr, "grad_clip": clip})
    missing = [n for n, p in params.items() if id(p) not in seen]
    if missing:
        raise ValueError(f"param_groups left trainable parameters out of every group: {missing[:5]}")
    return groups


def _autocast(device: torch.device, enabled: bool):
    if not enabled or device.type != "cuda":
        return contextlib.nullcontext(), None
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None
    return torch.autocast("cuda", dtype=dtype), scaler


def fit(
    model: nn.Module,
    make_batch: Callable[[int, int], Any],
    loss_fn: Callable[[nn.Module, Any], torch.Tensor],
    cfg: FitConfig,
    run_dir: str | Path,
    *,
    device: torch.device,
    resume: bool = False,
    dist_ctx: DistContext | None = None,
    progress: bool = True,
    description: str = "train",
    param_groups: Callable[[nn.Module], list[dict[str, Any]]] | None = None,
    eta_hint: str = "",
) -> FitResult:
    """Optimise ``model``'s trainable parameters.

    Args:
        model: module already on ``device``; frozen parts must have ``requires_grad=False``.
        make_batch: ``(step, rank) -> batch`` (on ``device``), deterministic in its arguments.
        loss_fn: ``(model_or_ddp_wrapper, batch) -> loss`` scalar.
        cfg: optimisation settings.
        run_dir: where ``train_state.pt`` is written (rank 0 only).
        resume: continue from ``run_dir/train_state.pt`` (error if absent).
        dist_ctx: from :func:`edge_ad.training.distributed.init_distributed`; DDP when world_size > 1.
        param_groups: ``model -> list of {"params", "lr", optional "grad_clip"}``; every trainable
            parameter must be in exactly one group. None = one group at ``cfg.lr``.
        eta_hint: printed after the time estimate when training on a CPU and the estimate exceeds
            :data:`LONG_RUN_SECONDS` (e.g. the cheaper preset to use instead).

    Returns:
        :class:`FitResult` with the logged loss curve.
    """
    dist_ctx = dist_ctx or DistContext()
    run_dir = Path(run_dir)
    state_path = run_dir / TRAIN_STATE_FILE
    params = _trainable(model)
    groups = _build_groups(model, params, cfg, param_groups)
    optimizer = torch.optim.AdamW(
        [{"params": g["params"], "lr": g["lr"]} for g in groups], lr=cfg.lr, weight_decay=cfg.weight_decay
    )
    autocast, scaler = _autocast(device, cfg.amp)

    start_step = 0
    result = FitResult()
    if resume:
        if not state_path.is_file():
            raise FileNotFoundError(f"cannot resume: {state_path} does not exist (train without --resume first)")
        state = torch.load(state_path, map_location=device, weights_only=True)
        missing = set(params) - set(state["params"])
        if missing:
            raise ValueError(f"{state_path} does not match this model: missing {sorted(missing)[:5]}")
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(state["params"][name])
        optimizer.load_state_dict(state["optimizer"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        start_step = int(state["step"])
        result.losses = [tuple(x) for x in state.get("losses", [])]
        if start_step >= cfg.steps:
            result.start_step = result.end_step = start_step
            return result

    train_model: nn.Module = model
    if dist_ctx.enabled:
        train_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=False
        )

    def save(step: int) -> None:
        if not dist_ctx.is_main:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        tmp = state_path.with_suffix(".tmp")
        torch.save(
            {
                "step": step,
                "params": {n: p.detach().cpu() for n, p in params.items()},
                "optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict() if scaler is not None else None,
                "losses": result.losses,
                "config": asdict(cfg),
            },
            tmp,
        )
        tmp.replace(state_path)  # atomic: an interrupted write never corrupts the last good state
        write_loss_curve(run_dir / LOSS_CURVE_FILE, result.losses)

    bar = None
    if progress and dist_ctx.is_main:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.steps, initial=start_step, desc=description, unit="step", dynamic_ncols=True)
    model.train()
    t0 = time.perf_counter()
    running = 0.0
    result.target_steps = end_step = cfg.steps
    for step in range(start_step, cfg.steps):
        torch.manual_seed(step_seed(cfg.seed, step, dist_ctx.rank))  # dropout etc. reproducible on resume
        for group, spec in zip(optimizer.param_groups, groups):
            group["lr"] = spec["lr"] * _lr_factor(step, cfg)
        optimizer.zero_grad(set_to_none=True)
        loss_sum = torch.zeros((), device=device)
        for micro in range(cfg.accumulate):
            batch = make_batch(step * cfg.accumulate + micro, dist_ctx.rank)
            # DDP all-reduces on every backward; skipping it for all but the last micro-batch is an
            # optimisation only (gradients are identical), so keep it simple and correct.
            with autocast:
                loss = loss_fn(train_model, batch) / cfg.accumulate
            if not torch.isfinite(loss):
                raise FloatingPointError(f"loss became {loss.item()} at step {step}; lower the learning rate")
            if scaler is not None:
                scaler.scale(loss).backward()
            else:
                loss.backward()
            loss_sum += loss.detach().float()
        loss = loss_sum
        if scaler is not None:
            scaler.unscale_(optimizer)
        for spec in groups:
            if spec["grad_clip"] > 0:
                torch.nn.utils.clip_grad_norm_(spec["params"], spec["grad_clip"])
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(list(params.values()), cfg.grad_clip)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        running += float(all_reduce_mean(loss.detach().float(), dist_ctx))
        done = step + 1
        if done % cfg.log_every == 0 or done == cfg.steps:
            n = cfg.log_every if done % cfg.log_every == 0 else done % cfg.log_every
            result.losses.append((done, running / n))
            running = 0.0
            if bar is not None:
                bar.set_postfix(loss=f"{result.losses[-1][1]:.4g}")
        if bar is not None:
            bar.update(1)
        ran, elapsed = done - start_step, time.perf_counter() - t0
        if ran == cfg.eta_after and done < cfg.steps:
            result.seconds_per_step = elapsed / ran
            result.eta_seconds = result.seconds_per_step * (cfg.steps - start_step)
            if progress and dist_ctx.is_main:
                _announce_eta(result, cfg, device, eta_hint, bar)
        if cfg.max_seconds and done < cfg.steps and _out_of_budget(elapsed, ran, cfg.max_seconds, dist_ctx, device):
            if running and done % cfg.log_every:
                result.losses.append((done, running / (done % cfg.log_every)))
            end_step, result.stopped_early = done, True
            if progress and dist_ctx.is_main:
                _say(f"--max-minutes budget reached: stopped cleanly at step {done}/{cfg.steps}; the run is "
                     "usable now, and resume=True (--resume) continues it", bar)
            break
        if done % cfg.checkpoint_every == 0 and done != cfg.steps:
            save(done)
    save(end_step)
    barrier(dist_ctx)
    if bar is not None:
        bar.close()
    model.eval()
    result.start_step, result.end_step = start_step, end_step
    result.seconds = time.perf_counter() - t0
    if result.seconds_per_step is None and end_step > start_step:
        result.seconds_per_step = result.seconds / (end_step - start_step)
    return result


#: Estimated runs longer than this (seconds) on a CPU get the ``eta_hint`` printed.
LONG_RUN_SECONDS = 30 * 60.0


def format_duration(seconds: float) -> str:
    """``'7 h 05 min'``, ``'12 min'`` or ``'40 s'``."""
    seconds = max(0.0, float(seconds))
    if seconds >= 3600:
        return f"{int(seconds // 3600)} h {int(seconds % 3600 // 60):02d} min"
    if seconds >= 60:
        return f"{round(seconds / 60)} min"
    return f"{round(seconds)} s"


def _say(message: str, bar: Any) -> None:
    if bar is not None:
        bar.write(message, file=sys.stderr)
    else:
        print(message, file=sys.stderr, flush=True)


def _announce_eta(result: FitResult, cfg: FitConfig, device: torch.device, hint: str, bar: Any) -> None:
    """Print the whole run's estimate from the first steps (and the hint for long CPU runs)."""
    message = (f"estimated training time: {format_duration(result.eta_seconds or 0.0)} for "
               f"{cfg.steps - result.start_step} steps ({result.seconds_per_step:.2f} s/step over the first "
               f"{cfg.eta_after} steps on {device.type})")
    if cfg.max_seconds:
        message += f"; --max-minutes stops it after {format_duration(cfg.max_seconds)}"
    _say(message, bar)
    if device.type == "cpu" and hint and (result.eta_seconds or 0.0) > LONG_RUN_SECONDS:
        _say(hint, bar)


def _out_of_budget(elapsed: float, ran: int, budget: float, dist_ctx: DistContext, device: torch.device) -> bool:
    """True when one more step (at the mean pace so far) would end past ``budget``; under DDP the
    ranks agree (any rank out of budget stops all, so none waits in a collective)."""
    late = elapsed + elapsed / max(1, ran) > budget
    if not dist_ctx.enabled:
        return late
    return float(all_reduce_mean(torch.tensor(float(late), device=device), dist_ctx)) > 0
