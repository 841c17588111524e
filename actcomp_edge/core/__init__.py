"""The device core: what the board and the exporter share, numpy only (never torch, onnx,
flwr or matplotlib). The method table, the decompositions, the network program, the memory
model and plan, the artifact's manifest, the wire protocol and the npz files."""
