"""Soft prompts learning the held-out question types of the embedded shapes LM (``background``, ``position``).

    python samples/lm_prompt_table.py [--methods prompt-tuning,p-tuning,lora] [--steps 600] [--tokens 16]

The embedded LM (peft_diffusion/models/shapes-lm) answers its pretrained question types and 0 % of the
held-out ones, whose answers are in every caption. Each method trains on train-split (prompt, answer) lines of
the held-out types (loss on the answer words and ``</s>`` only), same steps, batch and seed, then
``language.evaluate_lm`` reads greedy-decoded answers on 200 test-split prompts per type (captions never seen),
for the held-out types and for the pretrained ones (drift). Prints a Markdown table. LoRA (r 4 on the llama
preset) is the reference at the same budget. About 40 CPU seconds of training a method on one thread.
"""
import argparse
import time

import torch

import peft_diffusion as pd
from peft_diffusion.shapes import language

METHODS = {  # config, learning rate
    "prompt-tuning": (lambda n: pd.PromptTuning(num_virtual_tokens=n, init="text",
                                                init_text="what colour is the background? where is the shape?"), 0.1),
    "p-tuning": (lambda n: pd.PTuning(num_virtual_tokens=n, encoder="mlp", encoder_hidden_size=128), 1e-2),
    "lora": (lambda n: pd.LoRA(r=4), 3e-3),
}


def batch(tokenizer, rows):
    """ids, mask, labels (-100 on padding and on the prompt: the loss reads the answer and </s>)."""
    lines = [language.line(p, a) + tokenizer.eos_token for _, p, a in rows]
    enc = tokenizer(lines, padding=True, return_tensors="pt")
    labels = enc.input_ids.masked_fill(enc.attention_mask == 0, -100)
    for i, (_, p, _) in enumerate(rows):
        labels[i, :len(tokenizer(p).input_ids)] = -100
    return enc.input_ids, enc.attention_mask, labels


def run(method, args, data):
    model, tokenizer = language.load_lm()
    pd.methods.token_rows.set_tokenizer(model, tokenizer)
    make, lr = METHODS[method]
    lr = args.lr.get(method, lr)
    torch.manual_seed(args.seed)
    pd.inject(model, make(args.tokens), method)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(args.seed)
    model.train()
    start, losses = time.process_time(), []
    for step in range(args.steps):
        pick = torch.randint(len(data), (args.batch,), generator=g).tolist()
        ids, mask, labels = batch(tokenizer, [data[i] for i in pick])
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    cpu = time.process_time() - start
    acc = language.evaluate_lm(model, tokenizer, language.TYPES, n=args.eval_n)
    return {"params": sum(p.numel() for p in params), "loss": (sum(losses[:20]) / 20, sum(losses[-20:]) / 20),
            "acc": acc, "cpu": cpu}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=16, help="virtual tokens of the soft prompts")
    parser.add_argument("--eval-n", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr", default="", help="learning rates to use instead, e.g. prompt-tuning=0.3,lora=1e-3")
    args = parser.parse_args()
    args.lr = {k: float(v) for k, v in (kv.split("=") for kv in args.lr.split(",") if kv)}
    torch.set_num_threads(1)
    data = language.examples(language.HELD_OUT_TYPES, 2000, seed=args.seed, split="train")
    base, tokenizer = language.load_lm()
    rows = {"base": {"params": 0, "loss": None, "acc": language.evaluate_lm(base, tokenizer, language.TYPES,
                                                                            n=args.eval_n), "cpu": 0.0}}
    for method in args.methods.split(","):
        rows[method] = run(method, args, data)
    pre = language.PRETRAINED_TYPES
    print(f"\n{args.steps} steps, batch {args.batch}, {args.tokens} virtual tokens, "
          f"{args.eval_n} test prompts a type\n")
    print("| method | trainable | loss first -> last 20 | background | position | pretrained (mean) | train CPU s |")
    print("|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        a = r["acc"]
        loss = "-" if r["loss"] is None else f"{r['loss'][0]:.3f} -> {r['loss'][1]:.3f}"
        print(f"| {name} | {r['params']:,} | {loss} | {a['background']:.1%} | {a['position']:.1%} | "
              f"{sum(a[t] for t in pre) / len(pre):.1%} | {r['cpu']:.0f} |")


if __name__ == "__main__":
    main()
