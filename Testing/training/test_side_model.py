"""side-model: a model folder with a second denoiser that guides its sided reports; the model's own files
untouched, the config and card saying so; bad input refused before anything is written."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

import ctflow
from ctflow import GenerationRequest
from ctflow.checksums import write_checksums
from ctflow.errors import CorruptModelError
from ctflow.model_folder import CONFIG, SIDE_WEIGHTS, WEIGHTS, read_config, verify_model_folder
from ctflow.testing import create_random_model
from ctflow_train.cli import main

SIDED = "Findings: A 12 mm nodule in the right upper lobe. Impressions: Right upper lobe nodule."


@pytest.fixture(scope="module")
def side_folder(tmp_path_factory):
    """Another tiny model: the same shapes, other weights."""
    return create_random_model(tmp_path_factory.mktemp("side") / "side", "tiny", seed=1)


def made(folder, text=SIDED):
    pipe = ctflow.CTFlowPipeline.from_pretrained(folder, device="cpu")
    return pipe.generate(GenerationRequest(text, seed=3, steps=2, slices=4, guidance=3.0, side_guidance=1.0)).hu


def test_a_model_copied_with_a_side_model_guides_only_its_sided_reports(tiny_model, side_folder, tmp_path, capsys):
    out = tmp_path / "sided"
    argv = ["side-model", "--model", str(tiny_model), "--side", str(side_folder), "--weight", "1.5", "--out", str(out)]
    assert main(argv) == 0
    written = json.loads(capsys.readouterr().out)
    checksums, model = verify_model_folder(out), verify_model_folder(tiny_model)
    assert written == {"model": str(out), "side_model": verify_model_folder(side_folder)[WEIGHTS],
                       "side_model_guidance": 1.5}
    assert checksums[SIDE_WEIGHTS] == written["side_model"] and checksums[WEIGHTS] == model[WEIGHTS]
    assert {k: v for k, v in checksums.items() if k not in (SIDE_WEIGHTS, CONFIG, "README.md")} == \
        {k: v for k, v in model.items() if k not in (CONFIG, "README.md")}
    assert read_config(out).sampling.side_model_guidance == 1.5
    assert "Side model" in (out / "README.md").read_text()
    assert not np.array_equal(made(out), made(tiny_model))
    assert np.array_equal(made(out, "Findings: Emphysema."), made(tiny_model, "Findings: Emphysema."))
    assert main(argv) == 1 and "exists" in capsys.readouterr().err  # never over a folder unasked
    again = ["side-model", "--model", str(out), "--side", str(side_folder), "--weight", "2", "--out", str(out)]
    assert main([*again, "--overwrite"]) == 0  # in place: one side model, its card paragraph once
    assert json.loads(capsys.readouterr().out)["side_model_guidance"] == 2.0
    assert (out / "README.md").read_text().count("Side model") == 1 and verify_model_folder(out)[SIDE_WEIGHTS]


def exit_code(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as exc:  # argparse's refusal of a bad option value
        return exc.code


def test_bad_side_models_are_refused_before_anything_is_written(tiny_model, side_folder, tmp_path, capsys):
    base = ["side-model", "--model", str(tiny_model), "--side", str(side_folder), "--out", str(tmp_path / "out")]
    other = create_random_model(tmp_path / "small", "tiny", image_size=32, seed=2)  # another latent size
    for extra, message in ((["--weight", "0"], "adds nothing"), (["--weight", "nan"], "--weight"),
                           (["--weight", "-1"], "--weight"), (["--side", str(other), "--weight", "1"], "differs"),
                           (["--side", str(tmp_path / "absent"), "--weight", "1"], "absent"),
                           (["--weight", "1", "--out", str(side_folder)], "--side folder"),
                           (["--weight", "1", "--out", str(tiny_model / "inner")], "one inside the other")):
        assert exit_code([*base, *extra]) != 0
        assert message in capsys.readouterr().err
        assert not (tmp_path / "out").exists() and not (tiny_model / "inner").exists()


def test_a_config_that_asks_for_a_side_model_the_folder_lacks_is_a_damaged_folder(tiny_model, tmp_path):
    folder = shutil.copytree(tiny_model, tmp_path / "asks")
    config = json.loads((folder / CONFIG).read_text())
    config["sampling"]["side_model_guidance"] = 1.0
    (folder / CONFIG).write_text(json.dumps(config))
    write_checksums(folder)
    with pytest.raises(CorruptModelError, match=SIDE_WEIGHTS):
        ctflow.CTFlowPipeline.from_pretrained(folder, device="cpu")
