# Kept for tools that still call setup.py; all metadata is in pyproject.toml.
# The C++/CUDA extension (csrc/) is added here when it lands.
from setuptools import setup

setup()
