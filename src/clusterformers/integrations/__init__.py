"""Adapters that plug clusterformers layers into other libraries' models.

Each submodule imports only torch and clusterformers, so it imports without the host library:
``clusterformers.integrations.timm`` gives timm's ``attn_layer`` / ``mlp_layer`` protocols.
"""
