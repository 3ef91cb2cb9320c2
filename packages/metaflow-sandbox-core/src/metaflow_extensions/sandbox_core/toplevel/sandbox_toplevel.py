__mf_extensions__ = "sandbox"
__version__ = "0.2.0"
