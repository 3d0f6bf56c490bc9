"""Launch plans (``vitriton/kernels/_launch.py``): built on a signature's first call, replayed after it.

A plan hit must not validate again nor go back through triton's launch path; a change of signature (shape,
strides, alignment, flags) must build a new plan; results from the plan must equal the first call's path.
"""

from __future__ import annotations

import contextvars

import pytest
import torch
import triton

from tests.helpers import DEVICE
from vitriton.kernels import _launch, attention, layernorm, linear, qkv


def _fail(*args, **kwargs):
    raise AssertionError("a plan hit validated or planned again")


def _cases():
    generator = torch.Generator(device=DEVICE).manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=generator, device=DEVICE)

    x, w, b = randn(2, 7, 40), randn(72, 40), randn(72)
    w_qkv, b_qkv = randn(3 * 2 * 24, 40), randn(3 * 2 * 24)
    ln_w, ln_b = randn(40), randn(40)
    q = randn(2, 3, 19, 24)
    mask = torch.ones(2, 19, dtype=torch.bool, device=DEVICE)
    mask[1, 15:] = False
    return {
        "linear": (
            linear,
            ["check_operands", "check_activation"],
            lambda x=x: linear.linear_triton(x, w, b, "quick_gelu"),
            lambda x=x: linear.linear_reference(x, w, b, "quick_gelu"),
            x,
        ),
        "qkv": (
            qkv,
            ["check_operands", "check_qkv_shapes"],
            lambda x=x: qkv.qkv_projection_triton(x, w_qkv, b_qkv, 2),
            lambda x=x: torch.stack(qkv.qkv_projection_reference(x, w_qkv, b_qkv, 2)),
            x,
        ),
        "layer_norm": (
            layernorm,
            ["check_layer_norm_inputs"],
            lambda x=x: torch.stack(layernorm.layer_norm_triton(x, ln_w, ln_b, 1e-5, x.roll(1, -1))),
            lambda x=x: torch.stack(layernorm.layer_norm_reference(x, ln_w, ln_b, 1e-5, x.roll(1, -1))),
            x,
        ),
        "attention": (
            attention,
            ["check_attention_shapes", "pick_config"],
            lambda q=q: attention.attention_triton(
                q, q.roll(1, -2), q.flip(-1), causal=True, key_padding_mask=mask[: len(q)]
            ),
            lambda q=q: attention.attention_reference(
                q, q.roll(1, -2), q.flip(-1), causal=True, key_padding_mask=mask[: len(q)]
            ),
            q,
        ),
    }


@pytest.mark.parametrize("op", ["linear", "qkv", "layer_norm", "attention"])
def test_plan_is_built_once_then_replayed(op, monkeypatch):
    module, checks, run, reference, varying = _cases()[op]
    module.PLANS.clear()
    first = run()
    assert (module.PLANS.builds, module.PLANS.hits) == (1, 0)
    for name in [*checks, "first_launch"]:
        monkeypatch.setattr(module, name, _fail)
    varying.normal_()  # same signature, new values: the plan's launch must read them
    second = run()
    monkeypatch.undo()
    assert (module.PLANS.builds, module.PLANS.hits) == (1, 1)
    torch.testing.assert_close(second, reference(), rtol=1e-4, atol=1e-4)
    assert not torch.equal(first, second)


@pytest.mark.parametrize("tma", [False, True], ids=["plain", "tma"])
def test_plans_hold_no_tensor_and_serve_every_weight_of_a_shape(tma):
    """Two weights of one shape share a plan (one per op and shape for a whole model), and a dropped weight is
    freed: the plan keeps no reference to it (nor, on the TMA path, to its descriptor's base)."""
    import gc
    import weakref

    dtype = torch.float16 if tma else torch.float32
    generator = torch.Generator(device=DEVICE).manual_seed(3)
    x = torch.randn(7, 64, generator=generator, device=DEVICE).to(dtype)
    weights = [torch.randn(72, 64, generator=generator, device=DEVICE).to(dtype) for _ in range(2)]
    linear.PLANS.clear()
    outs = [linear.linear_triton(x, w, None, "gelu", tma=tma) for w in weights]
    assert (linear.PLANS.builds, linear.PLANS.hits) == (1, 1)
    for i in range(2):
        torch.testing.assert_close(outs[i], linear.linear_reference(x, weights[i], None, "gelu"), rtol=1e-2, atol=1e-2)
    dropped = weakref.ref(weights.pop())
    gc.collect()
    assert dropped() is None


@pytest.mark.parametrize("op", ["linear", "qkv", "layer_norm", "attention"])
def test_new_signature_builds_a_new_plan(op):
    module, _, run, reference, varying = _cases()[op]
    module.PLANS.clear()
    run()
    narrower = varying[:1].clone()  # another batch size
    torch.testing.assert_close(run(narrower), reference(narrower), rtol=1e-4, atol=1e-4)
    assert module.PLANS.builds == 2
    offset = torch.empty(varying.numel() + 1, device=DEVICE)[1:].view(varying.shape).copy_(varying)
    # 4-byte aligned only. The reference reads an aligned copy: on an H200 (torch 2.11) an fp32 q or k 4 bytes off
    # alignment faulted (misaligned address) where torch's SDPA, the reference, read it too; bf16 inputs, which the
    # reference reads through an fp32 copy, did not, and our kernel's PTX for the case loads 4 bytes at a time.
    torch.testing.assert_close(run(offset), reference(offset.clone()), rtol=1e-4, atol=1e-4)
    assert module.PLANS.builds == 3


def test_scratch_allocator_is_lent_only_where_none_is_set():
    """A first launch lends triton torch's allocator for the call alone, and keeps a user's own allocator."""
    from triton.runtime import _allocation

    def user_allocator(size, alignment, stream):
        return torch.empty(size, dtype=torch.int8)

    def check():
        assert isinstance(_allocation._allocator.get(), _allocation.NullAllocator)
        with _launch.scratch_allocator():
            assert _allocation._allocator.get() is _launch._torch_scratch
        assert isinstance(_allocation._allocator.get(), _allocation.NullAllocator)
        triton.set_allocator(user_allocator)
        with _launch.scratch_allocator():
            assert _allocation._allocator.get() is user_allocator
        assert _allocation._allocator.get() is user_allocator

    contextvars.copy_context().run(check)  # set_allocator stays inside this context


def _triton_descriptor_wrapper():
    """triton 3.4-3.6's ``wrap_handle_tensordesc`` and its module, or a skip where this triton has another."""
    driver_module = pytest.importorskip("triton.backends.nvidia.driver")
    wrap = getattr(driver_module, "wrap_handle_tensordesc", None)
    encode = getattr(driver_module, "make_tensordesc_arg", None)
    if wrap is None or encode is None or encode.__code__.co_argcount != 2:
        pytest.skip("this triton wraps its launcher in another way; plans keep its launch as it is")
    return driver_module, wrap


def test_plan_encodes_each_descriptor_once_as_triton_would(monkeypatch):
    """A plan hands the C launch the arguments triton's own wrapper would, descriptors encoded (``Plan.expand``),
    and encodes a descriptor again only for a new address. Runs without a GPU: the encoder is stubbed."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    driver_module, wrap = _triton_descriptor_wrapper()
    encodings = []

    def encode(descriptor, meta):  # stands in for the CUtensorMap fill, which needs the CUDA driver
        encodings.append(descriptor.base.data_ptr())
        return [("tensor map", descriptor.base.data_ptr(), meta["swizzle"]), *descriptor.shape, *descriptor.strides]

    monkeypatch.setattr(driver_module, "make_tensordesc_arg", encode)
    signature = {"x": "tensordesc<bf16[64, 64]>", "w": "tensordesc<bf16[128, 64]>", "bias": "*bf16"}
    signature |= {"out": "tensordesc<bf16[64, 64]>", "M": "i32", "BLOCK": "constexpr"}
    metas = [{"swizzle": index} for index in range(3)]
    received = []
    wrapped = wrap(lambda *args: received.append(args), signature, metas)
    launch, slots, _ = _launch.descriptor_slots(wrapped)
    assert [index for index, _ in slots] == [0, 1, 3]
    assert _launch.descriptor_slots(lambda *args: None) is None  # no wrapper: the launch runs as it is

    plan = _launch.Plan.__new__(_launch.Plan)
    plan.descriptors, plan.encoded = _launch.descriptor_slots(wrapped), {}
    x, w, out = torch.zeros(100, 64), torch.zeros(256, 64), torch.zeros(100, 256)

    def described(t):
        return TensorDescriptor(t, list(t.shape), [t.stride(0), 1], [64, 64])

    base = tuple(range(13))  # grid, stream, function, flags, scratch, metadata and hooks: passed through as they are
    full = (described(x), described(w), "bias", described(out), 100, 64)
    wrapped(*base, *full)
    launch(*base, *plan.expand(full))
    assert received[0] == received[1]
    assert len(encodings) == 6
    plan.expand(full)
    assert len(encodings) == 6  # every (argument, address) seen: nothing encoded again
    other = torch.zeros(100, 64)
    plan.expand((described(other), *full[1:]))
    assert encodings[6:] == [other.data_ptr()]  # a new activation buffer: only it
