"""Argus: the DeepEyesV2 recipe (cold-start SFT, tool-using RL, evaluation, registry, serving) as a platform."""

__version__ = "0.1.0"
