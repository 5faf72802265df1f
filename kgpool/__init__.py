"""kgpool: serve a Jupyter notebook as a REST API from a pool of warm kernels."""

__version__ = "0.1.0"
