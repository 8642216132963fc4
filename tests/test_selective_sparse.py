"""The masked / sparse selective methods (binary masking, FISH, Child-Tuning D/F, Diff pruning, LT-SFT) beyond
the contract: masks are what each paper says, sparse files are small and validated, the scoring pass and the
regulariser reach the trainer. Lifecycle (identity, trainable set, merge, round trip, remove) is in
test_contract.py; training through the trainer in test_dreambooth_methods.py.
"""
from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import tiny
import peft_diffusion as pd
from peft_diffusion.api import sites
from peft_diffusion.io import AdapterFileError
from peft_diffusion.methods import LTSFT, ChildTuningD, ChildTuningF, DiffPruning, FISHMask, Masking, masks
from peft_diffusion.target import Target

ATTN = Target(include=(r".*attn[12]\.to_[qkv]\.weight",), types=())
EMBEDDED = Path(pd.__file__).parent / "models" / "shapes-base"


def _deltas(model, name="a"):
    return {q: s.deltas[name] for q, s in sites(model) if name in s.deltas}


def _batches(n=3):
    return [tiny.unet_inputs(batch=1) | {"sample": torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(i))}
            for i in range(n)]


def _loss(model):
    return lambda b: tiny.main_output(model(**b)).float().pow(2).mean()


def _params(model, names):
    return {q: model.get_parameter(q) for q in names}


# ---------------------------------------------------------------- scoring passes


@pytest.mark.parametrize("config", [FISHMask(density=0.05, target=ATTN), ChildTuningD(density=0.05, target=ATTN)])
def test_fisher_mask_is_the_top_k_fisher_entries(unet, config):
    reference = copy.deepcopy(unet)
    batches = _batches()
    pd.inject(unet, config, "a")
    deltas = _deltas(unet)
    base = {q: t.detach().clone() for q, t in _params(reference, deltas).items()}
    out = tiny.run(unet, batches[0])
    lines = pd.api.prepare(unet, _loss(unet), batches)
    assert len(lines) == 1 and "kept" in lines[0]
    tensors = _params(reference, deltas)
    fisher = {q: torch.zeros_like(t) for q, t in tensors.items()}
    for b in batches:  # the squared gradient of each batch's loss, by hand on an adapter-free copy
        for t in tensors.values():
            t.requires_grad_(True)
        grads = torch.autograd.grad(_loss(reference)(b), list(tensors.values()))
        for q, g in zip(tensors, grads):
            fisher[q] += g.square()
    for q, d in deltas.items():
        k = masks.entries(fisher[q].numel(), 0.05)
        expected = torch.topk(fisher[q].reshape(-1), k).indices.sort().values
        assert torch.equal(d.indices.long(), expected), q
        assert d.indices.dtype == torch.int32 and d.scored and not d.values.any()
    # the pass leaves the model as it was: base tensors, their requires_grad, no .grad anywhere, same output
    for q, t in _params(unet, deltas).items():
        assert torch.equal(t, base[q]) and not t.requires_grad
    assert all(p.grad is None for p in unet.parameters())
    assert torch.equal(tiny.run(unet, batches[0]), out)


def test_lt_sft_picks_the_most_changed_entries_and_rewinds(unet):
    reference = copy.deepcopy(unet)
    batches = _batches()
    pd.inject(unet, LTSFT(density=0.02, dense_lr=1e-3, target=ATTN, scoring_batches=3), "a")
    deltas = _deltas(unet)
    before = {q: t.detach().clone() for q, t in _params(unet, deltas).items()}
    pd.api.prepare(unet, _loss(unet), batches)
    reference.requires_grad_(False)
    tensors = _params(reference, deltas)
    for t in tensors.values():
        t.requires_grad_(True)
    opt = torch.optim.AdamW(list(tensors.values()), lr=1e-3, weight_decay=0.0)
    for b in batches:  # the dense fine-tune of the same tensors, by hand
        _loss(reference)(b).backward()
        opt.step()
        opt.zero_grad()
    for q, d in deltas.items():
        change = (tensors[q].detach() - before[q]).abs().reshape(-1)
        chosen = d.indices.long()
        k = chosen.numel()
        # the chosen entries are the k largest changes (up to float ties at the k-th value)
        assert change[chosen].min() >= torch.topk(change, k).values[-1] - 1e-12, q
        assert torch.equal(unet.get_parameter(q), before[q]), "the dense fine-tune was not rewound"
    assert not any(p.requires_grad for n, p in unet.named_parameters() if ".deltas." not in n)


def test_prepare_without_scoring_methods_does_nothing(unet):
    pd.inject(unet, DiffPruning(target=ATTN), "a")
    assert pd.api.scoring_batches(unet) == 0
    assert pd.api.prepare(unet, _loss(unet), []) == []


# ---------------------------------------------------------------- Child-Tuning_F's gradient mask


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_child_tuning_f_masks_the_gradient(unet, optimizer):
    full = copy.deepcopy(unet)
    pd.inject(unet, ChildTuningF(density=0.3, target=ATTN), "a")
    pd.inject(full, ChildTuningF(density=1.0, target=ATTN), "a")  # p = 1: the unmasked gradient
    inputs = _batches(1)[0]
    unet.train(), full.train()
    torch.manual_seed(0)
    _loss(unet)(inputs).backward()
    _loss(full)(inputs).backward()
    kept = total = 0
    for q, d in _deltas(unet).items():
        g, ref = d.delta.grad, _deltas(full)[q].delta.grad
        on = g != 0
        # each entry: zero (masked) or the full gradient / p (kept, rescaled)
        torch.testing.assert_close(g[on], ref[on] / 0.3, rtol=1e-5, atol=1e-9)
        kept, total = kept + int((on & (ref != 0)).sum()), total + int((ref != 0).sum())
    assert 0.27 < kept / total < 0.33, kept / total
    params = [d.delta for d in _deltas(unet).values()]
    masked = {id(p): p.grad == 0 for p in params}
    opt = torch.optim.SGD(params, lr=0.1) if optimizer == "sgd" else torch.optim.AdamW(params, lr=0.1)
    opt.step()
    for p in params:  # no update outside this step's mask, an update inside it
        assert not p.detach()[masked[id(p)]].any()
        assert p.detach()[~masked[id(p)]].ne(0).all()


@pytest.mark.parametrize("p", [0.5, 0.3, 0.02])
def test_child_tuning_f_mask_has_mean_p_and_an_unbiased_gradient(p):
    w, k = masks.keep_threshold(p)
    q = k / 2**w  # the exact keep probability: p itself for dyadic p, else p to 32 bits
    assert abs(q - p) <= 2**-33 and w == (8 if p == 0.5 else 32)
    torch.manual_seed(0)
    n = 2**20 + 3  # not a whole number of 64-bit words
    keep, q_used = masks.bernoulli_keep(torch.empty(n), p)
    assert q_used == q and keep.dtype == torch.float32 and set(keep.unique().tolist()) == {0.0, 1.0}
    assert abs(float(keep.mean()) - q) < 5 * (q * (1 - q) / n) ** 0.5
    lanes = 64 // w  # entries sharing one 64-bit word: every lane (byte / half-word position) is Bernoulli(q)
    per_lane = keep[: n - n % lanes].view(-1, lanes).mean(0)
    assert (per_lane - q).abs().max() < 5 * (q * (1 - q) * lanes / n) ** 0.5, per_lane

    # through the delta's gradient: each draw gives 0 or g / q per entry, and the mean over draws is g
    delta = ChildTuningF(density=p).build(torch.zeros(4096), "w")
    g = torch.randn(4096, generator=torch.Generator().manual_seed(1))
    draws, total = 400, torch.zeros(4096)
    for _ in range(draws):
        delta.delta.grad = None
        (delta.value() * g).sum().backward()
        got = delta.delta.grad
        on = got != 0
        torch.testing.assert_close(got[on], g[on] / q, rtol=1e-6, atol=0)
        total += got
    z = (total / draws - g) / (g.abs() * ((1 - q) / q / draws) ** 0.5)  # ~ N(0, 1) per entry if unbiased
    assert abs(float(z.mean())) < 5 / 4096**0.5 and float(z.abs().max()) < 7, (float(z.mean()), float(z.abs().max()))


# ---------------------------------------------------------------- Diff pruning


def test_diff_pruning_reaches_the_target_density_and_regularises(unet):
    pd.inject(unet, DiffPruning(density=0.01, l0_weight=1e-3, target=ATTN), "a")
    deltas = _deltas(unet)
    unet.train()
    reg = pd.api.regularizer(unet)
    expected = sum(torch.sigmoid(d.log_alpha - torch.log(torch.tensor(1.0))).sum() for d in deltas.values())
    torch.testing.assert_close(reg, 1e-3 * expected)  # -l/r = 1: the penalty is sum sigmoid(log_alpha)
    reg.backward()
    assert all(d.log_alpha.grad is not None and d.log_alpha.grad.gt(0).all() for d in deltas.values())
    tiny.perturb_trainable(unet, std=0.05)
    unet.eval()
    dense = {q: (d.gates(False) * d.diff).detach().clone() for q, d in deltas.items()}
    pd.api.after_step(unet, 9, 10)
    assert not any(d.pruned for d in deltas.values())
    pd.api.after_step(unet, 10, 10)  # the last step prunes
    assert pd.api.regularizer(unet) is None
    for q, d in deltas.items():
        assert d.pruned and not hasattr(d, "diff")
        k = masks.entries(dense[q].numel(), 0.01)
        assert d.values.numel() == k and int((d.values != 0).sum()) == k
        kept = dense[q].reshape(-1)[d.indices.long()]
        torch.testing.assert_close(d.values, kept)
        assert kept.abs().min() >= torch.topk(dense[q].abs().reshape(-1), k).values[-1]
    # the model now computes with theta_0 + the sparse difference only
    sparse_out = tiny.run(unet, _batches(1)[0])
    fused = copy.deepcopy(unet)
    pd.fuse(fused)
    torch.testing.assert_close(tiny.run(fused, _batches(1)[0]), sparse_out, atol=1e-5, rtol=1e-5)


def test_pruned_diff_file_round_trip(unet, make_model, tmp_path):
    pd.inject(unet, DiffPruning(density=0.02, target=ATTN), "a")
    tiny.perturb_trainable(unet)
    pd.api.after_step(unet, 1, 1)
    out = tiny.run(unet, _batches(1)[0])
    path = pd.save_adapter(unet, tmp_path / "d.safetensors", "a")
    with safe_open(path, "pt") as f:
        assert all(k.endswith((".indices", ".values")) for k in f.keys())
    fresh = make_model("unet")
    pd.load_adapter(fresh, path)
    assert all(d.pruned for d in _deltas(fresh).values())
    torch.testing.assert_close(tiny.run(fresh, _batches(1)[0]), out, atol=1e-6, rtol=1e-6)


# ---------------------------------------------------------------- binary masking


def test_masking_straight_through_gradient_and_zeroed_entries(unet):
    pd.inject(unet, Masking(target=ATTN), "a")
    (q, d), *_ = _deltas(unet).items()
    w = unet.get_parameter(q)
    unet.train()
    out = tiny.main_output(unet(**_batches(1)[0]))
    out.float().pow(2).mean().backward()
    # STE: dL/dscores = dL/dW' ⊙ W; dL/dW' is what a full fine-tune's gradient would be
    ref = copy.deepcopy(unet)
    pd.remove(ref)
    ref.get_parameter(q).requires_grad_(True)
    tiny.main_output(ref(**_batches(1)[0])).float().pow(2).mean().backward()
    torch.testing.assert_close(d.mask_scores.grad, ref.get_parameter(q).grad * w, rtol=1e-5, atol=1e-10)
    with torch.no_grad():
        d.mask_scores[0, :3] = 0.0  # three entries below the threshold
    unet.eval()
    x = torch.randn(2, w.shape[1])
    owner = unet.get_submodule(q.rpartition(".")[0])
    expected = x @ (w * (d.mask_scores >= 5e-3)).T
    torch.testing.assert_close(owner(x), expected)
    before = w.detach().clone()
    pd.fuse(unet)
    assert not w[0, :3].any() and torch.equal(w[1:], before[1:])
    pd.unfuse(unet)
    assert torch.equal(w, before)  # the zeroed entries come back exactly


# ---------------------------------------------------------------- files and bad input


def test_sparse_file_is_small_on_the_embedded_base(tmp_path):
    from diffusers import UNet2DConditionModel

    sizes = {}
    for method, config in {"fish": FISHMask(density=0.005), "dense": ChildTuningF(),
                           "diff": DiffPruning(density=0.005)}.items():
        unet = UNet2DConditionModel.from_pretrained(str(EMBEDDED), subfolder="unet")
        pd.inject(unet, config, "a")
        tiny.perturb_trainable(unet)
        if method == "diff":
            pd.api.after_step(unet, 1, 1)
        path = pd.save_adapter(unet, tmp_path / f"{method}.safetensors", "a")
        sizes[method] = path.stat().st_size
        if method == "fish":
            with safe_open(path, "pt") as f:
                assert {f.get_tensor(k).dtype for k in f.keys() if k.endswith(".indices")} == {torch.int32}
    logging.getLogger(__name__).info("file sizes: %s", sizes)
    assert sizes["fish"] <= 0.02 * sizes["dense"], sizes
    assert sizes["diff"] <= 0.02 * sizes["dense"], sizes


@pytest.mark.parametrize("density", [0, -0.1, 1.5, True, "0.1", float("nan")])
def test_density_out_of_range(density):
    for cls in (FISHMask, ChildTuningD, ChildTuningF, DiffPruning, LTSFT):
        with pytest.raises(ValueError, match="density"):
            cls(density=density)
    with pytest.raises(ValueError, match="density_pattern"):
        FISHMask(density_pattern={"to_q.weight": density})


def test_pattern_matching_nothing_leaves_the_model_untouched(unet):
    state, types = tiny.snapshot(unet), tiny.module_types(unet)
    with pytest.raises(ValueError, match="matches no parameter"):
        pd.inject(unet, FISHMask(target=Target(include=("no_such_layer.weight",), types=())), "a")
    assert tiny.module_types(unet) == types and list(unet.state_dict()) == list(state)


def _damaged(path, tmp_path, change):
    from safetensors.torch import load_file, save_file

    with safe_open(path, "pt") as f:
        meta = f.metadata()
    tensors = load_file(path)
    key = next(k for k in tensors if k.endswith(".indices"))
    change(tensors, key)
    out = tmp_path / "damaged.safetensors"
    save_file(tensors, out, meta)
    return out, key.rsplit(".", 1)[0]


@pytest.mark.parametrize("damage, message", [
    (lambda t, k: t[k].__setitem__(0, 10**8), "outside the parameter"),
    (lambda t, k: t[k].__setitem__(0, -1), "outside the parameter"),
    (lambda t, k: t[k].__setitem__(1, t[k][0]), "repeat"),
    (lambda t, k: t[k[: -len("indices")] + "values"].__setitem__(0, float("nan")), "not finite|NaN or inf"),
    (lambda t, k: t[k[: -len("indices")] + "values"].__setitem__(0, float("inf")), "not finite|NaN or inf"),
])
def test_damaged_sparse_file_is_refused_naming_the_parameter(unet, make_model, tmp_path, damage, message):
    pd.inject(unet, FISHMask(density=0.05, target=ATTN), "a")
    tiny.perturb_trainable(unet)
    path = pd.save_adapter(unet, tmp_path / "f.safetensors", "a")
    bad, param = _damaged(path, tmp_path, damage)
    fresh = make_model("unet")
    state, types = tiny.snapshot(fresh), tiny.module_types(fresh)
    with pytest.raises(AdapterFileError, match=message) as err:
        pd.load_adapter(fresh, bad)
    assert param.split(".", 1)[1] in str(err.value)  # the parameter's name (without the component)
    assert tiny.module_types(fresh) == types and pd.api.adapter_names(fresh) == []
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in state.items())


# ---------------------------------------------------------------- the trainer


def test_trainer_runs_the_scoring_pass_and_logs_it(tiny_pipe_dir, instance_dir, class_cache, tmp_path, caplog):
    from safetensors.torch import load_file
    from test_dreambooth import make_config

    from peft_diffusion.training import dreambooth as db

    cfg = make_config(tiny_pipe_dir, instance_dir, class_cache, tmp_path / "run", steps=2,
                      method={"method": "fish", "density": 0.02, "scoring_batches": 2})
    with caplog.at_level(logging.INFO):
        path = db.train(cfg)
    assert any("scoring pass (2 batches" in r.getMessage() and "FISH mask" in r.getMessage() for r in caplog.records)
    header = json.loads(safe_open(path, "pt").metadata()["peft_diffusion"])
    assert header["components"]["unet"]["config"]["method"] == "fish"
    # the exported masks are the Fisher choice, not the random subsets a delta starts with
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(tiny_pipe_dir, subfolder="unet")
    pd.inject(unet, FISHMask(density=0.02), "fresh")
    random_masks = {q: d.indices for q, d in _deltas(unet, "fresh").items()}
    saved = {k[len("unet."):-len(".indices")]: v for k, v in load_file(path).items() if k.endswith(".indices")}
    assert saved.keys() == random_masks.keys()
    assert any(not torch.equal(saved[q], random_masks[q]) for q in saved)


def test_fused_hard_concrete_matches_the_composed_ops():
    """Diff pruning's one-node gate (masks.gated_diff) = the paper's formula composed of plain ops, values and
    gradients, with the same uniform draws."""
    w = torch.randn(500, dtype=torch.float64, requires_grad=True)
    log_alpha = (torch.randn(500, dtype=torch.float64) * 3).requires_grad_(True)
    g = torch.randn(500, dtype=torch.float64)
    torch.manual_seed(3)
    fused = masks.gated_diff(w, log_alpha, 0.7, -1.5, 1.5, sample=True)
    fused.backward(g)
    grads = w.grad.clone(), log_alpha.grad.clone()
    w.grad = log_alpha.grad = None
    torch.manual_seed(3)
    u = torch.rand(500, dtype=torch.float64).clamp(1e-6, 1 - 1e-6)
    z = (torch.sigmoid((torch.log(u) - torch.log1p(-u) + log_alpha) / 0.7) * 3.0 - 1.5).clamp(0, 1)
    (z * w).backward(g)
    torch.testing.assert_close(fused, z * w)
    torch.testing.assert_close(grads, (w.grad, log_alpha.grad))
    assert 0 < int((z == 0).sum()) and 0 < int((z == 1).sum())  # both clamps are exercised


def test_fused_gate_adds_the_parameter_with_the_adapter_weight():
    """The form Diff pruning's parameter site runs while training: base + weight * z ⊙ w in the gate's own node
    (one addcmul) = the composed formula, values and gradients (also into a base that requires grad)."""
    base = torch.randn(500, dtype=torch.float64, requires_grad=True)
    w = torch.randn(500, dtype=torch.float64, requires_grad=True)
    log_alpha = (torch.randn(500, dtype=torch.float64) * 3).requires_grad_(True)
    g = torch.randn(500, dtype=torch.float64)
    torch.manual_seed(4)
    fused = masks.gated_diff(w, log_alpha, 1.0, -1.5, 1.5, True, base, 0.5)
    fused.backward(g)
    grads = base.grad.clone(), w.grad.clone(), log_alpha.grad.clone()
    base.grad = w.grad = log_alpha.grad = None
    torch.manual_seed(4)
    u = torch.rand(500, dtype=torch.float64).clamp(1e-6, 1 - 1e-6)
    z = (torch.sigmoid(torch.log(u) - torch.log1p(-u) + log_alpha) * 3.0 - 1.5).clamp(0, 1)
    composed = base + 0.5 * (z * w)
    composed.backward(g)
    torch.testing.assert_close(fused, composed)
    torch.testing.assert_close(grads, (base.grad, w.grad, log_alpha.grad))
    assert 0 < int((z == 0).sum()) and 0 < int((z == 1).sum()) and 0 < int(((z > 0) & (z < 1)).sum())
