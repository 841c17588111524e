"""Workstation side (torch): model zoo, PyTorch reference of compressed training, the torch
frontend (``module_export.export_module``: any supported nn.Module -> training artifact)."""

