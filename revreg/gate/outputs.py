"""Gate results for CI systems: JUnit XML, GitHub Actions annotations and step summary."""

from __future__ import annotations

import xml.etree.ElementTree as ET

from revreg.gate.evaluate import GateReport


def junit_xml(report: GateReport) -> bytes:
    """One test case per rule; Jenkins, GitLab and GitHub test reporters read this format."""
    failures = sum(not r.passed for r in report.results)
    suite = ET.Element(
        "testsuite",
        name=f"revreg gate {report.ref}",
        tests=str(len(report.results)),
        failures=str(failures),
        errors="0",
        skipped="0",
    )
    for r in report.results:
        case = ET.SubElement(suite, "testcase", classname=f"revreg.gate.{report.ref}", name=r.rule)
        if r.passed:
            ET.SubElement(case, "system-out").text = r.message
        else:
            ET.SubElement(case, "failure", message=r.message, type="PolicyViolation").text = r.message
    suites = ET.Element("testsuites", name="revreg", tests=str(len(report.results)), failures=str(failures))
    suites.append(suite)
    ET.indent(suites)
    return ET.tostring(suites, encoding="utf-8", xml_declaration=True) + b"\n"


def junit_error(ref: str, message: str) -> bytes:
    """The JUnit file for a gate that could not run (bad policy, unknown version, registry down):
    one failing test case, so a CI report shows the failure instead of a missing file."""
    suite = ET.Element("testsuite", name=f"revreg gate {ref}", tests="1", failures="0", errors="1", skipped="0")
    case = ET.SubElement(suite, "testcase", classname=f"revreg.gate.{ref}", name="gate")
    ET.SubElement(case, "error", message=message, type="GateCouldNotRun").text = message
    suites = ET.Element("testsuites", name="revreg", tests="1", failures="0", errors="1")
    suites.append(suite)
    ET.indent(suites)
    return ET.tostring(suites, encoding="utf-8", xml_declaration=True) + b"\n"


def _escape(text: str) -> str:
    # GitHub workflow commands: %, CR and LF must be escaped in the message.
    return text.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")


def github_annotations(report: GateReport) -> list[str]:
    lines = []
    for r in report.results:
        level = "notice" if r.passed else "error"
        lines.append(f"::{level} title=revreg gate {_escape(report.ref)}: {r.rule}::{_escape(r.message)}")
    return lines


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def step_summary(report: GateReport) -> str:
    verdict = "passed" if report.passed else "FAILED"
    rows = "\n".join(f"| {'✅' if r.passed else '❌'} | `{r.rule}` | {_cell(r.message)} |" for r in report.results)
    return (
        f"### revreg gate {verdict}: `{report.ref}`\n\n`{report.digest}`\n\n"
        f"| | rule | detail |\n| --- | --- | --- |\n{rows}\n"
    )
