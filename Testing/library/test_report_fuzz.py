"""Fuzzing the report parser (Hypothesis): whatever a user pastes, parse_report returns a clean Report or raises
ReportError, and the prompt it renders has the model's shape. Bounded to a few seconds."""

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ctflow.errors import ReportError
from ctflow.report import MAX_REPORT_CHARS, Report, parse_report, render_prompt

# Pieces a report is made of, and pieces that break naive parsers, mixed with arbitrary text.
PIECES = ["Findings:", "FINDINGS", "Findings -", "Impression:", "IMPRESSIONS", "Conclusion:", "findings", ":", "-",
          "\n", "\r\n", "\t", " ", "  ", "Nodule in the RUL.", "No effusion.", "\x00", "\u2028", "é", "右肺", "😀"]
REPORT_TEXT = st.lists(st.one_of(st.sampled_from(PIECES), st.text(max_size=8)), max_size=30).map("".join)
FUZZ = settings(max_examples=150, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])


def clean(text: str) -> bool:
    return text == text.strip() and "  " not in text and not any(c in text for c in "\n\r\t")


@FUZZ
@given(REPORT_TEXT, st.one_of(st.none(), REPORT_TEXT))
def test_any_text_parses_cleanly_or_fails_with_a_report_error(text, impressions):
    try:
        report = parse_report(text, impressions)
    except ReportError:
        return
    assert report.findings or report.impressions
    assert clean(report.findings) and clean(report.impressions)
    assert len(report.findings) + len(report.impressions) <= MAX_REPORT_CHARS + 1  # + the joining space


@FUZZ
@given(REPORT_TEXT, st.one_of(st.none(), st.integers(1, 2048)), st.one_of(st.none(), st.floats(0.1, 10.0)))
def test_the_prompt_always_has_the_models_shape(text, slices, spacing):
    try:
        report = parse_report(text)
    except ReportError:
        return
    lines = render_prompt(report, slices, spacing).split("\n")
    assert lines[0].startswith("Findings: ") and lines[1].startswith("Impressions: ")
    assert len(lines) == 2 + (slices is not None) + (spacing is not None)


@FUZZ
@given(REPORT_TEXT)
def test_the_recorded_report_text_parses_to_the_same_report(text):
    """Provenance records report.text; regenerating from it must give the same prompt."""
    try:
        report = parse_report(text)
    except ReportError:
        return
    again = parse_report(report.text)
    assert (again.findings, again.impressions) == (report.findings, report.impressions)


@FUZZ
@given(st.one_of(st.binary(max_size=64), st.integers(), st.none(), st.lists(st.text(max_size=3), max_size=3)))
def test_what_is_not_text_is_a_report_error(value):
    try:
        parse_report(value)
    except ReportError:
        return
    assert isinstance(value, bytes)  # only UTF-8 bytes may parse


def test_a_report_in_report_form_keeps_its_sections():
    report = parse_report("FINDINGS: Nodule.\nIMPRESSION: Benign.")
    assert report == Report("Nodule.", "Benign.")
