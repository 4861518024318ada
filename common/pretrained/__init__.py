"""Frozen pretrained encoders (timm, Hugging Face transformers, OpenCLIP) and the trained
fusion head over their features. Only ``encoder_spec`` is free of torch and of the optional
``fedmm[pretrained]`` libraries."""
