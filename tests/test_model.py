"""Dual-head DiT: shapes, parameter counts, heads, input checks, forward-mode AD, DiT/SiT checkpoint import."""
from __future__ import annotations

import re

import pytest
import safetensors.torch
import torch
import torch.autograd.forward_ad as fwAD

from dumo_engine.models import (DIT_SIZES, CheckpointFormatError, DualHeadDiT, build_model, load_pretrained_dit,
                                read_state_dict)
from dumo_engine.models.dit import modulate

TINY_PRESETS = ("DiT-tiny", "DiT-digits")
from helpers import randomize_

NUM_CLASSES = 10


def inputs(n: int, channels: int, size: int, num_classes: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, channels, size, size, generator=g)
    t = torch.rand(n, generator=g) * 0.9 + 0.05
    h = t * torch.rand(n, generator=g)
    y = torch.randint(0, num_classes + 1, (n,), generator=g)  # NULL (= num_classes) included
    return x, t, h, y


def tiny_model(seed: int = 0, in_channels: int = 4, input_size: int = 8, num_classes: int = NUM_CLASSES):
    torch.manual_seed(seed)
    return randomize_(build_model("DiT-tiny", input_size=input_size, in_channels=in_channels,
                                  num_classes=num_classes), seed)


# ----------------------------------------------------------------------------------------------------------------
# shapes and parameter counts
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(DIT_SIZES))
def test_every_preset_output_shapes_on_meta(name):
    """Every preset builds (on meta) and maps (N, C, 32, 32) to v and u of the same shape."""
    with torch.device("meta"):
        model = build_model(name)
        x = torch.randn(2, 4, 32, 32)
        v, u = model(x, torch.rand(2), torch.rand(2), torch.zeros(2, dtype=torch.long))
    assert v.shape == (2, 4, 32, 32) and u.shape == (2, 4, 32, 32)
    spec = DIT_SIZES[name]
    assert model.hidden_size == spec.hidden_size and len(model.blocks) == spec.depth
    assert model.patch_size == spec.patch_size and model.num_heads == spec.num_heads


@pytest.mark.parametrize("name", TINY_PRESETS)
@pytest.mark.parametrize("in_channels", [1, 4])
def test_tiny_presets_run_on_cpu(name, in_channels):
    """The CPU presets run for real: finite (N, C, 8, 8) outputs, and the two heads differ."""
    torch.manual_seed(1)
    model = randomize_(build_model(name, input_size=8, in_channels=in_channels, num_classes=NUM_CLASSES), 1, std=0.05)
    x, t, h, y = inputs(3, in_channels, 8, NUM_CLASSES, seed=2)
    v, u = model(x, t, h, y)
    assert v.shape == u.shape == (3, in_channels, 8, 8)
    assert torch.isfinite(v).all() and torch.isfinite(u).all()
    assert not torch.allclose(v, u)


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("name,expected,millions", [
    ("DiT-XL/2", 679_115_552, 679.1),
    ("DiT-L/2", 461_252_640, 461.3),
    ("DiT-B/2", 132_284_960, 132.3),
])
def test_parameter_counts(name, expected, millions):
    """Exact dual-head parameter counts (input 32, 4 channels, 1000 classes) and the METHOD.md rounding."""
    with torch.device("meta"):
        model = build_model(name)
    n = _count(model)
    assert n == expected
    assert round(n / 1e6, 1) == millions


def test_xl_parameter_decomposition():
    """XL/2: h_embedder 1,624,320 + a second head 2,674,960 on top of plain DiT-XL/2 (674.8M)."""
    with torch.device("meta"):
        model = build_model("DiT-XL/2")
    h_emb, u_head, v_head = _count(model.h_embedder), _count(model.u_head), _count(model.v_head)
    assert h_emb == 1_624_320
    assert u_head == 2_674_960 == v_head
    plain = _count(model) - h_emb - u_head
    assert plain == 674_816_272 and round(plain / 1e6, 1) == 674.8
    # pos_embed is a fixed buffer, not a parameter
    assert "pos_embed" not in dict(model.named_parameters()) and "pos_embed" in model.state_dict()


# ----------------------------------------------------------------------------------------------------------------
# heads, input validation, build_model
# ----------------------------------------------------------------------------------------------------------------
def test_heads_selection():
    """heads="v" -> (v, None), heads="u" -> (None, u), each equal to the matching output of heads="vu"."""
    model = tiny_model(3)
    x, t, h, y = inputs(2, 4, 8, NUM_CLASSES, seed=4)
    v, u = model(x, t, h, y, heads="vu")
    v_only, none_u = model(x, t, h, y, heads="v")
    none_v, u_only = model(x, t, h, y, heads="u")
    assert none_u is None and none_v is None
    assert torch.equal(v_only, v) and torch.equal(u_only, u)
    assert not torch.allclose(v, u)


def test_outputs_depend_on_every_input():
    """t, h and y all reach the output (conditioning is wired): changing any one changes v and u."""
    model = tiny_model(5)
    x, t, h, y = inputs(2, 4, 8, NUM_CLASSES, seed=6)
    v0, u0 = model(x, t, h, y)
    for args in ((x, t + 0.1, h, y), (x, t, h + 0.1, y), (x, t, h, (y + 1) % (NUM_CLASSES + 1))):
        v1, u1 = model(*args)
        assert not torch.allclose(v0, v1) and not torch.allclose(u0, u1)


@pytest.mark.parametrize("shape", [(2, 3, 8, 8), (2, 4, 8, 6), (2, 4, 8), (4, 8, 8), (2, 4, 8, 8, 1)])
def test_wrong_input_shape_raises_value_error(shape):
    """Wrong channels, width or rank raise ValueError before the trunk runs."""
    model = tiny_model(0)
    _, t, h, y = inputs(2, 4, 8, NUM_CLASSES, seed=0)
    with pytest.raises(ValueError, match="expected x of shape"):
        model(torch.randn(*shape), t, h, y)


@pytest.mark.parametrize("shape", [(2, 4, 9, 8), (2, 4, 6, 8)])
def test_wrong_input_height_raises_value_error(shape):
    """A wrong height (width correct) must raise ValueError too."""
    model = tiny_model(0)
    _, t, h, y = inputs(2, 4, 8, NUM_CLASSES, seed=0)
    with pytest.raises(ValueError):
        model(torch.randn(*shape), t, h, y)


def test_build_model_unknown_name():
    """build_model with an unknown name raises ValueError naming it."""
    with pytest.raises(ValueError, match=re.escape("DiT-XXL/2")):
        build_model("DiT-XXL/2")


def test_input_size_not_divisible_by_patch():
    """input_size not a multiple of the patch size is refused at construction."""
    with pytest.raises(ValueError, match="not divisible"):
        build_model("DiT-tiny", input_size=7)


# ----------------------------------------------------------------------------------------------------------------
# forward-mode AD through attention
# ----------------------------------------------------------------------------------------------------------------
def test_forward_mode_ad_through_model():
    """torch.func.jvp and forward_ad dual numbers both run through the model (attention included) and agree.

    The fused CPU SDPA kernel has no forward derivative, so this fails if Attention stops switching to MATH.
    """
    model = tiny_model(7)
    x, t, h, y = inputs(2, 4, 8, NUM_CLASSES, seed=8)
    tx = torch.randn_like(x)

    def f(x_):
        return model(x_, t, h, y)[1]

    u, du = torch.func.jvp(f, (x,), (tx,))
    with fwAD.dual_level():
        out = f(fwAD.make_dual(x, tx))
        u2, du2 = fwAD.unpack_dual(out)
    assert torch.isfinite(du).all() and du.abs().sum() > 0
    torch.testing.assert_close(u2, u)
    torch.testing.assert_close(du2, du, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------------------------
# DiT / SiT checkpoint import
# ----------------------------------------------------------------------------------------------------------------
def dit_state_dict(src: DualHeadDiT) -> dict[str, torch.Tensor]:
    """facebookresearch/DiT layout from one of our models: v_head -> final_layer, no h_embedder, no u_head."""
    out = {}
    for k, v in src.state_dict().items():
        if k.startswith(("h_embedder.", "u_head.")):
            continue
        if k.startswith("v_head."):
            k = "final_layer." + k[len("v_head."):]
        out[k] = v.clone().contiguous()
    return out


DIT_KEY_PATTERNS = [
    "x_embedder.proj.weight", "x_embedder.proj.bias", "t_embedder.mlp.0.weight", "t_embedder.mlp.0.bias",
    "t_embedder.mlp.2.weight", "t_embedder.mlp.2.bias", "y_embedder.embedding_table.weight", "pos_embed",
    "blocks.1.attn.qkv.weight", "blocks.1.attn.qkv.bias", "blocks.1.attn.proj.weight", "blocks.1.attn.proj.bias",
    "blocks.1.mlp.fc1.weight", "blocks.1.mlp.fc1.bias", "blocks.1.mlp.fc2.weight", "blocks.1.mlp.fc2.bias",
    "blocks.1.adaLN_modulation.1.weight", "blocks.1.adaLN_modulation.1.bias", "final_layer.linear.weight",
    "final_layer.linear.bias", "final_layer.adaLN_modulation.1.weight", "final_layer.adaLN_modulation.1.bias",
]


def _check_imported(dst: DualHeadDiT, src_sd: dict[str, torch.Tensor], before: dict[str, torch.Tensor], report):
    got = dst.state_dict()
    h_keys = sorted(k for k in got if k.startswith("h_embedder."))
    assert h_keys and report.missing == h_keys  # h_embedder reported missing, by name, and nothing else
    for k in h_keys:  # ... kept at its previous value, except the output layer, zeroed to preserve the function
        if k in report.zeroed:
            assert torch.count_nonzero(got[k]) == 0 and torch.count_nonzero(before[k]) > 0
        else:
            assert torch.equal(got[k], before[k])
    for k, v in src_sd.items():
        if k.startswith("final_layer."):
            for head in ("v_head", "u_head"):
                name = head + k[len("final_layer"):]
                assert torch.equal(got[name], v), name
                assert name in report.loaded
        else:
            assert torch.equal(got[k], v), k
            assert k in report.loaded
    # every key of ours is either loaded or reported missing
    assert sorted(report.loaded + report.missing) == sorted(got)


@pytest.mark.parametrize("fmt", ["safetensors", "pt"])
def test_dit_import_round_trip(tmp_path, fmt):
    """A DiT-layout file (safetensors or torch) loads exactly: trunk, both heads from final_layer;
    h_embedder reported missing; an extra key is refused by the strict default, and reported unexpected with
    strict=False."""
    src = tiny_model(11)
    sd = dit_state_dict(src)
    assert set(DIT_KEY_PATTERNS) <= set(sd)
    file_sd = dict(sd, **{"extra_layer.weight": torch.randn(3)})
    path = tmp_path / f"dit.{fmt}"
    if fmt == "safetensors":
        safetensors.torch.save_file(file_sd, str(path))
    else:
        torch.save(file_sd, path)
    dst = tiny_model(12)  # different random values everywhere
    before = {k: v.clone() for k, v in dst.state_dict().items()}
    assert not torch.equal(before["blocks.0.attn.qkv.weight"], sd["blocks.0.attn.qkv.weight"])
    with pytest.raises(CheckpointFormatError, match="(?s)does not fit this model.*extra_layer.weight"):
        load_pretrained_dit(dst, path)
    assert torch.equal(dst.state_dict()["blocks.0.attn.qkv.weight"], before["blocks.0.attn.qkv.weight"])
    report = load_pretrained_dit(dst, path, strict=False)
    assert report.unexpected == ["extra_layer.weight"]
    assert report.converted == []
    _check_imported(dst, sd, before, report)
    assert "h_embedder.mlp.0.weight" in report.summary() and "extra_layer.weight" in report.summary()
    # the imported model computes what the source computes for the v head (trunk + head identical, h = 0 only
    # differs through h_embedder, so compare with the source's h_embedder copied in)
    dst.h_embedder.load_state_dict(src.h_embedder.state_dict())
    x, t, h, y = inputs(2, 4, 8, NUM_CLASSES, seed=13)
    v_src, _ = src(x, t, h, y)
    v_dst, u_dst = dst(x, t, h, y)
    assert torch.equal(v_dst, v_src) and torch.equal(u_dst, v_src)
    # the method form, model.load_pretrained_dit(path), does the same
    dst2 = tiny_model(14)
    report2 = dst2.load_pretrained_dit(path, strict=False)
    assert report2.unexpected == ["extra_layer.weight"] and report2.missing == report.missing
    assert torch.equal(dst2.state_dict()["u_head.linear.weight"], sd["final_layer.linear.weight"])


def test_strict_import_names_what_does_not_fit(tmp_path):
    """The strict default accepts a complete DiT file (only the h embedder, which DiT/SiT lack, is missing) and
    refuses, naming the keys, a file that matched nothing (it used to load 0 tensors and train on from random
    weights), a shallower or deeper model's file; "_orig_mod." (torch.compile) and "module." prefixes are removed."""
    src = tiny_model(11)
    sd = dit_state_dict(src)
    path = tmp_path / "dit.safetensors"
    safetensors.torch.save_file(sd, str(path))
    report = load_pretrained_dit(tiny_model(12), path)
    assert report.missing and all(k.startswith("h_embedder.") for k in report.missing) and not report.unexpected
    compiled = tmp_path / "compiled.safetensors"
    safetensors.torch.save_file({"_orig_mod." + k: v for k, v in sd.items()}, str(compiled))
    assert load_pretrained_dit(tiny_model(12), compiled).loaded == report.loaded
    renamed = tmp_path / "renamed.safetensors"
    safetensors.torch.save_file({"net." + k: v for k, v in sd.items()}, str(renamed))
    with pytest.raises(CheckpointFormatError, match="(?s)0 tensors matched.*missing.*blocks.0.attn.qkv.weight"):
        load_pretrained_dit(tiny_model(12), renamed)
    shallow = tmp_path / "shallow.safetensors"
    safetensors.torch.save_file({k: v for k, v in sd.items() if not k.startswith("blocks.1.")}, str(shallow))
    with pytest.raises(CheckpointFormatError, match="(?s)missing.*blocks.1.attn.qkv.weight"):
        load_pretrained_dit(tiny_model(12), shallow)
    deep = tmp_path / "deep.safetensors"
    extra = {k.replace("blocks.1.", "blocks.2.", 1): v.clone() for k, v in sd.items() if k.startswith("blocks.1.")}
    safetensors.torch.save_file(dict(sd, **extra), str(deep))
    with pytest.raises(CheckpointFormatError, match="(?s)unexpected.*blocks.2.attn.qkv.weight"):
        load_pretrained_dit(tiny_model(12), deep)
    assert load_pretrained_dit(tiny_model(12), shallow, strict=False).missing  # opt-in partial load


def _reference_unpatchify(x: torch.Tensor, channels: int, p: int) -> torch.Tensor:
    """DiT's unpatchify, written out: (N, T, p*p*channels) with channel fastest -> (N, channels, H, W)."""
    n, T, _ = x.shape
    g = int(round(T ** 0.5))
    out = torch.zeros(n, channels, g * p, g * p, dtype=x.dtype)
    for i in range(g):
        for j in range(g):
            tok = x[:, i * g + j]
            for a in range(p):
                for b in range(p):
                    for c in range(channels):
                        out[:, c, i * p + a, j * p + b] = tok[:, (a * p + b) * channels + c]
    return out


def test_learn_sigma_import_keeps_first_c_channels_per_position(tmp_path):
    """A learn-sigma final layer (2C channels per (p, q), channel fastest) imports as the first C channels of
    each group: the imported heads equal a reference unpatchify of the 2C output, channels [0, C)."""
    src = tiny_model(21)
    sd = dit_state_dict(src)
    C, p, D = 4, 2, src.hidden_size
    g = torch.Generator().manual_seed(22)
    W2 = torch.randn(p * p * 2 * C, D, generator=g) * 0.2
    B2 = torch.randn(p * p * 2 * C, generator=g) * 0.2
    sd["final_layer.linear.weight"], sd["final_layer.linear.bias"] = W2, B2
    path = tmp_path / "sit_learn_sigma.pt"
    torch.save(sd, path)
    dst = tiny_model(23)
    report = load_pretrained_dit(dst, path)
    assert sorted(report.converted) == ["final_layer.linear.bias", "final_layer.linear.weight"]
    assert report.unexpected == []

    x, t, h, y = inputs(3, C, 8, NUM_CLASSES, seed=24)
    with torch.no_grad():
        v, u = dst(x, t, h, y)
        tokens, c, _ = dst.trunk(x, t, h, y)
        shift, scale = dst.v_head.adaLN_modulation(c).chunk(2, dim=1)
        feats = modulate(dst.v_head.norm_final(tokens), shift, scale)
        full = feats @ W2.T + B2  # (N, T, p*p*2C): what DiT's final layer outputs
        ref = _reference_unpatchify(full, 2 * C, p)[:, :C]
        naive = _reference_unpatchify(feats @ W2[: p * p * C].T + B2[: p * p * C], C, p)
    torch.testing.assert_close(v, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(u, ref, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(v, naive, atol=1e-3)  # "first half of the rows" would be wrong


def test_shape_mismatch_names_the_key(tmp_path):
    """A tensor of the wrong shape raises CheckpointFormatError naming the key."""
    sd = dit_state_dict(tiny_model(31))
    path = tmp_path / "dit.safetensors"
    safetensors.torch.save_file(sd, str(path))
    dst = tiny_model(32, num_classes=5)  # y_embedder has 6 rows, the file 11
    with pytest.raises(CheckpointFormatError, match=re.escape("y_embedder.embedding_table.weight")):
        load_pretrained_dit(dst, path)


class NotATensor:
    """A custom class: weights_only unpickling must refuse it."""

    def __init__(self):
        self.payload = [1, 2, 3]


def test_truncated_safetensors_raises_format_error(tmp_path):
    """A truncated .safetensors file raises CheckpointFormatError."""
    path = tmp_path / "dit.safetensors"
    safetensors.torch.save_file(dit_state_dict(tiny_model(41)), str(path))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointFormatError):
        load_pretrained_dit(tiny_model(42), path)


@pytest.mark.parametrize("payload", ["object", "nested_object", "garbage", "list"])
def test_bad_torch_files_raise_format_error(tmp_path, payload):
    """Pickled custom objects (refused by weights_only), garbage bytes and non-dict payloads raise
    CheckpointFormatError, not a deep torch/pickle exception."""
    path = tmp_path / "bad.pt"
    if payload == "object":
        torch.save(NotATensor(), path)
    elif payload == "nested_object":
        torch.save({"model": {"x_embedder.proj.bias": torch.zeros(32)}, "args": NotATensor()}, path)
    elif payload == "garbage":
        path.write_bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0))
                         .to(torch.uint8).numpy().tobytes())
    else:
        torch.save([torch.zeros(3)], path)
    with pytest.raises(CheckpointFormatError):
        load_pretrained_dit(tiny_model(43), path)


def test_missing_file_raises_file_not_found(tmp_path):
    """A path that does not exist raises FileNotFoundError."""
    with pytest.raises(FileNotFoundError):
        read_state_dict(tmp_path / "nope.safetensors")


@pytest.mark.parametrize("wrap", ["model", "ema", "ema_and_model", "module_prefix", "ema_module_prefix"])
def test_nested_and_prefixed_checkpoints(tmp_path, wrap):
    """{"model": sd}, {"ema": sd} (preferred over "model") and DDP "module." prefixes all import exactly."""
    src = tiny_model(51)
    sd = dit_state_dict(src)
    decoy = dit_state_dict(tiny_model(52))
    prefixed = {"module." + k: v for k, v in sd.items()}
    payload = {
        "model": {"model": sd, "step": 7},
        "ema": {"ema": sd},
        "ema_and_model": {"model": decoy, "ema": sd},
        "module_prefix": prefixed,
        "ema_module_prefix": {"ema": prefixed, "model": decoy},
    }[wrap]
    path = tmp_path / "ckpt.pt"
    torch.save(payload, path)
    assert read_state_dict(path).keys() == sd.keys()
    dst = tiny_model(53)
    before = {k: v.clone() for k, v in dst.state_dict().items()}
    report = load_pretrained_dit(dst, path)
    assert report.unexpected == []
    _check_imported(dst, sd, before, report)


def test_h_only_in_u_head_makes_v_independent_of_h():
    """h_in_trunk=False: v is exactly h-independent, u still depends on h; same parameter count."""
    m = randomize_(build_model("DiT-tiny", input_size=8, in_channels=4, num_classes=NUM_CLASSES, h_in_trunk=False), 5)
    ref = build_model("DiT-tiny", input_size=8, in_channels=4, num_classes=NUM_CLASSES)
    assert sum(p.numel() for p in m.parameters()) == sum(p.numel() for p in ref.parameters())
    x, t, h, y = inputs(3, 4, 8, NUM_CLASSES, seed=6)
    v1, u1 = m(x, t, h, y)
    v2, u2 = m(x, t, h * 0.3, y)
    assert torch.equal(v1, v2) and not torch.allclose(u1, u2)
    v3, u3 = m(x, t, h, y, heads="v")
    assert torch.equal(v3, v1) and u3 is None
    # with h in the trunk (default) v does depend on h
    randomize_(ref, 5)
    assert not torch.allclose(ref(x, t, h, y)[0], ref(x, t, h * 0.3, y)[0])


def test_import_zeroes_h_embedder_output_so_function_is_preserved(tmp_path):
    """After a DiT import the h embedder outputs 0: any h gives the same outputs as h = 0."""
    src = tiny_model(21)
    path = tmp_path / "dit.safetensors"
    safetensors.torch.save_file(dit_state_dict(src), str(path))
    dst = tiny_model(22)
    report = dst.load_pretrained_dit(path)
    assert report.zeroed == ["h_embedder.mlp.2.weight", "h_embedder.mlp.2.bias"] and "zeroed" in report.summary()
    x, t, h, y = inputs(2, 4, 8, NUM_CLASSES, seed=23)
    v_h, u_h = dst(x, t, h, y)
    v_0, u_0 = dst(x, t, torch.zeros_like(h), y)
    assert torch.equal(v_h, v_0) and torch.equal(u_h, u_0)
    # the h embedder still trains: its output layer gets a gradient
    dst(x, t, h, y)[1].square().sum().backward()
    assert dst.h_embedder.mlp[2].weight.grad.abs().sum() > 0


def test_sit_import_is_exact(tmp_path):
    """source="sit": SiT runs time the other way (its x_s = s x + (1 - s) e is our z_t at s = 1 - t) and predicts
    x - e, minus our velocity. With time_scale 1 (SiT's unscaled t), the reflection folded into the time embedder and
    the heads negated, the imported model computes v(z, t) = -v_SiT(z, 1 - t) exactly (both heads, h ignored at
    import). The SiT stand-in is our network at time_scale 1 without h (SiT's architecture is DiT's)."""
    def build(ts, seed):
        torch.manual_seed(seed)
        return randomize_(build_model("DiT-tiny", input_size=8, in_channels=4, num_classes=NUM_CLASSES,
                                      time_scale=ts), seed)

    sit = build(1.0, 31)
    with torch.no_grad():  # SiT has no h embedder: ours contributes nothing
        sit.h_embedder.mlp[2].weight.zero_()
        sit.h_embedder.mlp[2].bias.zero_()
    path = tmp_path / "sit.safetensors"
    safetensors.torch.save_file(dit_state_dict(sit), str(path))
    dst = build(1.0, 32)
    report = load_pretrained_dit(dst, path, source="sit")
    assert "t_embedder.mlp.0.weight (time reflected: SiT t = 1 - ours)" in report.from_sit
    assert "converted from SiT's conventions" in report.summary()
    x, t, h, y = inputs(3, 4, 8, NUM_CLASSES, seed=33)
    with torch.no_grad():
        v_sit, _ = sit(x, 1 - t, h, y)
        v, u = dst(x, t, h, y)
    torch.testing.assert_close(v, -v_sit, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(u, -v_sit, rtol=1e-4, atol=1e-5)
    as_dit = build(1.0, 35)
    load_pretrained_dit(as_dit, path)  # the same file taken as DiT: weights as they are, so not the SiT function
    with torch.no_grad():
        v_dit, _ = as_dit(x, t, h, y)
    assert (v_dit + v_sit).abs().max() > 1e-2
    with pytest.raises(CheckpointFormatError, match="needs time_scale 1"):
        load_pretrained_dit(build(1000.0, 36), path, source="sit")
    with pytest.raises(ValueError, match="source must be one of"):
        load_pretrained_dit(dst, path, source="sat")
