"""The inference engine: speed paths for the model definitions in segany.modeling."""
