"""diverify: formal verification of generative models' distributional integrity."""

from diverify.errors import DiverifyError

__version__ = "0.1.0"

__all__ = ["DiverifyError", "__version__"]
