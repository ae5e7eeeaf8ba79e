from .reference import JVP_BACKENDS, flow_map_jvp

__all__ = ["flow_map_jvp", "JVP_BACKENDS"]
