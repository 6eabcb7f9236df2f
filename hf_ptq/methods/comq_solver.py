"""COMQ's coordinate descent on one layer, in two formulations that give the same codes.

Problem (algorithms.md §2.1): for each output row ``w`` (length n) find integer codes ``k`` on the
grid ``step · k``, ``k ∈ [kmin, kmax]``, minimising ``‖X (w − step·k)‖²``. One coordinate changes
at a time; its exact 1-D minimiser is the grid point nearest to the unconstrained minimiser
(§2.3), so every step can only lower the error.

*Direct* (reference code, §2.5): keep the row residual ``u = X r`` (``r = w − q``, an N-vector per
row) and update coordinate ``j`` with ``t* = w_j + ⟨x_j, u − x_j r_j⟩ / ‖x_j‖²``. Cost O(N·m·n)
per sweep and N×m buffers.

*Gram* (this package's default): the objective is ``rᵀ G r`` with ``G = XᵀX``, and
``⟨x_j, u⟩ = (G r)_j``, so

    t* = w_j + ((G r)_j − G_jj r_j) / G_jj  =  q_j + (G r)_j / G_jj.

Only ``s = G r`` at the coordinate being visited is needed. Rows are processed in parallel, each in
its own greedy order, in *blocks* of ``B`` steps: ``s`` on every coordinate is exact at a block
start; each row gathers the ``B×B`` sub-matrix of G on its block coordinates once and keeps ``s``
current inside the block with rank-1 updates of length ≤ B; after the block, the block's code
changes are pushed into ``s`` as one sparse × dense product (each row adds its B changed
coordinates' rows of G). A sweep costs ``m·n²`` multiply-adds (the sparse products) plus
``m·n·B`` gathered elements — O(m·n²), independent of the number of calibration tokens N. The
state is kept in each row's visiting order and in code units ``u = q/step``, so a block is a
contiguous slice and a scale step does not touch the codes.

Grouped/depthwise convolutions are ``g`` independent problems: ``G`` has shape ``[g, n, n]`` and
the rows (output channels) of group ``i`` are the ``i``-th contiguous ``m/g`` rows, as in the
``[out, in/g·kh·kw]`` flattened conv weight.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = [
    "ComqGrid",
    "ComqSolution",
    "coordinate_order",
    "comq_gram",
    "comq_direct",
    "layer_error",
    "default_block_size",
]


@dataclass
class ComqGrid:
    """Per-row grid ``value = step · k`` with integer ``k ∈ [kmin, kmax]`` (all ``[m]`` tensors).

    ``k`` is the signed offset ``code − zero_point`` of the storage format; scale updates change
    ``step`` and keep ``k`` (so the zero point stays the same integer). ``per_tensor`` ties every
    row to one shared step (the scale update then pools all rows).
    """

    step: torch.Tensor
    kmin: torch.Tensor
    kmax: torch.Tensor
    per_tensor: bool = False


@dataclass
class ComqSolution:
    """Signed integer codes ``k`` (``[m, n]`` int64, within the grid's bounds) and final steps ``[m]``."""

    codes: torch.Tensor
    step: torch.Tensor

    def dequantize(self) -> torch.Tensor:
        return self.codes.to(self.step.dtype) * self.step[:, None]


def default_block_size(n: int) -> int:
    """Steps per block of the Gram solver (``B``).

    The per-block sparse update costs the same in total for any B; the gathered B×B sub-matrices
    cost ∝ n·B per row and the per-block overhead ∝ n/B, so a small constant is best.
    """
    return int(min(n, 16))


def coordinate_order(weight: torch.Tensor, col_sqnorm: torch.Tensor, greedy: bool) -> torch.Tensor:
    """Visiting order per row ``[m, n]``: by ``|W_ij|·‖x_j‖`` descending (greedy, §2.4) or natural.

    ``col_sqnorm`` is ``‖x_j‖²`` as ``[n]`` or per row ``[m, n]`` (grouped convs). The sort is
    stable, so equal scores keep their natural order.
    """
    m, n = weight.shape
    if not greedy:
        return torch.arange(n, device=weight.device).expand(m, n).contiguous()
    score = weight.abs() * col_sqnorm.clamp_min(0).sqrt().expand(m, n)
    return torch.argsort(score, dim=1, descending=True, stable=True)


def _nearest_code(target: torch.Tensor, step: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor) -> torch.Tensor:
    """Code of the grid point nearest to ``target``: the exact minimiser of a 1-D convex quadratic."""
    return torch.clamp(torch.round(target / step), kmin, kmax)


def _dead_threshold(diag: torch.Tensor) -> torch.Tensor:
    """``‖x_j‖²`` at or below this is a dead input; such coordinates keep their RTN value."""
    return diag.amax().clamp_min(torch.finfo(diag.dtype).tiny) * 1e-12


def _scale_update(
    num: torch.Tensor, den: torch.Tensor, step: torch.Tensor, per_tensor: bool
) -> torch.Tensor:
    """Closed-form ``step ← kᵀGw / kᵀGk`` per row, or pooled over rows; keeps the old step if degenerate."""
    if per_tensor:
        num, den = num.sum().expand_as(step), den.sum().expand_as(step)
    ok = (den > 0) & (num > 0)
    return torch.where(ok, num / torch.where(ok, den, torch.ones_like(den)), step)


def _chunks(m: int, groups: int, chunk_size: int) -> list[tuple[int, int, int, int]]:
    """Row ranges ``(row0, row1, group0, group1)``: whole groups, or pieces of one group."""
    per = m // groups
    out = []
    if per >= chunk_size:
        for g in range(groups):
            for r0 in range(0, per, chunk_size):
                out.append((g * per + r0, g * per + min(per, r0 + chunk_size), g, g + 1))
    else:
        gpc = max(1, chunk_size // per)
        for g0 in range(0, groups, gpc):
            g1 = min(groups, g0 + gpc)
            out.append((g0 * per, g1 * per, g0, g1))
    return out


def _times_gram(rows: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
    """``rows @ G`` for rows laid out group-major (``gram`` is ``[g, n, n]``, g groups of equal rows)."""
    g, n, _ = gram.shape
    return torch.bmm(rows.reshape(g, -1, n), gram).reshape(rows.shape)


def _check(weight: torch.Tensor, grid: ComqGrid, sweeps: int, chunk_size: int) -> None:
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [out, in], got shape {tuple(weight.shape)}")
    if sweeps < 1:
        raise ValueError(f"sweeps={sweeps!r} is not allowed; allowed values: integers >= 1")
    if chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size!r} is not allowed; allowed values: integers >= 1")
    m = weight.shape[0]
    for name in ("step", "kmin", "kmax"):
        if getattr(grid, name).shape != (m,):
            raise ValueError(f"grid.{name} must have shape [{m}], got {tuple(getattr(grid, name).shape)}")


@torch.no_grad()
def comq_gram(
    weight: torch.Tensor,
    gram: torch.Tensor,
    grid: ComqGrid,
    *,
    sweeps: int = 1,
    greedy: bool = True,
    update_scale: bool = False,
    chunk_size: int = 4096,
    block_size: int | None = None,
    dtype: torch.dtype = torch.float32,
) -> ComqSolution:
    """COMQ from the Gram matrix ``G = XᵀX`` (``[n, n]``, or ``[g, n, n]`` for g row groups).

    Starts from ``Q = W`` (the reference's greedy path-following first sweep), visits each row's
    coordinates in :func:`coordinate_order`, and, with ``update_scale``, takes one closed-form
    scale step after every sweep. ``chunk_size`` output rows are solved at a time (rows are
    independent; only a per-tensor scale update couples them, and it runs between sweeps).
    Row state is kept in each row's visiting order, so a block of steps is a contiguous slice.
    """
    _check(weight, grid, sweeps, chunk_size)
    dev = weight.device
    gram = gram.to(dev, dtype)
    if gram.dim() == 2:
        gram = gram.unsqueeze(0)
    groups, n = gram.shape[0], gram.shape[-1]
    m = weight.shape[0]
    if weight.shape[1] != n or m % groups:
        raise ValueError(f"weight {tuple(weight.shape)} does not match a Gram matrix of shape {tuple(gram.shape)}")
    per = m // groups
    w = weight.detach().to(dtype)
    step = grid.step.to(dev, dtype).clone()
    kmin, kmax = grid.kmin.to(dev, dtype), grid.kmax.to(dev, dtype)
    diag = gram.diagonal(dim1=1, dim2=2).repeat_interleave(per, dim=0)  # [m, n]: ‖x_j‖² per row
    order = coordinate_order(w, diag, greedy)
    block = int(block_size or default_block_size(n))
    # State in each row's visiting order (column t of row i is coordinate order[i, t]) and in
    # code units: u = q / step, so a visited coordinate holds its integer code k and a scale step
    # leaves u untouched. Unvisited coordinates hold w / step (full precision, §2.3).
    d_p = diag.gather(1, order)
    inv_d_p = torch.where(d_p > _dead_threshold(diag), 1.0 / d_p.clamp_min(torch.finfo(dtype).tiny), 0.0)
    w_p = w.gather(1, order)
    u_p = w_p / step[:, None]
    dead_p = inv_d_p == 0
    any_dead = bool(dead_p.any())
    codes = torch.zeros_like(w)
    chunks = _chunks(m, groups, chunk_size)
    for sweep in range(sweeps):
        if any_dead:  # a dead input (x_j = 0) takes the RTN code of the current grid (reference behaviour)
            rtn = _nearest_code(w_p, step[:, None], kmin[:, None], kmax[:, None])
            u_p = torch.where(dead_p, rtn, u_p)
        if sweep or any_dead:
            q = torch.empty_like(w).scatter_(1, order, u_p) * step[:, None]
        for r0, r1, g0, g1 in chunks:
            s_full = _times_gram(w[r0:r1] - q[r0:r1], gram[g0:g1]) if sweep or any_dead else None
            with _one_thread():
                _gram_sweep_chunk(
                    u_p[r0:r1], s_full, gram[g0:g1], inv_d_p[r0:r1], order[r0:r1],
                    step[r0:r1], kmin[r0:r1], kmax[r0:r1], block,
                )  # fmt: skip
        codes.scatter_(1, order, u_p)  # every coordinate is visited once per sweep: u is integral now
        if update_scale:
            num, den = torch.empty_like(step), torch.empty_like(step)
            for r0, r1, g0, g1 in chunks:
                kg = _times_gram(codes[r0:r1], gram[g0:g1])
                num[r0:r1] = (kg * w[r0:r1]).sum(1)
                den[r0:r1] = (kg * codes[r0:r1]).sum(1)
            step = _scale_update(num, den, step, grid.per_tensor)
    return ComqSolution(codes=codes.to(torch.int64), step=step)


@contextlib.contextmanager
def _one_thread():
    """Run the sweep's memory-bound gathers and thousands of small elementwise ops on one thread.

    Threading them gains little, and on a busy machine every parallel region can wait
    milliseconds for a descheduled worker (measured on the shared 2-core box: a ViT fc1 sweep
    takes 1.1 s on one thread and 5 s on two).
    """
    before = torch.get_num_threads()
    if before > 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if before > 1:
            torch.set_num_threads(before)


def _gram_sweep_chunk(
    u_p: torch.Tensor,
    s_full: torch.Tensor | None,
    gram: torch.Tensor,
    inv_d_p: torch.Tensor,
    order: torch.Tensor,
    step: torch.Tensor,
    kmin: torch.Tensor,
    kmax: torch.Tensor,
    block: int,
) -> None:
    """One sweep over every coordinate of a chunk of rows; updates ``u_p`` (code units) in place.

    ``s_full = (W − Q) G`` (original layout) is exact at every block start: given (a GEMM at the
    sweep start; ``None`` = zero, the first sweep, where nothing is rounded yet), then after each
    block the block's changes are added as a sparse × dense product (``embedding_bag`` with
    per-sample weights: each row adds the G rows of its B changed coordinates, weighted by the
    change). Inside a block only each row's B×B sub-matrix of G is needed.
    """
    c, n = u_p.shape
    groups = gram.shape[0]
    row_base = (torch.arange(groups, device=u_p.device) * n).repeat_interleave(c // groups)[:, None]  # [c, 1]
    gram_rows = gram.reshape(groups * n, n)
    gram_flat = gram.reshape(-1)
    if s_full is None:
        s_full = torch.zeros_like(u_p)
    kmin, kmax = kmin[:, None], kmax[:, None]
    for b0 in range(0, n, block):
        b1 = min(n, b0 + block)
        p = order[:, b0:b1]  # [c, B]: each row's coordinates in this block
        s = s_full.gather(1, p)  # (G r)_j at the block start (value units)
        # G on the block's coordinates, times step: a change of Δ codes moves (G r) by −step·G·Δ
        gsub = gram_flat.take(((row_base + p) * n)[:, :, None] + p[:, None, :]) * step[:, None, None]
        ub = u_p[:, b0:b1]
        # t*/step = u_j + (G r)_j / (G_jj step); 1/G_jj is 0 for a dead input, which keeps the RTN
        # code it was given at the sweep start
        scale = inv_d_p[:, b0:b1] / step[:, None]
        u_start = ub.clone()
        for b in range(b1 - b0):
            u_old = ub[:, b : b + 1]
            k = torch.addcmul(u_old, s[:, b : b + 1], scale[:, b : b + 1]).round_()
            k = torch.minimum(torch.maximum(k, kmin), kmax)
            s[:, b + 1 :].addcmul_(gsub[:, b, b + 1 :], u_old - k)
            ub[:, b : b + 1] = k
        if b1 < n:
            s_full += F.embedding_bag(row_base + p, gram_rows, per_sample_weights=(u_start - ub) * step[:, None], mode="sum")


@torch.no_grad()
def comq_direct(
    weight: torch.Tensor,
    inputs: torch.Tensor,
    grid: ComqGrid,
    *,
    sweeps: int = 1,
    greedy: bool = True,
    update_scale: bool = False,
    chunk_size: int = 1024,
    dtype: torch.dtype = torch.float32,
) -> ComqSolution:
    """COMQ from the layer inputs ``X`` (``[N, n]``), reference-code style (§2.5).

    Keeps ``U = (W − Q) Xᵀ`` (``[rows, N]`` per chunk) and, per step, gathers each row's input
    column, takes one inner product and one rank-1 update of its residual — the reference's
    remove/minimise/put-back sequence fused into ``t* = q_j + ⟨x_j, u⟩/‖x_j‖²`` (same value).
    Used as the independent check of :func:`comq_gram` and as the benchmark baseline.
    """
    _check(weight, grid, sweeps, chunk_size)
    dev = weight.device
    x_t = inputs.to(dev, dtype).t().contiguous()  # [n, N]: an input column is a contiguous row
    m, n = weight.shape
    if x_t.shape[0] != n:
        raise ValueError(f"inputs {tuple(inputs.shape)} do not match weight {tuple(weight.shape)}")
    w = weight.detach().to(dtype)
    step = grid.step.to(dev, dtype).clone()
    kmin, kmax = grid.kmin.to(dev, dtype), grid.kmax.to(dev, dtype)
    norm2 = (x_t * x_t).sum(1)  # [n]
    inv_norm2 = torch.where(norm2 > _dead_threshold(norm2), 1.0 / norm2.clamp_min(torch.finfo(dtype).tiny), 0.0)
    order = coordinate_order(w, norm2, greedy)
    dead = inv_norm2 == 0
    any_dead = bool(dead.any())
    q = w.clone()
    codes = torch.zeros_like(w)
    for sweep in range(sweeps):
        if any_dead:  # a dead input takes the RTN code of the current grid
            rtn = _nearest_code(w, step[:, None], kmin[:, None], kmax[:, None])
            codes = torch.where(dead, rtn, codes)
            q = torch.where(dead, rtn * step[:, None], q)
        for r0 in range(0, m, chunk_size):
            r1 = min(m, r0 + chunk_size)
            wc, qc, kc, pc = w[r0:r1], q[r0:r1], codes[r0:r1], order[r0:r1]
            u = (wc - qc) @ x_t if sweep or any_dead else torch.zeros(r1 - r0, x_t.shape[1], dtype=dtype, device=dev)
            rows = torch.arange(r1 - r0, device=dev)
            for t in range(n):
                j = pc[:, t]
                xp = x_t.index_select(0, j)  # [rows, N]
                q_old = qc[rows, j]
                dot = torch.einsum("rn,rn->r", xp, u)
                target = q_old + dot * inv_norm2[j]  # a dead input keeps its RTN value
                k = _nearest_code(target, step[r0:r1], kmin[r0:r1], kmax[r0:r1])
                q_new = k * step[r0:r1]
                u.addcmul_(xp, (q_old - q_new)[:, None])
                qc[rows, j] = q_new
                kc[rows, j] = k
        if update_scale:
            num, den = torch.empty_like(step), torch.empty_like(step)
            for r0 in range(0, m, chunk_size):
                r1 = min(m, r0 + chunk_size)
                xk, xw = codes[r0:r1] @ x_t, w[r0:r1] @ x_t
                num[r0:r1], den[r0:r1] = (xk * xw).sum(1), (xk * xk).sum(1)
            step = _scale_update(num, den, step, grid.per_tensor)
            q = codes * step[:, None]
    return ComqSolution(codes=codes.to(torch.int64), step=step)


def layer_error(
    weight: torch.Tensor, dequantized: torch.Tensor, gram: torch.Tensor, dtype: torch.dtype = torch.float64
) -> float:
    """``Σ_rows (w − q)ᵀ G (w − q)`` = ``‖X Wᵀ − X Qᵀ‖²_F``, computed in ``dtype``."""
    gram = gram.to(dtype)
    if gram.dim() == 2:
        gram = gram.unsqueeze(0)
    r = (weight.to(dtype) - dequantized.to(dtype)).reshape(weight.shape[0], -1)
    return float((_times_gram(r, gram) * r).sum(dtype=torch.float64))
