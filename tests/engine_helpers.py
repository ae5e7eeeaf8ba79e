"""Small configs for engine tests (imported by test files; pytest does not collect this module)."""
from dumo_engine.config import load_config

TINY = [
    "--model.name=DiT-tiny", "--model.input_size=8", "--model.in_channels=1",
    "--objective.cfg_w=0.6", "--objective.cfg_k=0.2", "--objective.adaptive_p=0.5",
    "--optim.lr=2e-3", "--optim.ema_decay=0.9",
    "--train.batch_size=16", "--train.log_every=1", "--train.progress=false", "--eval.at_end=false",
]


def tiny_config(out_dir, *extra):
    return load_config(None, TINY + [f"--train.out_dir={out_dir}", *extra])
