"""Pretrained weights: torchvision checkpoints as Flax variables.

torch_archive (torch.save files read without torch), state_dicts (a
state_dict from .safetensors or .pth), conversion (the torchvision -> Flax
rules table and its checks), downloads (checked downloads), pretrained (the
published checkpoints, the converted-weights cache, the report command),
flax_checkpoint (a user's own Flax checkpoint: orbax, msgpack, safetensors).
Imports models and infra.
"""
