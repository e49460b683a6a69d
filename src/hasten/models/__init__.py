"""Model implementations hasten needs that diffusers / transformers do not ship (TRELLIS's 3-D models)."""
