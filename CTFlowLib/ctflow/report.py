"""Report -> prompt: split a radiology report into Findings and Impressions and render the model's prompt.

CT-RATE reports have a Findings and an Impressions section; CTFlow's prompt reads
"Findings: ... Impressions: ... Length: N". Training and generation both call `render_prompt`,
so the two can never drift apart.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

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

# A finding's side and its mirror image (side guidance steers away from the mirrored report). The heart and its
# vessels keep their names ("leads in the right atrium", "right and left ventricles", "right coronary artery",
# "right-to-left shunt"): a report's side is mirrored, not the anatomy; nor is "left" as a verb ("left in place").
_MIRRORED_WORDS = {"right": "left", "left": "right", "rul": "LUL", "lul": "RUL", "rll": "LLL", "lll": "RLL",
                   "rml": "lingula", "lingula": "middle lobe", "lingular": "middle lobe"}
_KEPT_AFTER = (r"(?:[\s-]+and[\s-]+(?:right|left))?[\s-]+(?:atri|ventric|heart|cardiac|coronar|main\s+coronar)"
               r"|-to-|\s+(?:in\s+(?:place|situ)|over\b|behind)")
_SIDE_WORD = re.compile(rf"\b({'|'.join(_MIRRORED_WORDS)})\b(?!{_KEPT_AFTER})", re.IGNORECASE)
_KEPT_BEFORE = re.compile(r"-to-$")  # the "left" of "right-to-left"


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


def mirrored(text: str) -> str:
    """The text with every side it names swapped (right and left, RUL and LUL, RML and the lingula, ...); the text
    itself when it names none. The negative prompt of side guidance: what the model would make on the other side."""
    def swap(match: re.Match) -> str:
        kept = _KEPT_BEFORE.search(text[max(0, match.start() - 4): match.start()])
        return match.group(0) if kept else _mirrored_word(match.group(0))

    return _SIDE_WORD.sub(swap, text)


def names_a_side(text: str) -> bool:
    """Whether side guidance has anything to mirror in `text` (otherwise it is made without it)."""
    return mirrored(text) != text


def _mirrored_word(word: str) -> str:
    other = _MIRRORED_WORDS[word.lower()]
    if other.isupper() or len(word) == 3:  # to or from an abbreviation as written: rll -> LLL, RML -> lingula
        return other
    if word.isupper():  # RIGHT -> LEFT
        return other.upper()
    return other.capitalize() if word[0].isupper() else other


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
