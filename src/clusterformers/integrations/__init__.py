"""Adapters that plug clusterformers layers into other libraries' models.

Each submodule imports only torch and clusterformers at import time, so it imports without the host library:
``clusterformers.integrations.hf`` registers Elliptical Attention with HuggingFace transformers and converts
MoE routers to AC routers; ``clusterformers.integrations.timm`` gives timm's ``attn_layer`` / ``mlp_layer``
protocols. See ``docs/integrations.md``.
"""
