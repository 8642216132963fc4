"""Textual inversion: new tokens in the pipeline's own prompt path, its files in and out (ours, diffusers',
A1111's, SDXL's pair), the tokenizer restored on remove, and bad input refused with the model untouched."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import tiny
import peft_diffusion as pd
from peft_diffusion import TextualInversion, inject, load_adapter, remove, save_adapter
from peft_diffusion.api import hosts
from peft_diffusion.methods.token_rows import TokenRows, expand_prompt, find_tokenizer


def encode(pipe, prompt: str) -> torch.Tensor:
    with torch.no_grad():
        return pipe.encode_prompt(prompt, "cpu", 1, False)[0]


def rows(obj, name: str) -> TokenRows:
    return next(h.deltas[name] for _, h in hosts(obj) if name in h.deltas)


def tokenizer_state(tokenizer) -> dict:
    """The Rust tokenizer's full state, less the padding / truncation that transformers sets on each call."""
    state = json.loads(tokenizer.backend_tokenizer.to_str())
    state.pop("padding"), state.pop("truncation")
    return state


def moved(obj, name: str, seed: int = 3) -> None:
    """Move adapter ``name``'s vectors away from their init (what training does)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        p = rows(obj, name).emb_params
        p.add_(torch.randn(p.shape, generator=g))


def test_identity_for_prompts_without_the_token_and_pipeline_runs(tiny_pipe):
    base = encode(tiny_pipe, "a photo of a cat")
    inject(tiny_pipe, TextualInversion(token="<cat>", num_vectors=2, init_word="dog"), "ti")
    assert torch.equal(encode(tiny_pipe, "a photo of a cat"), base)
    # initialised from "dog": the token reads like the word until trained
    torch.testing.assert_close(encode(tiny_pipe, "a photo of a <cat>"), encode(tiny_pipe, "a photo of a dog dog"))
    image = tiny_pipe(**{**tiny.pipe_call_kwargs(), "prompt": "a photo of <cat>"}).images
    assert image.shape == (1, 32, 32, 3) and bool(torch.isfinite(torch.from_numpy(image)).all())


def test_a_switched_off_token_adapter_names_itself(tiny_pipe):
    inject(tiny_pipe, TextualInversion(token="<cat>", init_word="dog"), "ti")
    pd.disable_adapters(tiny_pipe)
    with pytest.raises(IndexError, match=r"new tokens of adapter\(s\) \['ti'\], disabled or inactive"):
        encode(tiny_pipe, "a photo of a <cat>")
    assert encode(tiny_pipe, "a photo of a cat").shape[0] == 1  # prompts without the token still run
    pd.enable_adapters(tiny_pipe)
    pd.set_adapters(tiny_pipe, {})
    with pytest.raises(IndexError, match="disabled or inactive"):
        encode(tiny_pipe, "a photo of a <cat>")


def test_only_the_new_rows_train(tiny_pipe):
    te = tiny_pipe.text_encoder
    before = {k: v.clone() for k, v in te.state_dict().items()}
    inject(tiny_pipe, TextualInversion(token="<cat>", num_vectors=3, init_word="cat"), "ti")
    trainable = [n for n, p in te.named_parameters() if p.requires_grad]
    assert trainable == ["embeddings.token_embedding.deltas.ti.emb_params"]
    assert pd.parameter_report(tiny_pipe).adapters["ti"]["trainable"] == 3 * tiny.TEXT_HIDDEN
    opt = torch.optim.AdamW([p for p in te.parameters() if p.requires_grad], lr=1e-2)
    te.train()
    ids = tiny_pipe.tokenizer(expand_prompt("a photo of <cat>", tiny_pipe.tokenizer), return_tensors="pt").input_ids
    te(ids).last_hidden_state.pow(2).mean().backward()
    grad = rows(tiny_pipe, "ti").emb_params.grad
    assert grad is not None and bool((grad.abs().sum(-1) > 0).all()), "every vector of the token gets a gradient"
    assert all(p.grad is None for n, p in te.named_parameters() if n not in trainable)
    opt.step()
    after = {k.replace(".base.", "."): v for k, v in te.state_dict().items() if ".deltas." not in k}
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


def test_multi_vector_tokens_expand_in_the_pipelines_own_encode_prompt(tiny_pipe):
    inject(tiny_pipe, TextualInversion(token="<cat>", num_vectors=3), "ti")
    tok = tiny_pipe.tokenizer
    assert tiny_pipe.maybe_convert_prompt("a <cat> photo", tok) == "a <cat> <cat>_1 <cat>_2 photo"
    assert expand_prompt("a <cat> photo", tok) == "a <cat> <cat>_1 <cat>_2 photo"
    ids = tok("a <cat> <cat>_1 <cat>_2 photo", padding="max_length", max_length=tok.model_max_length,
              return_tensors="pt").input_ids
    assert rows(tiny_pipe, "ti").token_ids == [550, 551, 552] and set(ids[0, 2:5].tolist()) == {550, 551, 552}
    with torch.no_grad():
        direct = tiny_pipe.text_encoder(ids)[0]
    torch.testing.assert_close(encode(tiny_pipe, "a <cat> photo"), direct)
    assert not torch.allclose(direct, encode(tiny_pipe, "a photo"))


def test_our_diffusers_file_loads_in_diffusers_and_back(tiny_pipe, fresh, tmp_path):
    inject(tiny_pipe, TextualInversion(token="<cat>", num_vectors=2, init_word="dog"), "ti")
    moved(tiny_pipe, "ti")
    ours = encode(tiny_pipe, "a photo of <cat>")
    path = save_adapter(tiny_pipe, tmp_path, "ti", format="diffusers")
    assert path.name == "learned_embeds.safetensors"
    assert {k: tuple(v.shape) for k, v in load_file(path).items()} == {"<cat>": (2, tiny.TEXT_HIDDEN)}
    theirs = fresh()
    theirs.load_textual_inversion(str(tmp_path))
    torch.testing.assert_close(encode(theirs, "a photo of <cat>"), ours, atol=1e-6, rtol=1e-6)
    back = fresh()
    assert load_adapter(back, path) == "<cat>"  # the file's token names the adapter
    torch.testing.assert_close(encode(back, "a photo of <cat>"), ours, atol=1e-6, rtol=1e-6)
    other = fresh()
    assert load_adapter(other, path, name="<dog>") == "<dog>"  # name= is the token
    torch.testing.assert_close(encode(other, "a photo of <dog>"), ours, atol=1e-6, rtol=1e-6)
    native = save_adapter(tiny_pipe, tmp_path / "native.safetensors", "ti")
    again = fresh()
    load_adapter(again, native)
    torch.testing.assert_close(encode(again, "a photo of <cat>"), ours, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("kind", ["pt", "pt-original", "safetensors"])
def test_a1111_files_give_the_same_embeddings_as_diffusers(fresh, tmp_path, kind):
    vec = torch.randn(2, tiny.TEXT_HIDDEN, generator=torch.Generator().manual_seed(5))
    if kind == "pt":  # what A1111's Embedding.save writes
        path = tmp_path / "charturner.pt"
        torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": vec}, "name": "charturner",
                    "step": 1500, "sd_checkpoint": "e1441589", "sd_checkpoint_name": "v1-5-pruned"}, path)
    elif kind == "pt-original":  # the original repo's: a tensor placeholder id, the vectors a Parameter
        path = tmp_path / "charturner.pt"
        torch.save({"string_to_token": {"*": torch.tensor(265)},
                    "string_to_param": {"*": torch.nn.Parameter(vec.clone())}}, path)
    else:  # A1111 / kohya safetensors
        path = tmp_path / "charturner.safetensors"
        save_file({"emb_params": vec}, path)
    ours = fresh()
    assert load_adapter(ours, path) == "charturner"  # the token is the file stem
    theirs = fresh()
    if kind == "pt-original":  # diffusers reads A1111's "name" key, which these files lack: give it the vectors
        theirs.load_textual_inversion({"charturner": vec})
    else:
        theirs.load_textual_inversion(str(path), token="charturner")
    prompt = "charturner, a photo of a cat"
    torch.testing.assert_close(encode(ours, prompt), encode(theirs, prompt), atol=1e-6, rtol=1e-6)
    out = save_adapter(ours, tmp_path / "out.safetensors", "charturner", format="a1111")
    assert set(load_file(out)) == {"emb_params"} and torch.equal(load_file(out)["emb_params"], vec)


def _tiny_sdxl():
    from diffusers import StableDiffusionXLPipeline
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    tok1, tok2 = tiny.clip_tokenizer(), tiny.clip_tokenizer()
    te1 = tiny.tiny_clip_text(vocab_size=len(tok1), bos=tok1.bos_token_id, eos=tok1.eos_token_id)
    torch.manual_seed(1)  # a wider second encoder, as clip_g is: the pair must not swap
    te2 = CLIPTextModelWithProjection(CLIPTextConfig(
        vocab_size=len(tok2), hidden_size=40, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=tiny.SEQ, projection_dim=16, bos_token_id=tok2.bos_token_id,
        eos_token_id=tok2.eos_token_id, pad_token_id=tok2.eos_token_id)).eval()
    # encode_prompt needs only the text side
    return StableDiffusionXLPipeline(vae=None, text_encoder=te1, text_encoder_2=te2, tokenizer=tok1,
                                     tokenizer_2=tok2, unet=None, scheduler=None)


def test_sdxl_clip_pair_round_trip(tmp_path):
    pipe = _tiny_sdxl()

    def enc(p):
        with torch.no_grad():
            embeds, _, pooled, _ = p.encode_prompt("a photo of <s>", device="cpu", do_classifier_free_guidance=False)
        return torch.cat([embeds.flatten(), pooled.flatten()])

    inject(pipe, TextualInversion(token="<s>", num_vectors=2, init_word="dog"), "ti",
           components=("text_encoder", "text_encoder_2"))
    for _, host in hosts(pipe):
        with torch.no_grad():
            host.deltas["ti"].emb_params.normal_()
    ours = enc(pipe)
    path = save_adapter(pipe, tmp_path / "s.safetensors", "ti", format="a1111")
    assert {k: tuple(v.shape) for k, v in load_file(path).items()} == {"clip_l": (2, 32), "clip_g": (2, 40)}
    back = _tiny_sdxl()
    assert load_adapter(back, path, name="<s>") == "<s>"
    torch.testing.assert_close(enc(back), ours, atol=1e-6, rtol=1e-6)
    theirs = _tiny_sdxl()  # diffusers' documented way: each half into its encoder
    sd = load_file(path)
    theirs.load_textual_inversion(sd["clip_l"], token=["<s>", "<s>_1"], text_encoder=theirs.text_encoder,
                                  tokenizer=theirs.tokenizer)
    theirs.load_textual_inversion(sd["clip_g"], token=["<s>", "<s>_1"], text_encoder=theirs.text_encoder_2,
                                  tokenizer=theirs.tokenizer_2)
    torch.testing.assert_close(enc(theirs), ours, atol=1e-6, rtol=1e-6)


def test_remove_restores_tokenizer_and_model_in_any_order(tiny_pipe):
    te, tok = tiny_pipe.text_encoder, tiny_pipe.tokenizer
    types, state, tok_state = tiny.module_types(te), tiny.snapshot(te), tokenizer_state(tok)
    inject(tiny_pipe, TextualInversion(token="<a>", num_vectors=2), "a")
    inject(tiny_pipe, TextualInversion(token="<b>", num_vectors=2), "b")
    assert rows(tiny_pipe, "b").token_ids == [552, 553]
    b_prompt = encode(tiny_pipe, "a photo of <b>")
    remove(tiny_pipe, "a")  # not the last added: <b>'s ids move down and its delta follows
    assert "<a>" not in tok.get_vocab() and rows(tiny_pipe, "b").token_ids == [550, 551]
    torch.testing.assert_close(encode(tiny_pipe, "a photo of <b>"), b_prompt)
    remove(tiny_pipe, "b")
    assert tokenizer_state(tok) == tok_state and len(tok) == 550
    assert tiny.module_types(te) == types and list(te.state_dict()) == list(state)
    assert all(torch.equal(te.state_dict()[k], v) for k, v in state.items())


def test_overwrite_serves_an_existing_word_and_keeps_the_tokenizer(tiny_pipe):
    tok_state = tokenizer_state(tiny_pipe.tokenizer)
    base = encode(tiny_pipe, "a photo of a cat")
    inject(tiny_pipe, TextualInversion(token="cat", overwrite=True), "ti")
    assert rows(tiny_pipe, "ti").token_ids == [tiny_pipe.tokenizer.convert_tokens_to_ids("cat</w>")]
    assert torch.equal(encode(tiny_pipe, "a photo of a cat"), base)  # starts from its own row
    moved(tiny_pipe, "ti")
    assert not torch.allclose(encode(tiny_pipe, "a photo of a cat"), base)
    assert tokenizer_state(tiny_pipe.tokenizer) == tok_state
    with pytest.raises(ValueError, match="cannot be fused"):
        pd.fuse(tiny_pipe, ["ti"])
    remove(tiny_pipe)
    assert torch.equal(encode(tiny_pipe, "a photo of a cat"), base)


def test_lone_text_encoder_with_and_without_a_tokenizer(tmp_path):
    plain = tiny.tiny_clip_text()  # no tokenizer: new ids from the embedding size up
    inject(plain, TextualInversion(token="<a>", num_vectors=2), "a")
    inject(plain, TextualInversion(token="<b>"), "b")
    assert rows(plain, "a").token_ids == [1000, 1001] and rows(plain, "b").token_ids == [1002]
    ids = torch.tensor([[0, 5, 1000, 1002, 2]])
    out = tiny.run(plain, {"input_ids": ids})
    path = save_adapter(plain, tmp_path / "a.safetensors", "a")
    other = tiny.tiny_clip_text()
    load_adapter(other, path)
    inject(other, TextualInversion(token="<b>"), "b")
    rows(other, "b").emb_params.data.copy_(rows(plain, "b").emb_params)
    torch.testing.assert_close(tiny.run(other, {"input_ids": ids}), out)
    with pytest.raises(ValueError, match="init_word needs the text encoder's tokenizer"):
        inject(tiny.tiny_clip_text(), TextualInversion(token="<c>", init_word="dog"), "c")

    model = tiny.tiny_clip_text_tokenizer()  # set_tokenizer: the same as in a pipeline
    tokenizer = find_tokenizer(model, model)
    inject(model, TextualInversion(token="<cat>", init_word="dog"), "ti")
    assert "<cat>" in tokenizer.get_vocab()
    dog, cat = (tokenizer(p, return_tensors="pt").input_ids for p in ("a dog", "a <cat>"))
    torch.testing.assert_close(tiny.run(model, {"input_ids": cat}), tiny.run(model, {"input_ids": dog}))
    remove(model)
    assert "<cat>" not in tokenizer.get_vocab()


def test_bad_input_is_refused_with_the_model_untouched(tiny_pipe, tmp_path):
    te, tok = tiny_pipe.text_encoder, tiny_pipe.tokenizer
    inject(tiny_pipe, TextualInversion(token="<cat>"), "first")
    types, tok_state = tiny.module_types(te), tokenizer_state(tok)
    cases = [
        (TextualInversion(token="<cat>"), r"\['<cat>'\] already exist.*overwrite=True"),
        (TextualInversion(token="dog", num_vectors=2), r"\['dog'\] already exist"),
        (TextualInversion(token="<x>", num_vectors=3, init_word="photo dog"), "is 2 tokens.*one token per vector"),
        (TextualInversion(token="<x>", init_word="<cat>"), "added tokens the base embedding lacks"),
    ]
    for config, pattern in cases:
        with pytest.raises(ValueError, match=pattern):
            inject(tiny_pipe, config, "bad")
        assert tiny.module_types(te) == types and tokenizer_state(tok) == tok_state
        assert pd.adapter_names(tiny_pipe) == ["first"]
    for kwargs, pattern in [({"num_vectors": 0}, "num_vectors"), ({"token": " x"}, "token"),
                            ({"init_word": ""}, "init_word"), ({"overwrite": "yes"}, "overwrite")]:
        with pytest.raises(ValueError, match=pattern):
            TextualInversion(**{"token": "<x>", **kwargs})
    save_file({"<wide>": torch.randn(1, 768)}, tmp_path / "wide.safetensors")
    with pytest.raises(pd.AdapterFileError, match=r"\(1, 768\) in the file but \(1, 32\)"):
        load_adapter(tiny_pipe, tmp_path / "wide.safetensors")
    assert tiny.module_types(te) == types and tokenizer_state(tok) == tok_state
    with pytest.raises(ValueError, match="overwrite=True"):  # a file's token that exists: same refusal
        save_file({"<cat>": torch.randn(1, 32)}, tmp_path / "dup.safetensors")
        load_adapter(tiny_pipe, tmp_path / "dup.safetensors")
    assert tokenizer_state(tok) == tok_state
    with pytest.raises(ValueError, match="cannot write format"):
        save_adapter(tiny_pipe, tmp_path / "k.safetensors", "first", format="nope")
    with pytest.raises(ValueError, match="not .textual-inversion."):
        save_adapter(tiny_pipe, tmp_path / "k.safetensors", "first", format="kohya")


def test_sd15_text_encoder_trains_768_values_per_vector():
    from transformers import CLIPTextConfig, CLIPTextModel

    # stable-diffusion-v1-5/text_encoder/config.json (CLIP ViT-L/14 text tower)
    config = CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                            num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
                            projection_dim=768, bos_token_id=0, eos_token_id=2, pad_token_id=1)
    with torch.device("meta"):
        model = CLIPTextModel(config)
    inject(model, TextualInversion(token="<sks>", num_vectors=4), "ti")
    report = pd.parameter_report(model)
    assert report.adapters["ti"]["trainable"] == 4 * 768 == report.model_trainable
    assert rows(model, "ti").token_ids == [49408, 49409, 49410, 49411]
    assert json.loads(json.dumps(rows(model, "ti").config.to_dict()))["token"] == "<sks>"
