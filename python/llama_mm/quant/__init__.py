"""Weight-only quantization: int4/int8 linear layers and the compressed-tensors format."""
