"""Run configuration: dataclasses, YAML presets (configs/*.yaml), `--section.key=value` overrides.

Every key is checked: an unknown key, a value of the wrong type, or an out-of-range value raises
ConfigError with the dotted key name in the message. The resolved config is saved with each run.
"""
from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Optional

import yaml

from .objective_rules import flow_map_option_problem, guidance_problem, weighting_problem


class ConfigError(ValueError):
    """A bad configuration value; the message names the key."""


@dataclass
class ModelConfig:
    name: str = "DiT-digits"  # a key of dumo_engine.models.DIT_SIZES
    input_size: int = 8  # latent/image side, pixels
    in_channels: int = 1
    num_classes: int = 10  # label num_classes is the NULL class
    pretrained: Optional[str] = None  # DiT/SiT weights (safetensors or torch file) to start from
    h_in_trunk: bool = True  # h = t - r conditions the whole trunk (both heads see it); false: only the u head
    pretrained_source: str = "dit"  # dit | sit: the convention of model.pretrained (sit: exact, needs time_scale 1)
    time_scale: float = 1000.0  # the time embedders' sinusoids see t * time_scale: 1000 as DiT, 1 as SiT


@dataclass
class ObjectiveConfig:
    name: str = "dumo"  # dumo | meanflow | flow_matching
    P_mean: float = -0.4  # logit-normal time sampling
    P_std: float = 1.0
    equal_fraction: Optional[float] = None  # None: the objective's default (dumo 0.0, meanflow 0.75)
    cfg_w: float = 1.0  # folded CFG: v_g = w v + k v_cond + (1 - w - k) v_uncond; w=1, k=0 is off
    cfg_k: float = 0.0
    cfg_t_lo: float = 0.0
    cfg_t_hi: float = 1.0
    label_dropout: float = 0.1
    adaptive_p: float = 1.0  # L / sg((L + eps)^p); p = 0 is plain MSE
    adaptive_eps: float = 0.01
    tangent: str = "data"  # data | model (flow-map objectives); a tie on digits, data needs no extra pass
    target_velocity: str = "data"  # data | model
    lambda_v: float = 4.0  # DuMo only; chosen by benchmarks/compare_objectives.py (see RESULTS.md)
    jvp_backend: str = "auto"  # auto (fused on CUDA, func on CPU) | fused | func | forward_ad


@dataclass
class DataConfig:
    dataset: str = "digits"  # digits: scikit-learn's 8x8 digits, no download
    test_fraction: float = 0.2  # held out for evaluation, never trained on
    split_seed: int = 0


@dataclass
class OptimConfig:
    lr: float = 1e-4
    beta1: float = 0.9
    beta2: float = 0.95
    weight_decay: float = 0.0
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping
    ema_decay: float = 0.9999
    ema_warmup: bool = False  # decay_k = min(ema_decay, (1 + k) / (10 + k)) at step k (for short runs)


@dataclass
class TrainConfig:
    steps: int = 1000
    batch_size: int = 256  # global batch (MeanFlow ImageNet recipe)
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    precision: str = "bf16"  # bf16 autocast on CUDA (no-op on CPU) | fp32
    log_every: int = 50  # steps between JSONL log lines
    ckpt_every: int = 500  # steps between checkpoints (and one at the end); 0: only at the end
    keep_checkpoints: int = 2
    out_dir: str = "runs/default"
    resume: bool = True  # continue from out_dir's latest checkpoint when there is one
    threads: int = 0  # torch CPU threads; 0 leaves torch's default
    progress: bool = True  # tqdm bar with img/s
    peak_tflops: float = 0.0  # measured peak of the device for MFU in the log; 0: don't report MFU
    deepspeed: Optional[str] = None  # DeepSpeed JSON (configs/deepspeed/zero{0,1,2,3}.json); None: one process
    micro_batch: int = 0  # per-rank micro-batch under DeepSpeed; 0: batch_size / world_size (no accumulation)


@dataclass
class SampleConfig:
    t_mid: float = 0.5  # 2-step u sampler: 1 -> t_mid -> 0 (0.5 beat 0.3 and 0.7 on digits)
    v_steps: int = 20
    use_ema: bool = True
    seed: int = 1234
    per_class: int = 50  # samples per class for evaluation
    grid_cols: int = 10


@dataclass
class EvalConfig:
    at_end: bool = True  # sample + metrics after training
    methods: list = field(default_factory=lambda: ["u1", "u2", "euler"])


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


CHOICES = {
    "model.pretrained_source": ("dit", "sit"),
    "objective.name": ("dumo", "meanflow", "flow_matching"),
    "objective.tangent": ("data", "model"),
    "objective.target_velocity": ("data", "model"),
    "objective.jvp_backend": ("auto", "fused", "func", "forward_ad"),
    "data.dataset": ("digits",),
    "train.device": ("auto", "cpu", "cuda"),
    "train.precision": ("bf16", "fp32"),
}
POSITIVE = {"model.time_scale", "optim.lr", "train.steps", "train.batch_size", "sample.v_steps", "sample.per_class",
            "sample.grid_cols", "model.input_size", "model.in_channels", "model.num_classes", "objective.P_std",
            "train.keep_checkpoints"}  # keep_checkpoints 0 would keep one anyway: the one just written
NON_NEGATIVE = {"optim.weight_decay", "optim.grad_clip", "objective.lambda_v", "objective.adaptive_p",
                "objective.adaptive_eps", "train.log_every", "train.ckpt_every", "train.threads",
                "train.peak_tflops", "train.micro_batch"}
UNIT_INTERVAL = {"objective.equal_fraction", "objective.label_dropout", "objective.cfg_t_lo", "objective.cfg_t_hi",
                 "optim.ema_decay"}
HALF_OPEN_UNIT = {"optim.beta1", "optim.beta2"}  # [0, 1)
OPEN_UNIT = {"data.test_fraction"}  # (0, 1)
SEEDS = ("train.seed", "data.split_seed", "sample.seed")  # numpy / scikit-learn take seeds below 2**32
# What each embedded dataset feeds the model: (images, input_size, in_channels, num_classes)
DATASETS = {"digits": (1797, 8, 1, 10)}
METHODS = ("u1", "u2", "euler", "heun")


def _coerce(key: str, value: Any, hint: Any) -> Any:
    """Check value against a dataclass field's type hint; ints are accepted for floats."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None:
            return None
        return _coerce(key, value, args[0])
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    if hint is list or origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return list(value)
    raise ConfigError(f"{key}: unsupported field type {hint}")  # pragma: no cover


def _apply(obj: Any, values: dict, prefix: str = "") -> None:
    hints = typing.get_type_hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    for k, v in values.items():
        key = f"{prefix}{k}"
        if k not in names:
            raise ConfigError(f"unknown config key {key!r}; known here: {', '.join(sorted(names))}")
        cur = getattr(obj, k)
        if dataclasses.is_dataclass(cur):
            if not isinstance(v, dict):
                raise ConfigError(f"{key}: expected a section (mapping), got {v!r}")
            _apply(cur, v, key + ".")
        else:
            setattr(obj, k, _coerce(key, v, hints[k]))


# Objective settings that only some objectives read (train.build_objective); where they are unused, a value other
# than the default is refused instead of ignored.
_USED_BY = {"lambda_v": "it weighs DuMo's v loss: dumo only",
            "tangent": "the flow-map JVP's tangent: dumo and meanflow only",
            "target_velocity": "the flow-map target: dumo and meanflow only",
            "jvp_backend": "flow matching takes no JVP"}
_UNUSED_BY = {"meanflow": ("lambda_v",), "flow_matching": ("lambda_v", "tangent", "target_velocity", "jvp_backend")}


def validate(cfg: RunConfig) -> RunConfig:
    """Range and choice checks; raises ConfigError naming the key."""
    from .models import DIT_SIZES

    flat = to_flat_dict(cfg)
    for key, choices in CHOICES.items():
        if flat[key] not in choices:
            raise ConfigError(f"{key}: {flat[key]!r} is not one of {', '.join(choices)}")
    if cfg.model.name not in DIT_SIZES:
        raise ConfigError(f"model.name: unknown model {cfg.model.name!r}; known: {', '.join(DIT_SIZES)}")
    for key, value in flat.items():  # NaN passes every comparison below as False: refuse it (and inf) first
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{key} must be a finite number, got {value}")
    for key in SEEDS:
        if not 0 <= flat[key] < 2**32:
            raise ConfigError(f"{key} must be in [0, 2**32), got {flat[key]}")
    for key in POSITIVE:
        if not flat[key] > 0:
            raise ConfigError(f"{key} must be > 0, got {flat[key]}")
    for key in NON_NEGATIVE:
        if flat[key] < 0:
            raise ConfigError(f"{key} must be >= 0, got {flat[key]}")
    for key in UNIT_INTERVAL:
        if flat[key] is not None and not 0.0 <= flat[key] <= 1.0:
            raise ConfigError(f"{key} must be in [0, 1], got {flat[key]}")
    for key in HALF_OPEN_UNIT:
        if not 0.0 <= flat[key] < 1.0:
            raise ConfigError(f"{key} must be in [0, 1), got {flat[key]}")
    for key in OPEN_UNIT:
        if not 0.0 < flat[key] < 1.0:
            raise ConfigError(f"{key} must be in (0, 1), got {flat[key]}")
    o = cfg.objective
    guided = not (o.cfg_w == 1.0 and o.cfg_k == 0.0)
    if o.name == "flow_matching" and o.equal_fraction is not None:
        raise ConfigError("objective.equal_fraction has no meaning for flow_matching (r = t always); leave it null")
    for problem in (guidance_problem(o.cfg_w, o.cfg_k, o.cfg_t_lo, o.cfg_t_hi, o.label_dropout),
                    weighting_problem(o.adaptive_p, o.adaptive_eps)):  # the objectives' own rules
        if problem:
            raise ConfigError(problem)
    if cfg.model.pretrained and cfg.model.pretrained_source == "sit" and cfg.model.time_scale != 1.0:
        raise ConfigError(f"model.pretrained_source=sit needs model.time_scale=1 (SiT's time embedder saw t in "
                          f"[0, 1]), got model.time_scale={cfg.model.time_scale:g}")
    if o.name in ("dumo", "meanflow"):
        problem = flow_map_option_problem(o.name, o.tangent, o.target_velocity, o.lambda_v, guided)
        if problem:
            raise ConfigError(problem)
    defaults = ObjectiveConfig()
    for key in _UNUSED_BY.get(o.name, ()):  # set away from its default where it would be dropped without a word
        if getattr(o, key) != getattr(defaults, key):
            raise ConfigError(f"objective.{key}={getattr(o, key)!r} has no effect on objective.name={o.name} "
                              f"({_USED_BY[key]}); leave it at its default {getattr(defaults, key)!r}")
    if not 0.0 < cfg.sample.t_mid < 1.0:
        raise ConfigError(f"sample.t_mid must be in (0, 1), got {cfg.sample.t_mid}")
    if cfg.model.input_size % DIT_SIZES[cfg.model.name].patch_size:
        raise ConfigError(f"model.input_size {cfg.model.input_size} is not divisible by {cfg.model.name}'s patch size")
    _check_dataset(cfg)
    if not cfg.train.out_dir.strip():
        raise ConfigError("train.out_dir is empty: name the run directory (e.g. runs/digits)")
    if cfg.train.micro_batch and not cfg.train.deepspeed:
        raise ConfigError("train.micro_batch applies to DeepSpeed runs only (set train.deepspeed, or leave it 0)")
    if cfg.train.deepspeed and o.name != "flow_matching" and o.jvp_backend in ("func", "forward_ad"):
        raise ConfigError(f"objective.jvp_backend={o.jvp_backend} cannot run under train.deepspeed: torch.func sees "
                          "through no wrapper (the gradient sync would be skipped); use fused or auto")
    for m in cfg.eval.methods:
        if m not in METHODS:
            raise ConfigError(f"eval.methods: {m!r} is not one of {', '.join(METHODS)}")
    return cfg


def _check_dataset(cfg: RunConfig) -> None:
    """The model must fit what the dataset feeds it, and the batch must fit the training split."""
    images, size, channels, classes = DATASETS[cfg.data.dataset]
    m, name = cfg.model, cfg.data.dataset
    for key, want in (("input_size", size), ("in_channels", channels), ("num_classes", classes)):
        if getattr(m, key) != want:
            raise ConfigError(f"model.{key}={getattr(m, key)} does not fit data.dataset={name} ({key} {want})")
    n_test = math.ceil(images * cfg.data.test_fraction)  # sklearn's train_test_split rounding
    n_train = images - n_test
    for part, n in (("held-out", n_test), ("training", n_train)):  # the split is stratified: every class in each part
        if n < classes:
            raise ConfigError(f"data.test_fraction={cfg.data.test_fraction} leaves {n} {part} images of {name}, fewer "
                              f"than its {classes} classes")
    if cfg.train.batch_size > n_train:
        raise ConfigError(f"train.batch_size={cfg.train.batch_size} exceeds the {n_train} training images of {name}")


def parse_override(arg: str) -> tuple[str, Any]:
    """'--train.lr=1e-3' -> ('train.lr', 0.001); the value is parsed as YAML (numbers, bools, lists, null)."""
    if not arg.startswith("--") or "=" not in arg:
        raise ConfigError(f"override {arg!r} must look like --section.key=value")
    key, raw = arg[2:].split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"{key}: cannot parse value {raw!r}: {e}") from None
    return key, _yaml_number(value)


def _nest(key: str, value: Any) -> dict:
    parts = key.split(".")
    if len(parts) != 2:
        raise ConfigError(f"override key {key!r} must be section.key, e.g. train.steps")
    return {parts[0]: {parts[1]: value}}


def _yaml_number(value: Any) -> Any:
    """YAML 1.1 reads "1e-3" (no dot) as a string: take such a string as the number it spells."""
    if isinstance(value, dict):
        return {k: _yaml_number(v) for k, v in value.items()}
    if isinstance(value, str) and any(c in value for c in "eE."):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def load_config(path: Optional[str | os.PathLike] = None, overrides: typing.Sequence[str] = ()) -> RunConfig:
    """Defaults <- YAML preset <- --section.key=value overrides; then validated."""
    cfg = RunConfig()
    if path is not None:
        _apply(cfg, _yaml_number(read_config_file(path)))
    return apply_overrides(cfg, overrides)


def read_config_file(path: str | os.PathLike, allow_empty: bool = True) -> dict:
    """The YAML mapping of sections in path; ConfigError naming the file where it is missing, not YAML, not a
    mapping, or (allow_empty=False: a run's saved config.yaml) empty."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ConfigError(f"config file not found: {path}")
    with open(path) as f:
        try:
            data = yaml.safe_load(f)
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if data is None and allow_empty:
        data = {}
    if not isinstance(data, dict) or not (data or allow_empty):
        raise ConfigError(f"{path}: top level must be a {'non-empty ' if not allow_empty else ''}mapping of sections")
    return data


def apply_overrides(cfg: RunConfig, overrides: typing.Sequence[str]) -> RunConfig:
    """Apply --section.key=value overrides in order, then validate."""
    for arg in overrides:
        key, value = parse_override(arg)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and _is_text_field(key):
            value = arg.split("=", 1)[1]  # a path or name that looks like a number (--train.out_dir=1e3) stays text
        _apply(cfg, _nest(key, value))
    return validate(cfg)


def _is_text_field(key: str) -> bool:
    """Whether section.key is a str (or Optional[str]) setting of RunConfig."""
    parts = key.split(".")
    if len(parts) != 2:
        return False
    section = typing.get_type_hints(RunConfig).get(parts[0])
    if section is None or not dataclasses.is_dataclass(section):
        return False
    hint = typing.get_type_hints(section).get(parts[1])
    return hint is str or (typing.get_origin(hint) in (typing.Union, types.UnionType)
                           and str in typing.get_args(hint))


def to_dict(cfg: RunConfig) -> dict:
    return dataclasses.asdict(cfg)


def to_flat_dict(cfg: RunConfig) -> dict:
    return {f"{s}.{k}": v for s, sec in to_dict(cfg).items() for k, v in sec.items()}


def save_config(cfg: RunConfig, path: str | os.PathLike) -> None:
    """Written atomically (fsio.write_text_atomic): a reader sees the old or the new file."""
    from .fsio import write_text_atomic

    write_text_atomic(os.fspath(path), yaml.safe_dump(to_dict(cfg), sort_keys=False))


def from_dict(data: dict) -> RunConfig:
    cfg = RunConfig()
    _apply(cfg, data)
    return validate(cfg)
