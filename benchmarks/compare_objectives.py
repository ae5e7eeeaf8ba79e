"""Fair comparison of flow matching, MeanFlow and DuMo on digits (same training samples, 3 seeds).

Every variant trains from configs/digits.yaml with the same steps x batch, then its EMA model is
sampled class-conditionally and scored by the digits judge (classifier accuracy and Frechet
distance in its feature space vs held-out real digits; lower FD is better). Also runs the
ablations that pick the method's open choices: DuMo tangent (data | model), lambda_v, and t_mid of
the 2-step sampler (re-scored on the trained DuMo models, no retraining).

    python benchmarks/compare_objectives.py                  # full table (about 40 min on 2 cores)
    python benchmarks/compare_objectives.py --steps 50 --seeds 0 --variants fm,dumo   # smoke

Results are cached per run in --out (a run already there is not retrained) and printed as
markdown with mean +- std across seeds. Nothing is asserted: the numbers go to RESULTS.md.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

from dumo_engine.config import load_config  # noqa: E402
from dumo_engine.eval import DigitsJudge, evaluate_digits  # noqa: E402
from dumo_engine.train import train  # noqa: E402

VARIANTS = {
    "fm": ["--objective.name=flow_matching"],
    "meanflow": ["--objective.name=meanflow"],
    # lambda_v pinned: the preset's default moved to 4 after these rows were measured with 1
    "dumo": ["--objective.name=dumo", "--objective.lambda_v=1.0"],
    "dumo_tangent_model": ["--objective.name=dumo", "--objective.tangent=model", "--objective.lambda_v=1.0"],
    "dumo_lambda_v_0.5": ["--objective.name=dumo", "--objective.lambda_v=0.5"],
    "dumo_lambda_v_2": ["--objective.name=dumo", "--objective.lambda_v=2.0"],
    "dumo_lambda_v_4": ["--objective.name=dumo", "--objective.lambda_v=4.0"],
    "dumo_lambda_v_8": ["--objective.name=dumo", "--objective.lambda_v=8.0"],
    "dumo_lambda_v_4_cfg": ["--objective.name=dumo", "--objective.lambda_v=4.0", "--objective.cfg_w=1.0",
                            "--objective.cfg_k=0.5"],
    "dumo_lambda_v_4_h_u_only": ["--objective.name=dumo", "--objective.lambda_v=4.0", "--model.h_in_trunk=false"],
}
T_MIDS = (0.3, 0.5, 0.7)


def run_one(name: str, seed: int, args, judge: DigitsJudge) -> dict:
    out_dir = os.path.join(args.out, f"{name}_seed{seed}")
    result_path = os.path.join(out_dir, "compare.json")
    settings = VARIANTS[name] + [
        f"--train.steps={args.steps}", f"--train.batch_size={args.batch_size}", f"--train.seed={seed}",
        f"--sample.per_class={args.per_class}",
    ]
    if os.path.exists(result_path):  # a cached run counts only if it was trained and scored with these settings
        with open(result_path) as f:
            row = json.load(f)
        have = row.get("settings") or {"steps": row.get("steps"), "batch_size": row.get("batch_size")}
        want = settings if "settings" in row else {"steps": args.steps, "batch_size": args.batch_size}
        if have != want:
            raise SystemExit(f"compare_objectives: the cached run {result_path} was made with {have}, not {want}; "
                             "use another --out, or delete it to train again")
        return row
    overrides = settings + [
        f"--train.out_dir={out_dir}", "--train.resume=false", "--train.progress=false", "--train.ckpt_every=0",
        "--eval.at_end=false",
    ]
    cfg = load_config(os.path.join(ROOT, "configs", "digits.yaml"), overrides)
    t0 = time.perf_counter()
    res = train(cfg)
    train_s = time.perf_counter() - t0
    scores = evaluate_digits(res.ema, cfg, cfg.objective.name, out_dir=None, judge=judge, verbose=False)["methods"]
    if cfg.objective.name != "flow_matching":
        for t_mid in T_MIDS:
            cfg.sample.t_mid = t_mid
            s = evaluate_digits(res.ema, cfg, cfg.objective.name, judge=judge, methods=["u2"], verbose=False)
            scores[f"u2_tmid{t_mid:g}"] = s["methods"]["u2"]
    row = {"variant": name, "seed": seed, "steps": args.steps, "batch_size": args.batch_size, "settings": settings,
           "train_s": train_s, "scores": scores}
    with open(result_path, "w") as f:
        json.dump(row, f, indent=1)
    print(f"{name} seed {seed}: {train_s:.0f}s  " +
          "  ".join(f"{m}: acc {s['accuracy']:.3f} FD " + ("n/a" if s["fd"] is None else f"{s['fd']:.2f}")
                    for m, s in scores.items() if "tmid" not in m),
          flush=True)
    return row


def fmt(vals: list, digits: int) -> str:
    if any(v is None for v in vals):  # FD of a run whose samples were not finite (DigitsJudge.score)
        return "n/a (non-finite samples)"
    a = np.asarray(vals)
    return f"{a.mean():.{digits}f} ± {a.std(ddof=1) if len(a) > 1 else 0.0:.{digits}f}"


def table(rows: list[dict], judge: DigitsJudge) -> str:
    by = {}
    for r in rows:
        by.setdefault(r["variant"], []).append(r)
    methods = [("u1", "1-step"), ("u2", "2-step (t_mid 0.5)"), ("euler", "v head Euler 20")]
    out = [f"Digits judge: held-out accuracy {judge.test_accuracy:.3f}; FD floor (real train vs real test) {judge.real_fd:.2f}.",
           "", "| variant | seeds | train s/run | " + " | ".join(f"{lbl} acc | {lbl} FD" for _, lbl in methods) + " |",
           "|---|---|---|" + "---|---|" * len(methods)]
    for name, rs in by.items():
        cells = []
        for m, _ in methods:
            cells.append(fmt([r["scores"][m]["accuracy"] for r in rs], 3))
            cells.append(fmt([r["scores"][m]["fd"] for r in rs], 2))
        out.append(f"| {name} | {len(rs)} | {np.mean([r['train_s'] for r in rs]):.0f} | " + " | ".join(cells) + " |")
    tm = [(n, rs) for n, rs in by.items() if f"u2_tmid{T_MIDS[0]:g}" in rs[0]["scores"]]
    if tm:
        out += ["", "2-step sampler t_mid (FD, mean ± std over seeds):", "",
                "| variant | " + " | ".join(f"t_mid {t:g}" for t in T_MIDS) + " |", "|---|" + "---|" * len(T_MIDS)]
        for name, rs in tm:
            out.append(f"| {name} | " + " | ".join(fmt([r["scores"][f"u2_tmid{t:g}"]["fd"] for r in rs], 2) for t in T_MIDS) + " |")
    return "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--per-class", type=int, default=50)
    p.add_argument("--out", default=os.path.join(ROOT, "runs", "compare"))
    args = p.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    names = args.variants.split(",")
    for n in names:
        if n not in VARIANTS:
            p.error(f"unknown variant {n!r}; known: {', '.join(VARIANTS)}")
    commit = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    judge = DigitsJudge(per_class=args.per_class)
    rows = [run_one(n, s, args, judge) for n in names for s in seeds]
    print(f"\n## compare_objectives: {args.steps} steps x batch {args.batch_size} "
          f"({args.steps * args.batch_size} samples), seeds {args.seeds}, commit {commit} at start "
          f"(cached runs in {args.out} keep the code they were trained with)\n")
    print(table(rows, judge))


if __name__ == "__main__":
    main()
