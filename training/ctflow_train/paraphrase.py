"""Report variants: a cohort patient's findings in other radiologists' words, for the flow to train on.

The cohort's writer (reports.py) words each fact from a few templates, always in one order, lobes spelled out and
every absent finding negated alike, and a model trained on it alone follows those templates (held-out phrasings:
62 of 110 pairs raised, the writer's own 88). A user writes otherwise. `paraphrase` says the same facts in a style
drawn once a report: lobe abbreviations (RLL) or "the lower lobe of the right lung", "right-sided", synonyms, cm or
mm, other negations ("no evidence of", "lungs without", "has resolved", or nothing said), a normal heart's
cardiothoracic ratio where the cohort's labels hold it, a finding named in the Impressions alone, the Findings in
another order, and brief reports of a few negations and no routine sentences: a user's short report that negates a
finding must read as a normal chest, which the writer's long lists of negations alone did not teach. Written without
the finding study's held-out phrasings (heldout_reports.json), it shares no sentence with them
(Testing/training/test_heldout.py).

Twins share the variants' draws: the generator is consumed alike whether a finding is present or not, so variant k
of a twin differs from variant k of its patient in the flipped finding's words alone (`variant_rng`).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from ctflow.report import Report

from .dataset import patient_of
from .reports import ORDER, ROUTINE

ABBREVIATIONS = {"right upper lobe": "RUL", "right middle lobe": "RML", "right lower lobe": "RLL",
                 "left upper lobe": "LUL", "left lower lobe": "LLL"}
NEGATIONS = ("No {noun}.", "No evidence of {noun}.", "There is no {noun}.", "No {noun} is seen.",
             "Negative for {noun}.",
             "{subject} without {own_noun}.",  # its own noun: not "Pericardium without fluid in the pericardium"
             "Previously described {noun} has resolved.")
SUBJECTS = {  # what "{subject} without {own_noun}." says is free of a finding
    "cardiomegaly": "Heart", "pericardial_effusion": "Pericardium", "arterial_calcification": "Thoracic aorta",
    "lymphadenopathy": "Mediastinum", "pleural_effusion": "Pleural spaces",
}  # the lung findings: "Lungs"
NOUNS = {  # what a negation names
    "cardiomegaly": ("cardiomegaly", "cardiac enlargement"),
    "pericardial_effusion": ("pericardial effusion", "fluid in the pericardium"),
    "arterial_calcification": ("aortic calcification", "atherosclerotic calcification of the aorta"),
    "lymphadenopathy": ("hilar or mediastinal adenopathy", "enlarged mediastinal lymph node"),
    "emphysema": ("centrilobular emphysema", "emphysematous destruction"),
    "nodule": ("pulmonary nodule", "suspicious lung nodule"),
    "consolidation": ("lobar consolidation", "focal consolidation"),
    "ground_glass": ("ground-glass opacity", "GGO"),
    "atelectasis": ("subsegmental atelectasis", "atelectatic change"),
    "pleural_effusion": ("pleural effusion", "fluid in either pleural space"),
}
NORMAL_HEART = ("Normal heart size, cardiothoracic ratio {:.2f}.",
                "The cardiothoracic ratio is {:.2f}, within normal limits.")
RESOLVABLE = {"pericardial_effusion", "lymphadenopathy", "nodule", "consolidation", "ground_glass", "atelectasis",
              "pleural_effusion"}  # findings a report may call resolved
OTHER_ROUTINE = {  # the writer's routine topics, worded anew
    "airways": ("Airways are clear.", "Patent central airways."),
    "esophagus": ("Esophagus unremarkable.",),
    "abdomen": ("Included upper abdomen without acute abnormality.", "Limited views of the upper abdomen are normal."),
    "bones": ("Osseous structures intact.", "No aggressive osseous lesion."),
}
NORMAL = ("No acute cardiopulmonary process.", "Unremarkable chest CT.", "No acute intrathoracic abnormality.")


@dataclass(frozen=True)
class Style:
    """How one radiologist writes: drawn once a report."""

    lobe: int  # 0 "right lower lobe", 1 "RLL", 2 "lower lobe of the right lung"
    sided: bool  # "right-sided" for "right"
    cm: bool  # sizes in cm
    negation: int  # index into NEGATIONS
    unsaid: bool  # absent findings mostly left unsaid
    brief: bool  # no routine sentences, about half the absent findings negated: a short report of few negations
    shuffled: bool  # Findings in another order than the writer's anatomical one
    numbered: bool  # Impressions as a numbered list

    def lobe_name(self, lobe: str) -> str:
        side, part, _ = lobe.split(" ")
        return (lobe, ABBREVIATIONS[lobe], f"{part} lobe of the {side} lung")[self.lobe]

    def side(self, side: str) -> str:
        return f"{side}-sided" if self.sided and side != "bilateral" else side

    def size(self, mm: float) -> str:
        return f"{mm / 10:.1f} cm" if self.cm else f"{mm:.0f} mm"


def variant_rng(name: str, variant: int) -> np.random.Generator:
    """Variant `variant` of volume `name`: the same draws for every twin of one patient."""
    key = int.from_bytes(hashlib.sha256(patient_of(name).encode()).digest()[:8], "little")
    return np.random.default_rng(np.random.SeedSequence([key, variant]))


def paraphrase(drawn: dict[str, dict], rng: np.random.Generator) -> Report:
    """Findings and Impressions for the drawn findings (name -> {"present": bool, ...}), in a drawn style."""
    style = Style(lobe=int(rng.integers(3)), sided=bool(rng.random() < 0.3), cm=bool(rng.random() < 0.3),
                  negation=int(rng.integers(len(NEGATIONS))), unsaid=bool(rng.random() < 1 / 6),
                  brief=bool(rng.random() < 0.35), shuffled=bool(rng.random() < 0.3), numbered=bool(rng.random() < 0.5))
    order = rng.permutation(len(ORDER)) if style.shuffled else np.arange(len(ORDER))
    normal = NORMAL[int(rng.random() * len(NORMAL))]
    findings, impressions = [], []
    for topic in (ORDER[i] for i in order):
        pick, where, keep = rng.random(3)  # three draws a topic, present or not
        if topic in ROUTINE:
            options = OTHER_ROUTINE[topic]
            if keep < 0.5 and not style.brief:
                findings.append(options[int(pick * len(options))])
            continue
        params = drawn[topic]
        if params["present"]:
            sentences = PRESENT[topic](params, style)
            impressions.append(_sentence(IMPRESSION[topic](params, style)))
            if where >= 0.25:  # else named in the Impressions alone
                findings.append(sentences[int(pick * len(sentences))])
        elif topic in NOUNS and keep < (0.3 if style.unsaid else 0.5 if style.brief else 0.85):
            if "cardiothoracic_ratio" in params and where < 0.5:  # a normal heart's ratio (findings.normal_heart)
                findings.append(NORMAL_HEART[int(pick * len(NORMAL_HEART))].format(params["cardiothoracic_ratio"]))
            else:
                noun = NOUNS[topic][int(pick * len(NOUNS[topic]))]
                form = NEGATIONS[style.negation]
                if "resolved" in form and topic not in RESOLVABLE:
                    form = NEGATIONS[0]
                findings.append(_sentence(form.format(noun=noun, own_noun=NOUNS[topic][0],
                                                      subject=SUBJECTS.get(topic, "Lungs"))))
    if style.numbered and len(impressions) > 1:
        summary = " ".join(f"{n}. {item}." for n, item in enumerate(impressions, start=1))
    else:
        summary = " ".join(f"{item}." for item in impressions) or normal
    return Report(findings=" ".join(findings) or "Chest CT without contrast.", impressions=summary)


def _sentence(text: str) -> str:
    return text[0].upper() + text[1:]


def _pleural(p: dict, s: Style) -> list[str]:
    grade = p["grade"]
    if p["side"] == "bilateral":
        return [f"Bilateral {grade} pleural effusions.", f"{grade.capitalize()} pleural fluid on both sides."]
    side = s.side(p["side"])
    return [f"{grade.capitalize()} {side} hydrothorax.", f"{side.capitalize()} pleural effusion of {grade} size.",
            f"{grade.capitalize()} amount of {side} pleural fluid.", f"Pleural effusion on the {p['side']}, {grade}."]


def _atelectasis(p: dict, s: Style) -> list[str]:
    if p["kind"] == "linear":
        lobe = s.lobe_name(p["lobe"])
        return [f"Plate-like atelectasis in the {lobe}.", f"Subsegmental atelectatic change, {lobe}."]
    if p["side"] == "bilateral":
        return ["Bibasilar dependent atelectasis.", "Dependent atelectatic change at both lung bases."]
    return [f"Dependent atelectasis at the {s.side(p['side'])} lung base.",
            f"Posterior atelectatic change in the {s.lobe_name(p['side'] + ' lower lobe')}."]


def _device(p: dict, s: Style) -> list[str]:
    side = s.side(p["side"])
    if p["device"] == "pacemaker":
        return [f"{side.capitalize()} pacemaker with its lead in the right ventricle.",
                f"Cardiac pacing device over the {p['side']} chest, lead tip in the RV."]
    return [f"{side.capitalize()} chest port, catheter tip at the cavoatrial junction.",
            f"Implanted venous port via the {p['side']} side with its tip at the cavoatrial junction."]


def _nodes(p: dict, s: Style) -> list[str]:
    largest = p["nodes"][0]
    return [f"Mediastinal adenopathy, largest {s.size(largest['short_axis_mm'])} short axis ({largest['station']}).",
            f"Enlarged {largest['station']} lymph node measuring {s.size(largest['short_axis_mm'])}."]


PRESENT = {  # finding -> its sentences when present, in a style
    "cardiomegaly": lambda p, s: ["The heart is enlarged.", "Cardiac enlargement.",
                                  f"Enlarged cardiac silhouette, cardiothoracic ratio {p['cardiothoracic_ratio']:.2f}."],
    "pericardial_effusion": lambda p, s: [
        f"{p['grade'].capitalize()} pericardial fluid, {s.size(p['thickness_mm'])} thick.",
        f"Pericardial effusion up to {s.size(p['thickness_mm'])}.",
        f"{p['grade'].capitalize()} amount of fluid in the pericardial sac."],
    "arterial_calcification": lambda p, s: [f"{p['severity'].capitalize()} aortic calcification.",
                                            f"Calcified atheroma of the aorta ({p['severity']})."],
    "lymphadenopathy": _nodes,
    "medical_material": _device,
    "emphysema": lambda p, s: [f"{p['severity'].capitalize()} upper lobe predominant emphysema.",
                               f"Emphysematous change, {p['severity']}, mostly in the upper lobes."],
    "nodule": lambda p, s: [f"{s.size(p['diameter_mm'])} nodule in the {s.lobe_name(p['lobe'])}.",
                            f"Noncalcified nodule, {s.lobe_name(p['lobe'])}, {s.size(p['diameter_mm'])}.",
                            f"A {s.size(p['diameter_mm'])} solid lung nodule is seen in the {s.lobe_name(p['lobe'])}."],
    "consolidation": lambda p, s: [
        f"Airspace consolidation in the {s.lobe_name(p['lobe'])}{' with air bronchograms' if p['air_bronchogram'] else ''}.",
        f"Consolidative opacity, {s.lobe_name(p['lobe'])}.",
        f"Dense airspace opacity in the {s.lobe_name(p['lobe'])}, in keeping with consolidation."],
    "ground_glass": lambda p, s: [f"GGO in the {s.lobe_name(p['lobe'])}.",
                                  f"Hazy ground-glass attenuation in the {s.lobe_name(p['lobe'])}."],
    "atelectasis": _atelectasis,
    "pleural_effusion": _pleural,
}
IMPRESSION = {  # finding -> its Impressions item when present
    "cardiomegaly": lambda p, s: "Enlarged heart",
    "pericardial_effusion": lambda p, s: "Pericardial effusion",
    "arterial_calcification": lambda p, s: "Atherosclerotic aorta",
    "lymphadenopathy": lambda p, s: "Enlarged mediastinal nodes",
    "medical_material": lambda p, s: f"{s.side(p['side']).capitalize()} {'pacemaker' if p['device'] == 'pacemaker' else 'chest port'}",
    "emphysema": lambda p, s: "Emphysema",
    "nodule": lambda p, s: f"Nodule, {s.lobe_name(p['lobe'])}, {s.size(p['diameter_mm'])}",
    "consolidation": lambda p, s: f"Consolidation, {s.lobe_name(p['lobe'])}",
    "ground_glass": lambda p, s: f"Ground-glass opacity, {s.lobe_name(p['lobe'])}",
    "atelectasis": lambda p, s: "Atelectasis",
    "pleural_effusion": lambda p, s: ("Bilateral pleural effusions" if p["side"] == "bilateral"
                                      else f"{s.side(p['side']).capitalize()} pleural effusion"),
}
