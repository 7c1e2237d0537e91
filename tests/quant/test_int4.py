"""Packed 4-bit weights: the pack/unpack format and `Int4Linear` (W4A8 on ``torch._int_mm``) against the
simulation."""

from __future__ import annotations

import copy

import pytest
import torch

from diffcache.kernels import Int4Linear, IntMMLinear, int4_supports, pack_int4, unpack_int4
from diffcache.kernels.int8 import weight_codes
from diffcache.quant.quantizers import act_params, fake_quant_act, fake_quant_weight, weight_scales


@pytest.mark.parametrize("shape", [(16,), (7,), (1,), (0,), (5, 3), (24, 16, 3, 3), (48, 64)])
def test_pack_int4_round_trips_exactly_in_half_the_bytes(shape):
    torch.manual_seed(0)
    codes = torch.randint(-8, 8, shape)
    packed = pack_int4(codes)
    assert packed.dtype == torch.uint8 and packed.dim() == 1
    assert packed.numel() == (codes.numel() + 1) // 2
    unpacked = unpack_int4(packed, shape)
    assert unpacked.dtype == torch.int8 and unpacked.shape == codes.shape
    assert torch.equal(unpacked.long(), codes)


def test_pack_int4_holds_every_code_and_takes_float_codes():
    codes = torch.arange(-8, 8).repeat(3)  # each value in both nibbles
    assert torch.equal(unpack_int4(pack_int4(codes), codes.shape).long(), codes)
    as_floats = codes.float().view(6, 8)
    assert torch.equal(pack_int4(as_floats), pack_int4(codes))
    # the format (saved files depend on it): byte i = code i (low nibble) and code i + ceil(n/2) (high nibble)
    assert pack_int4(torch.tensor([1, -1, -8, 7, 3])).tolist() == [0x71, 0x3F, 0x08]


@pytest.mark.parametrize("codes", [torch.tensor([8]), torch.tensor([-9]), torch.tensor([0.5])])
def test_pack_int4_refuses_what_it_cannot_hold(codes):
    with pytest.raises(ValueError):
        pack_int4(codes)


def test_unpack_int4_checks_the_shape():
    with pytest.raises(ValueError, match="cannot hold"):
        unpack_int4(pack_int4(torch.zeros(10)), (4, 4))


def _simulated(module: torch.nn.Module, x: torch.Tensor, w_scale: torch.Tensor, x_scale: torch.Tensor,
               x_zero: torch.Tensor, act_bits: int = 8) -> torch.Tensor:
    """diffcache's W4A``act_bits`` simulation of ``module`` (in float32, whatever its dtype)."""
    weight, bias = module.weight.float(), module.bias.float()
    return torch.nn.functional.linear(fake_quant_act(x.float(), x_scale, x_zero, act_bits),
                                      fake_quant_weight(weight, w_scale, 4), bias)


@pytest.mark.parametrize("rows", [5, 600])  # _int_mm pads under 17 rows
def test_int4_linear_matches_the_simulation(rows):
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 48)
    x = torch.randn(rows, 64) * 2 + 1
    w_scale = weight_scales(linear.weight, 4, "mse")
    kernel = Int4Linear(linear.weight, w_scale, linear.bias)
    # bf16 models get bf16 out of the integers of their bf16 weights and inputs (a 4-bit code of a bf16-rounded
    # weight can differ by one step, so they are compared with their own simulation)
    rounded = copy.deepcopy(linear).to(torch.bfloat16)
    low_precision = Int4Linear(rounded.weight, w_scale, rounded.bias)
    for low, high in ((x.min(), x.max()), (x.min() / 2, x.max() * 3)):  # one packed weight, any step's range
        x_scale, x_zero = act_params(low, high)
        simulated = _simulated(linear, x, w_scale, x_scale, x_zero)
        real = kernel(x, x_scale, x_zero)
        assert real.shape == simulated.shape and real.dtype == torch.float32
        assert (real - simulated).abs().max() < 1e-5 * simulated.abs().max()  # same integers, float rounding only
        # bit for bit what the int8 _int_mm kernel gives for the same 4-bit values held unpacked
        assert torch.equal(real, IntMMLinear(linear.weight, w_scale, linear.bias, 4)(x, x_scale, x_zero))
        out = low_precision(x.to(torch.bfloat16), x_scale, x_zero)
        assert out.dtype == torch.bfloat16
        expected = _simulated(rounded, x.to(torch.bfloat16), w_scale, x_scale, x_zero)
        assert (out.float() - expected).abs().max() < 1e-2 * expected.abs().max()  # the output's bf16 rounding


def test_int4_linear_keeps_its_weight_packed():
    torch.manual_seed(0)
    linear = torch.nn.Linear(96, 80)
    w_scale = weight_scales(linear.weight, 4, "minmax")
    kernel = Int4Linear(linear.weight, w_scale, linear.bias)
    numel = linear.weight.numel()
    assert not hasattr(kernel, "qweight")  # no int8 copy kept
    assert kernel.packed.dtype == torch.uint8 and kernel.packed.numel() == numel // 2
    assert numel / 2 < kernel.nbytes <= numel / 2 + 8 * linear.out_features  # + fp32 scales and int32 row sums
    assert torch.equal(unpack_int4(kernel.packed, linear.weight.shape), weight_codes(linear.weight, w_scale, 4).to(
        torch.int8))


def test_int4_linear_runs_4_bit_activations_and_learned_rounding():
    torch.manual_seed(0)
    linear = torch.nn.Linear(32, 16)
    x = torch.randn(2, 7, 32)
    w_scale = weight_scales(linear.weight, 4, "mse")
    x_scale, x_zero = act_params(x.min() / 2, x.max() / 2, 4)  # a clipped 4-bit range: the clamp matters
    kernel = Int4Linear(linear.weight, w_scale, linear.bias, act_bits=4)
    simulated = _simulated(linear, x, w_scale, x_scale, x_zero, act_bits=4)
    assert (kernel(x, x_scale, x_zero) - simulated).abs().max() < 1e-5 * simulated.abs().max()
    up = torch.randint(0, 2, linear.weight.shape).float()
    rounded = Int4Linear(linear.weight, w_scale, linear.bias, up=up)
    assert torch.equal(unpack_int4(rounded.packed, linear.weight.shape),
                       weight_codes(linear.weight, w_scale, 4, up).to(torch.int8))


def test_int4_linear_refuses_8_bit_weights_and_says_what_it_runs():
    linear = torch.nn.Linear(8, 8)
    with pytest.raises(ValueError, match="int8 kernels"):
        Int4Linear(linear.weight, torch.ones(8), None, bits=8)
    assert int4_supports(linear) and int4_supports(linear.to(torch.bfloat16))
    assert not int4_supports(torch.nn.Conv2d(4, 4, 3))


def test_int4_linear_compiles_to_the_same_numbers():
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 48)
    x = torch.randn(40, 64)
    w_scale = weight_scales(linear.weight, 4, "mse")
    x_scale, x_zero = act_params(x.min(), x.max())
    kernel = Int4Linear(linear.weight, w_scale, linear.bias)
    compiled = torch.compile(lambda x, x_scale, x_zero: kernel(x, x_scale, x_zero), fullgraph=True)
    with torch.no_grad():
        assert (compiled(x, x_scale, x_zero) - kernel(x, x_scale, x_zero)).abs().max() < 1e-5
