"""compactbed: a testbed for residual-compressed parallel diffusion-transformer inference on slow links.

Subpackages: ``kernels`` (compressors, residual codec), ``runtime`` (xDiT parallel inference),
``netem`` (emulated links), ``testbed`` (scenarios, CLI), ``simulator`` (SimPy model), ``dashboards`` (Dash).
"""

__version__ = "0.1.0"
