#!/usr/bin/env python3
"""PEFT: `modules_to_save` copies stay in the model's half precision while LoRA factors are upcast.

Found by tunecheck's P11 (small updates must not be lost to half-precision rounding: at lr 1e-5,
8 AdamW steps must change at least half the elements of every trainable tensor) and P4 (NaN
losses in float16).

`get_peft_model` / `PeftModel.from_pretrained` with the default `autocast_adapter_dtype=True`
upcast the parameters of LoRA layers to float32 (`peft/tuners/tuners_utils.py`,
`cast_adapter_dtype`: only `BaseTunerLayer`s), but a module named in `modules_to_save`
(`embed_tokens`, `lm_head`, often needed to learn new tokens) is copied as it is, in the model's
bf16 or f16 (related: peft#341). The optimizer then updates the copy in half precision:
  * bf16: an AdamW update (about lr = 1e-5 per element) is below half a bf16 ulp (2^-9
    relative) of every weight larger than about 5e-3, so only the elements near zero ever move
    while the LoRA factors train;
  * f16: AdamW's eps (1e-8) underflows to 0 in float16, and the squared gradients of most
    elements do too, so the first update divides by zero: the copy becomes NaN, and through the
    loss every other parameter after it (transformers' Trainer then logs NaN losses and a
    constant NaN eval loss).

Measured with peft 0.21.2, transformers 5.23.0, torch 2.15.0 (CPU). Plain public API, no
tunecheck:

    pip install torch transformers peft
    python peft_modules_to_save_half_precision.py

Prints (10-20 s, most of it importing): in bf16, 8 steps change the LoRA factor (float32) in
100 % of its elements and the lm_head copy (bf16) in 15.9 %; in f16, NaN everywhere.
"""
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM


def run(dtype):
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=False,
                                         pad_token_id=None)).to(dtype)
    model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"],
                                             init_lora_weights="gaussian"))
    params = dict(model.named_parameters())
    lora = params["base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight"]
    head = params["base_model.model.lm_head.modules_to_save.default.weight"]
    before = {"lora": lora.detach().clone(), "head": head.detach().clone()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5, eps=1e-8)
    ids = torch.randint(0, 32, (2, 12))
    for _ in range(8):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    for name, p in (("LoRA factor q_proj.lora_A", lora), ("lm_head copy (modules_to_save)", head)):
        key = "lora" if "LoRA" in name else "head"
        changed = float((p.detach() != before[key]).float().mean()) * 100
        nan = bool(torch.isnan(p).any())
        print(f"{str(dtype):15} {name:32} held in {str(p.dtype):15} changed {changed:5.1f} % of elements"
              + (", NaN" if nan else ""))


run(torch.bfloat16)
run(torch.float16)
print("BUG: the modules_to_save copy does not train in half precision (updates lost in bf16, NaN in f16)")
