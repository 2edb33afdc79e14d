"""ctflow: a synthetic chest CT from a radiology report, generated block by block the CTFlow way.

    pipe = CTFlowPipeline.from_pretrained()            # the bundled demo model, a folder or a hub id
    for block in pipe.stream(GenerationRequest("Findings: ...")):
        ...                                            # block.hu: int16 HU slices [start, stop)
    volume = pipe.generate(GenerationRequest("Findings: ...", slices=128, seed=1))
    write_volume(volume, "ct.nii.gz")
"""

__version__ = "0.2.0"  # raised whenever the same model, report and seed make a different volume (provenance)

import importlib  # noqa: E402

from .entry import forget_working_folder  # noqa: E402

forget_working_folder()

# The public names, imported on first use (PEP 562): `import ctflow` stays light, so a console command can report
# Ctrl-C during the seconds torch takes to import, and `python -m ctflow` can drop the working folder from sys.path
# before any third-party import.
_EXPORTS = {
    "DENOISER_PRESETS": "config", "DenoiserConfig": "config", "ModelConfig": "config",
    "CTFlowError": "errors", "DeviceError": "errors", "ModelError": "errors", "OutputExistsError": "errors",
    "OutOfMemory": "errors", "ReportError": "errors", "RequestError": "errors",
    "read_dicom": "dicom", "write_dicom": "dicom", "read_volume": "io", "write_volume": "io",
    "default_model": "hub", "save_model": "model_folder",
    "Block": "pipeline", "DecodedBlock": "pipeline", "CTFlowPipeline": "pipeline", "GenerationPlan": "pipeline", "GenerationRequest": "pipeline",
    "import_released": "released", "load_released_denoiser": "released",
    "Report": "report", "parse_report": "report", "render_prompt": "report",
    "SYNTHETIC_NOTICE": "conventions", "Geometry": "volume", "Provenance": "volume", "Volume": "volume",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'ctflow' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
