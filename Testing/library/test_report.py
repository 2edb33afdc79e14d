import pytest

from ctflow import ReportError, parse_report, render_prompt
from ctflow.report import (FINDING_CODE_NAMES, LOBE_LEVELS, MAX_REPORT_CHARS, SIDE_CODE_SIZE, SIDED_FINDINGS, Report,
                           denoiser_code, finding_code, findings_named, half_code, half_reports, half_texts,
                           level_text, lobes_at,
                           names_one_side, placed_lobes, reading_of,
                           read_report_file, reported_findings, reports_no_finding, side_code, sided_findings, without_findings)

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


@pytest.mark.parametrize("text, right, left", [
    ("Right pleural effusion. No pneumothorax.", "Right pleural effusion. No pneumothorax.", " No pneumothorax."),
    ("RLL consolidation; LUL clear. Heart normal.", "RLL consolidation; Heart normal.", " LUL clear. Heart normal."),
    ("Lingula atelectasis. Nodule in the middle lobe.", " Nodule in the middle lobe.", "Lingula atelectasis."),
    ("RIGHT-sided hydrothorax, but the lungs are clear", "RIGHT-sided hydrothorax, but the lungs are clear",
     " the lungs are clear"),
    ("Right pleural effusion and left lower lobe consolidation.", "Right pleural effusion.",
     "and left lower lobe consolidation."),
    ("Consolidation in the RLL, ground glass in the LUL; no effusion.", "Consolidation in the RLL; no effusion.",
     ", ground glass in the LUL; no effusion."),
])
def test_each_half_reads_the_report_without_the_parts_that_name_the_other_side_only(text, right, left):
    assert half_texts(text) == (right, left) and names_one_side(text)


@pytest.mark.parametrize("text, right, left", [
    ("Atelectasis in the right lower lobe. Dependent atelectasis.", "Atelectasis in the right lower lobe. "
     "Dependent atelectasis.", ""),
    ("Left effusion. Effusion and nodule.", " Effusion and nodule.", "Left effusion. Effusion and nodule."),
    ("Right nodule. No nodule elsewhere; atelectasis.", "Right nodule. No nodule elsewhere; atelectasis.",
     " No nodule elsewhere; atelectasis."),
    ("Right and left effusions. Effusions.", "Right and left effusions. Effusions.",
     "Right and left effusions. Effusions."),
])
def test_a_part_without_a_side_goes_with_the_side_the_report_places_all_its_findings_on(text, right, left):
    """Only when every finding it reports is placed on one side alone; negated ones and findings placed on both
    sides keep it on both halves."""
    assert half_texts(text) == (right, left)


@pytest.mark.parametrize("text, expected", [
    ("Dependent atelectasis. No effusion. Venous port in place.", {"atelectasis", "device"}),
    ("Right effusion has resolved; no nodule. Emphysema.", {"emphysema"}),
    ("No consolidation. Consolidation in the RLL.", {"consolidation"}),
    ("Heart normal.", set()),
    ("Right pleural space is free of fluid. Hilar lymph nodes are not enlarged.", set()),  # said to be normal
    ("Subcarinal and right paratracheal nodes are subcentimetric. Hilar nodes are of normal size.", set()),
    ("A few subcentimetre lymph nodes are seen in the right paratracheal station.", set()),  # normal-sized nodes
    ("A subcentimetre nodule in the right lower lobe. The nodule is subcentimetric.", {"nodule"}),  # a nodule still
    ("Subcentimetre hilar nodes; an enlarged 15 mm subcarinal lymph node.", {"lymph node"}),
    ("The pleural space appears unremarkable; nothing nodular.", set()),
    ("Trace effusion within the pericardial recess.", set()),  # the pericardium's, not the pleura's
    ("Left effusion and the lungs are otherwise clear.", {"pleural effusion"}),  # normal words of another part
    ("A nodule is seen in the right lower lobe.", {"nodule"}),
    ("Airspace opacification of the RUL.", {"consolidation"}),  # opacification as well as opacity
    ("The RUL airspace opacification has resolved. No focal airspace opacity.", set()),
])
def test_reported_findings_are_those_named_without_a_negation_with_or_without_a_side(text, expected):
    assert reported_findings(text) == expected


def test_each_half_s_report_keeps_its_sections_and_leaves_an_emptied_one_empty():
    report = parse_report("Findings: Posterior atelectasis in the right lower lobe. Heart normal. "
                          "Impressions: Dependent atelectasis.")
    right, left = half_reports(report)
    assert right == report and left == Report("Heart normal.", "")
    assert render_prompt(left) == "Findings: Heart normal.\nImpressions: Not stated."
    unsided = parse_report("Findings: Emphysema. Impressions: Emphysema.")
    assert half_reports(unsided) == (unsided, unsided)


TOP, MIDDLE, BOTTOM = (0.0, 0.125), (0.5, 0.625), (0.75, 0.875)  # levels of the body, head to feet


@pytest.mark.parametrize("text, top, middle, bottom", [
    ("RLL consolidation. Heart normal.", " Heart normal.", "RLL consolidation. Heart normal.",
     "RLL consolidation. Heart normal."),
    ("Emphysema in both upper lobes; no effusion.", "Emphysema in both upper lobes; no effusion.",
     "Emphysema in both upper lobes; no effusion.", " no effusion."),
    ("Nodule in the lingula. Plate-like atelectasis in the right middle lobe.", "", "Nodule in the lingula. "
     "Plate-like atelectasis in the right middle lobe.", ""),
    ("Consolidation in the RUL and nodule in the LLL.", "Consolidation in the RUL.", "Consolidation in the RUL and "
     "nodule in the LLL.", "and nodule in the LLL."),
    ("Bibasilar atelectasis. Dependent atelectasis. No nodule.", " No nodule.",
     "Bibasilar atelectasis. Dependent atelectasis. No nodule.", "Bibasilar atelectasis. Dependent atelectasis. "
     "No nodule."),
    ("Remaining lobes aerated. Heart normal.", "Remaining lobes aerated. Heart normal.",
     "Remaining lobes aerated. Heart normal.", "Remaining lobes aerated. Heart normal."),
])
def test_each_level_of_the_body_reads_the_report_without_the_lobes_lying_elsewhere(text, top, middle, bottom):
    """The upper lobes reach the body's upper five eighths, the lower lobes its third to seventh eighths, the middle
    lobe and the lingula its fourth and fifth; a part without a lobe whose findings lie only elsewhere goes too."""
    assert [level_text(text, lobes_at(levels)) for levels in (TOP, MIDDLE, BOTTOM)] == [top, middle, bottom]
    assert level_text(text, lobes_at((0.0, 1.0))) == text


def test_lobes_are_placed_by_the_part_that_names_them():
    assert placed_lobes("RUL nodule and LLL consolidation. No atelectasis in the lower lobes.") == {
        "nodule": {"upper"}, "consolidation": {"lower"}}
    assert placed_lobes("Nodules in the upper and lower lobes. Emphysema of the upper, middle and lower lobes.") == {
        "nodule": {"upper", "lower"}, "emphysema": {"upper", "middle", "lower"}}  # every level of a list of lobes


def test_a_block_s_code_reads_the_report_where_only_the_lobes_at_its_levels_lie():
    text = "Findings: Consolidation in the right lower lobe. Emphysema. Heart normal. Impressions: Pneumonia."
    named = [name for name in SIDED_FINDINGS for _ in ("right", "left")]

    def read(levels):
        code = denoiser_code(text, "half", levels=levels)
        return [(name, side) for name, side, v in zip(named, ["right", "left"] * len(SIDED_FINDINGS), code) if v]

    emphysema = [("emphysema", "right"), ("emphysema", "left")]
    assert read(TOP) == emphysema  # the lower lobe is not at the top of the body
    assert read(BOTTOM) == read(MIDDLE) == read(None) == [("consolidation", "right"), *emphysema]
    assert denoiser_code(text, "half") == half_code(text)
    assert lobes_at(TOP) == {"upper"} and lobes_at(BOTTOM) == {"lower"} and lobes_at(MIDDLE) == set(LOBE_LEVELS)


@pytest.mark.parametrize("text", [
    "Large right and small left pleural effusions.",  # one finding, both sides: one part
    "Moderate bilateral pleural effusions. Emphysema in both upper lobes.",
    "Consolidation and ground glass in the right lower lobe and the left lower lobe.",
    "No focal consolidation. The heart is normal.",
])
def test_a_report_that_names_no_side_alone_reads_the_same_on_both_halves(text):
    assert half_texts(text) == (text, text) and not names_one_side(text)


@pytest.mark.parametrize("text", [
    "Leads in the right atrium and right ventricle; the left heart is normal.",
    "The right and left ventricles are normal; right-heart strain; left-ventricular hypertrophy.",
    "Calcified right coronary artery and left main coronary; no right-to-left shunt.",
    "Catheter left in place.",
    "Bright, cleft, leftover, righteous: no side.",
])
def test_the_heart_and_words_that_are_no_side_stay(text):
    assert half_texts(text) == (text, text) and not names_one_side(text) and not sided_findings(text)


@pytest.mark.parametrize("text, expected", [
    ("Moderate right pleural effusion.", {"pleural effusion": {"right"}}),
    ("There is a moderate pleural effusion on the right.", {"pleural effusion": {"right"}}),
    ("A small amount of fluid in the left pleural space.", {"pleural effusion": {"left"}}),
    ("Left-sided hydrothorax.", {"pleural effusion": {"left"}}),
    ("RLL consolidation. Ground glass in the LUL.", {"consolidation": {"right"}, "ground-glass opacity": {"left"}}),
    ("In the right upper lobe, a solid nodule measuring 6 mm.", {"nodule": {"right"}}),
    ("Atelectasis in the lingula.", {"atelectasis": {"left"}}),
    ("Consolidation in the right middle lobe.", {"consolidation": {"right"}}),
    ("Right pleural effusion and left lower lobe consolidation.",
     {"pleural effusion": {"right"}, "consolidation": {"left"}}),
    ("Consolidation in the right lower lobe and ground glass in the left upper lobe.",
     {"consolidation": {"right"}, "ground-glass opacity": {"left"}}),
    ("Consolidation and ground glass in the right lower lobe.",
     {"consolidation": {"right"}, "ground-glass opacity": {"right"}}),
    ("Large right and small left pleural effusions.", {"pleural effusion": {"right", "left"}}),
    ("Moderate bilateral pleural effusions.", {"pleural effusion": {"right", "left"}}),
    ("Emphysema, predominantly in both upper lobes.", {"emphysema": {"right", "left"}}),
    ("A pacemaker in the left anterior chest wall; the lead ends in the right ventricle.", {"device": {"left"}}),
    ("Right lower lobe consolidation without pleural effusion.", {"consolidation": {"right"}}),
    ("Small pericardial effusion. Left effusion.", {"pleural effusion": {"left"}}),
])
def test_the_side_code_reads_each_finding_s_side(text, expected):
    assert sided_findings(text) == expected
    code = side_code(text)
    assert len(code) == SIDE_CODE_SIZE == 2 * len(SIDED_FINDINGS)
    assert sum(code) == sum(len(sides) for sides in expected.values())


@pytest.mark.parametrize("text", [
    "No left pleural effusion.",
    "No evidence of pneumonia in the right lung.",
    "Previously noted right pleural effusion has resolved.",
    "Right lower lobe consolidation, no longer seen.",
    "Negative for nodules in the left lung.",
    "The trachea and both main bronchi are patent. Right coronary artery calcification.",
    "Pleural effusion.",  # a finding without a side
    "The right pleural space remains clear.",
    "Nothing to suggest left lower lobe consolidation.",
    "",
])
def test_negated_findings_and_findings_without_a_side_have_none(text):
    assert sided_findings(text) == {} and not any(side_code(text))


@pytest.mark.parametrize("text", [
    *(render_prompt(parse_report(read_report_file(f"Resources/SampleReports/{name}.txt")))
      for name in ("LLL_consolidation", "RUL_nodule", "right_pleural_effusion")),
    "Ground-glass opacity in the right middle lobe.", "RML atelectasis.", "Atelectasis in the lingula.",
    "Right pleural effusion and left lower lobe consolidation.",
    "Right lower lobe consolidation, a nodule in the left upper lobe; bilateral emphysema.",
])
def test_each_half_s_text_reports_the_findings_of_its_side_alone(text):
    code = side_code(text)
    assert any(code)
    pairs = [code[i:i + 2] for i in range(0, len(code), 2)]  # [right, left] of each finding
    both = [r * l for r, l in pairs]  # a finding on both sides stays on both halves
    right, left = (side_code(half) for half in half_texts(text))
    assert right == [v for (r, _), b in zip(pairs, both) for v in (r, b)]
    assert left == [v for (_, l), b in zip(pairs, both) for v in (b, l)]


@pytest.mark.parametrize("text, right, left", [
    ("Right pleural effusion. Emphysema. No nodule.", {"pleural effusion", "emphysema"}, {"emphysema"}),
    ("Pleural effusion.", {"pleural effusion"}, {"pleural effusion"}),  # no side: both halves
    ("Findings: Atelectasis in the right lower lobe.\nImpressions: Dependent atelectasis.", {"atelectasis"}, set()),
    ("LUL ground glass and a pacemaker in the left chest wall.", set(), {"ground-glass opacity", "device"}),
    ("Right pleural effusion and left lower lobe consolidation.", {"pleural effusion"}, {"consolidation"}),
    ("No evidence of pneumonia. Previously noted left effusion has resolved.", set(), set()),
])
def test_the_half_code_is_what_each_half_reads_reported(text, right, left):
    code = half_code(text)
    assert len(code) == SIDE_CODE_SIZE
    named = [name for name in SIDED_FINDINGS for _ in ("right", "left")]
    assert {n for n, v in zip(named[::2], code[::2]) if v} == right
    assert {n for n, v in zip(named[1::2], code[1::2]) if v} == left
    assert denoiser_code(text, "half") == code and denoiser_code(text, "side") == side_code(text)


@pytest.mark.parametrize("text, expected", [
    ("Findings: Small left effusion; heart normal in size. Enlarged heart.\nImpressions: Cardiomegaly and effusion.",
     "Findings: heart normal in size."),
    ("Findings: A 7 mm nodule in the lingula. No pericardial fluid. Atherosclerotic aorta.\n"
     "Impressions: Nodule. Follow up.", "Findings: No pericardial fluid.\nImpressions: Follow up."),
    ("Findings: No effusion, no plaque, nodes are not enlarged.\nImpressions: Normal chest.",
     "Findings: No effusion, no plaque, nodes are not enlarged.\nImpressions: Normal chest."),
    ("Findings: Bilateral pleural fluid with a pericardial effusion.", ""),
    ("Findings: Cardiac enlargement. The heart is not enlarged.", "Findings: The heart is not enlarged."),
])
def test_the_report_without_its_findings_keeps_what_reports_none(text, expected):
    """What finding guidance guides away from: parts that report a finding (sided or not) go, negated ones and the
    rest of the report stay."""
    assert without_findings(parse_report(text)).text == expected


@pytest.mark.parametrize("text, expected", [
    ("Findings: Mild cardiomegaly. Centrilobular emphysema in both upper lobes. No pleural or pericardial effusion.\n"
     "Impressions: Cardiomegaly. Emphysema.", {"cardiomegaly", "emphysema"}),
    ("No evidence of emphysema. Heart not enlarged. No consolidation, nodule or atelectasis.", set()),
    ("Small pericardial effusion. Coronary artery calcifications. Left lower lobe consolidation has resolved.",
     {"pericardial effusion", "arterial calcification"}),
    ("Right paratracheal lymphadenopathy and a right-sided port.", {"lymph node", "device"}),
    ("Findings: Lungs clear. Heart not enlarged.\nImpressions: Small pericardial effusion.", {"pericardial effusion"}),
])
def test_the_finding_code_reads_each_finding_reported_and_none_negated(text, expected):
    code = finding_code(text)
    assert len(code) == len(FINDING_CODE_NAMES) == len(SIDED_FINDINGS) + 3
    assert {name for name, value in zip(FINDING_CODE_NAMES, code) if value} == expected
    assert denoiser_code(text, "finding") == code
    assert reports_no_finding(parse_report(text)) == (not expected)  # a model's normal report is drawn for it
    assert {name for name, reported in findings_named(text).items() if reported} == expected


def test_a_finding_named_only_negated_is_told_from_one_reported():
    """A report of one finding that negates others ("No pleural fluid." in a report of a nodule): the finding study
    reads such reports for the negation half of a finding the report is not about."""
    text = "Findings: 9 mm RUL nodule. No pleural fluid, no adenopathy. Cardiomegaly.\nImpressions: Heart not enlarged."
    assert findings_named(text) == {"nodule": True, "pleural effusion": False, "lymph node": False,
                                    "cardiomegaly": True}  # reported in one clause: reported
    assert findings_named("The lungs are clear.") == {}


@pytest.mark.parametrize("text, expected", [
    ("Findings: Small right pleural effusion. Consolidation in the left lower lobe. No emphysema.\n"
     "Impressions: Right effusion.", "pleural effusion (right), consolidation (left lower lobe); negated: emphysema"),
    ("Bilateral lower lobe atelectasis. Right paratracheal lymphadenopathy. Mild cardiomegaly.",
     "atelectasis (right and left lower lobes), lymphadenopathy (right), cardiomegaly"),
    ("RUL nodule 6 mm. Ground glass in the LUL. Pericardial effusion has resolved.",
     "ground-glass opacity (left upper lobe), nodule (right upper lobe); negated: pericardial effusion"),
    ("No evidence of emphysema. No consolidation, nodule or atelectasis.",
     "no finding; negated: consolidation, nodule, atelectasis, emphysema"),
    ("The lungs are clear. Heart size normal.", "no finding"),
    ("Centrilobular emphysema, upper-lobe predominant. Small effusion in the pericardial sac.",
     "emphysema (upper lobe), pericardial effusion"),
    ("Small right pleural effusion. No fluid in the pericardial space.", "pleural effusion (right); negated: "
     "pericardial effusion"),
    ("Bibasal atelectasis. Bibasilar ground glass.",
     "ground-glass opacity (right and left lower lobes), atelectasis (right and left lower lobes)"),
    ("Atelectatic bands in the lingula. Left upper lobe and lingular consolidation. Right upper and lower lobe "
     "nodules.",
     "consolidation (left upper lobe and lingula), nodule (right upper and lower lobes), atelectasis (lingula)"),
])
def test_the_reading_says_what_the_codes_and_guidance_read(text, expected):
    report = parse_report(text)
    assert reading_of(report) == expected
    named = {name for name, value in zip(FINDING_CODE_NAMES, finding_code(f"{report.findings}\n{report.impressions}"))
             if value}
    said = expected.split("; negated")[0]
    assert all((name in said) == (name in named) for name in FINDING_CODE_NAMES if name != "lymph node")
