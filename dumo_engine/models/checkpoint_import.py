"""Initialise a DualHeadDiT from a facebookresearch/DiT or willisma/SiT state dict.

Both repos use the same parameter names; their `final_layer` initialises both of our heads.
Checkpoints trained with learn_sigma have 2C output channels per patch position: DiT's unpatchify
puts the channel fastest, so the linear's rows are laid out (p, q, 2C) and we keep the first C
channels of each (p, q) group — not simply the first half of the rows.

The h embedder does not exist in DiT/SiT: its output layer is zeroed on import, so the imported
model computes exactly what the checkpoint computes (h_embed = 0) and learns h from there.

Time conventions differ. DiT (source="dit") is an epsilon-prediction model with t in [0, 1000) and
noise at t -> 1000 (our t * 1000 with time_scale 1000, the same direction): its weights are carried over
as they are, and fine-tuning turns the epsilon output into velocities.

SiT (source="sit") predicts velocity with t in [0, 1] unscaled, data at SiT time 1: its x_s = s x + (1 - s) e
is our z_t at s = 1 - t, and its velocity x - e is minus ours (e - x). The import is exact: the model must
use time_scale 1 (SiT's sinusoid arguments), the reflection s = 1 - t is folded into the time embedder's
first layer per frequency f (cos f(1 - t) = cos f cos ft + sin f sin ft, sin f(1 - t) = sin f cos ft -
cos f sin ft), and both heads' output linear is negated; then v(z, t) = -v_SiT(z, 1 - t) at import.

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
    from_sit: list[str] = field(default_factory=list)  # rewritten to our time direction and velocity sign (SiT)
    zeroed: list[str] = field(default_factory=list)  # set to zero so the import preserves the function

    def summary(self) -> str:
        lines = [f"loaded {len(self.loaded)} tensors"]
        if self.converted:
            lines.append("dropped learn-sigma channels: " + ", ".join(self.converted))
        if self.from_sit:
            lines.append("converted from SiT's conventions: " + ", ".join(self.from_sit))
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


SOURCES = ("dit", "sit")


def _sit_to_ours(out: dict[str, torch.Tensor], model: DualHeadDiT, report: ImportReport) -> None:
    """SiT's time runs the other way and its velocity has the opposite sign (module docstring): fold s = 1 - t into
    t_embedder.mlp.0.weight, negate the heads' output linear. In place on the converted state dict."""
    emb = model.t_embedder
    if emb.time_scale != 1.0:
        raise CheckpointFormatError(f"a SiT import needs time_scale 1 (SiT's embedder saw t in [0, 1]); this model "
                                    f"has {emb.time_scale:g} (build_model(..., time_scale=1) / model.time_scale=1)")
    key = "t_embedder.mlp.0.weight"
    if key in out:
        w = out[key].double()
        half = emb.frequency_embedding_size // 2
        f = emb.frequencies(torch.zeros(1, dtype=torch.float64), emb.frequency_embedding_size)  # (half,)
        wc, ws = w[:, :half], w[:, half:2 * half]
        new = w.clone()
        new[:, :half] = wc * torch.cos(f) + ws * torch.sin(f)  # coefficient of cos(f t)
        new[:, half:2 * half] = wc * torch.sin(f) - ws * torch.cos(f)  # coefficient of sin(f t)
        out[key] = new.to(out[key].dtype)
        report.from_sit.append(key + " (time reflected: SiT t = 1 - ours)")
    for head in HEAD_NAMES:
        for part in ("weight", "bias"):
            k = f"{head}.linear.{part}"
            if k in out:
                out[k] = -out[k]
                report.from_sit.append(k + " (negated: SiT velocity = -ours)")


def load_pretrained_dit(model: DualHeadDiT, path: str | os.PathLike, strict: bool = True,
                        source: str = "dit") -> ImportReport:
    """Initialise trunk and both heads from a DiT/SiT checkpoint; returns what was loaded/missing/unexpected.
    source: "dit" (weights as they are) or "sit" (exact: time reflected, velocity negated; needs time_scale 1).

    strict (default): a model tensor missing from the file (other than the h embedder's, which DiT/SiT do
    not have) or a file tensor the model does not use is an error naming them: a file of another depth, or
    one whose names matched nothing, no longer starts a run from random weights with only a printed report.
    """
    if source not in SOURCES:
        raise ValueError(f"source must be one of {SOURCES}, got {source!r}")
    sd = read_state_dict(path)
    converted, report = convert_dit_state_dict(sd, model)
    if source == "sit":
        _sit_to_ours(converted, model, report)
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
