"""The security suite's table: a marked test's docstring names the attack, ``attack.ended``
records how it ended (see tests/conftest.py)."""

from __future__ import annotations

import pytest

pytest_plugins = ["pytester"]


def test_table_lists_attacks_and_how_they_ended(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(
        (__import__("pathlib").Path(__file__).parent.parent / "conftest.py").read_text()
    )
    pytester.makeini("[pytest]\nmarkers =\n    security: x\n")
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.security
        def test_a(attack):
            '''Upload a tar whose member is ../../etc/x.'''
            attack.ended("400 bad upload: member escapes")

        def test_unmarked():
            pass
        """
    )
    result = pytester.runpytest("-m", "security", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, deselected=1)
    result.stdout.fnmatch_lines(
        ["attacks tried*", "*passed*Upload a tar whose member is ../../etc/x.*400 bad upload*"]
    )
