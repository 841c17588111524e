"""Workstation side (torch): model zoo, PyTorch reference of compressed training."""
