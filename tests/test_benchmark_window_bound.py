"""``python -m benchmarks.window_bound``: its argument errors (before any timing)."""

from __future__ import annotations

import pytest

from benchmarks import window_bound


@pytest.mark.parametrize("argv,message", [
    (["--kinds", "paper,bogus"], "--kinds: unknown ['bogus']; expected some of paper, full"),
    (["--cpu-devices", "two"], "--cpu-devices: expected a positive integer or auto, got 'two'"),
    (["--cpu-devices", "0"], "--cpu-devices: expected a positive integer or auto, got '0'"),
])
def test_bad_arguments_are_one_line_errors(capsys, argv, message):
    with pytest.raises(SystemExit):
        window_bound.main(argv)
    assert message in capsys.readouterr().err
