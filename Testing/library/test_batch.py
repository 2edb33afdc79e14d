"""`ctflow batch`: reports tables, the manifest, resuming, and two ranks sharing one folder."""

import csv
import json
import os
import shutil
import subprocess
import sys

import pytest

from ctflow import CTFlowError, GenerationRequest, read_volume
from ctflow.batch import (
    COLUMNS, MANIFEST_JSON, SAMPLING_SETTINGS, BatchFolder, merge_manifest, plan_items, rank_and_world, read_manifest,
    read_reports, run_batch, sampling_settings, shard,
)
from ctflow.checksums import sha256_file

OPTIONS = GenerationRequest("", steps=1)


pytestmark = pytest.mark.usefixtures("one_thread")


def write_csv(path, rows):
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


@pytest.fixture
def reports(tmp_path):
    return write_csv(tmp_path / "reports.csv", [
        {"id": "rul nodule", "report": "Findings: A 9 mm nodule in the right upper lobe.", "slices": "5"},
        {"id": "effusion", "report": "Findings: Small left pleural effusion. Impressions: Effusion.", "slices": "6"},
    ])


def test_reports_come_from_ctrate_csv_and_cohort_jsonl(tmp_path):
    ctrate = read_reports(write_csv(tmp_path / "ctrate.csv", [
        {"VolumeName": "valid_1_a_1.nii.gz", "Findings_EN": "Emphysema.", "Impressions_EN": "COPD."}]))
    assert ctrate[0].id == "valid_1_a_1.nii.gz" and ctrate[0].text == "Findings: Emphysema.\nImpressions: COPD."
    index = tmp_path / "index.jsonl"
    index.write_text("\n".join(json.dumps(row) for row in [
        {"name": "p/001", "findings": "Cardiomegaly.", "impressions": "", "slices": 40},
        {"report": "Findings: Normal."}]))
    cohort = read_reports(index)
    assert [(r.id, r.slices, r.order) for r in cohort] == [("p_001", 40, 0), ("r00001", None, 1)]
    items = plan_items(cohort, seeds=2, first_seed=10)
    assert [item.name for item in items] == ["p_001_s10", "p_001_s11", "r00001_s10", "r00001_s11"]
    index.write_text('{"name": "a", "report": "x"}\n{"name": "a", "report": "y"}\n')
    with pytest.raises(CTFlowError, match="same id"):
        read_reports(index)
    index.write_text('{"name": "Case1", "report": "x"}\n{"name": "case1", "report": "y"}\n')
    with pytest.raises(CTFlowError, match="rows 1 and 2 have ids that differ only in case"):  # one file on NTFS, APFS
        read_reports(index)
    with pytest.raises(CTFlowError, match="no report text"):
        read_reports(write_csv(tmp_path / "empty.csv", [{"id": "a", "report": ""}]))


def test_a_table_saved_with_a_byte_order_mark_reads_as_without(tmp_path):
    table = tmp_path / "excel.csv"  # Excel's "CSV UTF-8" and Notepad start the file with U+FEFF
    table.write_text("id,report\nrul,Findings: Right upper lobe nodule.\n", encoding="utf-8-sig")
    assert [(r.id, r.text) for r in read_reports(table)] == [("rul", "Findings: Right upper lobe nodule.")]
    table.write_text("report,id\nFindings: Normal chest.,n1\n", encoding="utf-8-sig")
    assert [(r.id, r.text) for r in read_reports(table)] == [("n1", "Findings: Normal chest.")]


def test_a_long_report_cell_reads_and_a_damaged_manifest_is_one_line(tmp_path):
    """Python's csv refuses cells over 128 KiB by default; a report file may hold 256 KiB."""
    long = "Findings: " + "No pleural effusion. " * 7000  # about 150 KB
    rows = read_reports(write_csv(tmp_path / "long.csv", [{"id": "long", "report": long}]))
    assert rows[0].text.startswith("Findings: No pleural effusion.")
    (tmp_path / "manifest.json").write_text('{"rows": [1, 2')
    with pytest.raises(CTFlowError, match="manifest.json line 1: not JSON"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text('{"rows": 3}')
    with pytest.raises(CTFlowError, match="has no list of rows"):
        read_manifest(tmp_path)


def test_seeds_and_the_size_of_a_batch_are_checked_before_any_item_is_made(tmp_path):
    reports = read_reports(write_csv(tmp_path / "r.csv", [{"id": "a", "report": "Findings: x."}]))
    with pytest.raises(CTFlowError, match="more than the 1,000,000 volumes"):
        plan_items(reports, seeds=10**9)  # refused at once, not after a billion items are built
    with pytest.raises(CTFlowError, match="--seed must be"):
        plan_items(reports, seeds=1, first_seed=-1)


def test_a_batch_never_writes_among_a_users_own_files(tiny_pipeline, reports, tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "rul_nodule_s0.nii.gz").write_text("my own CT")
    with pytest.raises(CTFlowError, match="holds files but no batch"):
        run_batch(tiny_pipeline, plan_items(read_reports(reports), 1), BatchFolder(mine), OPTIONS)
    assert [path.name for path in mine.iterdir()] == ["rul_nodule_s0.nii.gz"]
    assert (mine / "rul_nodule_s0.nii.gz").read_text() == "my own CT"


def test_a_folder_finder_has_looked_into_is_still_empty(tiny_pipeline, reports, tmp_path):
    browsed = tmp_path / "browsed"
    browsed.mkdir()
    (browsed / ".DS_Store").write_bytes(b"Bud1 Finder's view settings")
    result = run_batch(tiny_pipeline, plan_items(read_reports(reports), 1)[:1], BatchFolder(browsed), OPTIONS)
    assert len(result.made) == 1 and (browsed / MANIFEST_JSON).is_file()


def test_ranks_share_items_evenly(monkeypatch):
    items = list(range(7))
    assert sorted(shard(items, 0, 2) + shard(items, 1, 2)) == items and shard(items, 1, 2) == [1, 3, 5]
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert rank_and_world() == (1, 2, 1)
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(CTFlowError, match="does not fit"):
        rank_and_world()


def test_manifest_describes_every_volume(tiny_pipeline, reports, tmp_path):
    items = plan_items(read_reports(reports), seeds=2)
    result = run_batch(tiny_pipeline, items, BatchFolder(tmp_path / "out"), OPTIONS)
    assert result.merged and len(result.made) == 4 and not result.failed
    rows = read_manifest(tmp_path / "out")
    assert [(r["file"], r["seed"], r["slices"]) for r in rows] == [
        ("rul_nodule_s0.nii.gz", 0, 5), ("rul_nodule_s1.nii.gz", 1, 5), ("effusion_s0.nii.gz", 0, 6),
        ("effusion_s1.nii.gz", 1, 6)]
    assert [r["reading"] for r in rows] == ["nodule (right upper lobe)"] * 2 + ["pleural effusion (left)"] * 2
    for row in rows:
        path = tmp_path / "out" / row["file"]
        assert row["sha256"] == sha256_file(path) and row["model"] == "random-tiny" and row["block_slices"] == 4
        assert row["report"].startswith("Findings: ") and row["time_s"] > 0 and row["steps"] == 1
        assert read_volume(path).provenance.seed == row["seed"]
    with open(tmp_path / "out" / "manifest.csv", newline="") as handle:
        table = list(csv.DictReader(handle))
    assert tuple(table[0]) == COLUMNS and [r["file"] for r in table] == [r["file"] for r in rows]


def test_resume_skips_finished_items_and_never_rewrites_them(tiny_pipeline, reports, tmp_path):
    items = plan_items(read_reports(reports), seeds=2)
    out = BatchFolder(tmp_path / "out")
    run_batch(tiny_pipeline, items, out, OPTIONS)
    stamps = {item.name: out.volume(item).stat().st_mtime_ns for item in items}
    out.row(items[1]).unlink()  # stopped between the volume and its row: not finished
    out.volume(items[2]).unlink()
    result = run_batch(tiny_pipeline, items, out, OPTIONS)
    assert sorted(result.made) == sorted([items[1].name, items[2].name])
    assert sorted(result.skipped) == sorted([items[0].name, items[3].name])
    assert all(out.volume(items[k]).stat().st_mtime_ns == stamps[items[k].name] for k in (0, 3))
    assert len(read_manifest(out.folder)) == 4
    with pytest.raises(CTFlowError, match="other settings .*steps"):
        run_batch(tiny_pipeline, items, out, GenerationRequest("", steps=2))
    settings = json.loads((out.folder / ".manifest" / "batch.json").read_text())
    assert "side_guidance_by_halves" not in settings  # written only when set: a batch begun without it resumes
    with pytest.raises(CTFlowError, match="other settings .*side_guidance_by_halves"):
        run_batch(tiny_pipeline, items, out, GenerationRequest("", steps=1, side_guidance=2.0))
    former = tmp_path / "former"  # begun with the former side guidance (away from the mirrored report): not finished
    shutil.copytree(out.folder, former)
    (former / ".manifest" / "batch.json").write_text(json.dumps({**settings, "side_guidance": 2.0}))
    with pytest.raises(CTFlowError, match=r"other settings \(side_guidance, side_guidance_by_halves\)"):
        run_batch(tiny_pipeline, items, BatchFolder(former), GenerationRequest("", steps=1, side_guidance=2.0))
    with pytest.raises(CTFlowError, match=r"other settings \(side_guidance\)"):
        BatchFolder(former).check_settings(sampling_settings(OPTIONS, tiny_pipeline.config, out.suffix),
                                           SAMPLING_SETTINGS)  # as the command line checks, before the load
    assert settings["dtype"] == "float32" and {row["dtype"] for row in read_manifest(out.folder)} == {"float32"}
    older = out.folder / ".manifest" / "batch.json"  # as an older ctflow wrote it: no dtype, so it resumes
    older.write_text(json.dumps({key: value for key, value in settings.items() if key != "dtype"}))
    assert run_batch(tiny_pipeline, items, out, OPTIONS).skipped
    older.write_text(json.dumps({**settings, "dtype": "bfloat16"}))  # begun in another precision: refused
    with pytest.raises(CTFlowError, match="other settings .*dtype"):
        run_batch(tiny_pipeline, items, out, OPTIONS)


def test_a_resume_from_an_edited_table_is_refused_and_the_manifest_lists_only_the_tables_items(
        tiny_pipeline, reports, tmp_path):
    """A volume made from one report must never be listed under another: metrics would score it against the
    wrong labels."""
    items = plan_items(read_reports(reports), seeds=1)
    out = BatchFolder(tmp_path / "out")
    run_batch(tiny_pipeline, items, out, OPTIONS)
    edited = write_csv(tmp_path / "edited.csv", [
        {"id": "rul nodule", "report": "Findings: Left lower lobe consolidation.", "slices": "5"},
        {"id": "effusion", "report": "Findings: Small left pleural effusion. Impressions: Effusion.", "slices": "7"},
    ])
    with pytest.raises(CTFlowError, match="rul_nodule_s0, effusion_s0 were made from another report or length"):
        run_batch(tiny_pipeline, plan_items(read_reports(edited), seeds=1), out, OPTIONS)
    fewer = write_csv(tmp_path / "fewer.csv", [
        {"id": "effusion", "report": "Findings: Small left pleural effusion. Impressions: Effusion.", "slices": "6"}])
    kept = plan_items(read_reports(fewer), seeds=1)
    assert run_batch(tiny_pipeline, kept, out, OPTIONS).skipped == [kept[0].name]
    assert [row["report_id"] for row in read_manifest(out.folder)] == ["effusion"]  # not the item the table dropped
    assert json.loads((out.folder / "manifest.json").read_text())["items"] == 1


def test_a_failing_item_is_reported_and_the_rest_go_on(tiny_pipeline, tmp_path):
    table = write_csv(tmp_path / "r.csv", [{"id": "bad", "report": "Findings: x.", "slices": "1000"},
                                           {"id": "good", "report": "Findings: y.", "slices": "3"}])
    result = run_batch(tiny_pipeline, plan_items(read_reports(table), 1), BatchFolder(tmp_path / "out"), OPTIONS)
    assert list(result.failed) == ["bad_s0"] and "slice count" in result.failed["bad_s0"]
    assert result.made == ["good_s0"] and [r["file"] for r in read_manifest(tmp_path / "out")] == ["good_s0.nii.gz"]


def test_two_ranks_split_one_batch_and_the_last_merges(tiny_pipeline, tiny_model, reports, tmp_path):
    """Rank 1 is a `ctflow batch` process as torchrun starts it (RANK/WORLD_SIZE set, no process group); rank 0
    runs here at the same time. Whichever finishes first must not merge; the last one merges every row."""
    out = tmp_path / "out"
    command = [sys.executable, "-m", "ctflow", "batch", str(reports), "--out", str(out), "--seeds", "2",
               "--model", str(tiny_model), "--steps", "1", "--device", "cpu"]
    env = {**os.environ, "RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "OMP_NUM_THREADS": "1"}
    rank1 = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    items = plan_items(read_reports(reports), seeds=2)
    rank0 = run_batch(tiny_pipeline, items, BatchFolder(out), OPTIONS, rank=0, world=2)
    stdout, stderr = rank1.communicate(timeout=300)
    assert rank1.returncode == 0, stderr
    assert rank0.made == ["rul_nodule_s0", "effusion_s0"] and "made 2" in stdout
    assert rank0.merged == ("manifest not merged yet" in stdout)  # exactly one merged: the one that ended last
    rows = read_manifest(out)
    assert [(r["file"], r["rank"]) for r in rows] == [
        ("rul_nodule_s0.nii.gz", 0), ("rul_nodule_s1.nii.gz", 1), ("effusion_s0.nii.gz", 0), ("effusion_s1.nii.gz", 1)]
    (out / "manifest.json").unlink()
    assert len(merge_manifest(out)) == 4 and len(read_manifest(out)) == 4


def test_a_rank_whose_item_failed_leaves_the_manifest_unmerged_and_says_how_to_finish(
        tiny_pipeline, tiny_model, tmp_path, monkeypatch, capsys):
    """Rank 1 finished its item; rank 0's fails. Rank 0 must not merge a manifest that misses an item of the
    table, must exit non-zero, and must say how to finish; --merge-only then writes the finished rows."""
    from ctflow.cli import main

    table = write_csv(tmp_path / "r.csv", [{"id": "bad", "report": "Findings: x.", "slices": "1000"},
                                           {"id": "good", "report": "Findings: y.", "slices": "3"}])
    out = tmp_path / "out"
    items = plan_items(read_reports(table), 1)
    assert run_batch(tiny_pipeline, items, BatchFolder(out), OPTIONS, rank=1, world=2).made == ["good_s0"]
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    command = ["batch", str(table), "--out", str(out), "--model", str(tiny_model), "--steps", "1", "--device", "cpu"]
    assert main(command) != 0
    printed = capsys.readouterr()
    assert "bad_s0" in printed.err and "failed 1" in printed.out
    assert "manifest not merged: run the same command again to retry the failed items" in printed.out
    assert not (out / "manifest.csv").exists()
    assert main([*command, "--merge-only"]) == 0
    assert [row["file"] for row in read_manifest(out)] == ["good_s0.nii.gz"]
