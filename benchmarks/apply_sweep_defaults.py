"""Copy the defaults that `sweep_kernels.py rmsnorm` printed (its "as defaults" block) into
triton_kernels/rmsnorm.py, so that one GPU call can sweep, adopt the winners and benchmark them.

    python benchmarks/sweep_kernels.py rmsnorm --out $OUT | tee sweep.log
    python benchmarks/apply_sweep_defaults.py sweep.log      # prints what it changed
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

KERNELS = Path(__file__).resolve().parent.parent / "triton_kernels" / "rmsnorm.py"
NAMES = ("BWD_WIDE_TILES", "BWD_STAGES", "BWD_PROGRAMS_PER_SM", "BWD_DW_REDUCE", "BWD_FROZEN_PERSISTENT")


def defaults_from_log(text: str) -> dict[str, str]:
    block = text.split("as defaults", 1)[1] if "as defaults" in text else ""
    found = {}
    for line in block.splitlines()[1:]:
        match = re.match(r"\s+([A-Z_]+) = (.+?)(\s{2,}\(.*)?$", line)
        if not match or match.group(1) not in NAMES:
            break
        found[match.group(1)] = match.group(2).strip()
    return found


def main() -> None:
    found = defaults_from_log(Path(sys.argv[1]).read_text())
    if not found:
        sys.exit("no 'as defaults' block in the log: nothing changed")
    source = KERNELS.read_text()
    for name, value in found.items():
        source, count = re.subn(rf"^{name} = .*$", f"{name} = {value}  # from the sweep (sweep_kernels.py rmsnorm)",
                                source, count=1, flags=re.M)  # fmt: skip
        print(f"{name} = {value}" + ("" if count else "   (not found in rmsnorm.py: skipped)"))
    KERNELS.write_text(source)


if __name__ == "__main__":
    main()
