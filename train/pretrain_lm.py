"""Pretrain the embedded language model: a small LLaMA-style causal LM on shapes-world language.

    python train/pretrain_lm.py [--key=value ...]      (a few minutes on 2 CPU cores)

Data (``peft_diffusion.shapes.language``): lines of a caption and one question/answer about it, "a large red
circle on a pink background, top left. Q: what colour is the shape? A: red", plus captions alone (some
fields left out). Only the pretrained question types are asked; the held-out ones (background, position)
are the downstream task, though every full caption states their answers. Only train-split captions are
read; evaluation asks about test-split captions. Writes a transformers ``save_pretrained`` folder (fp32
weights, word-level tokenizer, generation config) with a model card and metrics.json.
"""
import dataclasses
import json
import logging
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, get_scheduler

from peft_diffusion.shapes import language
from peft_diffusion.training import config as config_lib


@dataclasses.dataclass
class Config:
    out: str = "peft_diffusion/models/shapes-lm"
    seed: int = 0
    threads: int = 1  # a model this small gains nothing from a second thread, and loses ~4x on shared cores
    # model
    hidden: int = 128
    layers: int = 4
    heads: int = 4
    kv_heads: int = 4
    intermediate: int = 256
    max_tokens: int = 48
    # data
    caption_only_p: float = 0.2  # lines that are a caption alone
    omit_p: float = 0.2  # in caption-only lines, each of size / background / position left out with this chance
    # training
    steps: int = 500
    batch: int = 64
    lr: float = 1e-3  # at 2e-3 the model never learned to read the colour (chance after 2000 steps)
    warmup: int = 100
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.01
    answer_weight: float = 5.0  # loss weight of answer tokens (after "A:", with </s>) against caption tokens
    log_every: int = 100
    # evaluation
    eval_n: int = 200  # test prompts per question type
    eval_seed: int = 777


cfg = config_lib.load(Config, overrides=sys.argv[1:])
logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
log = logging.getLogger("pretrain_lm")
torch.set_num_threads(cfg.threads)
torch.manual_seed(cfg.seed)
out = Path(cfg.out)
out.mkdir(parents=True, exist_ok=True)
t0, c0 = time.perf_counter(), time.process_time()

# ---------------------------------------------------------------- tokenizer and model
tokenizer = language.build_tokenizer(cfg.max_tokens)
model = LlamaForCausalLM(LlamaConfig(
    vocab_size=len(tokenizer), hidden_size=cfg.hidden, intermediate_size=cfg.intermediate,
    num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads, num_key_value_heads=cfg.kv_heads,
    max_position_embeddings=cfg.max_tokens, tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
    eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, dtype="float32"))
language.check_vocab(model, tokenizer)
n_params = sum(p.numel() for p in model.parameters())
log.info("model: %s parameters, vocabulary %d words", f"{n_params:,}", len(tokenizer))

# ---------------------------------------------------------------- data: a seeded stream of training lines
pool = language.combos("train")
striped = [a for a in pool if a["striped"]]
rng = np.random.default_rng(cfg.seed)


def training_line() -> str:
    if rng.random() < cfg.caption_only_p:
        return language.caption_line(rng, pool, cfg.omit_p)
    qtype = language.PRETRAINED_TYPES[rng.integers(len(language.PRETRAINED_TYPES))]
    return language.line(*language.example(rng, qtype, pool, striped))


def batch_tensors():
    lines = [training_line() for _ in range(cfg.batch)]
    ids = [tokenizer(t).input_ids + [tokenizer.eos_token_id] for t in lines]
    width = max(map(len, ids))
    assert width <= cfg.max_tokens, f"a line needs {width} tokens, max_tokens is {cfg.max_tokens}"
    input_ids = torch.full((len(ids), width), tokenizer.pad_token_id)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for i, seq in enumerate(ids):
        input_ids[i, :len(seq)] = torch.tensor(seq)
        mask[i, :len(seq)] = 1
    # every real token is predicted; answers weigh more: they are ~1/25 of the tokens but carry the task (a run
    # at weight 1 and lr 2e-3 read shape and size from the caption but stayed at chance on colour for 2000 steps)
    weights = mask.float()
    a_pos = (input_ids == tokenizer.convert_tokens_to_ids("A:")).long().cumsum(1) > 0
    weights[a_pos & (mask == 1)] = cfg.answer_weight
    return input_ids, mask, weights


def weighted_loss(logits, input_ids, weights):
    """Next-token cross entropy, each target token weighted (0 on padding)."""
    per_token = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), input_ids[:, 1:].flatten(),
                                                  reduction="none").view_as(weights[:, 1:])
    w = weights[:, 1:]
    return (per_token * w).sum() / w.sum()


# ---------------------------------------------------------------- training
decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                         {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95))
lr_sched = get_scheduler("cosine_with_min_lr", opt, num_warmup_steps=cfg.warmup, num_training_steps=cfg.steps,
                         scheduler_specific_kwargs={"min_lr_rate": cfg.min_lr_ratio})
losses = []
model.train()
t1, c1 = time.perf_counter(), time.process_time()
for step in range(cfg.steps):
    input_ids, mask, weights = batch_tensors()
    loss = weighted_loss(model(input_ids=input_ids, attention_mask=mask).logits, input_ids, weights)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    lr_sched.step()
    losses.append(loss.item())
    if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
        log.info("step %d/%d loss %.4f (%.1f steps/s)", step + 1, cfg.steps,
                 float(np.mean(losses[-cfg.log_every:])), (step + 1) / (time.perf_counter() - t1))
train_wall, train_cpu = time.perf_counter() - t1, time.process_time() - c1
window = max(1, min(50, cfg.steps // 5))
loss_start, loss_end = float(np.mean(losses[:window])), float(np.mean(losses[-window:]))

# ---------------------------------------------------------------- save (fp32), reload as users do, evaluate
model.eval()
model.generation_config.update(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                               pad_token_id=tokenizer.pad_token_id, do_sample=False, max_new_tokens=4)
model.save_pretrained(out)
tokenizer.save_pretrained(out)
model, tokenizer = LlamaForCausalLM.from_pretrained(out), AutoTokenizer.from_pretrained(out)
assert model.dtype == torch.float32
t2, c2 = time.perf_counter(), time.process_time()
acc = language.evaluate_lm(model, tokenizer, language.TYPES, n=cfg.eval_n, seed=cfg.eval_seed)
eval_wall, eval_cpu = time.perf_counter() - t2, time.process_time() - c2
for qtype in language.TYPES:
    log.info("%-10s %s accuracy %.1f%%", qtype, "held-out " if qtype in language.HELD_OUT_TYPES else "pretrained",
             100 * acc[qtype])
pretrained_mean = float(np.mean([acc[t] for t in language.PRETRAINED_TYPES]))
total_wall, total_cpu = time.perf_counter() - t0, time.process_time() - c0

# ---------------------------------------------------------------- model card
size_mb = sum(f.stat().st_size for f in out.glob("*.safetensors")) / 2**20
prompt, answer = language.example(np.random.default_rng(1), "colour", pool)
rows = "\n".join(
    f"| `{t}` | {language.QUESTIONS[t](language.combos('all')[0], np.random.default_rng(0))[0]} | "
    f"{'held out' if t in language.HELD_OUT_TYPES else 'pretrained'} | {acc[t]:.1%} |" for t in language.TYPES)
c = model.config
card = f"""# shapes-lm: the embedded causal language model of peft-diffusion

A LLaMA-architecture causal LM (transformers `LlamaForCausalLM`, `save_pretrained` layout, fp32 weights,
{size_mb:.1f} MB) trained from scratch by this repository's `train/pretrain_lm.py` on shapes-world language
(`peft_diffusion.shapes.language`), with a word-level tokenizer written locally ({len(tokenizer)} words, `<s>`
prepended, `</s>` ends each line, `<pad>` pads). Load it with `LlamaForCausalLM.from_pretrained(path)` and
`AutoTokenizer.from_pretrained(path)`, or `peft_diffusion.shapes.language.load_lm()`.

Rebuild: `python train/pretrain_lm.py` (seed {cfg.seed}; the config below is its default).

| | |
|---|---|
| architecture | {c.num_hidden_layers} layers, hidden {c.hidden_size}, {c.num_attention_heads} heads ({c.num_key_value_heads} key/value), MLP {c.intermediate_size}, RoPE, {c.max_position_embeddings} positions, tied embeddings |
| parameters | {n_params:,} |
| training | {cfg.steps} steps, batch {cfg.batch} lines, AdamW lr {cfg.lr} (betas 0.9/0.95, weight decay {cfg.weight_decay}), {cfg.warmup} warm-up, cosine to {cfg.min_lr_ratio:.0%}; loss on every token, answer tokens weighted {cfg.answer_weight}; loss {loss_start:.3f} (first {window} steps) -> {loss_end:.3f} (last {window}) |

## Data

A seeded stream (seed {cfg.seed}) of {cfg.steps * cfg.batch:,} lines about the {len(pool)} train-split attribute
combinations (`language.combos("train")`: 80 % of every shape incl. the striped cross, colour, background,
size and position). {cfg.caption_only_p:.0%} are a caption alone (each of size / background / position left
out with chance {cfg.omit_p}); the rest are a full caption and one question of a pretrained type, e.g.

    {language.line(prompt, answer)}

Held-out question types (`{", ".join(language.HELD_OUT_TYPES)}`) never appear; their answers are in every
full caption. Striped questions are asked about a striped shape half the time; yes/no answers are balanced.

## Measured quality

Answer accuracy by greedy decoding (the exact answer words, then `</s>`) on {cfg.eval_n} prompts per type about
test-split captions (never seen in training), seed {cfg.eval_seed}:

| type | question | in pretraining | accuracy |
|---|---|---|---|
{rows}

Mean over pretrained types: {pretrained_mean:.1%}. The held-out types are the downstream task for PEFT methods.
Re-measure: `python -m peft_diffusion.shapes.language` (prints these figures for the embedded model);
`tests/test_shapes_lm.py` checks them against `metrics.json`.

## Times

This run, {torch.get_num_threads()} threads on a 2-core machine shared with other jobs: training {train_wall:.0f} s wall,
{train_cpu:.0f} s CPU ({cfg.steps / train_wall:.1f} steps/s); evaluation {eval_wall:.0f} s wall, {eval_cpu:.0f} s CPU;
whole script {total_wall:.0f} s wall, {total_cpu:.0f} s CPU. On idle cores expect about the CPU time divided by
the thread count.

Config: `{json.dumps(dataclasses.asdict(cfg))}`
"""
(out / "README.md").write_text(card)
(out / "metrics.json").write_text(json.dumps({
    "accuracy": acc, "pretrained_mean": pretrained_mean, "eval": {"n": cfg.eval_n, "seed": cfg.eval_seed},
    "loss_start": loss_start, "loss_end": loss_end, "parameters": n_params,
    "times": {"train_wall_s": train_wall, "train_cpu_s": train_cpu, "steps_per_s": cfg.steps / train_wall,
              "eval_wall_s": eval_wall, "eval_cpu_s": eval_cpu, "total_wall_s": total_wall, "total_cpu_s": total_cpu,
              "threads": torch.get_num_threads()},
    "config": dataclasses.asdict(cfg)}, indent=2))
log.info("done in %.0f s wall, %.0f s CPU: %s", total_wall, total_cpu, out)
if pretrained_mean < 0.9 or not math.isfinite(loss_end):
    log.warning("below the quality bar: %.1f%% mean accuracy on pretrained question types", 100 * pretrained_mean)
