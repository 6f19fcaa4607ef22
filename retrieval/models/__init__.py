"""Image encoders: backbones by name plus a projection into the word-vector space."""

from retrieval.models.backbones import BACKBONES, Backbone, create_backbone, load_state_dict_file
from retrieval.models.encoder import ImageEncoder, create_encoder

__all__ = ["BACKBONES", "Backbone", "ImageEncoder", "create_backbone", "create_encoder", "load_state_dict_file"]
