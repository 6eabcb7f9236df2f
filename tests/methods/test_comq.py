"""COMQ: the solver against an independent scalar loop, Gram vs direct, monotone sweeps, convs, real data.

Every expectation is computed here from the formulas (algorithms.md §2), never from the code under
test: the reference update is a plain Python loop over rows and coordinates with the residual
``u = X (w − q)``, a brute-force nearest grid point, and errors ``‖X (W − Q)ᵀ‖²`` from X itself.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hf_ptq.methods.base import UnitWork
from hf_ptq.methods.comq import (
    COMQ,
    COMQKwargs,
    GramAccumulator,
    comq_grid,
    comq_quantize_layer,
    input_columns,
)
from hf_ptq.methods.comq_solver import ComqGrid, comq_direct, comq_gram
from hf_ptq.quant.scheme import LayerScheme, rtn_quantize_weight

@pytest.fixture(autouse=True)
def _one_thread():
    """Small tensors: on 2 shared cores a second torch thread mostly adds OpenMP contention."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# -- independent references ------------------------------------------------------------------------


def correlated_inputs(n_rows: int, n: int, gen: torch.Generator, dead: int = 0) -> torch.Tensor:
    """Activations with correlated, unequally scaled columns (like real layer inputs)."""
    mix = torch.randn(n, n, generator=gen, dtype=torch.float64) / math.sqrt(n) + torch.eye(n, dtype=torch.float64)
    scales = torch.exp(torch.randn(n, generator=gen, dtype=torch.float64) * 0.5)
    x = (torch.randn(n_rows, n, generator=gen, dtype=torch.float64) @ mix) * scales
    if dead:
        x[:, :dead] = 0.0
    return x


def naive_grid(w: torch.Tensor, bits: int, symmetric: bool, per_tensor: bool, lam: float):
    """(step, zero point, qmin, qmax) per row from the formulas of the storage format, times λ."""
    w = w.double()
    lo = (w.min() if per_tensor else w.min(1).values).clamp(max=0) * torch.ones(w.shape[0], dtype=torch.float64)
    hi = (w.max() if per_tensor else w.max(1).values).clamp(min=0) * torch.ones(w.shape[0], dtype=torch.float64)
    if symmetric:
        half = 2 ** (bits - 1) - 1
        s = (torch.maximum(-lo, hi) / half).clamp(min=1e-8)
        z = torch.full_like(s, 2 ** (bits - 1))
        qmin, qmax = 1, 2**bits - 1
    else:
        s = ((hi - lo) / (2**bits - 1)).clamp(min=1e-8)
        z = torch.round(-lo.float() / s.float()).double().clamp(0, 2**bits - 1)
        qmin, qmax = 0, 2**bits - 1
    return s * lam, z, qmin, qmax


def naive_comq(w, x, bits, symmetric=False, per_tensor=False, lam=1.0, greedy=True, sweeps=1, update_scale=False):
    """The paper's update as a scalar loop (reference-code order): returns unsigned codes and steps."""
    w, x = w.double(), x.double()
    m, n = w.shape
    step, z, qmin, qmax = naive_grid(w, bits, symmetric, per_tensor, lam)
    norms = (x * x).sum(0)
    q = w.clone()
    codes = torch.zeros(m, n, dtype=torch.int64)
    orders = []
    for i in range(m):
        if greedy:
            orders.append(sorted(range(n), key=lambda j: -abs(float(w[i, j])) * math.sqrt(float(norms[j]))))
        else:
            orders.append(list(range(n)))
    for _ in range(sweeps):
        for i in range(m):
            u = x @ (w[i] - q[i])
            grid_codes = torch.arange(qmin, qmax + 1, dtype=torch.float64)
            grid_values = step[i] * (grid_codes - z[i])
            for j in orders[i]:
                u = u - x[:, j] * (w[i, j] - q[i, j])
                target = w[i, j] + (x[:, j] @ u) / norms[j] if norms[j] > 0 else w[i, j]
                best = int(torch.argmin((grid_values - target).abs()))
                q[i, j] = grid_values[best]
                codes[i, j] = int(grid_codes[best])
                u = u + x[:, j] * (w[i, j] - q[i, j])
        if update_scale:
            k = (codes - z[:, None]).double()
            xk, xw = x @ k.T, x @ w.T
            num, den = (xk * xw).sum(0), (xk * xk).sum(0)
            if per_tensor:
                num, den = num.sum().expand(m), den.sum().expand(m)
            step = torch.where((den > 0) & (num > 0), num / den, step)
            q = step[:, None] * k
    return codes, step


def recon_error(w: torch.Tensor, wq: torch.Tensor, x: torch.Tensor) -> float:
    """‖X Wᵀ − X Qᵀ‖²_F straight from the inputs."""
    return float((x.double() @ (w.double() - wq.double()).reshape(w.shape[0], -1).T).pow(2).sum())


def kwargs(**kw) -> COMQKwargs:
    return COMQKwargs(**{"solver_dtype": "float64", **kw})


# -- solver vs the scalar loop -----------------------------------------------------------------------

CASES = [
    dict(bits=4),
    dict(bits=3, greedy=False),
    dict(bits=2, sweeps=3),
    dict(bits=4, update_scale=True),
    dict(bits=3, update_scale=True, sweeps=3),
    dict(bits=4, symmetric=True),
    dict(bits=3, symmetric=True, update_scale=True, sweeps=2),
    dict(bits=4, per_tensor=True),
    dict(bits=2, per_tensor=True, update_scale=True, sweeps=2),
    dict(bits=3, per_tensor=True, symmetric=True, greedy=False, update_scale=True),
    dict(bits=2, lam=0.65),
    dict(bits=4, lam=0.8, update_scale=True, sweeps=2, dead=2),
]


@pytest.mark.parametrize("index", range(len(CASES)), ids=[",".join(f"{k}={v}" for k, v in c.items()) for c in CASES])
def test_codes_equal_scalar_loop(index):
    case = dict(CASES[index])
    dead = case.pop("dead", 0)
    gen = torch.Generator().manual_seed(100 + index)
    m, n, N = 6, 14, 60
    w = torch.randn(m, n, generator=gen) * 0.1
    x = correlated_inputs(N, n, gen, dead=dead)
    want_codes, want_step = naive_comq(w, x, **case)
    scheme = LayerScheme(
        bits=case["bits"], granularity="tensor" if case.get("per_tensor") else "channel",
        symmetric=case.get("symmetric", False),
    )  # fmt: skip
    kw = kwargs(
        greedy=case.get("greedy", True), sweeps=case.get("sweeps", 1),
        update_scale=case.get("update_scale", False), scale_factor=case.get("lam", 1.0),
    )  # fmt: skip
    got, _ = comq_quantize_layer(w, x.T @ x, scheme, kw)
    assert got.codes.dtype == torch.int32 and got.codes.shape == w.shape
    assert torch.equal(got.codes.long(), want_codes)
    want_scale = want_step[:1] if case.get("per_tensor") else want_step
    torch.testing.assert_close(got.scale.double(), want_scale, rtol=1e-6, atol=0)


# -- Gram vs direct formulation -----------------------------------------------------------------------


def _grid(w: torch.Tensor, bits: int, per_tensor: bool = False) -> ComqGrid:
    step, z, qmin, qmax = naive_grid(w, bits, False, per_tensor, 1.0)
    return ComqGrid(step=step.float(), kmin=(qmin - z).float(), kmax=(qmax - z).float(), per_tensor=per_tensor)


@pytest.mark.parametrize(
    "opts", [dict(), dict(update_scale=True, sweeps=2), dict(greedy=False, per_tensor=True, update_scale=True)]
)
def test_gram_and_direct_agree(opts):
    opts = dict(opts)
    per_tensor = opts.pop("per_tensor", False)
    gen = torch.Generator().manual_seed(1)
    m, n, N = 160, 64, 2000
    w = torch.randn(m, n, generator=gen) * 0.05
    x = correlated_inputs(N, n, gen).float()
    grid = _grid(w, 3, per_tensor)
    gram = x.double().T @ x.double()
    a = comq_gram(w, gram, grid, chunk_size=100, **opts)
    b = comq_direct(w, x, grid, chunk_size=160, **opts)
    same = (a.codes == b.codes).double().mean().item()
    print(f"\nGram vs direct {opts or 'default'}: {100 * same:.3f} % identical codes")
    assert same >= 0.999
    ea, eb = recon_error(w, a.dequantize(), x), recon_error(w, b.dequantize(), x)
    assert abs(ea - eb) <= 1e-5 * eb


def test_chunking_and_blocking_do_not_change_codes():
    gen = torch.Generator().manual_seed(2)
    w = torch.randn(24, 40, generator=gen)
    x = correlated_inputs(300, 40, gen)
    gram = x.T @ x
    grid = _grid(w, 3)
    ref = comq_gram(w, gram, grid, dtype=torch.float64, sweeps=2, update_scale=True)
    for chunk, block in [(5, 7), (24, 40), (1, 1), (100, 3)]:
        got = comq_gram(w, gram, grid, dtype=torch.float64, sweeps=2, update_scale=True, chunk_size=chunk, block_size=block)
        assert torch.equal(got.codes, ref.codes), (chunk, block)
        torch.testing.assert_close(got.step, ref.step)


# -- sweeps, scale steps, RTN ----------------------------------------------------------------------------


@pytest.mark.parametrize("update_scale", [False, True])
@pytest.mark.parametrize("granularity", ["channel", "tensor"])
def test_error_non_increasing_over_sweeps(update_scale, granularity):
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(32, 48, generator=gen) * 0.1
    x = correlated_inputs(400, 48, gen)
    gram = x.T @ x
    errors = []
    for sweeps in range(1, 6):
        q, _ = comq_quantize_layer(w, gram, LayerScheme(bits=3, granularity=granularity), kwargs(sweeps=sweeps, update_scale=update_scale))
        errors.append(recon_error(w, q.dequantize(), x))
    print(f"\nerror per sweep (update_scale={update_scale}, {granularity}):", [f"{e:.5g}" for e in errors])
    for before, after in zip(errors, errors[1:]):
        assert after <= before * (1 + 1e-9)
    assert errors[-1] < errors[0]  # later sweeps do move on a 3-bit grid


def test_scale_step_never_hurts():
    gen = torch.Generator().manual_seed(4)
    for _ in range(5):
        w = torch.randn(16, 32, generator=gen) * 0.1
        x = correlated_inputs(200, 32, gen)
        gram = x.T @ x
        for granularity in ["channel", "tensor"]:
            scheme = LayerScheme(bits=2, granularity=granularity)
            plain, _ = comq_quantize_layer(w, gram, scheme, kwargs(update_scale=False))
            scaled, _ = comq_quantize_layer(w, gram, scheme, kwargs(update_scale=True))
            assert torch.equal(plain.codes, scaled.codes)  # one sweep: the scale step comes after it
            assert recon_error(w, scaled.dequantize(), x) <= recon_error(w, plain.dequantize(), x) * (1 + 1e-9)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_first_sweep_beats_rtn_on_random_layers(bits):
    gen = torch.Generator().manual_seed(10 + bits)
    trials, wins, gains = 40, 0, []
    scheme = LayerScheme(bits=bits)
    for _ in range(trials):
        w = torch.randn(16, 48, generator=gen) * torch.exp(torch.randn(16, 1, generator=gen) * 0.3)
        x = correlated_inputs(256, 48, gen)
        q, _ = comq_quantize_layer(w, x.T @ x, scheme, kwargs(update_scale=False))  # codes only, RTN's grid
        e_comq = recon_error(w, q.dequantize(), x)
        e_rtn = recon_error(w, rtn_quantize_weight(w, scheme).dequantize(), x)
        wins += e_comq < e_rtn
        gains.append(e_comq / e_rtn)
    rate = wins / trials
    print(f"\nW{bits}: COMQ (1 sweep) beats RTN on {wins}/{trials} layers; median error ratio {sorted(gains)[trials // 2]:.3f}")
    assert rate >= 0.95


def test_dead_inputs_keep_rtn_codes():
    gen = torch.Generator().manual_seed(5)
    w = torch.randn(8, 20, generator=gen)
    x = correlated_inputs(100, 20, gen, dead=3)
    scheme = LayerScheme(bits=3)
    q, _ = comq_quantize_layer(w, x.T @ x, scheme, kwargs(sweeps=3))
    rtn = rtn_quantize_weight(w, scheme)
    assert torch.equal(q.codes[:, :3], rtn.codes[:, :3])


def test_codes_in_range_and_zero_point_kept():
    gen = torch.Generator().manual_seed(6)
    w = torch.randn(16, 30, generator=gen) + 0.3
    x = correlated_inputs(100, 30, gen)
    for symmetric in (False, True):
        for bits in (2, 3, 4, 8):
            scheme = LayerScheme(bits=bits, symmetric=symmetric)
            q, _ = comq_quantize_layer(w, x.T @ x, scheme, kwargs(update_scale=True, sweeps=2, scale_factor=0.7))
            lo = 1 if symmetric else 0
            assert int(q.codes.min()) >= lo and int(q.codes.max()) <= 2**bits - 1
            assert torch.equal(q.zero_point, rtn_quantize_weight(w, scheme).zero_point)


# -- convolutions ------------------------------------------------------------------------------------------

CONVS = [
    dict(in_channels=4, out_channels=6, kernel_size=3),
    dict(in_channels=4, out_channels=6, kernel_size=3, stride=2, padding=1),
    dict(in_channels=4, out_channels=6, kernel_size=(3, 5), padding=(1, 2), dilation=(2, 1), stride=(1, 2)),
    dict(in_channels=4, out_channels=8, kernel_size=3, groups=2, padding="same"),
    dict(in_channels=6, out_channels=6, kernel_size=4, groups=6, padding="same"),  # depthwise, even kernel
    dict(in_channels=3, out_channels=5, kernel_size=2, stride=2, padding="valid"),
]


@pytest.mark.parametrize("spec", CONVS)
def test_conv_columns_times_weight_equal_conv(spec):
    torch.manual_seed(0)
    conv = nn.Conv2d(**spec, bias=False)
    x = torch.randn(3, conv.in_channels, 11, 9)
    cols = input_columns(conv, x)  # [g, N, n]
    g, m = conv.groups, conv.out_channels
    out = torch.bmm(cols, conv.weight.reshape(g, m // g, -1).transpose(1, 2))  # [g, N, m/g]
    ref = conv(x)
    b, _, ho, wo = ref.shape
    ref = ref.reshape(b, g, m // g, ho, wo).permute(1, 0, 3, 4, 2).reshape(g, b * ho * wo, m // g)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_gram_accumulator_matches_unfold(monkeypatch):
    import hf_ptq.methods.comq as comq_module

    monkeypatch.setattr(comq_module, "GRAM_PIECE_ROWS", 50)  # force several pieces per batch
    conv = nn.Conv2d(4, 8, 3, padding=1, groups=2)
    acc = GramAccumulator(conv, torch.device("cpu"))
    batches = [torch.randn(3, 4, 6, 5), torch.randn(2, 4, 6, 5)]
    for xb in batches:
        acc.add(xb)
    cols = torch.cat([F.unfold(xb.double(), 3, padding=1) for xb in batches])  # [B, 36, L]
    cols = cols.permute(0, 2, 1).reshape(-1, 36)
    for grp in range(2):
        xg = cols[:, grp * 18 : (grp + 1) * 18]
        torch.testing.assert_close(acc.gram[grp], xg.T @ xg, rtol=1e-5, atol=1e-5)


def test_depthwise_conv_each_channel_its_own_problem():
    torch.manual_seed(1)
    conv = nn.Conv2d(5, 5, 3, padding=1, groups=5, bias=False)
    x = torch.randn(4, 5, 7, 7)
    acc = GramAccumulator(conv, torch.device("cpu"))
    acc.add(x)
    assert acc.gram.shape == (5, 9, 9)
    scheme = LayerScheme(bits=3)
    q, _ = comq_quantize_layer(conv.weight, acc.gram, scheme, kwargs(sweeps=2, update_scale=False))
    total_comq = total_rtn = 0.0
    rtn = rtn_quantize_weight(conv.weight, scheme)
    for c in range(5):
        xc = F.unfold(x[:, c : c + 1].double(), 3, padding=1).permute(0, 2, 1).reshape(-1, 9)
        wc = conv.weight[c].reshape(1, 9).detach()
        want, _ = naive_comq(wc, xc, bits=3, sweeps=2)
        assert torch.equal(q.codes[c].reshape(1, 9).long(), want), c
        total_comq += recon_error(wc, q.dequantize()[c].reshape(1, 9), xc)
        total_rtn += recon_error(wc, rtn.dequantize()[c].reshape(1, 9), xc)
    assert total_comq < total_rtn


# -- the method on a unit ---------------------------------------------------------------------------------


class Block(nn.Module):
    """q/k share an input; fc2 consumes fc1's output (sequential mode must see fc1 quantized)."""

    def __init__(self) -> None:
        super().__init__()
        self.q = nn.Linear(12, 12)
        self.k = nn.Linear(12, 12)
        self.fc1 = nn.Linear(12, 16)
        self.fc2 = nn.Linear(16, 12)

    def forward(self, x):
        h = self.q(x) * torch.sigmoid(self.k(x))
        return self.fc2(torch.relu(self.fc1(h)))


def _work(block: Block, batches: list[torch.Tensor], bits: int = 3) -> UnitWork:
    names = ["blk.q", "blk.k", "blk.fc1", "blk.fc2"]
    layers = {n: block.get_submodule(n.split(".", 1)[1]) for n in names}
    return UnitWork(
        name="blk", module=block, layers=layers, schemes={n: LayerScheme(bits=bits) for n in names},
        inputs=[((xb,), {}) for xb in batches], desc="(1/1) Block",
    )  # fmt: skip


class _Config:
    def __init__(self, **kw) -> None:
        self.method_kwargs = {"solver_dtype": "float64", **kw}
        self.weight_observer = None


@pytest.mark.parametrize("source", ["fp", "quantized"])
def test_unit_inputs_fp_vs_sequential(source):
    torch.manual_seed(2)
    block = Block().eval()
    batches = [torch.randn(5, 7, 12), torch.randn(3, 7, 12)]
    originals = dict(block.named_children())
    method = COMQ(_Config(input_source=source))
    assert method.input_mode == source
    result = method.quantize_unit(_work(block, batches))
    assert dict(block.named_children()) == originals  # float layers restored
    wq = {n: result.weights[f"blk.{n}"].dequantize() for n in ("q", "k", "fc1", "fc2")}

    x = torch.cat([b.reshape(-1, 12) for b in batches]).double()

    def lin(name, inp, weight=None):
        layer = getattr(block, name)
        w = layer.weight.double() if weight is None else weight.double()
        return inp @ w.T + layer.bias.double()

    with torch.no_grad():
        if source == "fp":
            h = lin("q", x) * torch.sigmoid(lin("k", x))
            a = torch.relu(lin("fc1", h))
        else:
            h = lin("q", x, wq["q"]) * torch.sigmoid(lin("k", x, wq["k"]))
            a = torch.relu(lin("fc1", h, wq["fc1"]))
        for name, inp in [("q", x), ("k", x), ("fc1", h), ("fc2", a)]:
            w = getattr(block, name).weight.detach()
            want, _ = naive_comq(w, inp, bits=3, update_scale=True)
            assert torch.equal(result.weights[f"blk.{name}"].codes.long(), want), name
    assert result.stats["comq_rel_error"] < result.stats["comq_rtn_rel_error"]


@pytest.mark.parametrize(
    "bad, field",
    [({"sweeps": 0}, "sweeps"), ({"input_source": "float"}, "input_source"), ({"scale_factor": 1.5}, "scale_factor"),
     ({"iters": 2}, "iters"), ({"chunk_size": 0}, "chunk_size")],
)  # fmt: skip
def test_bad_kwargs_raise_value_error_naming_field(bad, field):
    from hf_ptq import PTQConfig

    with pytest.raises(ValueError, match=field) as err:
        PTQConfig(method="comq", method_kwargs=bad, calibration={"dataset": [torch.zeros(1, 3, 8, 8)]})
    assert repr(next(iter(bad.values()))) in str(err.value)


def test_grid_is_rtn_grid_shrunk_by_lambda():
    w = torch.randn(4, 10)
    scheme = LayerScheme(bits=2)
    grid, rtn = comq_grid(w, scheme, "minmax", 0.65)
    step, z, qmin, qmax = naive_grid(w, 2, False, False, 0.65)
    torch.testing.assert_close(grid.step.double(), step, rtol=1e-6, atol=0)
    assert torch.equal(grid.kmin.double(), qmin - z) and torch.equal(grid.kmax.double(), qmax - z)


# -- real data: the digits ResNet -------------------------------------------------------------------------

_TOP1: dict[tuple, float] = {}


def _top1(ckpt, digits, method: str, bits: int | None, **extra) -> float:
    import hf_ptq
    from transformers import AutoModelForImageClassification

    key = (method, bits, tuple(sorted((k, repr(v)) for k, v in extra.items())))
    if key not in _TOP1:
        if method == "fp":
            model = AutoModelForImageClassification.from_pretrained(ckpt)
        else:
            calib = {"dataset": digits["train"], "num_samples": 256, "batch_size": 64}
            config = hf_ptq.PTQConfig(method=method, weight_bits=bits, calibration=calib, **extra)
            model = AutoModelForImageClassification.from_pretrained(ckpt, quantization_config=config)
        _TOP1[key] = hf_ptq.evaluate_model(model, digits["test"])["top1"]
    return _TOP1[key]


def test_digits_w4_within_02pt_of_fp(digits_checkpoint, digits):
    fp = _top1(digits_checkpoint, digits, "fp", None)
    comq = _top1(digits_checkpoint, digits, "comq", 4)
    print(f"\ndigits top-1: FP {100 * fp:.2f} %, COMQ W4A32 {100 * comq:.2f} %")
    assert comq >= fp - 0.002


@pytest.mark.parametrize("bits", [3, 2])
def test_digits_comq_beats_rtn(digits_checkpoint, digits, bits):
    rtn = _top1(digits_checkpoint, digits, "rtn", bits)
    comq = _top1(digits_checkpoint, digits, "comq", bits)
    print(f"\ndigits top-1 W{bits}A32 (per-channel asymmetric min-max grid): RTN {100 * rtn:.2f} %, COMQ {100 * comq:.2f} %")
    assert comq > rtn


def test_digits_w4a8_end_to_end(digits_checkpoint, digits):
    from hf_ptq.quant.replace import quant_modules
    from transformers import AutoModelForImageClassification
    import hf_ptq

    fp = _top1(digits_checkpoint, digits, "fp", None)
    calib = {"dataset": digits["train"], "num_samples": 256, "batch_size": 64}
    # min-max activation ranges: the engine's default MSE activation search is the slow part here
    config = hf_ptq.PTQConfig(method="comq", weight_bits=4, act_bits=8, act_observer="minmax", calibration=calib)
    model = AutoModelForImageClassification.from_pretrained(digits_checkpoint, quantization_config=config)
    layers = quant_modules(model)
    assert layers and all(q.scheme.act_bits == 8 and float(q.input_scale) != 1.0 for q in layers.values())
    report = model.hf_ptq_report["units"]
    assert all(u["recon_error"] <= u["recon_error_rtn"] for u in report)
    top1 = hf_ptq.evaluate_model(model, digits["test"])["top1"]
    print(f"\ndigits top-1: FP {100 * fp:.2f} %, COMQ W4A8 {100 * top1:.2f} %")
    assert top1 >= fp - 0.01


@pytest.mark.slow
@pytest.mark.parametrize("bits", [3, 2])
def test_digits_variants_slow(digits_checkpoint, digits, bits):
    """Reference-code settings and the sequential variant also beat RTN (per-channel and per-tensor)."""
    for granularity in ["channel", "tensor"]:
        rtn = _top1(digits_checkpoint, digits, "rtn", bits, weight_granularity=granularity)
        for kw in [{"update_scale": False}, {"input_source": "quantized"}, {"sweeps": 3}]:
            comq = _top1(digits_checkpoint, digits, "comq", bits, weight_granularity=granularity, method_kwargs=kw)
            print(f"\ndigits W{bits} {granularity} {kw}: RTN {100 * rtn:.2f} %, COMQ {100 * comq:.2f} %")
            assert comq > rtn
