"""Arguments shared by several commands: compare and serve take their threshold the same way, with one default."""

from __future__ import annotations

import pytest

from facesiam.commands import compare, serve
from facesiam.eval.compare import DEFAULT_OPERATING_POINT, OPERATING_POINTS

THRESHOLD_FLAGS = ("threshold", "report", "operating_point")


def _actions(parser) -> dict:
    return {a.dest: (tuple(a.option_strings), a.default, a.type, tuple(a.choices or ()), a.help)
            for a in parser._actions if a.dest in THRESHOLD_FLAGS}


def test_compare_and_serve_define_the_same_threshold_flags():
    ours, theirs = _actions(compare._parser()), _actions(serve._parser())
    assert set(ours) == set(THRESHOLD_FLAGS) and ours == theirs


def test_both_default_to_the_strict_operating_point():
    assert DEFAULT_OPERATING_POINT == "far=1e-3" and DEFAULT_OPERATING_POINT in OPERATING_POINTS
    c = compare._parser().parse_args(["--checkpoint", "M", "a.jpg", "b.jpg", "--report", "R"])
    s = serve._parser().parse_args(["--checkpoint", "M", "--report", "R"])
    assert c.operating_point == s.operating_point == "far=1e-3"
    c = compare._parser().parse_args(["--checkpoint", "M", "a.jpg", "b.jpg", "--report", "R",
                                      "--operating-point", "eer"])
    assert c.operating_point == "eer"


@pytest.mark.parametrize("parser,base", [(compare._parser, ["--checkpoint", "M", "a.jpg", "b.jpg"]),
                                         (serve._parser, ["--checkpoint", "M"])])
def test_threshold_and_report_exclude_each_other(parser, base, capsys):
    with pytest.raises(SystemExit) as info:
        parser().parse_args(base + ["--threshold", "0.5", "--report", "R"])
    assert info.value.code == 2 and "not allowed with" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parser().parse_args(base + ["--operating-point", "far=2"])


def test_only_serve_needs_a_threshold(capsys):
    assert compare._parser().parse_args(["--checkpoint", "M", "a.jpg", "b.jpg"]).threshold is None
    with pytest.raises(SystemExit) as info:
        serve._parser().parse_args(["--checkpoint", "M"])
    assert info.value.code == 2 and "--threshold" in capsys.readouterr().err
