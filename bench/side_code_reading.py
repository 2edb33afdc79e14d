"""Do `ctflow.report.side_code` and side guidance's `half_reports` read the side a report states? Checked against a
cohort's label files.

For every present finding of a prepared cohort whose labels give it a side (its side, or its lobe's; "bilateral":
both), the sides `sided_findings` reads from the writer's report and from each report variant (the same findings in
other words, as `cache-latents --variants` embeds them) are compared with the label's: the same, another, or none.
None is also what a report that never states the side gives (a variant may name a finding in its Impressions only),
so the first few of each kind are printed for a reader to judge. The held-out phrasings, which no training run may
use, are read the same way (`--heldout`), and their negated counterparts should read no side at all.
The rows "halves" read each text's two halves (`half_reports`, what side guidance guides the right and the left half
of the volume by): which halves' texts report the finding (`reported_findings`: with a side or without, as an
Impressions line "Dependent atelectasis." does) should be the label's sides, so a finding on the right is asked for
on the right half and not on the left.

  python bench/side_code_reading.py --data cache/cohort2a cache/sidetwins4 --variants 8 --heldout
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1] / "training"))
from ctflow.errors import CTFlowError  # noqa: E402
from ctflow.report import Report, half_reports, parse_report, reported_findings, sided_findings  # noqa: E402
from ctflow_train.dataset import read_index  # noqa: E402
from ctflow_train.heldout import load_heldout  # noqa: E402
from ctflow_train.latent_store import labelled_findings, report_variant  # noqa: E402
from ctflow_train.options import count, positive  # noqa: E402

NAMES = {"pleural_effusion": "pleural effusion", "consolidation": "consolidation", "ground_glass": "ground-glass opacity",
         "nodule": "nodule", "atelectasis": "atelectasis", "emphysema": "emphysema", "lymphadenopathy": "lymph node",
         "medical_material": "device"}  # label name -> the side code's


def label_sides(params: dict) -> set[str] | None:
    """The sides a present finding's labels give it; None when it has none."""
    if not params.get("present"):
        return None
    where = params.get("side") or params.get("lobe", "").split(" ")[0]
    return {"right", "left"} if where == "bilateral" else {where} if where in ("right", "left") else None


def verdict(read: set[str] | None, wanted: set[str]) -> str:
    return "same" if (read or set()) == wanted else "none" if not read else "another"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", nargs="+", type=Path, required=True, help="prepared cohort folders (with labels/)")
    parser.add_argument("--variants", type=positive(int), default=8,
                        help="report variants per volume, as the stores embed them")
    parser.add_argument("--heldout", action="store_true", help="also read the held-out phrasings")
    parser.add_argument("--examples", type=count, default=3, help="sentences printed per finding and verdict")
    args = parser.parse_args()
    tally: collections.Counter = collections.Counter()
    shown: collections.Counter = collections.Counter()

    def halves(text: str) -> dict[str, set[str]]:
        """Finding name -> the halves whose text reports it."""
        read: dict[str, set[str]] = {}
        for half, half_report in zip(("right", "left"), half_reports(parse_report(text))):
            for name in reported_findings(half_report.text):
                read.setdefault(name, set()).add(half)
        return read

    def record(kind: str, name: str, read: set[str] | None, wanted: set[str], text: str) -> None:
        outcome = verdict(read, wanted)
        tally[kind, name, outcome] += 1
        if outcome != "same" and shown[kind, name, outcome] < args.examples:
            shown[kind, name, outcome] += 1
            print(f"{kind} {name}: labels {sorted(wanted)}, read {sorted(read or [])}: {text!r}")

    for folder in args.data:
        for entry in read_index(folder):
            findings = labelled_findings(folder, entry)
            texts = [("writer", Report(entry["findings"], entry["impressions"]).text)]
            texts += [("variant", report_variant(findings, entry["name"], k).text) for k in range(args.variants)]
            for kind, text in texts:
                read, by_halves = sided_findings(text), halves(text)
                for key, name in NAMES.items():
                    wanted = label_sides(findings.get(key, {"present": False}))
                    if wanted:
                        record(kind, name, read.get(name), wanted, text)
                        record(f"{kind}, halves", name, by_halves.get(name), wanted, text)
    if args.heldout:
        for case in load_heldout():
            if case.side and case.finding in NAMES:
                name = NAMES[case.finding]
                record("held-out", name, sided_findings(case.report).get(name), {case.side}, case.report)
                record("held-out, halves", name, halves(case.report).get(name), {case.side}, case.report)
                record("held-out negated", name, sided_findings(case.negated).get(name), set(), case.negated)
                record("held-out negated, halves", name, halves(case.negated).get(name), set(), case.negated)
    print("| reports | finding | the labels' side | another | none |")
    print("|---|---|---|---|---|")
    for kind in (f"{k}{h}" for k in ("writer", "variant", "held-out", "held-out negated") for h in ("", ", halves")):
        for name in NAMES.values():
            row = [tally[kind, name, outcome] for outcome in ("same", "another", "none")]
            if sum(row):
                print(f"| {kind} | {name} | {row[0]} of {sum(row)} | {row[1]} | {row[2]} |")
    return 0


if __name__ == "__main__":
    try:  # a missing or corrupt input is one line
        sys.exit(main())
    except CTFlowError as exc:
        raise SystemExit(f"side_code_reading: {exc}") from exc
