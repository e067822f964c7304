"""Export diffusers image-to-image pipelines to ONNX and write a Triton model repository."""
