#!/usr/bin/env python3
"""LLaMA-Factory 0.9.5: the loss is divided by the unshifted label count (transformers <= 5.10.0).

Found by tunecheck's P10 (the step's unmasked target tokens, counted after the causal shift, must
equal the reference's): LLaMA-Factory's `CustomSeq2SeqTrainer` counted 58 target tokens where a
step of 3 micro-batches of 2 rows has 52.

LLaMA-Factory 0.9.5 requires transformers <= 5.6.0. Its trainer inherits
`Trainer._get_num_items_in_batch` (transformers/trainer.py), which counts `labels != -100` over the
whole label tensor, and hands that count to the model as `num_items_in_batch`, the loss's
denominator. The causal loss never predicts position 0 (the labels are shifted left by one), so
every row whose first label is not -100 adds one token that has no loss term: the loss and every
gradient shrink by shifted/unshifted (here 52/58). transformers fixed the count in 5.10.1 (PR
#46204: count the shifted labels); LLaMA-Factory's pin keeps its users on the old count. It bites
wherever row starts are trained (`train_on_prompt`, pretraining data, templates without a
prompt); a prompt-masked SFT row starts with -100 and is counted right.

Measured with llamafactory 0.9.5, transformers 5.6.0, torch 2.15.0 (CPU). Plain public API, no
tunecheck; CPU:

    pip install llamafactory==0.9.5
    python llamafactory_num_items_counts_unshifted_labels.py

Prints (20-40 s on 2 cores, most of it importing): the Trainer's count 12 against 10 shifted
targets, and the step loss 2.8804 against the token mean 3.4565 (ratio 10/12).
"""
import tempfile

import torch
from transformers import LlamaConfig, LlamaForCausalLM
from llamafactory.hparams import FinetuningArguments, TrainingArguments
from llamafactory.train.sft.trainer import CustomSeq2SeqTrainer

torch.manual_seed(0)
model = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                     num_attention_heads=2, num_key_value_heads=1, pad_token_id=None))
ids = torch.randint(0, 32, (2, 6))
batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}  # every position trained

with tempfile.TemporaryDirectory() as out:
    args = TrainingArguments(output_dir=out, per_device_train_batch_size=2, use_cpu=True, report_to=[])
    trainer = CustomSeq2SeqTrainer(model=model, args=args, finetuning_args=FinetuningArguments(),
                                   tokenizer=None, processor=None)
    _, counted = trainer.get_batch_samples(iter([batch]), 1, torch.device("cpu"))
    shifted = int((batch["labels"][:, 1:] != -100).sum())
    with torch.no_grad():
        step_loss = float(model(**batch, num_items_in_batch=counted).loss)
        token_mean = float(model(**batch).loss)
print(f"targets counted by the Trainer: {int(counted)}, after the causal shift: {shifted}")
print(f"step loss {step_loss:.4f}, token mean {token_mean:.4f} (ratio {step_loss / token_mean:.4f})")
print("BUG: loss divided by the unshifted count" if int(counted) != shifted else "ok")
