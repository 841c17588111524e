"""Workstation side (torch): model zoo, PyTorch reference of compressed training, the torch
frontend (``export_module``: any supported nn.Module -> training artifact)."""


def export_module(module, out_dir, **kwargs):
    """See export.module_export.export_module (imported on use: torch loads with it)."""
    from .module_export import export_module as run
    return run(module, out_dir, **kwargs)
