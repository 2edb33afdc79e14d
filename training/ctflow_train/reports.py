"""CT-RATE-style reports for synthetic patients: Findings in anatomical order, then Impressions.

Wording is drawn from several templates per statement, so the text encoder sees varied phrasing of
the same fact. Every finding is either described with its side, lobe and size, or explicitly negated
("No pleural effusion."); devices are only mentioned when present, as in real reports.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from ctflow.report import Report

Params = dict
Phrases = Callable[[Params], list[str]]

ROUTINE = {  # statements about structures the cohort never makes abnormal
    "airways": [
        "The trachea and both main bronchi are patent and of normal caliber.",
        "Trachea and main bronchi are open, with no endobronchial lesion.",
        "The central airways are patent.",
    ],
    "esophagus": [
        "The thoracic esophagus is of normal caliber without wall thickening.",
        "No thickening of the esophageal wall.",
    ],
    "abdomen": [
        "The upper abdominal organs included in the scan are unremarkable.",
        "Visualized upper abdominal organs show no abnormality.",
        "No abnormality in the upper abdomen within the field of view.",
    ],
    "bones": [
        "No lytic or destructive lesion in the bones within the field of view.",
        "The visualized bones are intact.",
        "Bone structures show no destructive lesion.",
    ],
}


def _lower_lobes(side: str) -> str:
    return "both lower lobes" if side == "bilateral" else f"the {side} lower lobe"


def _nodes(params: Params) -> str:
    return ", ".join(f"{node['station']} {node['short_axis_mm']:.0f} mm" for node in params["nodes"])


def _largest(params: Params) -> dict:
    return params["nodes"][0]


def _atelectasis(params: Params) -> list[str]:
    if params["kind"] == "linear":
        return [f"Linear subsegmental atelectasis in the {params['lobe']}.", f"Band-like subsegmental atelectasis in the {params['lobe']}."]
    where = _lower_lobes(params["side"])
    return [f"Dependent atelectasis in the posterior part of {where}.", f"Posterior basal dependent atelectasis in {where}."]


def _device(params: Params) -> list[str]:
    if params["device"] == "pacemaker":
        return [
            f"A cardiac pacemaker with its generator in the {params['side']} anterior chest wall; the lead passes through the superior vena cava into the right ventricle.",
            f"Pacemaker generator in the {params['side']} pectoral region with a lead ending in the right ventricle.",
        ]
    return [
        f"A {params['side']}-sided central venous port; the catheter tip lies at the cavo-atrial junction.",
        f"Venous port reservoir in the {params['side']} anterior chest wall, catheter tip at the cavo-atrial junction.",
    ]


def _pleural(params: Params) -> list[str]:
    grade, side = params["grade"], params["side"]
    if side == "bilateral":
        return [f"{grade.capitalize()} bilateral pleural effusions.", f"There is a {grade} pleural effusion on both sides."]
    return [
        f"{grade.capitalize()} {side} pleural effusion.",
        f"There is a {grade} pleural effusion on the {side}.",
        f"A {grade} amount of fluid in the {side} pleural space (pleural effusion).",
    ]


# name -> (phrases when present, phrases when absent; [] = say nothing)
FINDINGS: dict[str, tuple[Phrases, list[str]]] = {
    "cardiomegaly": (
        lambda p: [
            f"The heart is enlarged (cardiomegaly), with a cardiothoracic ratio of about {p['cardiothoracic_ratio']:.2f}.",
            "Cardiomegaly is noted.",
            "Cardiomegaly: the heart size is increased.",
        ],
        ["Heart size is normal; no cardiomegaly.", "No cardiomegaly.", "The heart is of normal size, without cardiomegaly."],
    ),
    "pericardial_effusion": (
        lambda p: [
            f"A {p['grade']} pericardial effusion, up to {p['thickness_mm']:.0f} mm thick.",
            f"{p['grade'].capitalize()} pericardial effusion surrounding the heart, maximal thickness {p['thickness_mm']:.0f} mm.",
        ],
        ["No pericardial effusion.", "No pericardial effusion or thickening.", "The pericardium is unremarkable, without effusion."],
    ),
    "arterial_calcification": (
        lambda p: [
            f"{p['severity'].capitalize()} atherosclerotic calcification of the aortic wall.",
            f"Calcified plaques in the wall of the thoracic aorta ({p['severity']}).",
            f"The thoracic aorta shows {p['severity']} mural calcification.",
        ],
        ["No calcification of the aortic wall.", "The thoracic aorta is of normal caliber without wall calcification."],
    ),
    "lymphadenopathy": (
        lambda p: [
            f"Enlarged mediastinal lymph nodes (short axis): {_nodes(p)}.",
            f"Mediastinal lymphadenopathy; the largest lymph node, in the {_largest(p)['station']} station, measures {_largest(p)['short_axis_mm']:.0f} mm in short axis.",
        ],
        ["No mediastinal or hilar lymphadenopathy.", "No lymph node of pathological size in the mediastinum or hila."],
    ),
    "medical_material": (_device, []),
    "emphysema": (
        lambda p: [
            f"{p['severity'].capitalize()} centrilobular emphysema, predominantly in both upper lobes.",
            f"Centrilobular emphysematous changes ({p['severity']}) in the upper lobes.",
        ],
        ["No emphysema.", "No emphysematous change in the lung parenchyma."],
    ),
    "nodule": (
        lambda p: [
            f"Solid nodule of {p['diameter_mm']:.0f} mm in the {p['lobe']}.",
            f"There is a solid pulmonary nodule measuring {p['diameter_mm']:.0f} mm in the {p['lobe']}.",
            f"In the {p['lobe']}, a solid nodule measuring {p['diameter_mm']:.0f} mm.",
        ],
        ["No pulmonary nodule.", "No nodule or mass in either lung."],
    ),
    "consolidation": (
        lambda p: [
            f"Consolidation in the {p['lobe']}{' with air bronchograms' if p['air_bronchogram'] else ''}.",
            f"An area of consolidation in the {p['lobe']}{', containing air bronchograms' if p['air_bronchogram'] else ''}.",
        ],
        ["No consolidation.", "No consolidation in either lung."],
    ),
    "ground_glass": (
        lambda p: [f"Ground-glass opacity in the {p['lobe']}.", f"A patchy ground-glass opacity in the {p['lobe']}."],
        ["No ground-glass opacity.", "No ground-glass opacity in the lung parenchyma."],
    ),
    "atelectasis": (_atelectasis, ["No atelectasis.", "No atelectatic change."]),
    "pleural_effusion": (_pleural, ["No pleural effusion.", "No pleural effusion or pneumothorax."]),
}
ORDER = (  # the Findings paragraph, in the order a radiologist reads a chest CT
    "airways", "cardiomegaly", "pericardial_effusion", "arterial_calcification", "esophagus", "lymphadenopathy",
    "medical_material", "emphysema", "nodule", "consolidation", "ground_glass", "atelectasis", "pleural_effusion",
    "abdomen", "bones",
)

IMPRESSIONS: dict[str, Callable[[Params], str]] = {  # most important first
    "pleural_effusion": lambda p: f"{p['grade'].capitalize()} {'bilateral' if p['side'] == 'bilateral' else p['side']} pleural effusion",
    "consolidation": lambda p: f"Consolidation in the {p['lobe']}",
    "nodule": lambda p: f"{p['diameter_mm']:.0f} mm nodule in the {p['lobe']}",
    "pericardial_effusion": lambda p: f"{p['grade'].capitalize()} pericardial effusion",
    "cardiomegaly": lambda p: "Cardiomegaly",
    "lymphadenopathy": lambda p: "Mediastinal lymphadenopathy",
    "ground_glass": lambda p: f"Ground-glass opacity in the {p['lobe']}",
    "emphysema": lambda p: f"{p['severity'].capitalize()} emphysema",
    "atelectasis": lambda p: "Subsegmental atelectasis" if p["kind"] == "linear" else "Dependent atelectasis",
    "arterial_calcification": lambda p: "Aortic atherosclerotic calcification",
    "medical_material": lambda p: f"{'Pacemaker' if p['device'] == 'pacemaker' else 'Venous port'} in place",
}
NORMAL_IMPRESSIONS = ["No acute abnormality in the chest.", "Normal CT of the chest.", "No significant pathology in the thorax."]


def compose_report(drawn: dict[str, dict], rng: np.random.Generator) -> Report:
    """Findings and Impressions for the drawn findings (name -> {"present": bool, ...})."""
    return Report(findings=" ".join(_findings(drawn, rng)), impressions=_impressions(drawn, rng))


# The writer's phrasing of the finding study's reports (one wording whatever seeds a run generates, so a run over
# other seeds adds to the same reports in the feature cache) and of an exported model's normal report.
WORDING_SEED = 0


def normal_report(seed: int = WORDING_SEED) -> Report:
    """The writer's report of a chest with no finding: the finding study's normal report, and the one an exported
    model draws every report of no finding from (config.normal_report)."""
    return compose_report({name: {"present": False} for name in FINDINGS}, np.random.default_rng(seed))


def _findings(drawn: dict[str, dict], rng: np.random.Generator) -> list[str]:
    sentences = []
    for topic in ORDER:
        if topic in ROUTINE:
            options = ROUTINE[topic]
        else:
            present, absent = FINDINGS[topic]
            params = drawn[topic]
            options = present(params) if params["present"] else absent
        if options:
            sentences.append(options[rng.integers(len(options))])
    return sentences


def _impressions(drawn: dict[str, dict], rng: np.random.Generator) -> str:
    items = [describe(drawn[name]) for name, describe in IMPRESSIONS.items() if drawn[name]["present"]]
    if not items:
        return NORMAL_IMPRESSIONS[rng.integers(len(NORMAL_IMPRESSIONS))]
    if len(items) > 1 and rng.random() < 0.5:
        return " ".join(f"{number}. {item}." for number, item in enumerate(items, start=1))
    return " ".join(f"{item}." for item in items)
