from .common import GUIDANCE_BY_SIZE, GuidanceConfig
from .flow_map import DuMo, MeanFlow
from .flow_matching import FlowMatching

OBJECTIVES = {"flow_matching": FlowMatching, "meanflow": MeanFlow, "dumo": DuMo}

__all__ = ["FlowMatching", "MeanFlow", "DuMo", "GuidanceConfig", "GUIDANCE_BY_SIZE", "OBJECTIVES"]
