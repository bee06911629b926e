"""What embeds: the timm model, its ONNX export, the portable runtimes and which one runs."""
