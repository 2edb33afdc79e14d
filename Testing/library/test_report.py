import pytest

from ctflow import ReportError, parse_report, render_prompt
from ctflow.report import MAX_REPORT_CHARS, mirrored, names_a_side, read_report_file

CT_RATE = """FINDINGS: Trachea and both main bronchi are open. A 6 mm nodule is seen in the right upper lobe.
No pleural effusion.
IMPRESSION: Right upper lobe nodule."""


def test_sections_are_found_whatever_the_case():
    report = parse_report(CT_RATE)
    assert report.findings.startswith("Trachea and both main bronchi are open.")
    assert "No pleural effusion." in report.findings
    assert report.impressions == "Right upper lobe nodule."
    assert not report.truncated


@pytest.mark.parametrize("header", ["Findings:", "findings -", "FINDING:"])
def test_header_spellings(header):
    assert parse_report(f"{header} Emphysema. Impressions: Emphysema.").findings == "Emphysema."


def test_free_text_is_findings_and_impressions_may_come_separately():
    report = parse_report("Cardiomegaly.", impressions="Enlarged heart.")
    assert (report.findings, report.impressions) == ("Cardiomegaly.", "Enlarged heart.")
    assert parse_report("", impressions="Normal chest CT.").impressions == "Normal chest CT."


@pytest.mark.parametrize("bad", ["", "   \n\t ", "Findings:  Impressions: "])
def test_empty_reports_are_refused(bad):
    with pytest.raises(ReportError, match="empty"):
        parse_report(bad)


@pytest.mark.parametrize("bad, message", [(42, "must be text"), (None, "must be text"), (b"\xff\xfe", "UTF-8"),
                                          ("Find\x00ings", "binary")])
def test_non_text_is_refused(bad, message):
    with pytest.raises(ReportError, match=message):
        parse_report(bad)


def test_bytes_in_utf8_are_accepted():
    assert parse_report("Findings: Ünremarkable.".encode()).findings == "Ünremarkable."


def test_a_report_file_with_a_byte_order_mark_reads_as_without(tmp_path):
    path = tmp_path / "notepad.txt"
    path.write_text("Findings: Right pleural effusion.\nImpressions: Effusion.", encoding="utf-8-sig")
    report = parse_report(read_report_file(path))
    assert (report.findings, report.impressions) == ("Right pleural effusion.", "Effusion.")


def test_huge_report_is_cut_and_flagged():
    report = parse_report("Findings: " + "word " * MAX_REPORT_CHARS)
    assert report.truncated
    assert len(report.findings) <= MAX_REPORT_CHARS


def test_prompt_carries_sections_and_meta_information():
    prompt = render_prompt(parse_report(CT_RATE), slices=120, slice_spacing=2.5)
    assert prompt.splitlines() == [
        "Findings: " + parse_report(CT_RATE).findings,
        "Impressions: Right upper lobe nodule.",
        "Length: 120 slices",
        "Spacing: 2.5 mm",
    ]
    assert "Length" not in render_prompt(parse_report("Normal."))


def test_header_alone_on_its_line():
    report = parse_report("FINDINGS\nMild emphysema.\nIMPRESSION\nEmphysema.")
    assert (report.findings, report.impressions) == ("Mild emphysema.", "Emphysema.")


@pytest.mark.parametrize("text, other", [
    ("Right pleural effusion; the left pleural space is clear.", "Left pleural effusion; the right pleural space is clear."),
    ("RLL consolidation, LUL clear.", "LLL consolidation, RUL clear."),
    ("RIGHT-sided hydrothorax, on the right and left", "LEFT-sided hydrothorax, on the left and right"),
])
def test_mirroring_swaps_the_sides_a_report_names(text, other):
    assert mirrored(text) == other and mirrored(other) == text and names_a_side(text)


@pytest.mark.parametrize("text, other", [
    ("rll and lll", "LLL and RLL"),  # abbreviations come back in capitals
    ("Lingula atelectasis; RML nodule", "Middle lobe atelectasis; lingula nodule"),
    ("Lingular scar in the left upper lobe", "Middle lobe scar in the right upper lobe"),
])
def test_lobes_mirror_to_their_nearest_lobe_on_the_other_side(text, other):
    assert mirrored(text) == other


@pytest.mark.parametrize("text", [
    "Leads in the right atrium and right ventricle; the left heart is normal.",
    "The right and left ventricles are normal; right-heart strain; left-ventricular hypertrophy.",
    "Calcified right coronary artery and left main coronary; no right-to-left shunt.",
    "Catheter left in place.",
    "Bright, cleft, leftover, righteous: no side.",
])
def test_the_heart_and_words_that_are_no_side_stay(text):
    assert mirrored(text) == text and not names_a_side(text)
