"""Board side: the fine-tuning runtime (numpy + onnxruntime + pyserial, never torch).

The runner itself arrives with the device-runner issue; this package exists so the
dependency direction (device_runner -> actcomp_edge, never torch) is fixed from the start.
"""
