"""dumo-engine: training and sampling engine for Duality Models (DuMo) on DiT backbones."""
__version__ = "0.1.0"
