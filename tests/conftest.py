"""Shared by every test directory: the closing summary of the figures tests record.

Here, not in tests/integration, because a parallel run's controller (pytest-xdist) loads only this conftest:
the hooks that gather the workers' figures and print them must live where it looks.
"""

from __future__ import annotations

import pytest

FIGURES: dict[str, dict[str, object]] = {}


@pytest.fixture
def figures(request: pytest.FixtureRequest):  # type: ignore[no-untyped-def]
    """figures(key=value, ...) records counts for the closing summary under the test's name. They travel in the
    test's report (its user properties), so that a parallel run's workers bring theirs to the summary too."""
    def record(**values: object) -> None:
        request.node.user_properties.append(("figures", {k: str(v) for k, v in values.items()}))
    return record


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.when == "teardown":  # the last report of a test: every figure it recorded is in it
        for key, values in report.user_properties:
            if key == "figures":
                FIGURES.setdefault(report.nodeid.rpartition("::")[2], {}).update(values)  # type: ignore[arg-type]


def pytest_terminal_summary(terminalreporter, exitstatus, config):  # type: ignore[no-untyped-def]
    if not FIGURES:
        return
    terminalreporter.section("suite figures")
    for name, values in FIGURES.items():
        terminalreporter.write_line(f"{name}: " + ", ".join(f"{k}={v}" for k, v in values.items()))
