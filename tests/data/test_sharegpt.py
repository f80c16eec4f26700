"""standardize_sharegpt on lists and datasets.Dataset."""

import pytest

from loraforge.data import standardize_sharegpt

datasets = pytest.importorskip("datasets")

ROWS = [
    {
        "id": 0,
        "conversations": [
            {"from": "system", "value": "Be brief."},
            {"from": "human", "value": "Hi"},
            {"from": "gpt", "value": "Hello."},
        ],
    },
    {
        "id": 1,
        "conversations": [
            {"from": "User", "value": "Sky colour?"},
            {"from": "chatgpt", "value": "Blue."},
            {"from": "human", "value": "And grass?"},
            {"from": "model", "value": "Green."},
            {"from": "tool", "value": "{}"},
        ],
    },
]
EXPECTED = [
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
    ],
    [
        {"role": "user", "content": "Sky colour?"},
        {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": "And grass?"},
        {"role": "assistant", "content": "Green."},
        {"role": "tool", "content": "{}"},
    ],
]


def test_list_of_rows():
    out = standardize_sharegpt(ROWS)
    assert [row["conversations"] for row in out] == EXPECTED
    assert [row["id"] for row in out] == [0, 1]
    assert ROWS[0]["conversations"][1]["from"] == "human"  # the input is not changed
    assert standardize_sharegpt(out) == out  # already standard: unchanged


def test_dataset():
    dataset = datasets.Dataset.from_list(ROWS)
    out = standardize_sharegpt(dataset)
    assert isinstance(out, datasets.Dataset)
    assert sorted(out.column_names) == ["conversations", "id"]
    assert out["conversations"][:] == EXPECTED
    assert out["id"][:] == [0, 1]


def test_unknown_role_names_role_and_row():
    rows = [ROWS[0], {"conversations": [{"from": "narrator", "value": "Once..."}]}]
    with pytest.raises(ValueError, match=r"row 1: unknown role 'narrator'"):
        standardize_sharegpt(rows)
    with pytest.raises(ValueError, match=r"row 1: unknown role 'narrator'"):
        standardize_sharegpt(datasets.Dataset.from_list(rows))
    out = standardize_sharegpt(rows, aliases_for_user=["narrator"])
    assert out[1]["conversations"] == [{"role": "user", "content": "Once..."}]


def test_malformed_rows():
    with pytest.raises(ValueError, match="row 0: a message needs a role"):
        standardize_sharegpt([{"conversations": [{"speaker": "human", "text": "hi"}]}])
    with pytest.raises(ValueError, match="row 0: expected a dict with a 'conversations' key"):
        standardize_sharegpt([{"messages": []}])
    with pytest.raises(ValueError, match="no 'conversations' column"):
        standardize_sharegpt(datasets.Dataset.from_list([{"messages": [{"role": "user", "content": "x"}]}]))
    out = standardize_sharegpt([{"messages": [{"from": "human", "value": "x"}]}], column="messages")
    assert out[0]["messages"] == [{"role": "user", "content": "x"}]
