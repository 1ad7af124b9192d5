"""mom_bench: how well linear sequence models remember."""
__version__ = "0.1.0"
