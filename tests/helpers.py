"""Shared test helpers (imported by test files; pytest does not collect this module)."""
import torch

from dumo_engine.config import load_config

TINY = [
    "--model.name=DiT-tiny", "--model.input_size=8", "--model.in_channels=1",
    "--objective.cfg_w=0.6", "--objective.cfg_k=0.2", "--objective.adaptive_p=0.5",
    "--optim.lr=2e-3", "--optim.ema_decay=0.9",
    "--train.batch_size=16", "--train.log_every=1", "--train.progress=false", "--eval.at_end=false",
]


def tiny_config(out_dir, *extra):
    return load_config(None, TINY + [f"--train.out_dir={out_dir}", *extra])


def randomize_(model: torch.nn.Module, seed: int, std: float = 0.2) -> torch.nn.Module:
    """Overwrite every parameter (heads and adaLN included, which the default init zeroes) with N(0, std^2)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return model
