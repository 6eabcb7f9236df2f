"""FP=xINT model level: AbelianAdd/AbelianMul group axioms, basis models, and the layer-wise sum.

Group axioms are property-based (hypothesis) on random small isomorphic models. Float addition
and multiplication are commutative and have exact identities/inverses for ⊕ in IEEE arithmetic,
so those are checked bitwise; associativity (and ⊙-inverses) hold exactly only for values where
no rounding happens, so they are checked bitwise on integer-valued models and to float
tolerance on general ones.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.overrides import TorchFunctionMode
from transformers import AutoModelForImageClassification

from hf_ptq import PTQConfig, quantize_model
from hf_ptq.expansion import (
    StackedConv2d,
    StackedLinear,
    abelian_add,
    abelian_mul,
    abelian_neg,
    abelian_one,
    abelian_reciprocal,
    abelian_sum,
    abelian_zero,
    expand_model,
    layerwise_sum,
)
from hf_ptq.quant.replace import quant_modules

from tiny_models import tiny_model, tiny_mobilenet

SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: on 2 shared cores a second torch thread only adds OpenMP contention (30x slower here)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

# -- random small isomorphic models ----------------------------------------------------------------


def small_model(arch: tuple[int, int, int, int], seed: int, values: str) -> nn.Module:
    """Conv(groups) → BN → ReLU → Linear, with every float tensor drawn from ``values``."""
    cin, groups, hidden, out = arch
    model = nn.Sequential(
        nn.Conv2d(cin * groups, hidden * groups, 3, padding=1, groups=groups),
        nn.BatchNorm2d(hidden * groups),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(hidden * groups * 4, out),
    ).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in model.state_dict().values():
            if not t.is_floating_point():
                continue
            if values == "int":  # small integers: sums and products stay exact in float32
                t.copy_(torch.randint(-8, 9, t.shape, generator=g).float())
            elif values == "nonzero":
                sign = torch.randint(0, 2, t.shape, generator=g).float() * 2 - 1
                t.copy_(sign * (0.25 + torch.rand(t.shape, generator=g) * 4))
            else:
                t.copy_(torch.randn(t.shape, generator=g) * 3)
    return model


archs = st.tuples(st.integers(1, 3), st.integers(1, 2), st.integers(1, 4), st.integers(1, 5))
seeds = st.lists(st.integers(0, 2**31 - 1), min_size=3, max_size=3, unique=True)


def state(m: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in m.state_dict().items()}


def assert_equal(a: nn.Module, b: nn.Module) -> None:
    sa, sb = state(a), state(b)
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


def assert_close(a: nn.Module, b: nn.Module, rtol: float = 1e-6) -> None:
    sa, sb = state(a), state(b)
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=rtol, atol=rtol * float(sb[k].abs().max().clamp_min(1)))


def three(arch, seeds, values):
    return [small_model(arch, s, values) for s in seeds]


@SETTINGS
@given(archs, seeds)
def test_abelian_add_is_an_abelian_group(arch, seeds):
    a, b, c = three(arch, seeds, "float")
    before = state(a)
    assert_equal(abelian_add(a, b), abelian_add(b, a))  # commutativity
    assert_equal(abelian_add(a, abelian_zero(a)), a)  # identity
    assert_equal(abelian_add(a, abelian_neg(a)), abelian_zero(a))  # inverse
    assert_close(abelian_add(abelian_add(a, b), c), abelian_add(a, abelian_add(b, c)))  # assoc. (rounding)
    ia, ib, ic = three(arch, seeds, "int")
    assert_equal(abelian_add(abelian_add(ia, ib), ic), abelian_add(ia, abelian_add(ib, ic)))  # assoc. exact
    for key, t in state(abelian_add(a, b)).items():  # closure: same structure, values are the sums
        if t.is_floating_point():
            assert torch.equal(t, a.state_dict()[key] + b.state_dict()[key])
    assert all(torch.equal(before[k], v) for k, v in a.state_dict().items())  # operands untouched


@SETTINGS
@given(archs, seeds)
def test_abelian_mul_is_an_abelian_group_on_models_without_zeros(arch, seeds):
    a, b, c = three(arch, seeds, "nonzero")
    assert_equal(abelian_mul(a, b), abelian_mul(b, a))  # commutativity
    assert_equal(abelian_mul(a, abelian_one(a)), a)  # identity
    assert_close(abelian_mul(a, abelian_reciprocal(a)), abelian_one(a))  # inverse (one rounding)
    assert_close(abelian_mul(abelian_mul(a, b), c), abelian_mul(a, abelian_mul(b, c)))  # assoc. (rounding)
    ia, ib, ic = three(arch, seeds, "int")
    assert_equal(abelian_mul(abelian_mul(ia, ib), ic), abelian_mul(ia, abelian_mul(ib, ic)))  # assoc. exact
    # ⊙ distributes over ⊕ (exact on integers): scaling a sum of basis models = sum of scaled ones
    assert_equal(abelian_mul(ia, abelian_add(ib, ic)), abelian_add(abelian_mul(ia, ib), abelian_mul(ia, ic)))


@SETTINGS
@given(archs, seeds)
def test_abelian_sum_is_order_independent(arch, seeds):
    ms = three(arch, seeds, "int")
    assert_equal(abelian_sum(ms), abelian_sum(ms[::-1]))
    assert_equal(abelian_sum(ms), abelian_add(abelian_add(ms[0], ms[1]), ms[2]))


def test_operations_reject_non_isomorphic_models():
    a = small_model((1, 1, 2, 3), 0, "float")
    with pytest.raises(ValueError, match="not isomorphic"):
        abelian_add(a, small_model((1, 1, 3, 3), 0, "float"))
    b = copy.deepcopy(a)
    b[1].num_batches_tracked.fill_(5)
    with pytest.raises(ValueError, match="non-float buffer"):
        abelian_mul(a, b)
    with pytest.raises(ValueError, match="zero entries"):
        abelian_reciprocal(abelian_zero(a))


# -- basis models ---------------------------------------------------------------------------------


@SETTINGS
@given(archs, st.integers(0, 2**31 - 1), st.sampled_from([2, 3, 4]), st.integers(1, 4), st.booleans())
def test_basis_models_factor_into_scales_times_integers(arch, seed, bits, terms, symmetric):
    model = small_model(arch, seed, "float")
    exp = expand_model(model, bits, terms, symmetric=symmetric, modules_to_not_convert=[])
    assert exp.layers == ["0", "5"]
    for k in range(terms):
        scales, ints = exp.factors(k)
        assert_equal(exp.basis(k), abelian_mul(scales, ints))
        for name in exp.layers:
            q = ints.get_submodule(name).weight
            assert torch.equal(q, q.round()) and int(q.abs().max()) <= 2**bits - 1  # integer codes, b-bit range
    # non-expanded tensors ride on M_1; the ⊕-sum equals the float model there, bitwise
    total, sd = state(abelian_sum(exp.bases())), model.state_dict()
    for key, t in total.items():
        if key not in ("0.weight", "5.weight"):
            assert torch.equal(t, sd[key]), key


def test_sum_of_basis_models_converges_geometrically():
    torch.manual_seed(0)
    model = tiny_model("resnet-basic")
    layers = expand_model(model, 3, 1).layers
    errors = []
    model.requires_grad_(False)
    for terms in range(1, 6):
        total = abelian_sum(expand_model(model, 3, terms).bases())
        num = sum(float((total.get_submodule(n).weight - model.get_submodule(n).weight).norm() ** 2) for n in layers)
        den = sum(float(model.get_submodule(n).weight.norm() ** 2) for n in layers)
        errors.append((num / den) ** 0.5)
    ratios = [errors[i + 1] / errors[i] for i in range(1, 4)]
    print("tiny ResNet W3 relative weight error by terms:", [f"{e:.2e}" for e in errors], "ratios", ratios)
    assert all(r <= 1.1 / (2**3 - 1) for r in ratios)  # closed-form contraction 1/(2^b-1), asym grid


# -- the layer-wise sum: exact evaluation through nonlinearities ---------------------------------


@pytest.mark.parametrize("name", ["resnet-bottleneck", "vit", "convnext", "mobilenet"])
def test_layerwise_sum_equals_parameter_sum(name):
    model = tiny_mobilenet() if name == "mobilenet" else tiny_model(name)
    exp = expand_model(model, 4, 3)
    bases = exp.bases()
    parallel = layerwise_sum(bases, exp.layers)
    assert any(isinstance(m, (StackedLinear, StackedConv2d)) for m in parallel.modules())
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = abelian_sum(bases)(pixel_values=x).logits
        got = parallel(pixel_values=x).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * float(want.abs().max()))


def test_layerwise_sum_of_enough_terms_gives_the_float_logits(digits, digits_checkpoint):
    from hf_ptq.quickstart import digits_image_processor

    x = digits_image_processor()(digits["test"][:64]["image"], return_tensors="pt")["pixel_values"]
    fp = AutoModelForImageClassification.from_pretrained(digits_checkpoint).eval()
    exp = expand_model(fp, 4, 5, modules_to_not_convert=[])
    with torch.no_grad():
        ref = fp(pixel_values=x).logits
        errs = {}
        for terms in (1, 3, 5):
            out = layerwise_sum(exp.bases(terms), exp.layers)(pixel_values=x).logits
            errs[terms] = float((out - ref).norm() / ref.norm())
    print("digits layer-wise sum of W4 basis models, relative logit error:", errs)
    assert errs[5] <= 1e-4 and errs[3] < errs[1]


def test_basis_models_match_the_stored_fpxint_terms(digits_checkpoint):
    fp = AutoModelForImageClassification.from_pretrained(digits_checkpoint).eval()
    exp = expand_model(fp, 3, 3)
    q = quantize_model(copy.deepcopy(fp), PTQConfig(method="fpxint", weight_bits=3, method_kwargs={"terms": 3}))
    qmods = quant_modules(q)
    assert set(qmods) == set(exp.layers)
    for k, basis in enumerate(exp.bases()):
        for name, qm in qmods.items():
            assert torch.equal(basis.get_submodule(name).weight, qm.dequantized_terms()[k]), (name, k)


# -- stacked layers: one batched op equals the naive loop over basis models ---------------------


class CountProducts(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.calls += func in (F.linear, F.conv2d, torch.bmm, torch.matmul)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("groups", [1, 2, 4])
def test_stacked_conv_equals_loop_over_basis_layers(groups):
    g = torch.Generator().manual_seed(groups)
    conv = nn.Conv2d(4, 8, 3, stride=2, padding=1, dilation=1, groups=groups)
    weights = torch.randn(3, *conv.weight.shape, generator=g)
    bias = torch.randn(8, generator=g)
    x = torch.randn(2, 4, 9, 9, generator=g)
    stacked = StackedConv2d(conv, weights, bias)
    counter = CountProducts()
    with torch.no_grad(), counter:
        got = stacked(x)
    want = sum(F.conv2d(x, w, None, conv.stride, conv.padding, conv.dilation, groups) for w in weights) + bias.reshape(1, -1, 1, 1)
    assert counter.calls == 1
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_stacked_linear_equals_loop_over_basis_layers():
    g = torch.Generator().manual_seed(0)
    weights, bias = torch.randn(4, 6, 5, generator=g), torch.randn(6, generator=g)
    x = torch.randn(2, 3, 5, generator=g)
    counter = CountProducts()
    with torch.no_grad(), counter:
        got = StackedLinear(weights, bias)(x)
    want = sum(x @ w.T for w in weights) + bias
    assert counter.calls == 1
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_expand_model_rejects_bad_arguments():
    m = small_model((1, 1, 2, 3), 0, "float")
    with pytest.raises(ValueError, match="bits=5"):
        expand_model(m, 5, 2)
    with pytest.raises(ValueError, match="terms=0"):
        expand_model(m, 4, 0)
