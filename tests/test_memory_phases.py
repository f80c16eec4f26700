"""benchmarks/memory_phases.py's layer marks: one set of hooks serves several steps, each marked step
labelled from its own start (forward, then backward), and unmarked steps leave no marks."""

import torch

from benchmarks.memory_phases import MarkTarget, PhaseMarks, instrument
from loraforge.testing import tiny_model


def _labels(marks: PhaseMarks) -> list[str]:
    return [label for label, *_ in marks.marks]


def test_marks_restart_at_each_marked_step():
    model = tiny_model("llama", num_hidden_layers=2)
    ids = torch.randint(3, 100, (1, 6))
    target = MarkTarget()
    instrument(model, target)

    def step():
        model(input_ids=ids, labels=ids).loss.backward()

    marked = []
    for marks in (PhaseMarks(), None, PhaseMarks(), PhaseMarks()):  # back to back, and after an unmarked step
        target.new_step(marks)
        step()
        if marks is not None:
            marked.append(_labels(marks))
    expected = ["L0 fwd in", "L0 fwd out", "L1 fwd in", "L1 fwd out", "L1 bwd", "L0 bwd"]
    assert marked == [expected] * 3
    target.new_step(None)
    step()  # marks nowhere, and does not fail
