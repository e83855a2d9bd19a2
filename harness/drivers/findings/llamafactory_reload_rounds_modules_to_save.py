#!/usr/bin/env python3
"""LLaMA-Factory 0.9.5: reloading a LoRA adapter rounds its float32 `modules_to_save` copies to bf16.

Found by tunecheck's P3 (a model saved and loaded from its directory alone must give the same
eval logits): after 2 LoRA steps on a bf16 Gemma 2 with `embed_tokens` trained in full
(`additional_target`), the reloaded model's logits were 4.6e-3 (relative L2) away.

LLaMA-Factory trains every trainable parameter in float32, the `modules_to_save` copies included
(`llamafactory/model/adapter.py`, `init_adapter`: "Upcasting trainable params to float32"), and
the adapter file holds those float32 values. Reloading it — `adapter_name_or_path`, for
inference, export or further training — goes through `_setup_lora_tuning`, which calls PEFT's
`PeftModel.from_pretrained` first: PEFT makes the copy from the base module, in the base's
bf16, and loads the float32 values into it (rounding them to bf16); only then does
`init_adapter` upcast to float32. The reloaded copy is the trained one rounded to bf16, so the
model predicts differently from the one that was saved, and a resumed run continues from the
rounded values. (LoRA factors are not affected: PEFT upcasts those before loading.)

Measured with llamafactory 0.9.5, transformers 5.6.0, peft 0.18.1, torch 2.15.0 (CPU). Plain
public API, no tunecheck:

    pip install llamafactory==0.9.5
    CUDA_VISIBLE_DEVICES= python llamafactory_reload_rounds_modules_to_save.py

Prints (20-40 s on 2 cores, most of it importing): the file holds float32 values; the reloaded
copy is float32 but 1.6e-3 (relative L2) away from them — exactly their bf16 rounding.
"""
import os
import shutil
import tempfile

import torch
from llamafactory.hparams import get_train_args
from llamafactory.model import load_model, load_tokenizer
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

work = tempfile.mkdtemp(prefix="lf-reload-")
try:
    base, adapter = os.path.join(work, "base"), os.path.join(work, "adapter")
    vocab = {f"t{i}": i for i in range(32)}
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t0")),
                                  pad_token="t0", eos_token="t1")
    tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1, pad_token_id=0,
                                         eos_token_id=1, bos_token_id=1)).to(torch.bfloat16)
    model.save_pretrained(base)
    tok.save_pretrained(base)

    # The adapter a bf16 LLaMA-Factory run saves: a LoRA pair, and embed_tokens trained in float32.
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["embed_tokens"]))
    trained = peft_model.base_model.model.model.embed_tokens.modules_to_save["default"].float()
    with torch.no_grad():
        trained.weight.add_(torch.randn_like(trained.weight) * 1e-3)  # a training update
    peft_model.save_pretrained(adapter)
    saved = {k: v for k, v in load_file(os.path.join(adapter, "adapter_model.safetensors")).items() if "embed" in k}
    (key, values), = saved.items()

    # LLaMA-Factory's reload of that adapter (as `llamafactory-cli train` / `export` / `chat` do).
    args = dict(stage="sft", do_train=True, finetuning_type="lora", model_name_or_path=base,
                adapter_name_or_path=adapter, template="empty", dataset="unused", bf16=True, use_cpu=True,
                output_dir=os.path.join(work, "out"), overwrite_output_dir=True, report_to="none")
    model_args, data_args, training_args, finetuning_args, _ = get_train_args(args)
    reloaded = load_model(load_tokenizer(model_args)["tokenizer"], model_args, finetuning_args, is_trainable=True)
    copy = reloaded.base_model.model.model.embed_tokens.modules_to_save["default"].weight.detach()

    rel = float((copy.float() - values).norm() / values.norm())
    rounding = float((values.bfloat16().float() - values).norm() / values.norm())
    print(f"{key}: saved as {values.dtype}, reloaded as {copy.dtype}")
    print(f"reloaded vs saved: relative L2 {rel:.3e}; the saved values' own bf16 rounding: {rounding:.3e}")
    print("BUG: the reload rounded the trained copy to bf16" if rel > 0 else "ok: reloaded exactly")
finally:
    shutil.rmtree(work, ignore_errors=True)
