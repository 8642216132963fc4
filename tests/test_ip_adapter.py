"""IP-Adapter (methods/ip_adapter.py, io/ip_adapter.py) against diffusers' own IP-Adapter on a tiny SD pipeline.

Peers both ways: our file loaded by diffusers' ``load_ip_adapter``, and a file in diffusers' layout (written
here from diffusers' own numbering of the U-Net's processors) loaded by ours, give the same U-Net outputs
and the same pipeline images (classifier-free guidance included: the unconditional half gets the zero-image
embedding). Per-block scales against ``pipe.set_ip_adapter_scale``; LoRA + IP-Adapter against diffusers'
LoRA + IP-Adapter; the SD1.5 count; bad input.
"""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import peft_diffusion as pd
import tiny
from peft_diffusion.api import hosts
from peft_diffusion.methods.ip_adapter import IPAttentionDelta

WIDTH = 16  # the tiny image encoder's projection_dim


def tiny_image_encoder(projection_dim: int = WIDTH):
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(3)
    config = CLIPVisionConfig(hidden_size=24, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                              image_size=32, patch_size=8, projection_dim=projection_dim)
    return CLIPVisionModelWithProjection(config).eval()


@pytest.fixture(scope="module")
def pipe_parts(tmp_path_factory):
    from transformers import CLIPImageProcessor

    pipe = tiny.tiny_sd_pipeline(tmp_path_factory.mktemp("tiny-sd"))
    pipe.set_progress_bar_config(disable=True)
    pipe.register_modules(image_encoder=tiny_image_encoder(),
                          feature_extractor=CLIPImageProcessor(size=32, crop_size=32))
    return pipe


@pytest.fixture
def pipe(pipe_parts):
    return copy.deepcopy(pipe_parts)


def image(seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8))


def perturb(obj, name: str, std: float = 0.1) -> None:
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for _, site in hosts(obj):
            if name in site.deltas:
                for p in site.deltas[name].parameters():
                    p.add_(torch.randn(p.shape, generator=g) * std)


def unet_out(unet, x, **kwargs):
    with torch.no_grad():
        return unet(**x, **kwargs).sample


def diffusers_state(unet, plus: bool = False, seed: int = 0) -> dict:
    """A random IP-Adapter state dict in the published layout, numbered as diffusers' loader numbers it."""
    g = torch.Generator().manual_seed(seed)
    c = unet.config.cross_attention_dim
    if plus:
        hidden, inner = 40, 128  # 2 heads of 64
        proj = {"latents": torch.randn(1, 6, hidden, generator=g), "proj_in.weight": torch.randn(hidden, 24, generator=g),
                "proj_in.bias": torch.randn(hidden, generator=g), "proj_out.weight": torch.randn(c, hidden, generator=g),
                "proj_out.bias": torch.randn(c, generator=g), "norm_out.weight": torch.randn(c, generator=g),
                "norm_out.bias": torch.randn(c, generator=g)}
        for i in range(4):
            for k, shape in {"0.norm1.weight": (hidden,), "0.norm1.bias": (hidden,), "0.norm2.weight": (hidden,),
                             "0.norm2.bias": (hidden,), "0.to_q.weight": (inner, hidden),
                             "0.to_kv.weight": (2 * inner, hidden), "0.to_out.weight": (hidden, inner),
                             "1.0.weight": (hidden,), "1.0.bias": (hidden,), "1.1.weight": (4 * hidden, hidden),
                             "1.3.weight": (hidden, 4 * hidden)}.items():
                proj[f"layers.{i}.{k}"] = torch.randn(*shape, generator=g) * 0.2
    else:
        proj = {"proj.weight": torch.randn(4 * c, WIDTH, generator=g) * 0.2, "proj.bias": torch.randn(4 * c, generator=g),
                "norm.weight": 1 + 0.1 * torch.randn(c, generator=g), "norm.bias": torch.randn(c, generator=g) * 0.1}
    ip, key = {}, 1
    for name, proc in unet.attn_processors.items():
        if not name.endswith("attn1.processor"):
            out = unet.get_submodule(name[: -len(".processor")]).to_k.out_features
            ip[f"{key}.to_k_ip.weight"] = torch.randn(out, c, generator=g) * 0.2
            ip[f"{key}.to_v_ip.weight"] = torch.randn(out, c, generator=g) * 0.2
            key += 2
    return {"image_proj": proj, "ip_adapter": ip}


def write_state(state: dict, path) -> None:
    save_file({f"{group}.{k}": v.contiguous() for group, d in state.items() for k, v in d.items()}, str(path))


def load_diffusers(pipe, path):
    pipe.load_ip_adapter(str(path.parent), subfolder="", weight_name=path.name, low_cpu_mem_usage=False)


# ---------------------------------------------------------------- identity, training


def test_identity_without_image_prompt_and_image_changes_output():
    unet = tiny.tiny_unet()
    x = tiny.unet_inputs(batch=2)
    base = unet_out(unet, x)
    pd.inject(unet, pd.IPAdapter(image_embed_dim=WIDTH), "ip")  # init="copy": the paper's
    assert torch.equal(unet_out(unet, x), base)
    with pd.inputs(unet, image_embeds=torch.randn(2, WIDTH)):
        assert not torch.allclose(unet_out(unet, x), base, atol=1e-3)
    assert torch.equal(unet_out(unet, x), base)  # the call after the block sees no image again
    pd.remove(unet)
    assert torch.equal(unet_out(unet, x), base)


def test_reused_image_tokens_follow_weights_and_embeddings(pipe):
    """Without gradients the image tokens and each layer's K', V' are computed once for repeated calls with the
    same image features (a pipeline's denoising steps); a weight update, a changed or new embedding, or
    recording gradients recomputes them: every call equals a fresh adapter's output."""
    x = tiny.unet_inputs(batch=2)
    pd.inject(pipe, pd.IPAdapter(), "ip")
    perturb(pipe, "ip")
    e = torch.randn(2, WIDTH)

    def fresh(embeds):  # the same adapter weights in a new copy: nothing cached
        unet = copy.deepcopy(pipe.unet)
        for d in unet.modules():
            if isinstance(d, IPAttentionDelta):
                d._run.kv_key = d._run.kv = None
        config = next(s.deltas["ip"].config for _, s in hosts(unet) if "ip" in s.deltas)
        config._call.feats = config._call.cached = None
        with pd.inputs(unet, image_embeds=embeds):
            return unet_out(unet, x)

    with pd.inputs(pipe, image_embeds=e):
        first = unet_out(pipe.unet, x)
        assert torch.equal(unet_out(pipe.unet, x), first)  # reused
    torch.testing.assert_close(first, fresh(e), atol=1e-6, rtol=0)
    perturb(pipe, "ip")  # an in-place update of every adapter weight (as an optimizer step)
    with pd.inputs(pipe, image_embeds=e):
        after = unet_out(pipe.unet, x)
    assert not torch.allclose(after, first, atol=1e-4)
    torch.testing.assert_close(after, fresh(e), atol=1e-6, rtol=0)
    with pd.inputs(pipe, image_embeds=e):
        e.mul_(-1)  # the same tensor changed in place
        torch.testing.assert_close(unet_out(pipe.unet, x), fresh(e), atol=1e-6, rtol=0)
    with pd.inputs(pipe, image_embeds=e.clone()), torch.enable_grad():  # training: no reuse, a graph
        out = pipe.unet(**x).sample
    assert out.requires_grad
    torch.testing.assert_close(out.detach(), fresh(e), atol=1e-6, rtol=0)


def test_trainable_set_and_gradient_checkpointing(pipe):
    pd.inject(pipe, pd.IPAdapter(), "ip")  # the width is read from pipe.image_encoder
    unet = pipe.unet
    trainable = {n for n, p in unet.named_parameters() if p.requires_grad}
    assert trainable and all("peft_annex.deltas.ip." in n for n in trainable)
    kinds = {n.rsplit(".deltas.ip.", 1)[1].split(".")[0] for n in trainable}
    assert kinds == {"image_proj", "to_k_ip", "to_v_ip"}
    attn2 = [n for n, m in unet.named_modules() if n.endswith("attn2")]
    assert sum(isinstance(s.deltas["ip"], IPAttentionDelta) for _, s in hosts(unet)) == len(attn2) == 4
    assert not any(p.requires_grad for c in ("text_encoder", "vae", "image_encoder")
                   for p in getattr(pipe, c).parameters())
    # to_k_ip / to_v_ip start as to_k / to_v (the paper)
    site = unet.get_submodule(attn2[0])
    assert torch.equal(site.peft_annex.deltas["ip"].to_k_ip.weight, site.to_k.weight)
    unet.enable_gradient_checkpointing()
    unet.train()
    x = tiny.unet_inputs(batch=2)
    with pd.inputs(pipe, image_embeds=torch.randn(2, WIDTH)):
        unet(**x).sample.pow(2).mean().backward()
    grads = {n for n, p in unet.named_parameters() if p.grad is not None}
    assert grads == trainable


def test_sd15_count():
    from diffusers import UNet2DConditionModel
    from test_sd15_counts import SD15_UNET

    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD15_UNET)
    pd.inject(unet, pd.IPAdapter(image_embed_dim=1024, num_tokens=4), "ip")
    assert pd.parameter_report(unet).adapters["ip"]["trainable"] == 22_319_616  # issue 12's figure


# ---------------------------------------------------------------- peers


@pytest.mark.parametrize("plus", [False, True], ids=["plain", "plus"])
def test_our_file_loads_in_diffusers(pipe, tmp_path, plus):
    theirs = copy.deepcopy(pipe)
    cfg = pd.IPAdapter(plus=True, num_tokens=6, heads=2, hidden_dim=40) if plus else pd.IPAdapter()
    pd.inject(pipe, cfg, "ip")
    perturb(pipe, "ip")
    path = pd.save_adapter(pipe, tmp_path, "ip", format="diffusers")
    assert path.name == "ip-adapter.safetensors" and all(k.startswith(("image_proj.", "ip_adapter.")) for k in load_file(path))
    load_diffusers(theirs, path)
    x = tiny.unet_inputs(batch=2)
    feats = torch.randn(2, 1, 5, 24) if plus else torch.randn(2, 1, WIDTH)
    with pd.inputs(pipe, **({"image_hidden_states": feats} if plus else {"image_embeds": feats})):
        ours = unet_out(pipe.unet, x)
    ref = unet_out(theirs.unet, x, added_cond_kwargs={"image_embeds": [feats]})
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)
    # the whole pipeline with an image prompt and classifier-free guidance (guidance 5: batch [negative; positive])
    kw = dict(tiny.pipe_call_kwargs(steps=2), guidance_scale=5.0)
    with pd.image_prompt(pipe, image()):
        ours = pipe(**kw).images
    ref = theirs(**dict(kw, generator=torch.Generator().manual_seed(tiny.SEED)), ip_adapter_image=image()).images
    np.testing.assert_allclose(ours, ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("plus", [False, True], ids=["plain", "plus"])
def test_diffusers_file_loads_in_ours(pipe, tmp_path, plus):
    theirs = copy.deepcopy(pipe)
    state = diffusers_state(pipe.unet, plus=plus)
    write_state(state, tmp_path / "ip.safetensors")
    load_diffusers(theirs, tmp_path / "ip.safetensors")
    assert pd.load_adapter(pipe, tmp_path / "ip.safetensors", name="ip") == "ip"
    cfg = next(s.deltas["ip"].config for _, s in hosts(pipe) if "ip" in s.deltas)
    assert (cfg.plus, cfg.num_tokens) == ((True, 6) if plus else (False, 4))
    x = tiny.unet_inputs(batch=2)
    feats = torch.randn(2, 1, 5, 24) if plus else torch.randn(2, 1, WIDTH)
    with pd.inputs(pipe, **({"image_hidden_states": feats} if plus else {"image_embeds": feats})):
        ours = unet_out(pipe.unet, x)
    ref = unet_out(theirs.unet, x, added_cond_kwargs={"image_embeds": [feats]})
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)
    # diffusers' own pipeline argument reaches ours too (added_cond_kwargs)
    kw = dict(tiny.pipe_call_kwargs(steps=2), guidance_scale=5.0)
    embeds = [torch.cat([torch.zeros_like(feats[:1]), feats[:1]])] if not plus else None
    if embeds is not None:
        ours = pipe(**kw, ip_adapter_image_embeds=embeds).images
        ref = theirs(**dict(kw, generator=torch.Generator().manual_seed(tiny.SEED)), ip_adapter_image_embeds=embeds).images
        np.testing.assert_allclose(ours, ref, atol=1e-5, rtol=0)
    # and the file written back is the file read
    again = load_file(pd.save_adapter(pipe, tmp_path / "back.safetensors", "ip", format="ip-adapter"))
    flat = {f"{g}.{k}": v for g, d in state.items() for k, v in d.items()}
    assert again.keys() == flat.keys() and all(torch.equal(again[k], flat[k]) for k in flat)


def test_cfg_batch_gets_the_negative():
    unet = tiny.tiny_unet()
    pd.inject(unet, pd.IPAdapter(image_embed_dim=WIDTH), "ip")
    perturb(unet, "ip")
    x = tiny.unet_inputs(batch=4)
    pos, neg = torch.randn(2, WIDTH), torch.randn(2, WIDTH)
    with pd.inputs(unet, image_embeds=pos, negative_image_embeds=neg):
        cfg = unet_out(unet, x)
    with pd.inputs(unet, image_embeds=torch.cat([neg, pos])):
        torch.testing.assert_close(cfg, unet_out(unet, x), atol=1e-6, rtol=0)
    with pd.inputs(unet, image_embeds=pos):  # no negative: the copies get the positive
        tiled = unet_out(unet, x)
    with pd.inputs(unet, image_embeds=torch.cat([pos, pos])):
        torch.testing.assert_close(tiled, unet_out(unet, x), atol=1e-6, rtol=0)
    assert not torch.allclose(tiled[:2], cfg[:2], atol=1e-4)
    with pytest.raises(ValueError, match="batch 3"):
        with pd.inputs(unet, image_embeds=torch.randn(3, WIDTH)):
            unet_out(unet, x)


def test_per_block_scales_match_diffusers(pipe, tmp_path):
    theirs = copy.deepcopy(pipe)
    write_state(diffusers_state(pipe.unet), tmp_path / "ip.safetensors")
    load_diffusers(theirs, tmp_path / "ip.safetensors")
    pd.load_adapter(pipe, tmp_path / "ip.safetensors", name="ip")
    x = tiny.unet_inputs(batch=2)
    feats = torch.randn(2, 1, WIDTH)
    for scale in ({"up": {"block_1": [0.0, 1.0]}}, {"down": 0.5, "up": {"block_1": [2.0, 0.0]}}, 0.3):
        pd.set_ip_adapter_scale(pipe, scale)
        theirs.set_ip_adapter_scale(scale)
        with pd.inputs(pipe, image_embeds=feats):
            ours = unet_out(pipe.unet, x)
        ref = unet_out(theirs.unet, x, added_cond_kwargs={"image_embeds": [feats]})
        torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)
    weights = {q: s.active["ip"] for q, s in hosts(pipe) if "ip" in s.deltas and s.deltas["ip"].site}
    assert sorted(weights.values()) == [0.3] * 4


def test_composes_with_lora_and_removes_exactly(pipe, tmp_path):
    theirs = copy.deepcopy(pipe)
    x = tiny.unet_inputs(batch=2)
    base = unet_out(pipe.unet, x)
    pd.inject(pipe, pd.LoRA(r=4, target=pd.Target(include=("to_q", "to_k", "to_v", "to_out.0"))), "lora")
    tiny.randomize(pipe, "lora", std=0.2)
    pd.inject(pipe, pd.IPAdapter(), "ip")
    perturb(pipe, "ip")
    feats = torch.randn(2, 1, WIDTH)
    with pd.inputs(pipe, image_embeds=feats):
        both = unet_out(pipe.unet, x)
    lora_only = unet_out(pipe.unet, x)
    # diffusers: the same LoRA (our native file is a peft-layout LoRA file) + the same IP-Adapter
    load = pd.save_adapter(pipe, tmp_path / "lora.safetensors", "lora")
    theirs.load_lora_weights(str(load), adapter_name="lora")
    load_diffusers(theirs, pd.save_adapter(pipe, tmp_path / "ip", "ip", format="ip-adapter"))
    ref = unet_out(theirs.unet, x, added_cond_kwargs={"image_embeds": [feats]})
    torch.testing.assert_close(both, ref, atol=1e-5, rtol=0)
    assert not torch.allclose(both, lora_only, atol=1e-4)
    pd.remove(pipe, "ip")
    assert torch.equal(unet_out(pipe.unet, x), lora_only)
    pd.remove(pipe, "lora")
    assert torch.equal(unet_out(pipe.unet, x), base)


def test_set_attention_processor_keeps_working(pipe):
    from diffusers.models.attention_processor import AttnProcessor

    x = tiny.unet_inputs(batch=2)
    pd.inject(pipe, pd.IPAdapter(), "ip")
    perturb(pipe, "ip")
    feats = torch.randn(2, WIDTH)
    with pd.inputs(pipe, image_embeds=feats):
        sdpa = unet_out(pipe.unet, x)
        pipe.unet.set_attn_processor(AttnProcessor())  # diffusers' classic processor: ours is not a processor
        torch.testing.assert_close(unet_out(pipe.unet, x), sdpa, atol=1e-5, rtol=0)


def test_query_and_output_projection_shared_with_the_text_branch(pipe):
    """One to_q and one to_out call per cross-attention with an image prompt (as diffusers' processor), no
    hook left behind after the call, nor after a call that failed half-way."""
    x = tiny.unet_inputs(batch=2)
    pd.inject(pipe, pd.IPAdapter(), "ip")
    perturb(pipe, "ip")
    attns = [m for m in pipe.unet.modules() if getattr(m, "is_cross_attention", False) and hasattr(m, "to_q")]
    calls = {"q": 0, "out": 0}
    counters = [h for a in attns for h in (
        a.to_q.register_forward_hook(lambda *_: calls.__setitem__("q", calls["q"] + 1)),
        a.to_out[0].register_forward_hook(lambda *_: calls.__setitem__("out", calls["out"] + 1)))]
    with pd.inputs(pipe, image_embeds=torch.randn(2, WIDTH)):
        with_image = unet_out(pipe.unet, x)
    for h in counters:
        h.remove()
    assert calls == {"q": len(attns), "out": len(attns)}
    assert all(not a.to_q._forward_hooks and not a.to_out[0]._forward_pre_hooks for a in attns)

    def boom(*_):
        raise RuntimeError("boom")
    handle = attns[-1].to_out[0].register_forward_hook(boom)
    with pd.inputs(pipe, image_embeds=torch.randn(2, WIDTH)), pytest.raises(RuntimeError, match="boom"):
        unet_out(pipe.unet, x)
    handle.remove()
    assert attns[-1].to_q._forward_hooks  # the failed call's hooks are still there: the next call drops them
    unet_out(pipe.unet, x)
    assert all(not a.to_q._forward_hooks and not a.to_out[0]._forward_pre_hooks for a in attns)
    with pd.inputs(pipe, image_embeds=torch.randn(2, WIDTH)), pytest.raises(RuntimeError, match="boom"):
        handle = attns[-1].to_out[0].register_forward_hook(boom)
        unet_out(pipe.unet, x)
    handle.remove()
    pd.remove(pipe, "ip")  # and so does remove
    assert all(not a.to_q._forward_hooks and not a.to_out[0]._forward_pre_hooks for a in attns)


# ---------------------------------------------------------------- bad input


def test_projection_width_mismatch_names_both_sides(pipe, tmp_path):
    unet = tiny.tiny_unet()
    pd.inject(unet, pd.IPAdapter(image_embed_dim=8), "ip")  # made for an 8-wide encoder
    path = pd.save_adapter(unet, tmp_path, "ip", format="ip-adapter")
    keys = list(pipe.unet.state_dict())
    with pytest.raises(ValueError, match=r"takes 8-wide .* gives 16-wide"):
        pd.load_adapter(pipe, path)
    assert list(pipe.unet.state_dict()) == keys and not list(hosts(pipe))
    pipe.image_encoder = tiny_image_encoder(projection_dim=8)  # the right encoder: it loads
    pd.load_adapter(pipe, path, name="ip")
    with pytest.raises(ValueError, match="8-wide"):
        with pd.inputs(pipe, image_embeds=torch.randn(1, 16)):
            unet_out(pipe.unet, tiny.unet_inputs())


def test_missing_image_encoder(pipe):
    pipe.image_encoder = None
    keys = list(pipe.unet.state_dict())
    with pytest.raises(ValueError, match="no image_encoder in StableDiffusionPipeline.*image_embed_dim"):
        pd.inject(pipe, pd.IPAdapter(), "ip")
    assert list(pipe.unet.state_dict()) == keys and not list(hosts(pipe))
    pd.inject(pipe, pd.IPAdapter(image_embed_dim=WIDTH), "ip")
    with pytest.raises(ValueError, match="no image encoder: StableDiffusionPipeline.image_encoder is None"):
        with pd.image_prompt(pipe, image()):
            pass


def test_files_diffusers_cannot_read_are_refused(tmp_path):
    unet = tiny.tiny_unet()
    pd.inject(unet, pd.IPAdapter(image_embed_dim=WIDTH, target=pd.Target(include=("up_blocks.*attn2",), types=())), "a")
    with pytest.raises(ValueError, match="every cross-attention"):
        pd.save_adapter(unet, tmp_path / "a.safetensors", "a", format="ip-adapter")
    pd.inject(unet, pd.IPAdapter(image_embed_dim=WIDTH, plus=True, depth=2, heads=1), "b")
    with pytest.raises(ValueError, match="4 resampler blocks"):
        pd.save_adapter(unet, tmp_path / "b.safetensors", "b", format="ip-adapter")
    for name in ("a", "b"):  # the native format keeps both
        path = pd.save_adapter(unet, tmp_path / f"{name}.safetensors", name)
        pd.load_adapter(tiny.tiny_unet(), path)
    sd15 = diffusers_state(tiny.tiny_unet())  # a file for a U-Net with another number of cross-attentions
    sd15["ip_adapter"]["9.to_k_ip.weight"] = sd15["ip_adapter"]["1.to_k_ip.weight"].clone()
    sd15["ip_adapter"]["9.to_v_ip.weight"] = sd15["ip_adapter"]["1.to_v_ip.weight"].clone()
    write_state(sd15, tmp_path / "other.safetensors")
    fresh = tiny.tiny_unet()
    with pytest.raises(pd.AdapterFileError, match="holds 5 cross-attention layers .* has 4"):
        pd.load_adapter(fresh, tmp_path / "other.safetensors")
    assert not list(hosts(fresh))


# ---------------------------------------------------------------- training


def test_batch_inputs_drop_text_image_or_both(pipe):
    pd.inject(pipe, pd.IPAdapter(), "ip")
    cfg = next(s.deltas["ip"].config for _, s in hosts(pipe) if "ip" in s.deltas)
    pixels = torch.rand(3, 3, 32, 32) * 2 - 1
    make = cfg.batch_inputs(pipe, pixels, 0.05)
    u = torch.tensor([0.01, 0.07, 0.12, 0.5])  # text dropped, image dropped, both, neither
    noise = torch.zeros(4, 2, 4, 4, 4)
    noise[:, 0, 0, 0, 0] = torch.special.ndtri(u)
    batch = {"instance": torch.tensor([0, 1, 2, 0]), "prior": torch.tensor([1, 0, 1, 0]), "noise": noise}
    inputs, drop_text = make(batch)
    embeds = inputs["image_embeds"]
    assert embeds.shape == (8, WIDTH) and drop_text.tolist() == [True, False, True, False] + [False] * 4
    own = pipe.image_encoder(pipe.feature_extractor(images=list(((pixels + 1) / 2).permute(0, 2, 3, 1).numpy()),
                                                    do_rescale=False, return_tensors="pt").pixel_values).image_embeds
    torch.testing.assert_close(embeds[0], own[0].detach())
    torch.testing.assert_close(embeds[3], own[0].detach())
    assert not embeds[1:3].any() and not embeds[4:].any()  # dropped images and prior items: zeros (negative)
    shown = cfg.validation_inputs(pipe, pixels, guidance=True)  # validation: the first instance image prompts
    torch.testing.assert_close(shown["image_embeds"], own[:1].detach())
    assert not shown["negative_image_embeds"].any() and set(cfg.validation_inputs(pipe, pixels, False)) == {"image_embeds"}


def test_trainer_exports_a_file_diffusers_loads(tiny_pipe_dir, instance_dir, class_cache, tmp_path, pipe_parts):
    from diffusers import StableDiffusionPipeline
    from test_dreambooth import make_config

    from peft_diffusion.training import dreambooth as db

    folder = tmp_path / "encoder"
    pipe_parts.image_encoder.save_pretrained(folder)
    prompted = []  # the validation images are generated with the first instance image as the image prompt

    def seen(step, images, prompts):
        prompted.append(step)
        return {}

    path = db.train(make_config(tiny_pipe_dir, instance_dir, class_cache, tmp_path / "run", steps=2, lr=1e-2,
                                method={"method": "ip-adapter"}, image_encoder=str(folder), export_format="diffusers",
                                validation_every=0, validation_images=1, validation_steps=2), on_validation=seen)
    assert prompted == [0, 2] and len(list((tmp_path / "run" / "validation").glob("*.png"))) == 2
    assert path.name == "adapter.safetensors" and all(k.startswith(("image_proj.", "ip_adapter.")) for k in load_file(path))
    ours, theirs = (StableDiffusionPipeline.from_pretrained(tiny_pipe_dir) for _ in range(2))
    theirs.register_modules(image_encoder=pipe_parts.image_encoder, feature_extractor=pipe_parts.feature_extractor)
    load_diffusers(theirs, path)
    pd.load_adapter(ours, path, name="ip")
    x, feats = tiny.unet_inputs(batch=2), torch.randn(2, 1, WIDTH)
    with pd.inputs(ours, image_embeds=feats):
        torch.testing.assert_close(unet_out(ours.unet, x), unet_out(theirs.unet, x, added_cond_kwargs={"image_embeds": [feats]}),
                                   atol=1e-5, rtol=0)
    with pytest.raises(Exception, match="image_prompt_dropout"):
        make_config(tiny_pipe_dir, instance_dir, class_cache, tmp_path / "bad", method={"method": "ip-adapter"},
                    image_prompt_dropout=0.5)
