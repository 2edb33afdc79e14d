"""ctflow: a synthetic chest CT from a radiology report, generated block by block the CTFlow way.

    pipe = CTFlowPipeline.from_pretrained()            # the bundled demo model, a folder or a hub id
    for block in pipe.stream(GenerationRequest("Findings: ...")):
        ...                                            # block.hu: int16 HU slices [start, stop)
    volume = pipe.generate(GenerationRequest("Findings: ...", slices=128, seed=1))
    write_volume(volume, "ct.nii.gz")
"""

__version__ = "0.1.0"

from .config import DENOISER_PRESETS, DenoiserConfig, ModelConfig  # noqa: E402
from .errors import CTFlowError, DeviceError, ModelError, OutputExistsError, ReportError, RequestError  # noqa: E402
from .dicom import read_dicom, write_dicom  # noqa: E402
from .io import read_volume, write_volume  # noqa: E402
from .model_folder import create_random_model, default_model, save_model  # noqa: E402
from .pipeline import Block, CTFlowPipeline, GenerationPlan, GenerationRequest  # noqa: E402
from .released import import_released, load_released_denoiser  # noqa: E402
from .report import Report, parse_report, render_prompt  # noqa: E402
from .volume import SYNTHETIC_NOTICE, Geometry, Provenance, Volume  # noqa: E402

__all__ = [
    "Block", "CTFlowError", "CTFlowPipeline", "DENOISER_PRESETS", "DenoiserConfig", "DeviceError", "GenerationPlan",
    "GenerationRequest", "Geometry", "ModelConfig", "ModelError", "OutputExistsError", "Provenance", "Report",
    "ReportError", "RequestError", "SYNTHETIC_NOTICE", "Volume", "create_random_model", "default_model",
    "import_released", "load_released_denoiser", "parse_report", "read_dicom", "read_volume", "render_prompt",
    "save_model", "write_dicom", "write_volume",
]
