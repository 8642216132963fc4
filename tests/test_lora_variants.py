"""LoRA variants: DoRA (against peft and diffusers, both ways), Delta-LoRA (the paper's update rule),
IncreLoRA (rank growth by importance within a budget), and each through the DreamBooth trainer."""
from __future__ import annotations

import copy
import dataclasses
import json

import pytest
import torch
from diffusers import StableDiffusionPipeline
from peft import LoraConfig
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from transformers.pytorch_utils import Conv1D

import peft_diffusion as pd
import tiny
from peft_diffusion.api import after_step, hosts
from peft_diffusion.methods import DeltaLoRA, DoRA, IncreLoRA
from peft_diffusion.methods.dora import channel_norm
from peft_diffusion.training import dreambooth as db
from test_dreambooth import make_config, max_diff, stop_after_first_checkpoint
from test_formats import assert_close, outputs, save_peft_adapters, unet_output

TYPES = ("Linear", "Conv2d", "Conv1D")


def _toy():
    torch.manual_seed(0)
    return nn.ModuleDict({"lin": nn.Linear(6, 5), "conv": nn.Conv2d(3, 4, 3, padding=1), "gpt": Conv1D(5, 6)})


def _run(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(2, 6, generator=g), torch.randn(1, 3, 5, 5, generator=g)
    return torch.cat([model["lin"](x).flatten(), model["conv"](y).flatten(), model["gpt"](x).flatten()])


def _inject(model, config, name="a"):
    return pd.inject(model, dataclasses.replace(config, target=pd.Target(types=TYPES)), name)


# ---------------------------------------------------------------- DoRA


def test_dora_is_the_paper_equation_on_every_layer_kind():
    model = _toy()
    base = copy.deepcopy(model)
    _inject(model, DoRA(r=2, alpha=3.0))
    tiny.perturb_trainable(model, std=0.3)
    for name, host in model.items():
        d = host.deltas["a"]
        w0 = base[name].weight.detach()
        w0 = w0.T if name == "gpt" else w0
        ba = (d.lora_B.weight.flatten(1) @ d.lora_A.weight.flatten(1)).view(w0.shape)
        v = w0 + d.scaling * ba
        expected = d.lora_magnitude_vector.detach().reshape(-1, *[1] * (v.dim() - 1)) * v / channel_norm(v)
        base[name].weight.data = expected.T if name == "gpt" else expected
    torch.testing.assert_close(_run(model), _run(base), atol=1e-5, rtol=1e-5)


def test_dora_magnitude_starts_at_the_weight_norm_and_gets_gradients():
    model = _toy()
    _inject(model, DoRA(r=2))
    lin = model["lin"].deltas["a"]
    torch.testing.assert_close(lin.lora_magnitude_vector, model["lin"].base.weight.norm(dim=1))
    assert model["conv"].deltas["a"].lora_magnitude_vector.shape == (1, 4, 1, 1)  # peft's shape
    tiny.randomize(model, "a", std=0.3)
    _run(model).pow(2).sum().backward()
    for host in model.values():
        d = host.deltas["a"]
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in d.parameters())
        assert host.base.weight.grad is None


def test_dora_norm_is_detached_as_in_the_paper():
    """Section 4.3: ||W0 + sBA||_c is a constant for backprop; the magnitude's gradient is then V/||V|| . dL/dW'."""
    lin = nn.Linear(4, 3)
    model = nn.Sequential(lin)
    pd.inject(model, DoRA(r=2, target=pd.Target(types=("Linear",))), "a")
    d = model[0].deltas["a"]
    tiny.randomize(model, "a", std=0.5)
    x = torch.randn(5, 4)
    model(x).sum().backward()
    v = lin.weight.detach() + d.scaling * d.lora_B.weight.detach() @ d.lora_A.weight.detach()
    dl_dw = torch.ones(5, 3).T @ x  # d(sum(x W'^T))/dW'
    expected = (v / v.norm(dim=1, keepdim=True) * dl_dw).sum(1)
    torch.testing.assert_close(d.lora_magnitude_vector.grad, expected)


def test_dora_unfuse_restores_the_weight_and_exact_is_bit_exact():
    model = _toy()
    w0 = {k: m.weight.detach().clone() for k, m in model.items()}
    _inject(model, DoRA(r=2))
    tiny.perturb_trainable(model, std=0.3)
    out = _run(model)
    pd.fuse(model)
    torch.testing.assert_close(_run(model), out, atol=1e-5, rtol=1e-5)
    pd.unfuse(model)
    for k, m in model.items():
        torch.testing.assert_close(m.base.weight, w0[k], atol=1e-6, rtol=1e-5)
    before = {k: m.base.weight.detach().clone() for k, m in model.items()}
    pd.fuse(model, exact=True)
    assert not any(torch.equal(m.base.weight, before[k]) for k, m in model.items())
    pd.unfuse(model)
    assert all(torch.equal(m.base.weight, before[k]) for k, m in model.items())
    pd.set_adapters(model, {"a": 0.5})  # a weight scales s, as peft's set_scale does
    half = _run(model)
    pd.fuse(model)
    torch.testing.assert_close(_run(model), half, atol=1e-5, rtol=1e-5)


def peft_dora_file(pipe, path, metadata=True):
    """A DoRA made by diffusers + peft: random B, magnitudes moved off ||W0||."""
    pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=["to_q", "to_v", "proj_in", "conv1"],
                                     init_lora_weights=False, use_dora=True))
    pipe.text_encoder.add_adapter(LoraConfig(r=2, lora_alpha=6, target_modules=["q_proj", "v_proj"],
                                             init_lora_weights=False, use_dora=True))
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for model in (pipe.unet, pipe.text_encoder):
            for n, p in model.named_parameters():
                if "lora_magnitude_vector" in n:
                    p.mul_(1 + 0.3 * torch.rand(p.shape, generator=g))
    return save_peft_adapters(pipe, path, metadata)


def text_output(pipe):
    ids = pipe.tokenizer(["a photo of sks dog"], padding="max_length", return_tensors="pt").input_ids
    with torch.no_grad():
        return pipe.text_encoder(ids)[0]


# diffusers 0.42 with transformers 5.23 loads a text encoder's DoRA without its magnitudes (transformers' load
# report: "lora_magnitude_vector.default_0.weight | MISSING"), so text-encoder DoRA is checked against peft's
# own model (the maker) and the U-Net against diffusers' load_lora_weights.


@pytest.mark.parametrize("metadata", [True, False])
def test_peft_dora_file_loads_like_peft_and_diffusers(tiny_pipe_dir, tmp_path, metadata):
    maker = StableDiffusionPipeline.from_pretrained(tiny_pipe_dir)
    path = peft_dora_file(maker, tmp_path, metadata)
    with safe_open(path, "pt") as f:
        assert any(k.endswith("conv1.lora_magnitude_vector") for k in f.keys())
    theirs = StableDiffusionPipeline.from_pretrained(tiny_pipe_dir)
    theirs.load_lora_weights(path)
    ours = StableDiffusionPipeline.from_pretrained(tiny_pipe_dir)
    name = pd.load_adapter(ours, path)
    assert {type(h.deltas[name].config).__name__ for _, h in hosts(ours)} == {"DoRA"}
    base = unet_output(StableDiffusionPipeline.from_pretrained(tiny_pipe_dir).unet)
    assert (unet_output(theirs.unet) - base).abs().max() > 1e-3  # the DoRA does something
    torch.testing.assert_close(unet_output(ours.unet), unet_output(theirs.unet), atol=1e-5, rtol=0)
    if metadata:  # without it the file does not say alpha (diffusers and we take alpha = r)
        torch.testing.assert_close(unet_output(ours.unet), unet_output(maker.unet), atol=1e-5, rtol=0)
        torch.testing.assert_close(text_output(ours), text_output(maker), atol=1e-5, rtol=0)


@pytest.mark.parametrize("fmt", ["native", "diffusers"])
def test_our_dora_loads_in_diffusers(tiny_pipe, tiny_pipe_dir, tmp_path, fmt):
    pd.inject(tiny_pipe, DoRA(r=4, alpha=6, rank_pattern={"attn2.to_k": 2}, target="unet-all"), "mine")
    pd.inject(tiny_pipe, DoRA(r=2, alpha=3, rslora=True), "mine", components=("text_encoder",))
    tiny.perturb_trainable(tiny_pipe.unet, std=0.05)
    tiny.perturb_trainable(tiny_pipe.text_encoder, std=0.05)
    expected = outputs(tiny_pipe)
    path = pd.save_adapter(tiny_pipe, tmp_path / f"{fmt}.safetensors", "mine", format=fmt)
    with safe_open(path, "pt") as f:
        header = json.loads(f.metadata()["lora_adapter_metadata"])
    assert header["unet.use_dora"] and header["text_encoder.use_dora"]
    theirs = StableDiffusionPipeline.from_pretrained(tiny_pipe_dir)
    theirs.load_lora_weights(path)
    torch.testing.assert_close(unet_output(theirs.unet), unet_output(tiny_pipe.unet), atol=1e-5, rtol=0)
    again = StableDiffusionPipeline.from_pretrained(tiny_pipe_dir)
    pd.load_adapter(again, path)
    assert_close(outputs(again), expected)


def test_dora_header_and_keys_must_agree(tiny_pipe, tiny_pipe_dir, tmp_path):
    pd.inject(tiny_pipe, DoRA(r=2), "mine")
    path = pd.save_adapter(tiny_pipe, tmp_path / "d.safetensors", "mine", format="diffusers")
    with safe_open(path, "pt") as f:
        meta = f.metadata()
    sd = {k: v for k, v in load_file(path).items() if "magnitude" not in k}
    save_file(sd, tmp_path / "stripped.safetensors", metadata=meta)
    fresh = StableDiffusionPipeline.from_pretrained(tiny_pipe_dir)
    with pytest.raises(pd.AdapterFileError, match="use_dora=True but unet has no lora_magnitude_vector"):
        pd.load_adapter(fresh, tmp_path / "stripped.safetensors")
    assert not list(hosts(fresh))


# ---------------------------------------------------------------- Delta-LoRA


def _train(model, steps, seed=3, lr=0.05, hook=True):
    """AdamW on a toy model's trainable parameters, after_step after each optimizer step; per-step inputs."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    g = torch.Generator().manual_seed(seed)
    for step in range(1, steps + 1):
        out = _run(model, seed=step)
        (out - torch.randn(out.shape, generator=g)).pow(2).mean().backward()
        opt.step()
        if hook:
            after_step(model, step, steps)
        opt.zero_grad()


def test_delta_lora_follows_the_papers_update_rule():
    """Algorithm 1 written out: W moves by lambda * the change of s B A from step K + 1 on, A and B get
    plain LoRA gradients (W itself gets none), checked step by step against our delta."""
    torch.manual_seed(0)
    lin = nn.Linear(6, 5)
    ours = nn.Sequential(copy.deepcopy(lin))
    pd.inject(ours, DeltaLoRA(r=2, alpha=4.0, update_ratio=0.5, start_step=2, target=pd.Target(types=("Linear",))), "a")
    d = ours[0].deltas["a"]
    w, bias, s, lam = lin.weight.detach().clone(), lin.bias.detach(), d.scaling, 0.5
    a = d.lora_A.weight.detach().clone().requires_grad_()
    b = d.lora_B.weight.detach().clone().requires_grad_()
    opt_ours = torch.optim.AdamW(d.parameters(), lr=0.1)
    opt_ref = torch.optim.AdamW([a, b], lr=0.1)
    g = torch.Generator().manual_seed(1)
    for t in range(1, 7):
        x, y = torch.randn(8, 6, generator=g), torch.randn(8, 5, generator=g)
        (ours(x) - y).pow(2).mean().backward()
        opt_ours.step()
        after_step(ours, t, 6)
        opt_ours.zero_grad()
        ((x @ (w + s * b @ a).T + bias - y).pow(2).mean()).backward()
        before = s * (b @ a).detach()
        opt_ref.step()
        if t > 2:  # the paper's "t > K"
            w += lam * (s * (b @ a).detach() - before)
        opt_ref.zero_grad()
        torch.testing.assert_close(d.lora_A.weight, a, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(d.lora_B.weight, b, atol=1e-6, rtol=1e-5)
        effective = lin.weight + d.delta_weight()  # W(t) + s B(t) A(t), with W(t) implicit
        torch.testing.assert_close(effective, w + s * b @ a, atol=1e-6, rtol=1e-5)
        moved = (effective - lin.weight - s * b @ a).abs().max()
        assert (moved > 1e-4) == (t > 2), f"step {t}: W moved by {moved}"
    assert torch.equal(ours[0].base.weight, lin.weight)  # W0 itself was never written


def test_delta_lora_save_load_and_remove(tmp_path):
    model = _toy()
    w0 = {k: m.weight.detach().clone() for k, m in model.items()}
    _inject(model, DeltaLoRA(r=2, start_step=1))
    _train(model, 4)
    out = _run(model)
    assert (model["lin"].deltas["a"].lora_B_K.abs().sum() > 0)  # the snapshot is of step 1, not of the init
    path = pd.save_adapter(model, tmp_path / "d.safetensors", "a")
    fresh = _toy()
    pd.load_adapter(fresh, path)
    torch.testing.assert_close(_run(fresh), out, atol=1e-6, rtol=1e-6)
    # a loaded, frozen adapter keeps its update of W when another run calls after_step before its K
    after_step(fresh, 1, 10)
    torch.testing.assert_close(_run(fresh), out, atol=1e-6, rtol=1e-6)
    pd.remove(model)
    assert all(torch.equal(model[k].weight, w0[k]) for k in w0)  # bit-exact: W0 is never written


def test_delta_lora_config_checks_and_late_start_warning(caplog):
    with pytest.raises(ValueError, match="dropout=0"):
        DeltaLoRA(dropout=0.1)
    with pytest.raises(ValueError, match="start_step"):
        DeltaLoRA(start_step=-1)
    model = _toy()
    _inject(model, DeltaLoRA(r=2, start_step=10))
    with caplog.at_level("WARNING"):
        _train(model, 2)
    assert "never updated" in caplog.text


# ---------------------------------------------------------------- IncreLoRA


def _ranks(model, name="a"):
    return {k: int(h.deltas[name].rank_mask.sum()) for k, h in model.items()}


def test_increlora_starts_as_identity_with_zero_slots():
    model = _toy()
    out = _run(model)
    _inject(model, IncreLoRA(r=1, rank_pattern={"conv": 2}, max_r=4, target_rank=3))
    torch.testing.assert_close(_run(model), out, atol=0, rtol=0)
    assert _ranks(model) == {"lin": 1, "conv": 2, "gpt": 1}
    conv = model["conv"].deltas["a"]
    assert conv.lora_A.weight.shape == (4, 3, 3, 3) and conv.lora_A.weight[2:].abs().sum() == 0
    assert conv.lora_A.weight[:2].abs().sum() > 0


@pytest.mark.parametrize("grad", [True, False])
def test_increlora_masked_components_contribute_nothing(grad):
    model = _toy()
    _inject(model, IncreLoRA(r=1, max_r=3, target_rank=2))
    tiny.perturb_trainable(model, std=0.3)
    with torch.set_grad_enabled(grad):  # with grad: the dW path that measures sensitivity; else low-rank
        out = _run(model)
        with torch.no_grad():
            for host in model.values():  # junk in the masked slots
                d = host.deltas["a"]
                d.lora_A.weight[1:] = torch.randn_like(d.lora_A.weight[1:])
                d.lora_B.weight[:, 1:] = torch.randn_like(d.lora_B.weight[:, 1:])
        junk = _run(model)
    torch.testing.assert_close(junk, out, atol=1e-6, rtol=1e-6)
    if grad:
        junk.sum().backward()
        for host in model.values():
            d = host.deltas["a"]
            assert d.lora_A.weight.grad[1:].abs().sum() == 0 and d.lora_B.weight.grad[:, 1:].abs().sum() == 0
            assert d.lora_B.weight.grad[:, :1].abs().sum() > 0


def test_increlora_sensitivity_is_the_papers_score():
    """S = sum |dW * dL/d(dW)| / sqrt(numel), dL/d(dW) = sum over tokens of grad_out x^T for a Linear."""
    model = nn.Sequential(nn.Linear(6, 5))
    pd.inject(model, IncreLoRA(r=2, max_r=3, target_rank=3, target=pd.Target(types=("Linear",))), "a")
    d = model[0].deltas["a"]
    tiny.perturb_trainable(model, std=0.3)
    x = torch.randn(4, 6)
    model(x).pow(2).sum().backward()
    dw = d.delta_weight().detach()
    grad_w = (2 * model(x).detach()).T @ x
    torch.testing.assert_close(d.score_step, (dw * grad_w).abs().sum() / 30 ** 0.5)


def test_increlora_grows_where_importance_is_highest_within_budget():
    torch.manual_seed(0)
    model = nn.ModuleDict({k: nn.Linear(6, 5) for k in ("big", "mid", "small")})
    weights = {"big": 10.0, "mid": 1.0, "small": 0.1}  # how much each module's output counts in the loss
    cfg = IncreLoRA(r=1, max_r=3, target_rank=2, interval=2, warmup=1, top_h=1, target=pd.Target(types=("Linear",)))
    pd.inject(model, cfg, "a")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05)
    g = torch.Generator().manual_seed(1)
    history = []
    for step in range(1, 13):
        x = torch.randn(8, 6, generator=g)
        sum(w * (model[k](x) - 1).pow(2).mean() for k, w in weights.items()).backward()
        opt.step()
        before = _ranks(model)
        after_step(model, step, 12)
        after = _ranks(model)
        grown = [k for k in after if after[k] > before[k]]
        if grown:
            # the importance after this step's smoothing, among the modules with room left (max_r = 3)
            seen = {k: float(h.deltas["a"].score_avg * h.deltas["a"].score_unc) for k, h in model.items()
                    if before[k] < 3}
            assert grown == [max(seen, key=seen.get)]
            history.append((step, grown[0]))
        assert sum(after.values()) <= 2 * 3  # target_rank x modules
        opt.zero_grad()
    assert [s for s, _ in history] == [2, 4, 6]  # every interval after warmup, until the budget is spent
    assert history[0][1] == "big" and _ranks(model) == {"big": 3, "mid": 2, "small": 1}
    assert not any(h.deltas["a"].scoring for h in model.values())  # budget spent: no more dW hooks


def test_increlora_new_component_keeps_the_output_and_round_trips(tmp_path):
    model = _toy()
    _inject(model, IncreLoRA(r=1, max_r=3, target_rank=2, interval=1, warmup=0, top_h=3))
    _train(model, 1, hook=False)
    out = _run(model)
    after_step(model, 1, 5)  # grows every module by one component, b_k = 0
    assert _ranks(model) == {"lin": 2, "conv": 2, "gpt": 2}
    torch.testing.assert_close(_run(model), out, atol=1e-6, rtol=1e-6)  # float order only: the budget is spent,
    assert not model["lin"].deltas["a"].scoring  # so the low-rank path replaced the dW one
    _train(model, 3)
    out = _run(model)
    path = pd.save_adapter(model, tmp_path / "i.safetensors", "a")
    fresh = _toy()
    pd.load_adapter(fresh, path, trainable=True)
    assert _ranks(fresh) == _ranks(model)
    torch.testing.assert_close(_run(fresh), out, atol=1e-6, rtol=1e-6)
    _train(fresh, 2)  # a loaded adapter trains on (growth included)


# ---------------------------------------------------------------- as plain LoRA, for LoRA-only formats


def _plain_lora_state(pipe, method):
    """Delta-LoRA / IncreLoRA on the U-Net (attention, feed-forward and resnet convs) and text encoder, with
    state beyond the factors: Delta-LoRA's snapshot away from them (every other module), IncreLoRA's ranks
    0-3 by module."""
    if method == "delta-lora":
        unet, te = DeltaLoRA(r=2, alpha=3, target="unet-all"), DeltaLoRA(r=2, rslora=True)
    else:
        unet, te = IncreLoRA(r=1, max_r=3, target_rank=2, alpha=3, target="unet-all"), IncreLoRA(r=2, max_r=3, target_rank=2)
    pd.inject(pipe, unet, "mine")
    pd.inject(pipe, te, "mine", components=("text_encoder",))
    tiny.perturb_trainable(pipe.unet, std=0.05)
    tiny.perturb_trainable(pipe.text_encoder, std=0.05)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for i, (_, host) in enumerate(hosts(pipe)):
            d = host.deltas["mine"]
            if method == "delta-lora" and i % 2:  # K not reached here: W has not moved
                d.snapshot()
            elif method == "delta-lora":
                d.lora_A_K.add_(0.05 * torch.randn(d.lora_A_K.shape, generator=g))
                d.lora_B_K.add_(0.05 * torch.randn(d.lora_B_K.shape, generator=g))
            else:
                d.rank_mask.copy_((torch.arange(3) < i % 4).float())


@pytest.mark.parametrize("method", ["delta-lora", "increlora"])
@pytest.mark.parametrize("fmt", ["diffusers", "kohya", "lycoris"])
def test_written_as_their_exact_plain_lora_outside_our_format(method, fmt, tiny_pipe, tiny_pipe_dir, tmp_path):
    _plain_lora_state(tiny_pipe, method)
    expected = outputs(tiny_pipe)
    path = pd.save_adapter(tiny_pipe, tmp_path / f"{fmt}.safetensors", "mine", format=fmt)
    ranks = {k: t.shape[0] for k, t in load_file(path).items() if k.endswith(("lora_A.weight", "lora_down.weight"))}
    assert set(ranks.values()) == ({2, 4} if method == "delta-lora" else {1, 2, 3})
    again = StableDiffusionPipeline.from_pretrained(tiny_pipe_dir)
    pd.load_adapter(again, path)
    assert {h.deltas[n].config.method for _, h in hosts(again) for n in h.deltas} == {"lora"}
    assert_close(outputs(again), expected)
    # diffusers 0.42 applies one alpha per component to kohya SD1.x attention (see test_formats), so kohya
    # files with per-module ranks (and so alphas) are for kohya's own tools
    if fmt == "diffusers":
        theirs = StableDiffusionPipeline.from_pretrained(tiny_pipe_dir)
        theirs.load_lora_weights(path)
        assert_close(outputs(theirs), expected)


def test_increlora_config_checks():
    with pytest.raises(ValueError, match="max_r"):
        IncreLoRA(r=4, max_r=3, target_rank=3)
    with pytest.raises(ValueError, match="target_rank=9"):
        IncreLoRA(r=2, max_r=8, target_rank=9)
    with pytest.raises(ValueError, match="interval"):
        IncreLoRA(interval=0)
    with pytest.raises(ValueError, match="beta1"):
        IncreLoRA(beta1=1.0)


# ---------------------------------------------------------------- the DreamBooth trainer


@pytest.mark.parametrize("table", [
    {"method": "dora", "r": 2, "alpha": 2},
    {"method": "delta-lora", "r": 2, "update_ratio": 1.0, "start_step": 2},
    {"method": "increlora", "r": 1, "max_r": 3, "target_rank": 2, "interval": 2, "warmup": 1, "top_h": 4},
])
def test_dreambooth_trains_and_resumes_exactly(table, tiny_pipe_dir, instance_dir, class_cache, tmp_path,
                                               monkeypatch):
    """A [method] table through the trainer (after_step each step), stopped after its first checkpoint and
    resumed: the same file as an uninterrupted run, so snapshots, masks and smoothed scores resume too."""
    def run(name, **over):
        return db.train(make_config(tiny_pipe_dir, instance_dir, class_cache, tmp_path / name, steps=6,
                                    checkpoint_every=3, method=table, **over))

    whole = run("whole")
    stop_after_first_checkpoint(monkeypatch, lambda: run("split"))
    assert max_diff(whole, run("split", resume="latest")) == 0
    sd = load_file(whole)
    if table["method"] == "dora":
        assert any(k.endswith("lora_magnitude_vector") for k in sd)
    elif table["method"] == "delta-lora":  # W moved: steps 3..6 changed B A away from the snapshot of step 2
        assert max((sd[k] - sd[k.replace("lora_B_K", "lora_B.weight")]).abs().max() for k in sd if "B_K" in k) > 0
    else:  # budget 2 x modules from rank 1: grown at steps 2, 4, 6, four modules at a time
        masks = [t for k, t in sd.items() if k.endswith("rank_mask")]
        assert sum(int(m.sum()) for m in masks) == min(2 * len(masks), len(masks) + 12)
