"""Flax ports of generative models' components, read from Hugging Face checkpoints.

Text encoders: :func:`load_text_encoder` returns a :class:`TextEncoder` (BERT family
as used by sentence-transformers, CLIP text as used by Stable Diffusion); see
``docs/design-models.md``.
"""

from diverify.models.encoder import TextEncoder, load_text_encoder

__all__ = ["TextEncoder", "load_text_encoder"]
