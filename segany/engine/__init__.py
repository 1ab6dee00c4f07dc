"""The inference engine: speed paths (fusion, reduced precision, memory layout) kept out of the model definitions."""
