"""FP=xINT: tensor-level convergence, layer-level batched forward, accuracy and storage.

Every check compares against something computed here independently of hf_ptq's code paths: the
closed-form contraction bound, the float model's logits, dequantization and activation
expansion written out in the test, or a naive Python loop over (weight term, activation term) pairs.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn
from torch.overrides import TorchFunctionMode
from transformers import AutoModelForImageClassification

import hf_ptq
from hf_ptq import PTQConfig, quantize_model
from hf_ptq.methods import get_method
from hf_ptq.methods.fpxint import effective_act_bits, effective_bits
from hf_ptq.quant.expanded import pair_outputs
from hf_ptq.quant.replace import quant_modules
from hf_ptq.quant.series import residual_expand


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: on 2 shared cores a second torch thread only adds OpenMP contention (30x slower here)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

# -- helpers written independently of hf_ptq --------------------------------------------------


def rho(bits: int, symmetric: bool) -> float:
    """Closed-form max-norm contraction per term: |R_k| <= s_k/2 with s_k = range / #steps."""
    return 1.0 / (2**bits - 2) if symmetric else 1.0 / (2**bits - 1)


def terms_by_hand(codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:
    """``scale * (code - zero_point)`` per term and channel, in float64: ``[K, C_or_1, n]``."""
    k, c = codes.shape[0], codes.shape[1]
    q = codes.reshape(k, c, -1).double()
    return (q - zero_point.reshape(k, -1, 1).double()) * scale.reshape(k, -1, 1).double()


def act_terms_by_hand(rows: torch.Tensor, bits: int, terms: int, symmetric: bool) -> list[torch.Tensor]:
    """Per-row residual expansion of activations, spelled out (min-max grid containing 0)."""
    r, out = rows.float().reshape(rows.shape[0], -1), []
    for _ in range(terms):
        lo = torch.minimum(r.amin(1), torch.zeros(()))
        hi = torch.maximum(r.amax(1), torch.zeros(()))
        if symmetric:
            s = (torch.maximum(-lo, hi) / (2 ** (bits - 1) - 1)).clamp_min(1e-8)
            z = torch.full_like(s, 2 ** (bits - 1))
            qmin = 1
        else:
            s = ((hi - lo) / (2**bits - 1)).clamp_min(1e-8)
            z = torch.round(-lo / s).clamp(0, 2**bits - 1)
            qmin = 0
        q = torch.clamp(torch.round(r / s[:, None]) + z[:, None], qmin, 2**bits - 1)
        a = (q - z[:, None]) * s[:, None]
        out.append(a.reshape(rows.shape))
        r = r - a
    return out


def weight_terms_by_hand(qmodule) -> list[torch.Tensor]:
    qw = qmodule.quantized_weight()
    codes = qw.codes if qw.scheme.terms > 1 else qw.codes.unsqueeze(0)
    k = codes.shape[0]
    vals = terms_by_hand(codes, qw.scale.reshape(k, -1), qw.zero_point.reshape(k, -1)).float()
    return [v.reshape(codes.shape[1:]) for v in vals]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def digits_batch(digits, checkpoint, n: int = 64) -> torch.Tensor:
    from hf_ptq.quickstart import digits_image_processor

    images = digits["test"][:n]["image"]
    return digits_image_processor()(images, return_tensors="pt")["pixel_values"]


# -- tensor level: geometric convergence ---------------------------------------------------------


def measured_rate(w: torch.Tensor, bits: int, symmetric: bool, terms: int = 4) -> tuple[float, list[float]]:
    """Check the per-channel max-norm contraction; return the Frobenius rate over terms 2..K."""
    s = residual_expand(w, bits, terms, symmetric, "channel")
    assert s.codes.dtype == torch.int32 and int(s.codes.min()) >= 0 and int(s.codes.max()) <= 2**bits - 1
    w64 = w.double().reshape(w.shape[0], -1)
    residuals = w64.unsqueeze(0) - terms_by_hand(s.codes, s.scale, s.zero_point).cumsum(0)  # [K, C, n]
    prev = w64.abs().amax(1)
    slack = 1e-6 * prev  # fp32 rounding of the code's own residual (~eps * |W|), not a fudge on rho
    for k in range(terms):
        cur = residuals[k].abs().amax(1)
        assert bool((cur <= rho(bits, symmetric) * prev + slack).all()), f"term {k + 1}: max-norm bound violated"
        prev = cur
    norms = [float(w64.norm())] + [float(r.norm()) for r in residuals]
    rate = (norms[-1] / norms[1]) ** (1.0 / (terms - 1))
    return rate, [norms[i + 1] / norms[i] for i in range(terms)]


def random_weights() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "gaussian linear 256x512": torch.randn(256, 512, generator=g) * 0.02,
        "gaussian conv 64x32x3x3": torch.randn(64, 32, 3, 3, generator=g) * 0.05,
        "shifted uniform 128x300": torch.rand(128, 300, generator=g) - 0.3,
    }


@pytest.mark.parametrize("symmetric", [False, True], ids=["asym", "sym"])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_residual_shrinks_geometrically_on_random_weights(bits, symmetric):
    for name, w in random_weights().items():
        rate, ratios = measured_rate(w, bits, symmetric)
        print(f"random {name} W{bits} {'sym' if symmetric else 'asym'}: rate {rate:.4f} "
              f"(closed form {rho(bits, symmetric):.4f}, 2^-(b-1)={2 ** -(bits - 1):.4f}), per-term {[round(r, 4) for r in ratios]}")
        # Frobenius rate: within 10 % of the max-norm closed form (exact bound: checked per channel)
        assert rate <= 1.1 * 2 ** -(bits - 1)
        assert 0.9 * rho(bits, symmetric) <= rate <= 1.1 * rho(bits, symmetric)


@pytest.mark.parametrize("symmetric", [False, True], ids=["asym", "sym"])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_residual_shrinks_geometrically_on_trained_resnet_weights(digits_checkpoint, bits, symmetric):
    state = load_file(str(digits_checkpoint / "model.safetensors"))
    weights = {k: v for k, v in state.items() if k.endswith(".weight") and v.dim() in (2, 4)}
    assert len(weights) >= 8
    rates = {}
    for name, w in weights.items():
        rates[name], _ = measured_rate(w, bits, symmetric)
    lo, hi = min(rates.values()), max(rates.values())
    print(f"digits ResNet W{bits} {'sym' if symmetric else 'asym'}: {len(rates)} layers, rate {lo:.4f}..{hi:.4f} "
          f"(closed form {rho(bits, symmetric):.4f}, 2^-(b-1)={2 ** -(bits - 1):.4f})")
    assert hi <= 1.1 * 2 ** -(bits - 1)
    assert 0.9 * rho(bits, symmetric) <= lo and hi <= 1.1 * rho(bits, symmetric)


# -- layer level: batched terms == the naive sum over kept pairs -------------------------------


def fpxint_quantized(layer: nn.Module, **config) -> nn.Module:
    model = nn.Sequential(layer)
    quantize_model(model, PTQConfig(method="fpxint", modules_to_not_convert=[], **config))
    return model[0]


LAYERS = {
    "linear": (lambda: nn.Linear(40, 24), lambda g: torch.randn(2, 5, 40, generator=g)),
    "conv-groups2-stride2": (
        lambda: nn.Conv2d(8, 12, 3, stride=2, padding=1, groups=2),
        lambda g: torch.randn(3, 8, 9, 9, generator=g),
    ),
    "depthwise-dilated": (
        lambda: nn.Conv2d(6, 6, 3, padding=2, dilation=2, groups=6, bias=False),
        lambda g: torch.randn(2, 6, 7, 7, generator=g),
    ),
}
ORDERS = [(1, 1, None), (2, 1, None), (3, 2, None), (3, 3, 4), (2, 3, 4), (4, 2, 5)]


@pytest.mark.parametrize("terms,act_terms,max_order", ORDERS)
@pytest.mark.parametrize("kind", list(LAYERS))
def test_batched_terms_equal_naive_pair_loop(kind, terms, act_terms, max_order):
    make_layer, make_x = LAYERS[kind]
    torch.manual_seed(0)
    layer = make_layer()
    x = make_x(torch.Generator().manual_seed(1))
    q = fpxint_quantized(
        layer, weight_bits=3, act_bits=4, method_kwargs={"terms": terms, "act_terms": act_terms, "max_order": max_order}
    )
    assert q.scheme.act_dynamic and not hasattr(q, "input_scale")
    w_terms = weight_terms_by_hand(q)
    rows = x.reshape(-1, x.shape[-1]) if kind == "linear" else x
    a_terms = [a.reshape(x.shape) for a in act_terms_by_hand(rows, 4, act_terms, symmetric=False)]
    order = max_order if max_order is not None else terms + act_terms
    naive, pairs = torch.zeros(()), []
    layer.requires_grad_(False)
    for k in range(1, terms + 1):
        for j in range(1, act_terms + 1):
            if k + j > order:
                continue
            if kind == "linear":
                y = F.linear(a_terms[j - 1], w_terms[k - 1])
            else:
                y = F.conv2d(a_terms[j - 1], w_terms[k - 1], None, layer.stride, layer.padding, layer.dilation, layer.groups)
            pairs.append(y)
            naive = naive + y
    if layer.bias is not None:
        naive = naive + (layer.bias if kind == "linear" else layer.bias.reshape(1, -1, 1, 1))
    with torch.no_grad():
        out = q(x)
        per_pair = pair_outputs(q, x)
    scale = float(naive.abs().max())
    torch.testing.assert_close(out, naive, rtol=1e-5, atol=1e-5 * scale)
    assert per_pair.shape[0] == len(pairs)
    for got, want in zip(per_pair, pairs):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * scale)


class CountProducts(TorchFunctionMode):
    """Counts GEMM/conv calls made inside a forward."""

    OPS = {F.linear, F.conv2d, torch.bmm, torch.matmul, torch.mm, torch.Tensor.matmul, torch.Tensor.__matmul__}

    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.calls += func in self.OPS
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("kind", list(LAYERS))
def test_one_batched_product_whatever_the_number_of_terms(kind):
    make_layer, make_x = LAYERS[kind]
    x = make_x(torch.Generator().manual_seed(1))
    for terms, act_terms in [(1, 1), (2, 1), (4, 1), (2, 3), (4, 4)]:
        torch.manual_seed(0)
        q = fpxint_quantized(make_layer(), weight_bits=4, act_bits=8, method_kwargs={"terms": terms, "act_terms": act_terms})
        counter = CountProducts()
        with torch.no_grad(), counter:
            q(x)
        assert counter.calls == 1, f"terms={terms} act_terms={act_terms}: {counter.calls} product calls"


def test_weight_only_terms_equal_sum_of_dequantized_terms():
    torch.manual_seed(0)
    layer = nn.Linear(33, 17)
    q = fpxint_quantized(layer, weight_bits=2, method_kwargs={"terms": 3})
    assert not q.scheme.act_dynamic and q.weight_packed.shape[0] == 3 and q.weight_scale.shape == (3, 17)
    x = torch.randn(4, 33)
    want = F.linear(x, sum(weight_terms_by_hand(q)), layer.bias)
    torch.testing.assert_close(q(x), want, rtol=1e-5, atol=1e-6)


# -- model level: convergence to the float logits and accuracy without data --------------------


def test_logits_converge_to_float_model(digits, digits_checkpoint):
    x = digits_batch(digits, digits_checkpoint)
    fp = AutoModelForImageClassification.from_pretrained(digits_checkpoint).eval()
    with torch.no_grad():
        ref = fp(pixel_values=x).logits
    errors = {}
    for terms in range(1, 6):
        config = PTQConfig(method="fpxint", weight_bits=4, modules_to_not_convert=[], method_kwargs={"terms": terms})
        q = quantize_model(copy.deepcopy(fp), config)
        with torch.no_grad():
            errors[terms] = rel(q(pixel_values=x).logits, ref)
    config = PTQConfig(
        method="fpxint", weight_bits=4, act_bits=8, modules_to_not_convert=[], method_kwargs={"terms": 5, "act_terms": 3}
    )
    q = quantize_model(copy.deepcopy(fp), config)
    with torch.no_grad():
        with_acts = rel(q(pixel_values=x).logits, ref)
    print("relative logit error vs FP, W4 terms 1..5:", {k: f"{v:.2e}" for k, v in errors.items()},
          f"| W4x5 A8x3: {with_acts:.2e}")
    assert errors[5] <= 1e-4 and with_acts <= 1e-4
    assert all(errors[k + 1] < errors[k] for k in range(1, 5))


def test_w4_two_terms_matches_float_accuracy_without_calibration(digits, digits_checkpoint):
    fp = AutoModelForImageClassification.from_pretrained(digits_checkpoint)
    fp_top1 = hf_ptq.evaluate_model(fp, digits["test"])["top1"]
    config = PTQConfig(method="fpxint", weight_bits=4, method_kwargs={"terms": 2})
    assert config.calibration is None
    q = AutoModelForImageClassification.from_pretrained(digits_checkpoint, quantization_config=config)
    q_top1 = hf_ptq.evaluate_model(q, digits["test"])["top1"]
    report = q.hf_ptq_report
    print(f"digits: FP top-1 {100 * fp_top1:.2f} %, FP=xINT W4x2 (effective {report['effective_bits']} bits, "
          f"no calibration) {100 * q_top1:.2f} %, drop {100 * (fp_top1 - q_top1):+.2f} pt")
    assert report["effective_bits"] == 8 and report["terms"] == 2
    assert q.config.quantization_config.method_kwargs["effective_bits"] == 8
    assert all(m.scheme.terms == 2 and m.scheme.bits == 4 for m in quant_modules(q).values())
    assert 100 * (fp_top1 - q_top1) <= 0.1


# -- storage: save -> reload bitwise ---------------------------------------------------------


@pytest.mark.parametrize(
    "config",
    [
        dict(weight_bits=8, weight_granularity="tensor", method_kwargs={"terms": 3}),
        dict(weight_bits=3, weight_symmetric=True, act_bits=4, method_kwargs={"terms": 2, "act_terms": 2, "max_order": 3}),
    ],
    ids=["w8x3-tensor-int8", "w3x2-sym-a4x2-order3-int32"],
)
def test_save_reload_is_bitwise(tmp_path, digits, digits_checkpoint, config):
    x = digits_batch(digits, digits_checkpoint)
    q = AutoModelForImageClassification.from_pretrained(
        digits_checkpoint, quantization_config=PTQConfig(method="fpxint", **config)
    )
    q.save_pretrained(tmp_path)
    back = AutoModelForImageClassification.from_pretrained(tmp_path)
    sd, sd_back = q.state_dict(), back.state_dict()
    assert sd.keys() == sd_back.keys()
    for key, t in sd.items():
        assert t.dtype == sd_back[key].dtype and torch.equal(t, sd_back[key]), key
    schemes = {n: m.scheme for n, m in quant_modules(q).items()}
    assert schemes == {n: m.scheme for n, m in quant_modules(back).items()}
    terms = config["method_kwargs"]["terms"]
    for m in quant_modules(back).values():
        assert m.weight_packed.shape[0] == terms and m.weight_scale.shape[0] == terms
    with torch.no_grad():
        assert torch.equal(q(pixel_values=x).logits, back(pixel_values=x).logits)
    assert back.config.quantization_config.method_kwargs == q.config.quantization_config.method_kwargs


# -- config ----------------------------------------------------------------------------------


def test_activation_expansion_needs_no_calibration():
    config = PTQConfig(method="fpxint", weight_bits=4, act_bits=4, method_kwargs={"act_terms": 2})
    assert config.calibration is None
    assert get_method("fpxint").requires_calibration(config) is False
    assert get_method("fpxint").input_mode == "none"
    assert config.method_kwargs == {
        "terms": 2, "act_terms": 2, "max_order": None, "effective_bits": 8, "effective_act_bits": 8
    }


def test_effective_bits_helpers():
    assert effective_bits(PTQConfig(method="fpxint", weight_bits=3, method_kwargs={"terms": 4})) == 12
    assert effective_bits(PTQConfig(method="fpxint", weight_bits=4)) == 8  # default terms = 2
    assert effective_bits(PTQConfig(method="rtn", weight_bits=4)) == 4
    assert effective_act_bits(PTQConfig(method="fpxint", act_bits=4, method_kwargs={"act_terms": 3})) == 12
    assert effective_act_bits(PTQConfig(method="fpxint")) is None


@pytest.mark.parametrize(
    "kwargs,needle",
    [
        (dict(method_kwargs={"terms": 0}), "`terms`: 0"),
        (dict(method_kwargs={"terms": 17}), "`terms`: 17"),
        (dict(method_kwargs={"terms": "2"}), "`terms`: '2'"),
        (dict(method_kwargs={"bits": 4}), "unknown argument `bits`"),
        (dict(method_kwargs={"act_terms": 2}), "`act_terms`: 2. Allowed values: 1 when act_bits is None"),
        (dict(act_bits=8, method_kwargs={"terms": 3, "act_terms": 2, "max_order": 3}), "`max_order`: 3. Allowed values: None (keep all pairs) or an integer in [4, 5]"),
        (dict(act_bits=8, method_kwargs={"max_order": 9}), "`max_order`: 9"),
        (dict(weight_observer="mse"), "`weight_observer`: 'mse'"),
        (dict(weight_bits=4, method_kwargs={"terms": 2, "effective_bits": 4}), "`effective_bits`: 4. It is derived (bits × terms); allowed values: None or 8"),
    ],
)
def test_bad_kwargs_raise_value_error_naming_field_value_and_allowed(kwargs, needle):
    with pytest.raises(ValueError) as err:
        PTQConfig(method="fpxint", **kwargs)
    assert needle in str(err.value)

