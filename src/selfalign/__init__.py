"""selfalign: diffusion transformers that guide their own representation learning."""
__version__ = "0.1.0"
