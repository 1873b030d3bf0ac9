"""An nnU-Net v1 checkpoint's weights under our PlainConvUNet's names, and the mirror axes its trainer predicts
with: what inference/v1_model.py needs of a v1 `.model` file beyond checkpoint.py's weights-only loading.
"""
import re
from typing import Optional


def v2_weights(v1_state: dict, network) -> dict:
    """v1 Generic_UNet weights under our PlainConvUNet's names (spec section 6): context stages ->
    encoder stages, the bottleneck's 1 + 1 convolutions -> its stage, `tu` -> transpconvs, localization ->
    decoder stages, `seg_outputs` -> seg_layers; up-convolutions and heads have no bias in v1, so theirs are 0."""
    import torch
    n_stages = len(network.encoder.stages)
    per_stage = len(network.encoder.stages[0][0].convs)
    out, used = {}, set()
    for key, template in network.state_dict().items():
        source = _v1_key(_canonical(key), n_stages, per_stage)
        if source is None:      # a bias v1 does not have
            out[key] = torch.zeros_like(template)
        elif source in v1_state:
            out[key] = v1_state[source]
            used.add(source)
    # weights of another network (a v1 trainer with its own architecture) stay under their names, so that
    # checkpoint.load_weights names them as unexpected instead of their being left out silently
    out.update({k: v for k, v in v1_state.items() if k not in used})
    return out


def _canonical(key: str) -> str:
    """Our network's aliases of one weight (decoder.encoder..., all_modules.N) under its plain name."""
    key = key[len("decoder."):] if key.startswith("decoder.encoder.") else key
    return key.replace(".all_modules.0.", ".conv.").replace(".all_modules.1.", ".norm.")


def _v1_key(name: str, n_stages: int, per_stage: int) -> Optional[str]:
    part = {"conv": "conv", "norm": "instnorm"}
    match = re.fullmatch(r"encoder\.stages\.(\d+)\.0\.convs\.(\d+)\.(conv|norm)\.(weight|bias)", name)
    if match:
        s, c, layer, what = int(match[1]), int(match[2]), match[3], match[4]
        if s < n_stages - 1:
            return f"conv_blocks_context.{s}.blocks.{c}.{part[layer]}.{what}"
        block, index = (0, c) if c < per_stage - 1 else (1, 0)
        return f"conv_blocks_context.{s}.{block}.blocks.{index}.{part[layer]}.{what}"
    match = re.fullmatch(r"decoder\.stages\.(\d+)\.convs\.(\d+)\.(conv|norm)\.(weight|bias)", name)
    if match:
        u, c, layer, what = int(match[1]), int(match[2]), match[3], match[4]
        block, index = (0, c) if c < per_stage - 1 else (1, 0)
        return f"conv_blocks_localization.{u}.{block}.blocks.{index}.{part[layer]}.{what}"
    match = re.fullmatch(r"decoder\.(transpconvs|seg_layers)\.(\d+)\.(weight|bias)", name)
    if match:
        if match[3] == "bias":
            return None
        return f"{'tu' if match[1] == 'transpconvs' else 'seg_outputs'}.{match[2]}.weight"
    return name


def mirror_axes_for(trainer_name: str, dimensions: int):
    """nnUNetTrainerV2's mirror axes ((0, 1, 2) in 3D, (0, 1) in 2D); trainers named noMirroring have none."""
    if "nomirror" in trainer_name.lower():
        return None
    return tuple(range(dimensions))
