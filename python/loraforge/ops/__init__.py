"""torch.library ops, one file per op family. Importing this package registers them all.

Each op has a pure-torch reference (its definition), a CPU kernel and a CUDA kernel. Code above
ops/ calls the ops (torch.ops.loraforge.*) or the thin functions exported here, never `_core`.
"""

from loraforge.ops import nf4  # noqa: F401  (registers loraforge::nf4_*)
from loraforge.ops import cross_entropy  # noqa: F401  (registers loraforge::cross_entropy*)
from loraforge.ops import fused_linear_cross_entropy  # noqa: F401  (registers loraforge::fused_linear_cross_entropy)
from loraforge.ops import rmsnorm  # noqa: F401  (registers loraforge::rms_norm, rms_norm_backward)
from loraforge.ops import rope  # noqa: F401  (registers loraforge::rope, rope_backward, rope_)
from loraforge.ops import swiglu  # noqa: F401  (registers loraforge::gated_activation, gated_activation_backward[_])
