"""eldr: expert-locality-aware decode routing for PD-disaggregated MoE serving (arXiv 2607.00466)."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("eldr")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
