"""The `ctflow` command line: its contract is relied on by other tools."""

import json
import subprocess
import sys

import pytest
from PIL import Image

from ctflow import GenerationRequest, read_volume
from ctflow.cli import ProgressBar, main


def generate(tiny_model, tmp_path, *extra):
    return main(["generate", "--report", "Findings: Left lower lobe consolidation.", "--out", str(tmp_path / "ct.nii.gz"),
                 "--model", str(tiny_model), "--steps", "2", "--seed", "5", *extra])


def test_generate_writes_the_volume_and_a_preview(tiny_model, tmp_path, capsys):
    assert generate(tiny_model, tmp_path, "--slices", "10", "--preview", str(tmp_path / "ct.png")) == 0
    volume = read_volume(tmp_path / "ct.nii.gz")
    assert volume.shape == (10, 16, 16)
    assert volume.provenance.seed == 5 and volume.provenance.slices_requested == 10
    preview = Image.open(tmp_path / "ct.png")
    assert preview.width == 3 * 256 and preview.height > 2 * 256  # 3 planes x 2 windows
    captured = capsys.readouterr()
    assert "block 3/3" in captured.err and "ETA" in captured.err
    assert "ctflow: the report reads as: consolidation (left lower lobe)\n" in captured.err
    assert "wrote" in captured.out and "SYNTHETIC" in captured.out


def test_the_bar_ends_full_when_the_volume_ends_where_a_block_would_start(steered, capsys):
    blocks = list(steered(2, 0).stream(GenerationRequest("Findings: Normal chest.", seed=0, steps=2)))
    assert (blocks[-1].blocks_done, blocks[-1].stop) == (2, 8) and blocks[-1].blocks_expected > 2  # only then known
    bar = ProgressBar()
    for block in blocks:
        bar.update(block)
    bar.finish()
    assert capsys.readouterr().err.splitlines()[-1].startswith(f"block 2/2 [{'#' * bar.width}] 8 slices")


def test_report_file_and_nrrd_output(tiny_model, tmp_path):
    report = tmp_path / "report.txt"
    report.write_text("FINDINGS: Emphysema.\nIMPRESSION: Emphysema.", encoding="utf-8")
    code = main(["generate", "--report-file", str(report), "--out", str(tmp_path / "ct.nrrd"), "--model",
                 str(tiny_model), "--slices", "3", "--steps", "1", "--device", "cpu"])
    assert code == 0 and read_volume(tmp_path / "ct.nrrd").provenance.report.startswith("Findings: Emphysema.")


def test_an_unknown_option_is_argparse_s_usage_error_and_no_file(tiny_model, tmp_path, capsys):
    """Bad values are test_bad_inputs.py's table; an option that does not exist is argparse's to refuse."""
    with pytest.raises(SystemExit) as exit_:
        main(["generate", "--out", str(tmp_path / "ct.nii.gz"), "--model", str(tiny_model), "--report", "Normal.",
              "--out-of-range-flag"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "unrecognized arguments: --out-of-range-flag" in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


def test_an_existing_output_is_kept_unless_overwrite(tiny_model, tmp_path, capsys):
    (tmp_path / "ct.nii.gz").write_bytes(b"precious")
    assert generate(tiny_model, tmp_path, "--slices", "2") == 1
    assert "already exists" in capsys.readouterr().err
    assert (tmp_path / "ct.nii.gz").read_bytes() == b"precious"
    assert generate(tiny_model, tmp_path, "--slices", "2", "--overwrite") == 0
    assert read_volume(tmp_path / "ct.nii.gz").shape[0] == 2


def test_info_prints_the_model_card(tiny_model, capsys):
    assert main(["info", "--model", str(tiny_model)]) == 0
    out = capsys.readouterr().out
    card, _, facts = out.partition("\n\n{")
    assert card.startswith("# random-tiny") and "not for diagnosis" in card
    info = json.loads("{" + facts)
    assert info["model"] == "random-tiny" and info["denoiser_parameters"] > 0 and info["device"] == "cpu"


def test_the_installed_command_runs(tiny_model, tmp_path):
    """The console script itself, as a user runs it: exit codes and stderr, not just main()."""
    result = subprocess.run([sys.executable, "-m", "ctflow", "generate", "--report", "", "--out",
                             str(tmp_path / "x.nii.gz"), "--model", str(tiny_model)], capture_output=True, text=True)
    assert result.returncode == 1 and result.stderr.startswith("ctflow: error: the report is empty")
    assert "Traceback" not in result.stderr and not (tmp_path / "x.nii.gz").exists()


def test_no_memory_for_the_model_is_one_line_and_no_file(tmp_path):
    """Memory really runs out: with every module imported (imports under such a cap can hang in the import machinery,
    or fail with a SystemError: torch imports sympy, and at times torch._dynamo, the first time the model's init
    draws random weights),
    the process caps its own address space a little above what it holds, then asks for the bundled model (tens of
    MB); loading it fails in torch's CPU allocator."""
    out = tmp_path / "x.nii.gz"
    capped = ("import resource, sys\n"
              "import ctflow.pipeline\n"
              "import torch.fx.experimental.symbolic_shapes  # torch imports it (and sympy) lazily in randn\n"
              "import torch._dynamo  # and this, lazily, when a default device routes randn through torch._refs\n"
              "from ctflow.cli import main\nfrom ctflow.entry import quiet_third_party_logs\n"
              "quiet_third_party_logs()\n"
              "held = int(open('/proc/self/statm').read().split()[0]) * resource.getpagesize()\n"
              "resource.setrlimit(resource.RLIMIT_AS, (held + 8 * 2**20, resource.RLIM_INFINITY))\n"
              f"sys.exit(main(['generate', '--report', 'Normal chest.', '--out', {str(out)!r}]))\n")
    result = subprocess.run([sys.executable, "-c", capped], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1, result.stderr
    assert result.stderr.startswith("ctflow: error: out of cpu memory while loading ctflow-demo;"), result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not out.exists()
