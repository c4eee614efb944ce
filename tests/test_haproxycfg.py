from __future__ import annotations

import pytest

from spoa.findings import Level
from spoa.haproxycfg import Fallback, Report, format_report


@pytest.mark.parametrize(
    ("fallback", "level"),
    [
        (Fallback.AGREES, Level.OK),
        (Fallback.NOT_CALLED, Level.NOTE),
        (Fallback.ABSENT, Level.NOTE),
        (Fallback.STALE, Level.ERROR),
        (Fallback.BROKEN, Level.ERROR),
    ],
)
def test_each_fallback_state_is_reported_at_its_level(fallback: Fallback, level: Level) -> None:
    report = Report(fallback=fallback, map_path="/f.map", detail="v1")
    [finding] = format_report(report, "haproxy.cfg", "p.yaml")
    assert finding.level is level
    assert str(finding).startswith(f"{level}: ")


def test_a_missing_backend_is_an_error_and_an_unused_one_no_problem() -> None:
    report = Report(missing_backends=["sync"], unused_backends=["be_old"])
    findings = format_report(report, "haproxy.cfg", "p.yaml")
    assert [f.level for f in findings] == [Level.ERROR, Level.OK, Level.NOTE]
    assert "nothing is wrong" in findings[1].text
    assert "be_sync" in findings[0].text and "be_old" in findings[1].text


def test_fallback_lines_of_another_release_and_a_running_map_out_of_step_are_errors() -> None:
    report = Report(fallback=Fallback.AGREES, map_path="/f.map", missing_key_lines=["room"])
    report.running, report.running_detail = False, "policy version abc"
    findings = format_report(report, "haproxy.cfg", "p.yaml")
    assert [f.level for f in findings] == [Level.OK, Level.ERROR, Level.ERROR]
    assert "no room regex" in findings[1].text
    assert "policy version abc" in findings[2].text
    report.running = True
    assert format_report(report, "haproxy.cfg", "p.yaml")[-1].level is Level.OK
