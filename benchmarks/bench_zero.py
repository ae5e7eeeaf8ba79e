"""DuMo training step under DeepSpeed ZeRO 0-3 vs plain PyTorch DDP: img/s and peak memory per rank, on whatever
devices the machine has (NCCL on CUDA GPUs, gloo on CPU processes).

Each variant runs in its own `torchrun` launch (fresh process group and memory counters): the fused DuMo loss
(fused forward+JVP through the wrapper), backward, clipping, AdamW step, EMA, on a fixed random batch; the
median step time over --steps after 2 warm-up steps. Peak memory: torch.cuda.max_memory_allocated on CUDA from the
first warm-up step on (the setup's full-model build before partitioning is not counted), the process's peak RSS on
CPU (which includes the ~0.3-0.5 GiB of the interpreter and torch themselves), max over ranks.
Precision on CUDA is each engine's own bf16 recipe: DDP keeps float32 weights under bf16 autocast; DeepSpeed's bf16
mode holds bf16 weights and gradients with float32 masters in the optimizer (dumo_engine/distributed/ds_config.py),
so the memory columns compare the two recipes, not only the sharding.

  python benchmarks/bench_zero.py                      # CUDA: all GPUs, DiT-XL/2 at 32x32x4, bf16; CPU: 2 ranks
  python benchmarks/bench_zero.py --ranks 2 --model DiT-S/2 --batch 16 --steps 5 --out benchmarks/out/zero.jsonl
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import subprocess
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, ROOT)

VARIANTS = ["ddp", "zero0", "zero1", "zero2", "zero3"]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker(args) -> None:
    """One rank of one variant; rank 0 prints a JSON line with the result."""
    import torch.distributed as dist

    from dumo_engine.config import load_config
    from dumo_engine.models import build_model
    from dumo_engine.objectives import DuMo
    from dumo_engine.train import LocalBackend

    cuda = torch.cuda.is_available()
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    torch.manual_seed(0)
    model = build_model(args.model, input_size=args.input_size, in_channels=args.channels,
                        num_classes=args.classes).to(device)
    objective = DuMo(args.classes, jvp_backend="fused")
    over = [f"--train.batch_size={args.batch}", "--train.precision=bf16", "--optim.lr=1e-4"]
    if args.worker != "ddp":
        over.append(f"--train.deepspeed={os.path.join(ROOT, 'configs', 'deepspeed', args.worker + '.json')}")
    cfg = load_config(os.path.join(ROOT, "configs", "digits.yaml"), over)
    if args.worker == "ddp":
        dist.init_process_group("nccl" if cuda else "gloo")
        backend = LocalBackend(cfg, model, device)  # plain AdamW + clipping, around a DDP-wrapped module
        backend.module = torch.nn.parallel.DistributedDataParallel(model, device_ids=[local] if cuda else None)
        rank, world = dist.get_rank(), dist.get_world_size()
        shards = [(rank * args.batch // world, (rank + 1) * args.batch // world)]
    else:
        from dumo_engine.distributed.engine import DeepSpeedBackend

        backend = DeepSpeedBackend(cfg, model, device)
        rank, world = backend.rank, backend.world_size
        shards = backend.shards(args.batch)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(args.batch, args.channels, args.input_size, args.input_size, generator=g).to(device)
    y = torch.randint(0, args.classes, (args.batch,), generator=g).to(device)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else torch.autocast("cpu", enabled=False)

    def step():
        draws = objective.draw(x)
        for i, (a, b) in enumerate(shards):
            with amp:
                loss, _ = objective.loss(backend.module, x[a:b], y[a:b], draws.rows(a, b))
            backend.backward(loss, first=i == 0)
        backend.step()
        backend.ema_update(0.999)

    times = []
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    for k in range(args.steps + 2):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize()
        if k >= 2:
            times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated(device) if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t = torch.tensor([float(peak)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    times.sort()
    if rank == 0:
        med = times[len(times) // 2]
        print("RESULT " + json.dumps({"variant": args.worker, "ranks": world, "median_ms": med * 1e3,
                                      "p20_ms": times[int(round(0.2 * (len(times) - 1)))] * 1e3,
                                      "p80_ms": times[int(round(0.8 * (len(times) - 1)))] * 1e3,
                                      "img_s": args.batch / med, "peak_gib": t.item() / 2**30}), flush=True)
    dist.barrier()
    dist.destroy_process_group()
    # leave without interpreter teardown: after gloo/DeepSpeed it intermittently aborts ("terminate called without
    # an active exception"), which torchrun would report as a failed rank (see dumo_engine/cli.py _HARD_EXIT)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cuda = torch.cuda.is_available()
    p.add_argument("--ranks", type=int, default=torch.cuda.device_count() if cuda else 2)
    p.add_argument("--model", default="DiT-XL/2" if cuda else "DiT-S/2")
    p.add_argument("--input-size", type=int, default=32 if cuda else 8)
    p.add_argument("--channels", type=int, default=4 if cuda else 1)
    p.add_argument("--classes", type=int, default=1000 if cuda else 10)
    p.add_argument("--batch", type=int, default=0, help="global batch (default: 32 per rank CUDA, 8 per rank CPU)")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--out", default=None)
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    from harness import Row, Timing, device_name, emit

    args.batch = args.batch or args.ranks * (32 if cuda else 8)
    rows, command = [], "python " + " ".join(sys.argv)
    dev = f"{args.ranks} x {device_name()}"
    ddp_ms = None
    for v in args.variants.split(","):
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={args.ranks}",
               "--master_addr=127.0.0.1", f"--master_port={_port()}", os.path.abspath(__file__), "--worker", v,
               "--model", args.model, "--input-size", str(args.input_size), "--channels", str(args.channels),
               "--classes", str(args.classes), "--batch", str(args.batch), "--steps", str(args.steps)]
        res = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
        line = [ln for ln in res.stdout.splitlines() if ln.startswith("RESULT ")]
        if res.returncode != 0 or not line:
            cause = [ln for ln in res.stderr.splitlines() if any(k in ln for k in ("terminate", "what()", "Error", "rror:"))]
            print(f"[bench_zero] {v} failed (exit {res.returncode}, result line printed: {bool(line)}):\n"
                  + "\n".join(cause[:20]) + "\n" + res.stderr[-1500:])
            continue
        r = json.loads(line[0][len("RESULT "):])
        ddp_ms = r["median_ms"] if v == "ddp" else ddp_ms
        row = Row(op="train_step", shape=f"{args.model} global b{args.batch} {args.input_size}px",
                  dtype="bf16-autocast" if cuda else "fp32", impl=v,
                  timing=Timing(r["median_ms"], r["p20_ms"], r["p80_ms"], args.steps),
                  ref_ms=ddp_ms if v != "ddp" else None,
                  extra={"ranks": r["ranks"], "img_s": round(r["img_s"], 1),
                         ("peak_gib" if cuda else "peak_rss_gib"): round(r["peak_gib"], 3)})
        rows.append(row)
        emit([row], out=args.out, device=dev, command=command)
    print("\nall rows (speedup column: vs DDP):")
    emit(rows, out=None, device=dev, command=command)


if __name__ == "__main__":
    main()
