"""precision=auto: bf16 only where it is faster, said in one line; explicit choices pass through."""

from __future__ import annotations

import pytest
import torch

from unclip.errors import ConfigError
from unclip.precision import (
    CPU_BF16_MARGIN,
    choose_cpu_precision,
    matmul_gflops,
    resolve_precision,
    sampling_precision,
)

X86 = {"sse2", "avx2", "fma"}


@pytest.mark.parametrize(
    ("fp32", "bf16", "flags", "expected"),
    [
        (71.0, 0.7, X86, "no"),  # this CI's kind of host: bf16 emulated
        (128.0, 327.0, X86 | {"avx512_bf16", "amx_bf16"}, "bf16"),  # a host with AMX
        (128.0, 327.0, X86, "no"),  # a fast bf16 reading without the x86 instructions is not trusted
        (100.0, 100.0 * CPU_BF16_MARGIN * 0.99, X86 | {"avx512_bf16"}, "no"),  # not faster by the margin
        (50.0, 150.0, {"fp", "asimd", "bf16"}, "bf16"),  # an ARM host: the measurement decides
    ],
)
def test_cpu_choice_needs_a_measured_speed_up(fp32, bf16, flags, expected):
    choice = choose_cpu_precision(fp32, bf16, flags)
    assert choice.precision == expected
    assert f"{bf16:.1f} GFLOP/s" in choice.reason and f"{fp32:.1f} GFLOP/s" in choice.reason


def test_explicit_choices_pass_through_and_typos_are_named():
    for name in ("no", "bf16", "fp16"):
        assert resolve_precision(name, "cpu").precision == name
    with pytest.raises(ConfigError, match=r"trainer.precision='fp8' must be one of \['auto', 'no'"):
        resolve_precision("fp8", "cpu", "trainer.precision")


def test_auto_on_this_cpu_measures_and_says_why():
    choice = resolve_precision("auto", "cpu")
    assert choice.precision in ("no", "bf16")
    assert choice.reason.startswith(f"precision=auto chose {choice.precision}: ")
    assert "GFLOP/s" in choice.reason
    assert resolve_precision("auto", torch.device("cpu")) == choice  # measured once per process
    assert matmul_gflops(torch.device("cpu"), torch.float32, 64, 0.0) > 0


def test_sampling_precision_autocasts_the_networks_only():
    layer = torch.nn.Linear(8, 8)
    x = torch.randn(2, 8)
    with sampling_precision("cpu", "bf16") as choice:
        assert choice.precision == "bf16" and layer(x).dtype == torch.bfloat16
        assert (x * 2).dtype == torch.float32
    with sampling_precision("cpu", "no"):
        assert layer(x).dtype == torch.float32
