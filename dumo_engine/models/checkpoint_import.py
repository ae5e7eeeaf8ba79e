"""Initialise a DualHeadDiT from a facebookresearch/DiT or willisma/SiT state dict.

Both repos use the same parameter names; their `final_layer` initialises both of our heads.
Checkpoints trained with learn_sigma have 2C output channels per patch position: DiT's unpatchify
puts the channel fastest, so the linear's rows are laid out (p, q, 2C) and we keep the first C
channels of each (p, q) group — not simply the first half of the rows.

The h embedder does not exist in DiT/SiT: its output layer is zeroed on import, so the imported
model computes exactly what the checkpoint computes (h_embed = 0) and learns h from there.

Time conventions differ, and only the weights are carried over: DiT is an epsilon-prediction model
with t in [0, 1000) and noise at t -> 1000 (our t * 1000, the same direction); SiT uses t in [0, 1]
unscaled, with data at t = 1, and predicts velocity of the opposite direction, while our embedder
feeds 1000 t: an imported SiT trunk sees time features it was not trained on (sinusoid arguments up to
1000 where SiT saw at most 1). The imported heads therefore start from a related but different output,
and fine-tuning adapts them; nothing is converted. (An exact SiT import would need time_scale 1, the
1 - t reflection folded into t_embedder.mlp.0 per frequency, and both heads' final linear negated.)

The import is strict: every parameter and buffer of the model except the h embedder must come from the
file, and every tensor of the file must be used, else CheckpointFormatError names them (a torch.compile
export's "_orig_mod." prefix and DDP's "module." are removed first). strict=False loads what matches.

Files are read as safetensors, or as torch files with weights_only=True (never unpickled).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

from .dit import DualHeadDiT

HEAD_NAMES = ("v_head", "u_head")


class CheckpointFormatError(ValueError):
    """A weights file that cannot be read or does not look like a state dict."""


@dataclass
class ImportReport:
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # ours, not in the file (kept at their init)
    unexpected: list[str] = field(default_factory=list)  # in the file, not used
    converted: list[str] = field(default_factory=list)  # learn-sigma channels dropped
    zeroed: list[str] = field(default_factory=list)  # set to zero so the import preserves the function

    def summary(self) -> str:
        lines = [f"loaded {len(self.loaded)} tensors"]
        if self.converted:
            lines.append("dropped learn-sigma channels: " + ", ".join(self.converted))
        if self.zeroed:
            lines.append("zeroed (h_embed starts at 0, the checkpoint's function is preserved): " + ", ".join(self.zeroed))
        if self.missing:
            lines.append("missing (kept at init): " + ", ".join(self.missing))
        if self.unexpected:
            lines.append("unexpected (ignored): " + ", ".join(self.unexpected))
        return "\n".join(lines)


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read tensors from a .safetensors file or a torch file (weights_only=True)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"weights file not found: {path}")
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            sd = load_file(path, device="cpu")
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt/truncated/pickled-object files all land here
        raise CheckpointFormatError(f"cannot read weights from {path}: {type(e).__name__}: {e}") from None
    # Training checkpoints often nest the weights: {"model": ..., "ema": ...}; DiT's own release is flat.
    if isinstance(sd, dict) and "ema" in sd and isinstance(sd["ema"], dict):
        sd = sd["ema"]
    elif isinstance(sd, dict) and "model" in sd and isinstance(sd["model"], dict):
        sd = sd["model"]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointFormatError(f"{path} does not contain a flat state dict of tensors")
    return {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in sd.items()}


def _drop_learn_sigma(weight: torch.Tensor, patch_size: int, out_channels: int) -> torch.Tensor:
    # (p*p*2C, ...) -> (p*p*C, ...): keep the mean channels of every (p, q) position.
    pp = patch_size * patch_size
    rest = weight.shape[1:]
    return weight.reshape(pp, 2 * out_channels, *rest)[:, :out_channels].reshape(pp * out_channels, *rest)


def convert_dit_state_dict(sd: dict[str, torch.Tensor], model: DualHeadDiT) -> tuple[dict[str, torch.Tensor], ImportReport]:
    """Map DiT/SiT names onto ours; returns the state dict to load and a report of what matched."""
    report = ImportReport()
    ours = model.state_dict()
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        targets = [key]
        if key.startswith("final_layer."):
            targets = [key.replace("final_layer.", f"{h}.", 1) for h in HEAD_NAMES]
        for tgt in targets:
            if tgt not in ours:
                report.unexpected.append(key)
                break
            if tgt.endswith("linear.weight") or tgt.endswith("linear.bias"):
                if tgt.split(".")[0] in HEAD_NAMES and value.shape[0] == 2 * ours[tgt].shape[0]:
                    value = _drop_learn_sigma(value, model.patch_size, model.out_channels)
                    if key not in report.converted:
                        report.converted.append(key)
            if value.shape != ours[tgt].shape:
                raise CheckpointFormatError(
                    f"shape mismatch for {key}: file has {tuple(value.shape)}, model expects {tuple(ours[tgt].shape)}"
                    " (wrong model size, patch size, input size or class count?)"
                )
            out[tgt] = value.to(ours[tgt].dtype)
            report.loaded.append(tgt)
    report.missing = sorted(k for k in ours if k not in out)
    return out, report


def load_pretrained_dit(model: DualHeadDiT, path: str | os.PathLike, strict: bool = True) -> ImportReport:
    """Initialise trunk and both heads from a DiT/SiT checkpoint; returns what was loaded/missing/unexpected.

    strict (default): a model tensor missing from the file (other than the h embedder's, which DiT/SiT do
    not have) or a file tensor the model does not use is an error naming them: a file of another depth, or
    one whose names matched nothing, no longer starts a run from random weights with only a printed report.
    """
    sd = read_state_dict(path)
    converted, report = convert_dit_state_dict(sd, model)
    missing = [k for k in report.missing if not k.startswith("h_embedder.")]
    if strict and (missing or report.unexpected):
        raise CheckpointFormatError(
            f"{path} does not fit this model ({len(report.loaded)} tensors matched; strict=False loads what "
            f"matches):\n{report.summary()}")
    model.load_state_dict(converted, strict=False)
    if not any(k.startswith("h_embedder.") for k in converted):
        last = model.h_embedder.mlp[2]
        with torch.no_grad():
            last.weight.zero_()
            last.bias.zero_()
        report.zeroed = ["h_embedder.mlp.2.weight", "h_embedder.mlp.2.bias"]
    return report
