"""benchmarks/memory_at_peak.py's trace replay: the blocks alive at the peak, grouped by call site."""

from benchmarks.memory_at_peak import alive_at_peak


def _frames(file, line, name):
    return [{"filename": "/x/site-packages/torch/nn/functional.py", "line": 1, "name": "linear"},
            {"filename": f"/repo/python/{file}", "line": line, "name": name}]  # fmt: skip


def test_alive_at_peak_replays_allocations_and_frees():
    a = _frames("loraforge/models/stacked_lora.py", 10, "stacked_weight")
    b = _frames("loraforge/models/lora_autograd.py", 20, "_backward")
    trace = [
        {"action": "alloc", "addr": 1, "size": 100, "frames": a},
        {"action": "alloc", "addr": 2, "size": 50, "frames": b},
        {"action": "free_requested", "addr": 1, "size": 100},  # not yet free: the peak still counts it
        {"action": "alloc", "addr": 3, "size": 30, "frames": b},  # total 180: the peak
        {"action": "free_completed", "addr": 1, "size": 100},
        {"action": "alloc", "addr": 4, "size": 120, "frames": a},  # total 200? no: 50 + 30 + 120 = 200 > 180
        {"action": "free_completed", "addr": 4, "size": 120},
    ]
    peak, groups = alive_at_peak(trace, baseline=1000)
    assert peak == 1000 + 200
    assert groups == {"loraforge/models/stacked_lora.py:10 stacked_weight": 120,
                      "loraforge/models/lora_autograd.py:20 _backward": 80}  # fmt: skip
    # A free of an address never seen (allocated before recording began) is ignored.
    assert alive_at_peak([{"action": "free_completed", "addr": 9, "size": 5}]) == (0, {})
