"""One torch.library namespace, `loraforge`, and a helper that declares an op the same way each time:
schema once, a pure-torch reference as the catch-all kernel, a CPU and a CUDA kernel, and a fake
(meta) kernel so torch.compile sees the op as one opaque node.

We register through `torch.library.Library` rather than `torch.library.custom_op`: the call goes
through torch's C++ dispatcher straight to our Python kernel, about 2.5 us a call against ~10 us,
which matters for ops called per layer per step.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

LIB = torch.library.Library("loraforge", "DEF")


def define_op(
    schema: str,
    *,
    reference: Callable,
    cpu: Callable | None,
    cuda: Callable | None,
    fake: Callable,
    backward: Callable | None = None,
    setup_context: Callable | None = None,
) -> Callable:
    """Declare loraforge::<schema> and return its OpOverloadPacket (torch.ops.loraforge.<name>).

    With `backward` and `setup_context`, autograd is registered on the op itself
    (torch.library.register_autograd), so it differentiates the same way eager and compiled.
    The backward may itself call other loraforge ops (e.g. a `<name>_backward` op).
    """
    name = LIB.define(schema)
    LIB.impl(name, reference, "CompositeExplicitAutograd")
    if cpu is not None:
        LIB.impl(name, cpu, "CPU")
    if cuda is not None:
        LIB.impl(name, cuda, "CUDA")
    torch.library.register_fake(f"loraforge::{name}", fake, lib=LIB)
    if backward is not None:
        torch.library.register_autograd(f"loraforge::{name}", backward, setup_context=setup_context, lib=LIB)
    return getattr(torch.ops.loraforge, name)
