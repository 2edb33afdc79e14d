"""The model card's table of training stages: written by `export`, read back when a run warm-starts from a model
folder, so that a model's card counts every stage its weights cost, across model folders."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class StageColumn:
    """A column of the model card's table of training stages: its header, the stage's field, and the field's type
    (how the cell is read back when a model folder's card gives the stages a new run started from)."""

    header: str
    key: str
    kind: type = str
    default: object = None  # for a card written before the column existed; None: the column is required

    def value(self, record: dict):
        """The field from a stage, or from a run's arguments; the default where they predate the column."""
        return record[self.key] if self.default is None else record.get(self.key, self.default)

    def cell(self, stage: dict) -> str:
        value = self.value(stage)
        return ", ".join(value) if self.kind is list else str(value)

    def read(self, cell: str):
        if self.kind is bool:
            return cell == "True"
        if self.kind is list:
            return cell.split(", ") if cell else []
        return self.kind(cell)


STAGES_HEADING = "## Training stages"
AVERAGED_IN = " (averaged in)"  # after a stage's run: a sibling of the stage before, weight-averaged with it
MISSING_STAGE = "not found: its figures are not counted"
STAGE_COLUMNS = (
    StageColumn("run", "run"), StageColumn("steps", "steps", int), StageColumn("minutes", "minutes", float),
    StageColumn("device", "device"), StageColumn("batch", "batch", int), StageColumn("lr", "lr", float),
    StageColumn("previous-block noise", "cond_noise", float),
    StageColumn("own-estimate share", "rollout_p", float, 0.0),
    StageColumn("own-estimate steps", "rollout_steps", int, 1),
    StageColumn("end-block share", "end_p", float, 0.0),
    StageColumn("finding-block share", "finding_p", float, 0.0),
    StageColumn("report-variant share", "variant_p", float, 0.0),
    StageColumn("pair-loss weight", "pair_weight", float, 0.0),
    StageColumn("region-loss weight", "region_weight", float, 0.0),
    StageColumn("seam weight", "seam_weight", float, 1.0),
    StageColumn("slice position", "slice_position", bool, False),
    StageColumn("pooled text", "pooled_text", bool, False),
    StageColumn("seam context", "seam_context", bool, False),
    StageColumn("side code", "side_code", bool, False),
    StageColumn("side map", "side_map", bool, False),
    StageColumn("lobe map", "lobe_map", bool, False),
    StageColumn("finding code", "finding_code", bool, False),
    StageColumn("finding map", "finding_map", bool, False),
    StageColumn("code lr scale", "code_lr", float, 1.0),
    StageColumn("latent caches", "caches", list),
)


def stage_table(stages: list[dict]) -> list[str]:
    """The card's table: one row a stage; a stage whose run is gone says so and counts nothing."""
    return [f"| {' | '.join(c.header for c in STAGE_COLUMNS)} |", "|" + "---|" * len(STAGE_COLUMNS)] + [
        f"| {s['run']} | {MISSING_STAGE} |" + "|" * (len(STAGE_COLUMNS) - 2) if s.get("missing") else
        f"| {' | '.join(c.cell(s) for c in STAGE_COLUMNS)} |" for s in stages]


def card_stages(card: Path) -> list[dict]:
    """The stages the table of a model card (`model_card`'s own) lists, oldest first; [] when there is no card or
    no such table: a run warm-started from a model folder keeps what that folder's weights cost to train."""
    if not card.is_file():
        return []
    lines = card.read_text(encoding="utf-8", errors="replace").splitlines()
    if STAGES_HEADING not in lines:
        return []
    rows = []
    for line in lines[lines.index(STAGES_HEADING) + 1:]:
        if line.startswith("|"):
            rows.append([cell.strip() for cell in line.strip().strip("|").split("|")])
        elif rows or line.strip():
            break  # the table ends at its first other line
    if len(rows) < 2:
        return []
    columns = {c.header: c for c in STAGE_COLUMNS}
    index = {header: n for n, header in enumerate(rows[0]) if header in columns}
    if any(c.default is None and c.header not in index for c in STAGE_COLUMNS):
        return []  # not the table this export writes
    stages = []
    try:
        for row in rows[2:]:
            if len(row) > 1 and row[1] == MISSING_STAGE:
                stages.append({"run": row[0], "missing": True})
            else:
                stages.append({c.key: c.read(row[index[c.header]]) if c.header in index else c.default
                               for c in STAGE_COLUMNS})
    except (ValueError, IndexError):  # a card edited by hand: its figures cannot be read, so none are counted
        return []
    return stages
