"""actcomp-edge shared core: activation decomposition, memory model, host CLI.

Device-side modules (decomposition, memory, arch) import numpy only, never torch.
"""
__version__ = "0.1.0"
