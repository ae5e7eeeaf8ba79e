"""The seeded 10-step tiny DuMo run whose losses are pinned in tests/assets/regression_losses.json.

It covers the whole reference path: logit-normal (t, r), label dropout, folded CFG (two no-grad v-head
passes), the torch.func JVP, both head losses, AdamW, clipping and EMA. The fused path will be pinned
against the same numbers. Regenerate (only on purpose, and say why in the commit):
    python tests/regression_run.py --write
"""
from __future__ import annotations

import json
import os
import sys

ASSET = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "regression_losses.json")
OVERRIDES = [
    "--model.name=DiT-tiny", "--model.input_size=8", "--model.in_channels=1", "--model.num_classes=10",
    "--objective.name=dumo", "--objective.lambda_v=1.0", "--objective.cfg_w=0.5", "--objective.cfg_k=0.3", "--objective.cfg_t_hi=0.9",
    "--objective.adaptive_p=0.0", "--objective.label_dropout=0.2",
    "--optim.lr=3e-3", "--optim.grad_clip=1.0", "--optim.ema_decay=0.99",
    "--train.steps=10", "--train.batch_size=16", "--train.seed=1234", "--train.log_every=1",
    "--train.ckpt_every=0", "--train.progress=false", "--train.resume=false", "--eval.at_end=false",
]
KEYS = ("loss", "mse_u", "mse_v", "grad_norm")


def run(out_dir: str) -> list[dict]:
    from dumo_engine.config import load_config
    from dumo_engine.train import read_log, train

    cfg = load_config(None, OVERRIDES + [f"--train.out_dir={out_dir}"])
    res = train(cfg)
    return [{k: row[k] for k in ("step",) + KEYS} for row in read_log(res.log_path)]


if __name__ == "__main__":
    import tempfile

    rows = run(tempfile.mkdtemp())
    print(json.dumps(rows, indent=1))
    if "--write" in sys.argv:
        with open(ASSET, "w") as f:
            json.dump({"overrides": OVERRIDES, "rows": rows}, f, indent=1)
        print(f"wrote {ASSET}")
