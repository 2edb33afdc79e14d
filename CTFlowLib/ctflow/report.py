"""Report -> prompt: split a radiology report into Findings and Impressions and render the model's prompt.

CT-RATE reports have a Findings and an Impressions section; CTFlow's prompt reads
"Findings: ... Impressions: ... Length: N". Training and generation both call `render_prompt`,
so the two can never drift apart.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Callable, Iterator

from .errors import ReportError

# Longer input is cut before tokenising (the encoder keeps far fewer tokens anyway); the caller is told.
MAX_REPORT_CHARS = 20_000
MAX_REPORT_FILE_BYTES = 256 * 1024  # a long report is a few KB; a bigger file is the wrong one (or /dev/zero)

# A section header: "Findings:" anywhere (after a space, a colon or the start), "Findings -" at a line start, or
# "FINDINGS" alone on its line. Spaces are normalised first (every kind but the newline becomes " "), so what
# the header test sees is what Report.text records: parsing a report's recorded text gives the same report.
_NAMES = r"(findings?|impressions?|conclusions?)"
_HEADER = re.compile(
    rf"(?:(?:^|(?<=[\s:])){_NAMES}\s*:|^[ \t]*{_NAMES}[ \t]*(?:-[ \t]|$))[ \t]*", re.IGNORECASE | re.MULTILINE
)
_SPACES = re.compile(r"[^\S\n]+")
_TYPED_META = re.compile(r"\b(?:length:\s*\d+\s*slices?|spacing:\s*\d+(?:\.\d+)?\s*mm)", re.IGNORECASE)

# The words that name a side. The heart and its vessels keep theirs ("leads in the right atrium", "right and left
# ventricles", "right coronary artery", "right-to-left shunt"): they are anatomy, not where a finding lies; nor is
# "left" as a verb ("left in place"). "Middle lobe" alone is the right's (_MORE_SIDE_WORDS).
_SIDE_OF_WORD = {"right": "right", "rul": "right", "rll": "right", "rml": "right",
                 "left": "left", "lul": "left", "lll": "left", "lingula": "left", "lingular": "left"}
_KEPT_AFTER = (r"(?:[\s-]+and[\s-]+(?:right|left))?[\s-]+(?:atri|ventric|heart|cardiac|coronar|main\s+coronar)"
               r"|-to-|\s+(?:in\s+(?:place|situ)|over\b|behind)")
_SIDE_WORD = re.compile(rf"\b({'|'.join(_SIDE_OF_WORD)})\b(?!{_KEPT_AFTER})", re.IGNORECASE)
_KEPT_BEFORE = re.compile(r"-to-$")  # the "left" of "right-to-left"

# Where each lobe lies, head to feet, as fractions of the body the model draws (its real slices, neck to upper
# abdomen): the levels of finding_study's anatomy prior (8 levels of the cohort's CT) that hold at least a tenth of
# the lobe's largest share, both sides together. The lingula lies at the middle lobe's levels. A lobe_map denoiser
# reads each block's code from the report where only the lobes at the block's levels lie (level_text).
LOBE_LEVELS = {"upper": (0.0, 0.625), "middle": (0.375, 0.625), "lower": (0.25, 0.875)}
_LOBE_OF_WORD = {"upper": "upper", "rul": "upper", "lul": "upper", "apical": "upper", "apices": "upper",
                 "middle": "middle", "rml": "middle", "lingula": "middle", "lingular": "middle",
                 "lower": "lower", "rll": "lower", "lll": "lower", "bases": "lower", "basal": "lower",
                 "bibasal": "lower", "basilar": "lower", "bibasilar": "lower"}
# A level word counts before "lobe", "-lobe" or a list's "lobes" ("upper and lower lobes").
_LOBE_WORD = re.compile(r"\b(?:(upper|middle|lower)(?=(?:\s*(?:,|and)\s*(?:upper|middle|lower))*[\s-]+lobes?\b)|"
                        r"rul|rml|rll|lul|lll|lingular?|apical|apices|bases|(?:bi)?basal|(?:bi)?basilar)\b",
                        re.IGNORECASE)

# The side code (a denoiser's `side_code` input): for each finding that has a side, whether the report puts it on the
# right and on the left. The text encoder's vectors hardly tell "left" from "right" (issue 18); this tells the
# denoiser outright. A finding is named by any of its cues and takes the side words of its clause that modify or
# place it (`_sides_of`); it counts for nothing when a negation cue of its clause precedes it, a "resolved"-like cue
# follows it, or its words are said to be normal ("the left pleural space is clear").
SIDED_FINDINGS = {
    "pleural effusion": r"(?<!pericardial )effusions?(?!\s+(?:in|of|within)\s+the\s+pericardi)|hydrothora\w*|"
                        r"pleural (?:fluid|space)",
    "consolidation": r"consolidat\w*|air-?space (?:disease|opaci\w*)|pneumonia|infiltrat\w*",
    "ground-glass opacity": r"ground[- ]glass|GGOs?",
    "nodule": r"nodul\w*|mass(?:es)?",
    "atelectasis": r"atelecta\w*|collapsed?",
    "emphysema": r"emphysema\w*|bullae|bullous",
    "lymph node": r"lymph\w*|adenopath\w*|nodes",
    "device": r"ports?|pacemakers?|catheters?|defibrillators?|picc",
}
SIDE_CODE_SIZE = 2 * len(SIDED_FINDINGS)
# Findings without a side, read only to leave them out of a report (without_findings).
UNSIDED_FINDINGS = {
    "cardiomegaly": r"cardiomegaly|cardiac enlargement|enlarged (?:heart|cardiac silhouette)|"
                    r"(?:heart|cardiac silhouette) (?:is )?enlarged",
    "pericardial effusion": r"pericardial (?:effusion|fluid)|(?:effusion|fluid) (?:in|of|within) the pericardi\w*",
    "arterial calcification": r"calcifi\w*|atherosclero\w*|plaques?",
}
_UNSIDED_CUE = re.compile("|".join(rf"\b(?P<u{i}>{cue})\b" for i, cue in enumerate(UNSIDED_FINDINGS.values())),
                          re.IGNORECASE)
# The finding code (a denoiser's `finding_code` input): for each finding, sided or not, whether the report reports it.
# The text encoder's pooled vector hardly tells a finding from its negation (issue 18: "No emphysema." reads as
# emphysema); this tells the denoiser outright, by the same negation rules that finding guidance leaves findings out by.
FINDING_CODE_NAMES = (*SIDED_FINDINGS, *UNSIDED_FINDINGS)
READING_NAMES = {"lymph node": "lymphadenopathy"}  # what `reading_of` calls a finding whose name says less
_LYMPH_NODE_GROUP = f"f{list(SIDED_FINDINGS).index('lymph node')}"  # its cue's group name in _FINDING_CUE
_FINDING_CUE = re.compile("|".join(rf"\b(?P<f{i}>{cue})\b" for i, cue in enumerate(SIDED_FINDINGS.values())),
                          re.IGNORECASE)
_MORE_SIDE_WORDS = re.compile(r"\b(?:(?P<both>bilateral\w*|both|bibas(?:al|ilar))|"
                              r"(?<!left )(?<!right )(?P<right>middle lobe))\b", re.IGNORECASE)
_PLACING = re.compile(r"\b(?:in|on|at|of|within|involving|to|from)\s+(?:the\s+)?$", re.IGNORECASE)  # "in the" left
_CLAUSE_END = re.compile(r"[.;:!?\n]|\b(?:but|however|whereas|although)\b", re.IGNORECASE)
_PART_START = re.compile(r",|\band\b", re.IGNORECASE)  # where a clause may name its findings' sides in parts
_NEGATION_BEFORE = re.compile(r"\b(?:no|not|nothing|without|negative for|free of|absence of|absent|resolved|"
                              r"resolution of|ruled out|nor)\b", re.IGNORECASE)
_NEGATION_AFTER = re.compile(r"\b(?:resolved|not (?:seen|identified|present|visible)|no longer|absent|ruled out|"
                             r"excluded)\b", re.IGNORECASE)
# A finding's words said to be normal ("the left pleural space is clear", "lymph nodes are not enlarged"): only right
# after the cue (one word may come between), as "effusion and the lungs are clear" reports the effusion.
_SAID_TO_BE = r"(?:\s+[a-z]+)?\s+(?:is|are|appears?|remains?)\s+"
_NORMAL_RIGHT_AFTER = re.compile(_SAID_TO_BE + r"(?:clear|normal|unremarkable|free|within normal limits|not enlarged|"
                                 r"non-?enlarged|of normal size)\b", re.IGNORECASE)
# Lymph nodes said to be of normal size ("subcentimetre nodes", "the nodes are subcentimetric"): not lymphadenopathy.
# Only for the nodes: a subcentimetre nodule is a nodule.
_NORMAL_SIZE = r"(?:sub-?centimet\w*|normal[- ]sized?)"
_NORMAL_SIZED_BEFORE = re.compile(rf"\b{_NORMAL_SIZE}\s+(?:[a-z]+\s+){{0,2}}$", re.IGNORECASE)
_NORMAL_SIZED_AFTER = re.compile(rf"{_SAID_TO_BE}{_NORMAL_SIZE}\b", re.IGNORECASE)


@dataclass(frozen=True)
class Report:
    findings: str
    impressions: str
    truncated: bool = False  # True when the input was longer than MAX_REPORT_CHARS

    @property
    def text(self) -> str:
        """The report as one canonical string (what provenance records)."""
        parts = []
        if self.findings:
            parts.append(f"Findings: {self.findings}")
        if self.impressions:
            parts.append(f"Impressions: {self.impressions}")
        return "\n".join(parts)


def parse_report(report: object, impressions: str | None = None) -> Report:
    """Parse free text, or text with Findings/Impressions headers (any case), into a Report.

    `impressions` may be passed separately (the Slicer panel has two boxes); text without headers
    counts as findings.
    """
    findings_text = _as_text(report, "report")
    impressions_text = _as_text(impressions, "impressions") if impressions is not None else ""
    truncated = len(findings_text) + len(impressions_text) > MAX_REPORT_CHARS
    findings_text = findings_text[:MAX_REPORT_CHARS]
    impressions_text = impressions_text[: max(0, MAX_REPORT_CHARS - len(findings_text))]

    sections = _split_sections(findings_text)
    findings = sections.get("findings", "")
    found_impressions = sections.get("impressions", "")
    joined_impressions = " ".join(p for p in (found_impressions, _clean(impressions_text)) if p)
    if not findings and not joined_impressions:
        raise ReportError("the report is empty: type the Findings and/or Impressions of a chest CT report")
    return Report(findings=findings, impressions=joined_impressions, truncated=truncated)


def read_report_file(path: str | os.PathLike) -> str:
    """The file's text; at most MAX_REPORT_FILE_BYTES are read, so /dev/zero or a CT volume fails at once."""
    try:
        with open(path, "rb") as handle:
            data = handle.read(MAX_REPORT_FILE_BYTES + 1)
    except FileNotFoundError as exc:
        raise ReportError(f"report file {path} does not exist") from exc
    except OSError as exc:
        raise ReportError(f"cannot read report file {path}: {exc.strerror}") from exc
    if len(data) > MAX_REPORT_FILE_BYTES:
        raise ReportError(f"report file {path} is larger than {MAX_REPORT_FILE_BYTES // 1024} KB; a report is a few KB "
                          "of text: is it the right file?")
    try:
        return data.decode("utf-8-sig")  # a byte-order mark (Notepad's) is no part of the report
    except UnicodeDecodeError as exc:
        raise ReportError(f"report file {path} is not UTF-8 text") from exc


def render_prompt(report: Report, slices: int | None = None, slice_spacing: float | None = None) -> str:
    """The text the model is conditioned on: report sections plus optional meta-information."""
    lines = [f"Findings: {report.findings or 'Not stated.'}", f"Impressions: {report.impressions or 'Not stated.'}"]
    if slices is not None:
        lines.append(f"Length: {int(slices)} slices")
    if slice_spacing is not None:
        lines.append(f"Spacing: {float(slice_spacing):g} mm")
    return "\n".join(lines)


def typed_meta_lines(report: Report) -> list[str]:
    """Meta lines render_prompt writes ("Length: N slices", "Spacing: S mm") that a user typed into the report
    itself: the model reads them there as report text, not as a request."""
    return _TYPED_META.findall(f"{report.findings}\n{report.impressions}")


def half_texts(text: str, placed: dict[str, set[str]] | None = None) -> tuple[str, str]:
    """(right, left): the text as each half of the body reads it, without the parts that name the other side only.

    Side guidance guides each half of the volume by its own text (sampling.Guidance), so a finding the report puts on
    one side is asked for on that side alone. A part is a clause, or within a clause one of its findings with its
    side ("Right pleural effusion and left lower lobe consolidation."); a part that names no side is on both halves,
    unless every finding it reports is one the report places on the other side only (`placed`, by default the text's
    own sided_findings): "Dependent atelectasis." after "atelectasis in the right lower lobe" is the right's."""
    placed = sided_findings(text) if placed is None else placed

    def without(other: str) -> str:
        def elsewhere(part: str) -> bool:
            sides = _sides_named(part)
            return sides == {other} or (not sides and _only_placed(part, placed, other))
        return _without(text, elsewhere, _sides_named)

    return without("left"), without("right")


def lobes_at(levels: tuple[float, float]) -> frozenset[str]:
    """The lobes (of LOBE_LEVELS) that reach the body's levels [top, bottom), fractions of the body head to feet."""
    return frozenset(lobe for lobe, (top, bottom) in LOBE_LEVELS.items() if top < levels[1] and levels[0] < bottom)


def level_text(text: str, lobes: frozenset[str], placed: dict[str, set[str]] | None = None) -> str:
    """The text where only `lobes` lie (lobes_at): without the parts that name other lobes only, nor those without a
    lobe whose findings the text places only in other lobes (`placed`, by default the text's own placed_lobes)."""
    placed = placed_lobes(text) if placed is None else placed

    def elsewhere(part: str) -> bool:
        named = _lobes_named(part)
        if named:
            return not named & lobes
        reported = reported_findings(part)
        return bool(reported) and all(placed.get(name) and not placed[name] & lobes for name in reported)

    return _without(text, elsewhere, _places_named)


def half_reports(report: Report) -> tuple[Report, Report]:
    """(right, left): each section by half_texts, the findings placed by the whole report; a section with nothing
    left on a half is empty there, so that half's prompt reads "Not stated." as render_prompt writes it."""
    placed = sided_findings(f"{report.findings}\n{report.impressions}")
    (right_findings, left_findings), (right_impressions, left_impressions) = (
        (right.strip(), left.strip()) for right, left in (half_texts(section, placed)
                                                          for section in (report.findings, report.impressions)))
    return (Report(right_findings, right_impressions, report.truncated),
            Report(left_findings, left_impressions, report.truncated))


def lobe_report(report: Report, lobes: frozenset[str]) -> Report:
    """The report where only `lobes` lie: each section by level_text, the findings placed by the whole report; a
    section with nothing left is empty, as in half_reports. What side guidance asks for inside a lobe (places)."""
    placed = placed_lobes(f"{report.findings}\n{report.impressions}")
    return Report(*(level_text(section, lobes, placed).strip() for section in (report.findings, report.impressions)),
                  report.truncated)


def reports_no_finding(report: Report) -> bool:
    """True when the report reports no finding of FINDING_CODE_NAMES (every one it names is negated): a normal chest
    to this parser, whatever its words (pipeline.drawn_report)."""
    return not any(finding_code(f"{report.findings}\n{report.impressions}"))


def without_findings(report: Report) -> Report:
    """The report without the parts that report a finding (any of SIDED_FINDINGS and UNSIDED_FINDINGS, not negated):
    what finding guidance guides away from, so that it amplifies what the findings' words change and not what the
    rest of the report does. A section with nothing left is empty, as in half_reports."""
    def reports_one(part: str) -> bool:  # a part lies inside one clause: finding_code reads it as that clause
        return any(finding_code(part))

    return Report(*(_without(section, reports_one, _places_named).strip()
                    for section in (report.findings, report.impressions)), report.truncated)


def names_one_side(text: str) -> bool:
    """Whether some part of the text names one side only, so that side guidance has something to do."""
    right, left = half_texts(text)
    return right != left


def sided_findings(text: str) -> dict[str, set[str]]:
    """The findings of SIDED_FINDINGS that `text` reports (not negated) on a side, by name: {"right"}, {"left"}
    or both. A finding reported without a side is not in it."""
    found: dict[str, set[str]] = {}
    for clause, _ in _clauses(text):
        sides = _side_words(clause)
        cues = list(_FINDING_CUE.finditer(clause))
        for number, cue in enumerate(cues):
            if _negated(clause, cue) or not sides:
                continue
            name = list(SIDED_FINDINGS)[int(cue.lastgroup[1:])]
            after_previous = cues[number - 1].end() if number else 0
            before_next = cues[number + 1].start() if number + 1 < len(cues) else len(clause)
            found.setdefault(name, set()).update(_sides_of(cue, sides, clause, after_previous, before_next))
    return found


def side_code(text: str) -> list[float]:
    """[right, left] of every finding in SIDED_FINDINGS: 1.0 where the text reports it on that side (sided_findings)."""
    found = sided_findings(text)
    return [float(side in found.get(name, ())) for name in SIDED_FINDINGS for side in ("right", "left")]


def half_code(text: str) -> list[float]:
    """[right, left] of every finding in SIDED_FINDINGS: 1.0 where that half of the body reads it reported (the
    halves of half_texts, read by reported_findings), so a finding reported without a side is on both."""
    halves = [reported_findings(half) for half in half_texts(text)]
    return [float(name in found) for name in SIDED_FINDINGS for found in halves]


def finding_code(text: str) -> list[float]:
    """1.0 for each finding of FINDING_CODE_NAMES that the text reports, with or without a side (not negated in its
    clause)."""
    named = findings_named(text)
    return [float(named.get(name, False)) for name in FINDING_CODE_NAMES]


def findings_named(text: str) -> dict[str, bool]:
    """Each finding of FINDING_CODE_NAMES the text names: True where it reports it (not negated in some clause),
    False where it only negates it ("No pleural fluid." in a report of a nodule)."""
    named: dict[str, bool] = {}
    for name, negated in _finding_cues(text):
        named[name] = named.get(name, False) or not negated
    return named


DENOISER_CODES = {"side": side_code, "half": half_code, "finding": finding_code}


def denoiser_code(text: str, kind: str, levels: tuple[float, float] | None = None) -> list[float]:
    """What a denoiser reads of the text besides its tokens: the code of DENOISER_CODES named `kind` (half_code for
    a side_map denoiser); at `levels` (a block's, config.DenoiserConfig.code_levels), of the text where only the lobes
    there lie (level_text). One home for training and generation."""
    if levels is not None:
        text = level_text(text, lobes_at(levels))
    return DENOISER_CODES[kind](text)


def placed_lobes(text: str) -> dict[str, set[str]]:
    """The findings of SIDED_FINDINGS that `text` reports in a lobe (a part naming both), by name: the lobes' levels
    ("upper", "middle", "lower"; LOBE_LEVELS)."""
    found: dict[str, set[str]] = {}
    for clause, _ in _clauses(text):
        for part in _parts(clause, _places_named):
            lobes = _lobes_named(part)
            for name in reported_findings(part) if lobes else ():
                found.setdefault(name, set()).update(lobes)
    return found


def reported_findings(text: str) -> set[str]:
    """The findings of SIDED_FINDINGS that `text` reports, with or without a side (not negated in their clause)."""
    return {name for name, negated in _finding_cues(text) if not negated and name in SIDED_FINDINGS}


def reading_of(report: Report) -> str:
    """What the report is read to say: each finding of FINDING_CODE_NAMES it reports, with the sides and lobes it
    names, then those it names only negated. Side and finding guidance (and a denoiser's code) follow this reading;
    said in words, a user can see where the parser misread them and rephrase."""
    text = f"{report.findings}\n{report.impressions}"
    named = findings_named(text)
    sides, lobes = sided_findings(text), placed_lobes(text)

    def placed(name: str) -> str:
        where = _where(sides.get(name, set()), lobes.get(name, set()))
        return f"{READING_NAMES.get(name, name)} ({where})" if where else READING_NAMES.get(name, name)

    said = ", ".join(placed(name) for name in FINDING_CODE_NAMES if named.get(name)) or "no finding"
    unsaid = [READING_NAMES.get(name, name) for name in FINDING_CODE_NAMES if named.get(name) is False]
    return f"{said}; negated: {', '.join(unsaid)}" if unsaid else said


def _where(sides: set[str], lobes: set[str]) -> str:
    """Sides and lobe levels in words: "right lower lobe", "right and left upper lobes", "lingula", "left", ""."""
    side = [word for word in ("right", "left") if word in sides]
    lobe = [word for word in LOBE_LEVELS if word in lobes]
    lingula = side == ["left"] and "middle" in lobe  # the left lung's middle level is the lingula's
    if lingula:
        lobe.remove("middle")
        side = side if lobe else []  # "lingula", not "left and lingula"
    words = " and ".join(side)
    if lobe:
        levels = " and ".join([", ".join(lobe[:-1]), lobe[-1]] if len(lobe) > 1 else lobe)
        words += f" {levels} lobe" + "s" * (len(side) > 1 or len(lobe) > 1)
    return " and ".join(word for word in (words.strip(), "lingula" * lingula) if word)


def _finding_cues(text: str) -> Iterator[tuple[str, bool]]:
    """(name, negated) for each cue of a finding of FINDING_CODE_NAMES in the text, clause by clause."""
    for clause, _ in _clauses(text):
        for cues, names in ((_FINDING_CUE, list(SIDED_FINDINGS)), (_UNSIDED_CUE, list(UNSIDED_FINDINGS))):
            for cue in cues.finditer(clause):
                yield names[int(cue.lastgroup[1:])], _negated(clause, cue)


def _negated(clause: str, cue: re.Match) -> bool:
    """Whether a negation cue of the clause precedes the finding's cue, a "resolved"-like cue follows it, or its
    words are said to be normal right after it; for lymph nodes also, whether they are said to be of normal size."""
    nodes = cue.lastgroup == _LYMPH_NODE_GROUP and bool(_NORMAL_SIZED_BEFORE.search(clause[:cue.start()])
                                                       or _NORMAL_SIZED_AFTER.match(clause, cue.end()))
    return bool(nodes or _NEGATION_BEFORE.search(clause, 0, cue.start()) or _NEGATION_AFTER.search(clause, cue.end())
                or _NORMAL_RIGHT_AFTER.match(clause, cue.end()))


def _only_placed(part: str, placed: dict[str, set[str]], side: str) -> bool:
    """Whether the part reports findings, all of them placed on `side` alone."""
    reported = reported_findings(part)
    return bool(reported) and all(placed.get(name) == {side} for name in reported)


def _without(text: str, elsewhere: Callable[[str], bool], named: Callable[[str], set[str]]) -> str:
    """The text without the parts (_parts, cut where `named` names a place) that lie `elsewhere`: a clause keeps its
    end while a part of it stays."""
    kept = []
    for clause, end in _clauses(text):
        parts = _parts(clause, named)
        staying = [part for part in parts if not elsewhere(part)]
        if len(staying) == len(parts):
            kept.append(clause + end)
        elif staying:
            kept.append("".join(staying).rstrip() + end)
    return "".join(kept)


def _clauses(text: str) -> list[tuple[str, str]]:
    """(words, end) of each clause: the end is what _CLAUSE_END matched after the words ("" for the last one);
    joined, they are the text."""
    ends = list(_CLAUSE_END.finditer(text))
    starts = [0] + [m.end() for m in ends]
    clauses = [(text[start:m.start()], m.group(0)) for start, m in zip(starts, ends)] + [(text[starts[-1]:], "")]
    return [(words, end) for words, end in clauses if words or end]


def _parts(clause: str, named: Callable[[str], set[str]]) -> list[str]:
    """The clause's words cut before each ", " or "and" that starts another finding with its own place (a side,
    _sides_named, or also a lobe, _places_named): joined, they are the clause."""
    cuts = [0] + [m.start() for m in _PART_START.finditer(clause)] + [len(clause)]
    pieces = [clause[a:b] for a, b in zip(cuts, cuts[1:]) if b > a] or [clause]
    parts = [pieces[0]]
    for piece in pieces[1:]:
        if all(_FINDING_CUE.search(p) and named(p) for p in (parts[-1], piece)):
            parts.append(piece)
        else:
            parts[-1] += piece
    return parts


def _side_words(text: str) -> list[tuple[re.Match, set[str]]]:
    """Each word of text that names a side, with the sides it names ("bilateral": both)."""
    kept = [m for m in _SIDE_WORD.finditer(text) if not _KEPT_BEFORE.search(text[max(0, m.start() - 4): m.start()])]
    return ([(m, {_SIDE_OF_WORD[m.group(0).lower()]}) for m in kept]
            + [(m, {"right"} if m.group("right") else {"left", "right"}) for m in _MORE_SIDE_WORDS.finditer(text)])


def _sides_named(text: str) -> set[str]:
    return set().union(*(sides for _, sides in _side_words(text)))


def _lobes_named(text: str) -> set[str]:
    """The lobes' levels the text names ("upper", "middle", "lower"; LOBE_LEVELS)."""
    return {_LOBE_OF_WORD[(m.group(1) or m.group(0)).lower()] for m in _LOBE_WORD.finditer(text)}


def _places_named(text: str) -> set[str]:
    """The sides and lobes' levels the text names."""
    return _sides_named(text) | _lobes_named(text)


def _sides_of(cue: re.Match, sides: list[tuple[re.Match, set[str]]], clause: str, low: int, high: int) -> set[str]:
    """A finding's sides: the side words that modify it ("left lower lobe consolidation", between the clause's
    previous cue and this one, `low`) and those that place it ("consolidation in the left lower lobe", up to the
    next cue, `high`); when neither, the nearest side word of the clause ("in the left upper lobe, a nodule")."""
    def placing(word: re.Match) -> bool:
        return bool(_PLACING.search(clause, 0, word.start()))

    taken = [side for word, side in sides if (low <= word.start() < cue.start() and not placing(word))
             or (cue.end() <= word.start() < high and placing(word))]
    if taken:
        return set().union(*taken)

    def distance(side: tuple[re.Match, set[str]]) -> tuple[int, bool]:
        word = side[0]
        after = word.start() > cue.start()
        return len((clause[cue.end():word.start()] if after else clause[word.end():cue.start()]).split()), after

    return min(sides, key=distance)[1]


def _as_text(value: object, what: str) -> str:
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ReportError(f"the {what} is not UTF-8 text; save it as plain text and try again") from exc
    if not isinstance(value, str):
        raise ReportError(f"the {what} must be text, not {type(value).__name__}")
    if "\x00" in value:
        raise ReportError(f"the {what} contains binary data (NUL bytes); paste the report as plain text")
    return value


def _clean(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def _split_sections(text: str) -> dict[str, str]:
    """Map 'findings'/'impressions' to their text; text before any header is findings."""
    sections: dict[str, list[str]] = {"findings": [], "impressions": []}
    text = _SPACES.sub(" ", text)
    matches = list(_HEADER.finditer(text))
    head = text[: matches[0].start()] if matches else text
    sections["findings"].append(head)
    for i, match in enumerate(matches):
        end = matches[i + 1].start() if i + 1 < len(matches) else len(text)
        name = (match.group(1) or match.group(2)).lower()
        key = "findings" if name.startswith("finding") else "impressions"
        sections[key].append(text[match.end() : end])
    return {key: _clean(" ".join(parts)) for key, parts in sections.items()}
