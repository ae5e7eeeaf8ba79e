from .checkpoint_import import CheckpointFormatError, ImportReport, load_pretrained_dit, read_state_dict
from .dit import DIT_SIZES, DiTSpec, DualHeadDiT, build_model

__all__ = [
    "DIT_SIZES", "DiTSpec", "DualHeadDiT", "build_model",
    "load_pretrained_dit", "read_state_dict", "ImportReport", "CheckpointFormatError",
]
