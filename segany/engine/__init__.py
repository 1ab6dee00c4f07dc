"""The inference engine: fast paths (bfloat16, fused kernels, ...) for the models defined in segany.modeling."""
