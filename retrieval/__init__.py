"""Image-text retrieval: image encoders trained against frozen word vectors."""

__version__ = "0.1.0"
