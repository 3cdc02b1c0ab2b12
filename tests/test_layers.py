import pytest

from embstore import LayerSpecError, format_layers, parse_layers

L6 = list(range(7))  # MiniLM: 0 = embeddings, 1..6


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("all", L6),
        ("0", [0]),
        ("6", [6]),
        ("4-6", [4, 5, 6]),
        ("-3--1", [4, 5, 6]),
        ("-1", [6]),
        ("3,6", [3, 6]),
        ("6,3,3", [3, 6]),
        ("last2", [5, 6]),
        ("0-1,last1", [0, 1, 6]),
        ([0, -1], [0, 6]),
    ],
)
def test_parse_layers(spec, expected):
    assert parse_layers(spec, L6) == expected


def test_layer_zero_is_a_real_layer():
    assert parse_layers("0", L6) == [0]
    assert parse_layers([0], [0, 3]) == [0]


def test_parse_against_stored_subset():
    assert parse_layers("-1", [2, 4, 6]) == [6]
    assert parse_layers("4-6", [2, 4, 6]) == [4, 6]


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ("9-12", r"must name layers in \[0, 6\].*got '9-12'"),
        ("7", r"\[0, 6\]"),
        ("-8", r"-1\.\.-7"),
        ("5-2", r"empty \(start 5 > end 2\)"),
        ("last9", r"only 7 layers"),
        ("cls", r"Cannot read"),
    ],
)
def test_parse_layers_errors(spec, match):
    with pytest.raises(LayerSpecError, match=match):
        parse_layers(spec, L6)


def test_layer_not_in_stored_subset():
    with pytest.raises(LayerSpecError, match=r"\[2, 6\]"):
        parse_layers("3", [2, 4, 6])


def test_format_layers():
    assert format_layers([9, 10, 11, 12]) == "9-12"
    assert format_layers([3, 6]) == "3,6"
