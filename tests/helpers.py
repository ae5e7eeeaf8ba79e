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


def record_launches(monkeypatch, module):
    """Patch _triton_jit.on_device and module._jitted so that every kernel launch of `module` asserts it runs inside
    on_device; returns (devices entered, kernel names launched)."""
    from dumo_engine.ops import _triton_jit

    seen, inside, launched = [], [], []
    real_jitted = module._jitted

    class Recorder:
        def __init__(self, t):
            self.t = t

        def __enter__(self):
            seen.append(self.t.device)
            inside.append(True)

        def __exit__(self, *exc):
            inside.pop()

    def jitted(fn):
        kernel = real_jitted(fn)

        class Checked:
            def __getitem__(self, grid):
                assert inside, f"{fn.__name__} launched outside on_device"
                launched.append(fn.__name__)
                return kernel[grid]

        return Checked()

    monkeypatch.setattr(_triton_jit, "on_device", Recorder)
    monkeypatch.setattr(module, "_jitted", jitted)
    return seen, launched
