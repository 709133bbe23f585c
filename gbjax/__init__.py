"""gbjax: granular-ball clustering, pixel embedding and robustness tools in JAX."""
from gbjax.gb import Features, GBResult, gb_cluster, gb_denoise, gb_multiscale, memory_estimate

__version__ = "0.1.0"
