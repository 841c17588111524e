"""The device core: what the board and the exporter share, numpy only (never torch, onnx,
flwr or matplotlib; pyserial only when a serial link is opened). The method table, the
decompositions, the network program, the memory model and plan, the artifact's manifest, the
wire protocol, its links and the step's record, the npz files and the device profiles."""
