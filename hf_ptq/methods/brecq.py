"""BRECQ: block reconstruction with learned rounding (AdaRound), optional Fisher weighting,
learned activation step sizes, and QDrop's random drop as an option.

Per unit of the block map, in forward order (inputs from the model quantized so far — the
reference's ``asym=True`` — targets from the float model):

1. **Weights.** Per-channel MSE (L2.4) grid init, frozen. AdaRound rounding variables ``V`` of every
   layer in the unit learned jointly with Adam to minimise the unit-output reconstruction error
   ``mean Σ_c (|Δz|·g)^2`` plus ``λ Σ 1 − |2h(V) − 1|^β`` (β 20 → 2 linearly after a 20 % warm-up
   without the regulariser); then hard rounding. ``g`` = 1 (``recon_loss="mse"``, the default: what
   the reference script runs and its published numbers use), the paper's task-loss Fisher
   (``"fisher_diag"``) or the reference code's damped KL gradient (``"fisher_kl"``).
2. **Activations** (``act_bits`` set). Input quantizers of the unit's layers start from a per-tensor
   MSE (L2.4) range and their step sizes are learned LSQ-style with the weights fixed (the
   reference's second stage, Adam 4e-4 with cosine decay, L2.4 loss). With ``drop_prob < 1``
   (QDrop) step sizes and rounding are learned *jointly* in one pass instead, and every input
   element is quantized with probability ``drop_prob`` (float otherwise), both at the unit input
   (quantized- vs float-model input) and inside the unit.

``granularity="layer"`` runs the same loop with every layer its own unit (= AdaRound).
The reference runs its activation stage after *all* blocks' weights; hf_ptq's engine hands over
one unit at a time, so the activation stage runs per unit, right after that unit's weights (see
docs/methods/brecq.md).
"""

from __future__ import annotations

import dataclasses
import math
import tempfile
import time
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt
from torch import nn
from transformers.utils import logging

from ..quant.observers import ActivationObserver
from ..quant.scheme import LayerScheme, QuantizedWeight, rtn_quantize_weight
from .adaround import AdaRoundWeight, beta_schedule
from .base import PTQMethod, UnitResult, UnitWork, register_method
from .fisher import GradientCache, frozen_parameters, kl_gradients, model_logits, swapped_weights, task_loss_gradients
from .lsq import LearnedStepQuantizer
from .recon import MiniBatch, UnitData, input_hooks, recon_loss, unit_forward, weight_key

logger = logging.get_logger("hf_ptq")

__all__ = ["BRECQ", "BRECQKwargs"]

#: default activation step-size learning rates: BRECQ's second stage vs QDrop's joint pass.
ACT_LR_STAGE, ACT_LR_JOINT = 4e-4, 4e-5
#: values kept per layer input for the activation range init (a uniform subsample; the BRECQ
#: reference initialises on all values of 64 images, QDrop on 256 images).
ACT_INIT_SAMPLES = 1 << 18


class BRECQKwargs(BaseModel):
    """``method_kwargs`` of ``method="brecq"`` (defaults: the BRECQ reference, ``main_imagenet.py``)."""

    model_config = ConfigDict(extra="forbid")

    #: Adam iterations per unit for the rounding variables (reference: 20 000).
    iters: StrictInt = Field(20_000, ge=0)
    #: samples per iteration, drawn at random from the calibration cache (reference: 32).
    batch_size: StrictInt = Field(32, gt=0)
    #: Adam learning rate of the rounding variables V.
    lr: float = Field(1e-3, gt=0)
    #: λ, weight of the rounding regulariser (reference 0.01; 0.1 for MobileNetV2).
    round_weight: float = Field(0.01, ge=0)
    beta_start: float = Field(20.0, gt=0)
    beta_end: float = Field(2.0, gt=0)
    #: fraction of ``iters`` without the rounding regulariser.
    warmup: float = Field(0.2, ge=0, lt=1)
    #: exponent of the weight-stage reconstruction loss.
    p: float = Field(2.0, gt=0)
    recon_loss: Literal["mse", "fisher_diag", "fisher_kl"] = "mse"
    #: "block" = BRECQ, "layer" = AdaRound (every Linear/Conv2d reconstructed alone).
    granularity: Literal["block", "layer"] = "block"
    #: probability that an activation element takes its quantized value during reconstruction;
    #: 1.0 = BRECQ (two stages), < 1 = QDrop (joint weights + step sizes, reference 0.5).
    drop_prob: float = Field(1.0, gt=0, le=1)
    #: iterations of the activation step-size stage per unit (BRECQ only; reference 5 000).
    act_iters: StrictInt = Field(5_000, ge=0)
    #: step-size learning rate; None = 4e-4 (BRECQ stage) or 4e-5 (QDrop joint).
    act_lr: float | None = Field(None, gt=0)
    #: exponent of the activation-stage reconstruction loss (reference 2.4).
    act_p: float = Field(2.4, gt=0)
    #: first and last quantized layer at 8-bit weights and 8-bit inputs (references' head/stem).
    keep_first_last_8bit: StrictBool = True


@register_method("brecq")
class BRECQ(PTQMethod):
    Kwargs = BRECQKwargs
    default_weight_observer = "mse"
    default_fold_batchnorm = True
    input_mode = "quantized"
    needs_targets = True
    unit_granularity = "block"

    def __init__(self, config) -> None:
        super().__init__(config)
        k: BRECQKwargs = self.kwargs
        # per instance: the engine reads these from the method object
        self.unit_granularity = k.granularity
        self.input_mode = "mixed" if k.drop_prob < 1.0 else "quantized"
        self._first_layer: str | None = None
        self._kl_state: tuple[nn.Module, list[torch.Tensor], list[torch.Tensor]] | None = None
        self._spill: tempfile.TemporaryDirectory | None = None  # fisher_diag's gradient files
        self._gen_seed = config.seed
        self._unit_index = 0

    # -- formats ---------------------------------------------------------------------------------
    def layer_schemes(self, layers: dict[str, nn.Module]) -> dict[str, LayerScheme]:
        """8-bit weights (and inputs) for the first and last quantized layer unless disabled."""
        schemes = super().layer_schemes(layers)
        if not self.kwargs.keep_first_last_8bit or not layers:
            return schemes
        names = list(layers)
        self._first_layer = names[0]
        for name in {names[0], names[-1]}:
            s = schemes[name]
            schemes[name] = dataclasses.replace(s, bits=8, act_bits=8 if s.act_bits is not None else None)
        return schemes

    # -- once, on the float model ------------------------------------------------------------------
    def prepare(self, model: nn.Module, units: list, batches: list[torch.Tensor], device: torch.device) -> dict:
        kind = self.kwargs.recon_loss
        if kind == "fisher_diag":
            start = time.perf_counter()
            # every unit's gradients at once would grow with depth in RAM: one file per unit instead
            self._spill = tempfile.TemporaryDirectory(prefix="hf_ptq-fisher-")
            caches = task_loss_gradients(model, {u.name: u.module for u in units}, batches, device, self._spill.name)
            total = sum(c.nbytes() for c in caches.values())
            logger.info(
                f"brecq: task-loss Fisher weights for {len(caches)} units in {time.perf_counter() - start:.1f}s, "
                f"{total / 2**20:.1f} MiB (float16) in {self._spill.name}"
            )
            return {name: {"fisher": cache} for name, cache in caches.items()}
        if kind == "fisher_kl":
            with torch.no_grad():
                fp_logits = [model_logits(model, pv.to(device).float()).float().cpu() for pv in batches]
            self._kl_state = (model, batches, fp_logits)
        return {}

    # -- one unit ------------------------------------------------------------------------------------
    def quantize_unit(self, work: UnitWork) -> UnitResult:
        try:
            return self._quantize_unit(work)
        finally:
            fisher = work.extras.get("fisher")
            if fisher is not None:  # this unit's Fisher weights are not needed again
                fisher.release()

    def _quantize_unit(self, work: UnitWork) -> UnitResult:
        k: BRECQKwargs = self.kwargs
        start = time.perf_counter()
        self._unit_index += 1
        device = work.device
        init = {
            n: rtn_quantize_weight(layer.weight, work.schemes[n], self.weight_observer) for n, layer in work.layers.items()
        }
        if self._first_layer is not None and list(work.layers) == [self._first_layer]:
            # the references' 8-bit stem is not reconstructed (``ignore_reconstruction``): MSE init only,
            # and its input quantizer is left to the engine's observer
            return UnitResult(weights=init, stats={"reconstructed": 0.0})

        fisher, norm = self._fisher_weights(work, init)
        data = UnitData(work, fisher, norm, seed=self._gen_seed * 1_000_003 + self._unit_index)
        rounders = {n: AdaRoundWeight(layer.weight, init[n]).to(device) for n, layer in work.layers.items()}
        act_names = [n for n in work.layers if work.schemes[n].act_bits is not None]
        joint = k.drop_prob < 1.0
        stats: dict[str, float] = {"reconstructed": 1.0}

        nearest = {weight_key(work, n): r.hard_weight() for n, r in rounders.items()}
        quantizers: dict[str, LearnedStepQuantizer] = {}
        with frozen_parameters(work.module):
            stats["loss_init"] = self._full_loss(work, data, nearest, {}, k.p)
            if joint and act_names:
                quantizers = self._init_act_quantizers(work, data, nearest, act_names, keep_prob=k.drop_prob)
            stats.update(self._learn(work, data, rounders, quantizers, joint))
            hard = {weight_key(work, n): r.hard_weight() for n, r in rounders.items()}
            stats["loss_final"] = self._full_loss(work, data, hard, {}, k.p)
            if act_names and not joint:
                quantizers = self._init_act_quantizers(work, data, hard, act_names, keep_prob=1.0)
                stats.update(self._learn_steps(work, data, hard, quantizers))
        stats["round_up_changed"] = _changed_fraction(rounders, init)
        stats["undecided"] = _undecided_fraction(rounders)
        stats["seconds"] = time.perf_counter() - start
        return UnitResult(
            weights={n: r.quantized() for n, r in rounders.items()},
            input_qparams={n: q.qparams() for n, q in quantizers.items()},
            stats=stats,
        )

    # -- pieces ----------------------------------------------------------------------------------
    def _fisher_weights(self, work: UnitWork, init: dict[str, QuantizedWeight]) -> tuple[GradientCache | None, float]:
        """Fisher factors ``g`` of this unit's output and their normaliser (1 for the damped KL)."""
        kind = self.kwargs.recon_loss
        if kind == "fisher_diag":
            cache = work.extras.get("fisher")
            if cache is None:
                raise RuntimeError(f"no Fisher weights were prepared for unit {work.name}")
            # scale-free: mean g² = 1 over the unit, so λ keeps the balance it has with the plain L2 loss
            return cache, math.sqrt(cache.mean_square()) or 1.0
        if kind == "fisher_kl":
            if self._kl_state is None:
                raise RuntimeError("fisher_kl needs prepare() to run first")
            model, batches, fp_logits = self._kl_state
            shapes = {n: layer.weight.shape for n, layer in work.layers.items()}
            nearest = {n: q.dequantize().reshape(shapes[n]).to(work.device) for n, q in init.items()}
            with swapped_weights(work.layers, nearest):
                return kl_gradients(model, work.module, batches, fp_logits, work.device), 1.0
        return None, 1.0

    def _learn(
        self,
        work: UnitWork,
        data: UnitData,
        rounders: dict[str, AdaRoundWeight],
        quantizers: dict[str, LearnedStepQuantizer],
        joint: bool,
    ) -> dict[str, float]:
        """The AdaRound loop (QDrop: with step sizes learned jointly and random drop)."""
        k: BRECQKwargs = self.kwargs
        if k.iters == 0:
            return {"iters": 0.0}
        opt = torch.optim.Adam([r.logits for r in rounders.values()], lr=k.lr)
        act_opt = sched = None
        if quantizers:
            act_opt = torch.optim.Adam([q.scale for q in quantizers.values()], lr=k.act_lr or ACT_LR_JOINT)
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(act_opt, T_max=k.iters, eta_min=0.0)
        for q in quantizers.values():
            q.train()
        tracker = _LossTracker(k.iters)
        bar = logging.tqdm(total=k.iters, desc=f"{work.desc} brecq weights", leave=False, unit="it")
        begin = time.perf_counter()
        with input_hooks(work, quantizers):
            for t in range(1, k.iters + 1):
                mb = data.gather(data.sample(k.batch_size), work.device)
                args = _dropped_inputs(mb, k.drop_prob) if joint else mb.args
                weights = {weight_key(work, n): r() for n, r in rounders.items()}
                rec = recon_loss(unit_forward(work, weights, args, mb.kwargs), mb.target, k.p, mb.weight)
                beta = beta_schedule(t, k.iters, k.warmup, k.beta_start, k.beta_end)
                loss = rec
                if beta > 0 and k.round_weight > 0:
                    loss = rec + k.round_weight * sum(r.regularizer(beta) for r in rounders.values())
                opt.zero_grad(set_to_none=True)
                if act_opt is not None:
                    act_opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                if act_opt is not None:
                    act_opt.step()
                    sched.step()
                tracker.add(t, rec.detach(), loss.detach())
                if t % 50 == 0 or t == k.iters:
                    bar.set_postfix(rec=f"{float(rec.detach()):.3g}", loss=f"{float(loss.detach()):.3g}", beta=f"{beta:.1f}", refresh=False)
                bar.update(1)
        bar.close()
        for q in quantizers.values():
            q.eval()
        seconds = time.perf_counter() - begin
        return {"iters": float(k.iters), "sec_per_iter": seconds / k.iters, **tracker.summary("rec")}

    def _learn_steps(
        self, work: UnitWork, data: UnitData, weights: dict[str, torch.Tensor], quantizers: dict[str, LearnedStepQuantizer]
    ) -> dict[str, float]:
        """BRECQ's activation stage: only the step sizes learn, weights at their final rounding."""
        k: BRECQKwargs = self.kwargs
        out: dict[str, float] = {"act_loss_init": self._full_loss(work, data, weights, quantizers, k.act_p)}
        if k.act_iters == 0:
            return out
        opt = torch.optim.Adam([q.scale for q in quantizers.values()], lr=k.act_lr or ACT_LR_STAGE)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=k.act_iters, eta_min=0.0)
        tracker = _LossTracker(k.act_iters)
        bar = logging.tqdm(total=k.act_iters, desc=f"{work.desc} brecq act steps", leave=False, unit="it")
        begin = time.perf_counter()
        with input_hooks(work, quantizers):
            for t in range(1, k.act_iters + 1):
                mb = data.gather(data.sample(k.batch_size), work.device)
                rec = recon_loss(unit_forward(work, weights, mb.args, mb.kwargs), mb.target, k.act_p, mb.weight)
                opt.zero_grad(set_to_none=True)
                rec.backward()
                opt.step()
                sched.step()
                tracker.add(t, rec.detach(), rec.detach())
                if t % 50 == 0 or t == k.act_iters:
                    bar.set_postfix(rec=f"{float(rec.detach()):.3g}", refresh=False)
                bar.update(1)
        bar.close()
        out["act_sec_per_iter"] = (time.perf_counter() - begin) / k.act_iters
        out["act_loss_final"] = self._full_loss(work, data, weights, quantizers, k.act_p)
        return out

    @torch.no_grad()
    def _init_act_quantizers(
        self, work: UnitWork, data: UnitData, weights: dict[str, torch.Tensor], names: list[str], keep_prob: float
    ) -> dict[str, LearnedStepQuantizer]:
        """Per-tensor range init of each layer's input quantizer (``act_observer``, default MSE L2.4)."""
        observers = {
            n: ActivationObserver(self.config.act_observer, max_samples=ACT_INIT_SAMPLES, seed=self.config.seed)
            for n in names
        }
        spies = {n: _Observe(observers[n]) for n in names}
        with input_hooks(work, spies):
            for mb in data.batches(work.device):
                unit_forward(work, weights, mb.args, mb.kwargs)
        quantizers = {}
        for n in names:
            s = work.schemes[n]
            scale, zp = observers[n].qparams(s.act_bits, s.act_symmetric)
            quantizers[n] = LearnedStepQuantizer(scale, zp, s.act_bits, s.act_symmetric, keep_prob).to(work.device).eval()
        return quantizers

    @torch.no_grad()
    def _full_loss(
        self, work: UnitWork, data: UnitData, weights: dict[str, torch.Tensor], quantizers: dict, p: float
    ) -> float:
        """Reconstruction loss (per sample) over the whole calibration set, hard weights, no drop."""
        total, count = 0.0, 0
        with input_hooks(work, quantizers):
            for mb in data.batches(work.device):
                n = int(mb.target.shape[0])
                total += float(recon_loss(unit_forward(work, weights, mb.args, mb.kwargs), mb.target, p, mb.weight)) * n
                count += n
        return total / max(count, 1)


class _Observe(nn.Module):
    """An input hook that only feeds an observer (quantization off during range init)."""

    def __init__(self, observer: ActivationObserver) -> None:
        super().__init__()
        self.observer = observer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.observer.update(x)
        return x


def _dropped_inputs(mb: MiniBatch, keep_prob: float) -> tuple:
    """QDrop: each element of the unit input is the quantized-model value with prob ``keep_prob``."""
    if mb.fp_args is None:
        return mb.args
    q, fp = mb.args[0], mb.fp_args[0]
    mixed = torch.where(torch.rand_like(q) < keep_prob, q, fp)
    return (mixed,) + tuple(mb.args[1:])


class _LossTracker:
    """Mean loss over the first and last 5 % of the iterations (no device sync per step)."""

    def __init__(self, iters: int) -> None:
        self.window = max(1, iters // 20)
        self.iters = iters
        self.first = [0.0, 0.0]
        self.last = [0.0, 0.0]

    def add(self, t: int, rec: torch.Tensor, total: torch.Tensor) -> None:
        if t <= self.window:
            self.first = [self.first[0] + rec, self.first[1] + total]
        if t > self.iters - self.window:
            self.last = [self.last[0] + rec, self.last[1] + total]

    def summary(self, prefix: str) -> dict[str, float]:
        w = self.window
        return {
            f"{prefix}_first": float(self.first[0]) / w,
            f"{prefix}_last": float(self.last[0]) / w,
            "loss_first": float(self.first[1]) / w,
            "loss_last": float(self.last[1]) / w,
        }


def _changed_fraction(rounders: dict[str, AdaRoundWeight], init: dict[str, QuantizedWeight]) -> float:
    """Fraction of weights whose learned code differs from the round-to-nearest code."""
    changed = total = 0
    for n, r in rounders.items():
        codes = r.quantized().codes
        changed += int((codes != init[n].codes.cpu().reshape(codes.shape)).sum())
        total += codes.numel()
    return changed / max(total, 1)


@torch.no_grad()
def _undecided_fraction(rounders: dict[str, AdaRoundWeight], tol: float = 1e-3) -> float:
    """Fraction of rounding variables whose soft value h(V) is not yet within ``tol`` of 0 or 1."""
    undecided = total = 0
    for r in rounders.values():
        h = r.soft_rounding()
        undecided += int(((h > tol) & (h < 1 - tol)).sum())
        total += h.numel()
    return undecided / max(total, 1)
