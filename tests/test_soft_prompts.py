"""Prompt tuning and P-tuning (methods/prompt_tuning.py, p_tuning.py, soft_prompt.py; io/peft_prompt.py).

Against peft (``PromptTuningConfig``, ``PromptEncoderConfig``) on tiny LLaMA, BERT and T5-encoder models: the
same prompt values loaded into both give the same outputs (atol 1e-5). Like with like: peft's outputs keep the
virtual positions in front (a causal LM's logits are [B, n + L, V], BERT's last hidden state [B, n + L, d]),
and so do ours, so whole tensors are compared; BERT's classification head pools the first position, which is a
virtual token in both. Files convert both ways through peft's adapter folders. Then the T5-XXL count, the
trainable set, folding, the CLIP placeholder path, and bad input (model untouched).
"""
from __future__ import annotations

import pytest
import torch

import tiny
import peft_diffusion as pd
from peft_diffusion.api import sites
from peft_diffusion.io import AdapterFileError
from peft_diffusion.io.peft_prompt import load_peft_prompt, save_peft_prompt
from peft_diffusion.methods import PromptTuning, PTuning
from peft_diffusion.methods.p_tuning import fold
from peft_diffusion.methods.token_rows import set_tokenizer

peft = pytest.importorskip("peft")
N = 4


def _delta(model, name="p"):
    return next(s.deltas[name] for _, s in sites(model) if name in s.deltas)


def _batch(seq=7, vocab=99, pad=True):
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, vocab, (2, seq), generator=g)
    mask = torch.ones(2, seq, dtype=torch.long)
    if pad:
        mask[1, -2:] = 0  # right padding on the second row
    return ids, mask


def _bert_cls():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(tiny.SEED)
    config = BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=37, max_position_embeddings=64, num_labels=3)
    return BertForSequenceClassification(config).eval()


def _peft_config(method, task, **kw):
    if method == "prompt-tuning":
        return peft.PromptTuningConfig(task_type=task, num_virtual_tokens=N)
    return peft.PromptEncoderConfig(task_type=task, num_virtual_tokens=N, encoder_hidden_size=kw.get("hidden", 8),
                                    encoder_reparameterization_type=kw.get("encoder", "mlp").upper(),
                                    encoder_num_layers=kw.get("layers", 2))


def _ours(method, **kw):
    if method == "prompt-tuning":
        return PromptTuning(num_virtual_tokens=N)
    return PTuning(num_virtual_tokens=N, encoder=kw.get("encoder", "mlp"), encoder_hidden_size=kw.get("hidden", 8),
                   encoder_num_layers=kw.get("layers", 2))


def _pair(build, method, task, **kw):
    """(ours, peft's) on two identical base models, peft's prompt state copied into ours."""
    mine, theirs = build(), build()
    pd.inject(mine, _ours(method, **kw), "p")
    theirs = peft.get_peft_model(theirs, _peft_config(method, task, **kw)).eval()
    encoder = theirs.prompt_encoder["default"]
    state = encoder.state_dict()
    if method == "prompt-tuning":
        state = {"prompt_embeddings": state["embedding.weight"]}
    _delta(mine).load_state_dict(state)
    return mine.eval(), theirs


CASES = [("prompt-tuning", {}), ("p-tuning", {"encoder": "mlp"}), ("p-tuning", {"encoder": "lstm", "layers": 1})]


@pytest.mark.parametrize("method, kw", CASES)
def test_llama_logits_and_loss_match_peft(method, kw):
    mine, theirs = _pair(tiny.tiny_llama, method, "CAUSAL_LM", **kw)
    ids, mask = _batch()
    labels = ids.masked_fill(mask == 0, -100)
    with torch.no_grad():
        a = mine(input_ids=ids, attention_mask=mask, labels=labels)
        b = theirs(input_ids=ids, attention_mask=mask, labels=labels)
    assert a.logits.shape == b.logits.shape == (2, N + ids.shape[1], 99)  # virtual positions in front, both
    torch.testing.assert_close(a.logits, b.logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(a.loss, b.loss, atol=1e-5, rtol=0)  # -100 on the virtual positions in both
    with torch.no_grad():  # given positions 0..L-1 become 0..n+L-1 (peft drops given ones: the same here)
        c = mine(input_ids=ids, attention_mask=mask, position_ids=torch.arange(ids.shape[1]).expand(2, -1))
    torch.testing.assert_close(c.logits, b.logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("method, kw", CASES)
def test_bert_matches_peft(method, kw):
    mine, theirs = _pair(_bert_cls, method, "SEQ_CLS", **kw)
    ids, mask = _batch()
    types = torch.zeros_like(ids)
    types[:, 4:] = 1
    with torch.no_grad():
        a = mine(input_ids=ids, attention_mask=mask, token_type_ids=types).logits
        b = theirs(input_ids=ids, attention_mask=mask, token_type_ids=types).logits
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    mine, theirs = _pair(tiny.tiny_bert, method, "FEATURE_EXTRACTION", **kw)
    with torch.no_grad():
        a = mine(input_ids=ids, attention_mask=mask).last_hidden_state
        b = theirs(input_ids=ids, attention_mask=mask).last_hidden_state
    assert a.shape == b.shape == (2, N + ids.shape[1], 32)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_t5_encoder_matches_peft():
    mine, theirs = _pair(tiny.tiny_t5_encoder, "prompt-tuning", "FEATURE_EXTRACTION")
    ids, mask = _batch()
    with torch.no_grad():
        a = mine(input_ids=ids, attention_mask=mask).last_hidden_state
        b = theirs(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


@pytest.mark.parametrize("method, kw", CASES)
def test_files_convert_to_and_from_peft(method, kw, tmp_path):
    """Ours -> peft folder -> peft's PeftModel; peft's save_pretrained -> ours: same logits (P-tuning
    arrives folded both ways, as peft saves it)."""
    mine, theirs = _pair(tiny.tiny_llama, method, "CAUSAL_LM", **kw)
    with torch.no_grad():  # move the prompt off its init so the files carry something of ours
        for p in _delta(mine).parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(3)) * 0.05)
    ids, mask = _batch()
    with torch.no_grad():
        want = mine(input_ids=ids, attention_mask=mask).logits
    folder = save_peft_prompt(mine, tmp_path / "ours", "p")
    loaded = peft.PeftModel.from_pretrained(tiny.tiny_llama(), str(folder)).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids, attention_mask=mask).logits, want, atol=1e-5, rtol=0)
    theirs.save_pretrained(str(tmp_path / "theirs"))
    fresh = tiny.tiny_llama()
    assert load_peft_prompt(fresh, tmp_path / "theirs", "q") == "q"
    with torch.no_grad():
        got = fresh(input_ids=ids, attention_mask=mask).logits
        torch.testing.assert_close(got, theirs(input_ids=ids, attention_mask=mask).logits, atol=1e-5, rtol=0)
    assert [k for k in _delta(fresh, "q").state_dict()] == ["prompt_embeddings"]
    assert not any(p.requires_grad for p in _delta(fresh, "q").parameters())


def test_t5_xxl_count_on_meta():
    """Lester et al.: prompt tuning T5-XXL with 5 tokens trains 20,480 parameters (d_model 4096 x 5)."""
    from transformers import T5Config, T5ForConditionalGeneration

    config = T5Config(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                      feed_forward_proj="gated-gelu")
    with torch.device("meta"):
        model = T5ForConditionalGeneration(config)
    pd.inject(model, PromptTuning(num_virtual_tokens=5), "p")
    trainable = {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"peft_annex.deltas.p.prompt_embeddings": 20_480}


def test_only_the_prompt_trains_and_fold_keeps_outputs(tmp_path):
    model = tiny.tiny_llama()
    keys = list(model.state_dict())
    pd.inject(model, PTuning(num_virtual_tokens=3, encoder="lstm", encoder_hidden_size=8, encoder_num_layers=1), "p")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("peft_annex.deltas.p.") for n in trainable)
    assert {n.split(".")[3] for n in trainable} == {"embedding", "lstm_head", "mlp_head"}
    ids, _ = _batch(pad=False)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if n in trainable)
    assert all(p.grad is None for n, p in model.named_parameters() if n not in trainable)
    model.zero_grad()
    with torch.no_grad():
        before = model(input_ids=ids).logits
    fold(model, "p")
    assert list(_delta(model).state_dict()) == ["prompt_embeddings"] and _delta(model).prompt_embeddings.requires_grad
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, before, atol=1e-6, rtol=0)
    path = pd.save_adapter(model, tmp_path / "folded.safetensors", "p")
    fresh = tiny.tiny_llama()
    pd.load_adapter(fresh, path)
    with torch.no_grad():
        torch.testing.assert_close(fresh(input_ids=ids).logits, before, atol=1e-6, rtol=0)
    pd.remove(model)
    assert list(model.state_dict()) == keys and not model._forward_pre_hooks


def test_clip_placeholder_path_is_exact():
    """CLIP text takes no inputs_embeds: placeholder ids + a one-call swap of their rows. With n = 1 this must
    equal the base model run on [placeholder; ids] with the placeholder's embedding row set to the prompt."""
    model, ref = tiny.tiny_clip_text(), tiny.tiny_clip_text()
    ids = tiny.clip_text_inputs(batch=2)["input_ids"]
    pd.inject(model, PromptTuning(num_virtual_tokens=1), "p")
    prompt = _delta(model).prompt_embeddings.detach()
    with torch.no_grad():
        ref.get_input_embeddings().weight[0] = prompt[0]
        want = ref(input_ids=torch.cat([torch.zeros(2, 1, dtype=torch.long), ids], 1))
        got = model(input_ids=ids)
    torch.testing.assert_close(got.last_hidden_state, want.last_hidden_state, atol=1e-6, rtol=0)
    torch.testing.assert_close(got.pooler_output, want.pooler_output, atol=1e-6, rtol=0)
    assert not model.get_input_embeddings()._forward_hooks  # the swap hook lives for one call only


def test_init_from_vocabulary_and_text():
    from transformers import BertTokenizerFast

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "photo", "of", "cat"]
    tok = BertTokenizerFast(vocab={w: i for i, w in enumerate(words)})
    model = set_tokenizer(tiny.tiny_bert(), tok)
    table = model.get_input_embeddings().weight
    pd.inject(model, PromptTuning(num_virtual_tokens=7, init="text", init_text="a cat photo"), "t")
    rows = _delta(model, "t").prompt_embeddings
    torch.testing.assert_close(rows, table[[5, 8, 6, 5, 8, 6, 5]])  # the text's tokens, cycled to n (as peft)
    torch.manual_seed(0)
    pd.inject(model, PromptTuning(num_virtual_tokens=5, init="vocab"), "v")
    rows = _delta(model, "v").prompt_embeddings
    assert all(any(torch.equal(r, t) for t in table) for r in rows)


# ---------------------------------------------------------------- bad input: clear errors, model untouched


def _untouched(model, keys):
    assert list(model.state_dict()) == keys and not pd.adapter_names(model) and not model._forward_pre_hooks


def test_prompt_longer_than_the_position_table():
    model = tiny.tiny_bert()  # 64 learned positions
    keys = list(model.state_dict())
    with pytest.raises(ValueError, match=r"64 virtual tokens .* position table of 64 positions"):
        pd.inject(model, PromptTuning(num_virtual_tokens=64), "p")
    _untouched(model, keys)
    pd.inject(model, PromptTuning(num_virtual_tokens=60), "p")
    with pytest.raises(ValueError, match=r"60 virtual tokens \+ 8 input tokens = 68 positions, more than "
                                         r"BertModel's position table of 64"):
        model(**tiny.token_inputs())


def test_prompt_file_for_another_width_or_token_count(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    model = tiny.tiny_llama()
    pd.inject(model, PromptTuning(num_virtual_tokens=N), "p")
    native = pd.save_adapter(model, tmp_path / "p.safetensors", "p")
    folder = save_peft_prompt(model, tmp_path / "peft", "p")
    wide = LlamaForCausalLM(LlamaConfig(vocab_size=99, hidden_size=48, intermediate_size=37, num_hidden_layers=1,
                                        num_attention_heads=4, num_key_value_heads=2)).eval()
    keys = list(wide.state_dict())
    with pytest.raises(AdapterFileError, match=r"shape \(4, 32\); this adapter needs 4 virtual tokens of the "
                                               r"model's width 48"):
        pd.load_adapter(wide, native)
    with pytest.raises(ValueError, match=r"shape \(4, 32\); this adapter needs 4 virtual tokens of the model's "
                                         r"width 48, i.e. \(4, 48\) \(LlamaForCausalLM\)"):
        load_peft_prompt(wide, folder)
    _untouched(wide, keys)
    import json

    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, "num_virtual_tokens": 6}))
    fresh = tiny.tiny_llama()
    keys = list(fresh.state_dict())
    with pytest.raises(ValueError, match=r"says 6 virtual tokens of width 32, adapter_model.safetensors holds a "
                                         r"prompt of shape \(4, 32\)"):
        load_peft_prompt(fresh, folder)
    _untouched(fresh, keys)


def test_init_text_that_tokenizes_to_nothing():
    from transformers import BertTokenizerFast

    tok = BertTokenizerFast(vocab={w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "a"])})
    model = set_tokenizer(tiny.tiny_bert(), tok)
    keys = list(model.state_dict())
    with pytest.raises(ValueError, match=r"init_text '\u0301' tokenizes to nothing with BertTokenizer"):
        pd.inject(model, PromptTuning(num_virtual_tokens=3, init="text", init_text="\u0301"), "p")  # an accent alone
    _untouched(model, keys)
    bare = tiny.tiny_bert()
    with pytest.raises(ValueError, match="needs the model's tokenizer"):
        pd.inject(bare, PromptTuning(num_virtual_tokens=3, init="text", init_text="a"), "p")
    _untouched(bare, keys)


def test_cached_generation_is_refused_and_uncached_generation_runs():
    model = tiny.tiny_llama()
    pd.inject(model, PromptTuning(num_virtual_tokens=3), "p")
    ids, _ = _batch(pad=False)
    with pytest.raises(ValueError, match="use_cache=False"):
        model.generate(input_ids=ids, max_new_tokens=2, do_sample=False)
    out = model.generate(input_ids=ids, max_new_tokens=2, do_sample=False, use_cache=False)
    assert out.shape == (2, ids.shape[1] + 2)


def test_t5_seq2seq_trains_and_refuses_generate():
    """T5ForConditionalGeneration: the prompt goes in front of the encoder's input (mask extended for the
    decoder's cross-attention too), decoder labels untouched; generate (encoder run outside the hook) refused."""
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    model = T5ForConditionalGeneration(T5Config(vocab_size=99, d_model=32, d_kv=8, d_ff=37, num_layers=2,
                                                num_heads=4, relative_attention_num_buckets=8, dropout_rate=0.0,
                                                decoder_start_token_id=0)).eval()
    pd.inject(model, PromptTuning(num_virtual_tokens=3), "p")
    ids, mask = _batch()
    out = model(input_ids=ids, attention_mask=mask, labels=ids[:, :5].contiguous())
    assert out.logits.shape == (2, 5, 99) and out.encoder_last_hidden_state.shape == (2, 3 + ids.shape[1], 32)
    out.loss.backward()
    assert _delta(model).prompt_embeddings.grad is not None
    with pytest.raises(ValueError, match="seq2seq generation is not supported"):
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=2)


@pytest.mark.parametrize("key", ["clip-text", "llama"])
def test_two_prompts_stack_like_one_concatenated(key):
    """Adapters A (2 tokens) then B (3) active together run [P_B; P_A; X]: the same as one 5-token prompt
    cat(P_B, P_A) (on CLIP this checks that each one-call swap finds its own placeholders)."""
    build, inputs = tiny.MODELS[key]
    two, one = build(), build()
    pd.inject(two, PromptTuning(num_virtual_tokens=2), "a")
    pd.inject(two, PromptTuning(num_virtual_tokens=3), "b")
    pd.inject(one, PromptTuning(num_virtual_tokens=5), "c")
    with torch.no_grad():
        _delta(one, "c").prompt_embeddings.copy_(torch.cat([_delta(two, "b").prompt_embeddings,
                                                            _delta(two, "a").prompt_embeddings]))
    torch.testing.assert_close(tiny.run(two, inputs()), tiny.run(one, inputs()), atol=1e-6, rtol=0)
