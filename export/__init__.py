"""Export pipeline: ONNX, simplification, FP16 graph, TensorRT engines (import as stt_fast.export)."""
