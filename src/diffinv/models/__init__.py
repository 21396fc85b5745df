"""Models shipped inside the package (weights as safetensors package data)."""
