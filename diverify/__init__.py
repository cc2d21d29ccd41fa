"""diverify: formal verification of generative models' distributional integrity."""

from diverify.errors import DiverifyError


def load_text_encoder(name_or_dir: str = "minilm"):
    """Load a text encoder (see :func:`diverify.models.load_text_encoder`); imported lazily."""
    from diverify.models import load_text_encoder as load

    return load(name_or_dir)


__version__ = "0.1.0"

__all__ = ["DiverifyError", "load_text_encoder", "__version__"]
