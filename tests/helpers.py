"""Shared test utilities: tolerance table, poisoned outputs, error bounds."""

from __future__ import annotations

import torch

# (rtol, atol) for a kernel against its eager reference computed in the same dtype.
TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float32: (1e-4, 1e-5),
    torch.float16: (1e-2, 2e-3),
    torch.bfloat16: (3e-2, 1e-2),
}

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# The interpreter cannot run bf16 tl.dot; bf16 is tested on the GPU only.
DTYPES = [torch.float32, torch.float16, torch.bfloat16] if DEVICE == "cuda" else [torch.float32, torch.float16]


def poisoned(shape: tuple[int, ...], dtype: torch.dtype, device: str | torch.device = DEVICE) -> torch.Tensor:
    """A NaN-filled buffer, so an element a kernel forgets to write fails the comparison."""
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in fp64; NaN anywhere gives inf."""
    out64, ref64 = out.double(), ref.double()
    if not torch.isfinite(out64).all():
        return float("inf")
    return ((out64 - ref64).norm() / ref64.norm().clamp_min(1e-30)).item()


def assert_lowp_bound(out: torch.Tensor, ref_fp32: torch.Tensor, eager_lowp: torch.Tensor, atol: float) -> None:
    """flash-attention's bound: max|out - ref32| <= 2 * max|eager_lowp - ref32| + atol."""
    ref = ref_fp32.double()
    assert torch.isfinite(out).all(), "output holds NaN or inf"
    ours = (out.double() - ref).abs().max().item()
    theirs = (eager_lowp.double() - ref).abs().max().item()
    assert ours <= 2 * theirs + atol, f"max error {ours:.3e} exceeds 2 * {theirs:.3e} + {atol:.1e}"


def triton_calls() -> dict[str, int]:
    """Calls that reached each op's Triton launcher (plan built or plan hit): the kernels' own observable."""
    from vitriton.kernels import attention, layernorm, linear, qkv

    return {m.PLANS.name: m.PLANS.builds + m.PLANS.hits for m in (attention, layernorm, linear, qkv)}
