#!/usr/bin/env python3
"""TRL: resuming a QLoRA SFT run trains the LoRA factors in float32, a fresh run in bfloat16.

Found by tunecheck's P3 (a fit stopped mid-epoch, saved, reloaded and finished must equal the
fit that never stopped): with a 4-bit base, `SFTTrainer.__init__` casts every trainable
parameter to bfloat16 (trl/trainer/sft_trainer.py, "When using QLoRA, the PEFT adapter weights
are converted to bf16"). `trainer.train(resume_from_checkpoint=...)` then reloads the adapter
through transformers' `Trainer._load_from_checkpoint` -> PEFT `load_adapter`, whose default
`autocast_adapter_dtype=True` upcasts the factors to float32 — after TRL's cast, which is not
applied again. The resumed run trains float32 factors (with bf16 optimizer moments restored
into them) where the uninterrupted run trains bf16 ones, so the two end in different weights.

Measured with trl 1.16.0, transformers 5.23.0, peft 0.21.2, bitsandbytes 0.50.2, torch 2.15.0
(CPU). Plain public API, no tunecheck; runs in seconds on a CPU:

    pip install torch transformers peft trl datasets bitsandbytes tokenizers
    python trl_qlora_resume_upcasts_lora.py
"""
import os
import shutil
import sys
import tempfile

os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")

import datasets  # noqa: E402
import torch  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402
from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402
from transformers import (AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM,  # noqa: E402
                          PreTrainedTokenizerFast, TrainerCallback)
from trl import SFTConfig, SFTTrainer  # noqa: E402

work = tempfile.mkdtemp(prefix="trl-qlora-resume-")
base = os.path.join(work, "base")
vocab = {f"t{i}": i for i in range(32)}
tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t0")), pad_token="t0")
tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
torch.manual_seed(0)
LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2)).save_pretrained(base)
tok.save_pretrained(base)
data = datasets.Dataset.from_dict({"input_ids": [[(i * 5 + j * 3) % 31 + 1 for j in range(12)] for i in range(8)]})


def model():
    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)
    m = AutoModelForCausalLM.from_pretrained(base, quantization_config=q, dtype=torch.float32)
    torch.manual_seed(1)
    return get_peft_model(m, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))


dtypes = []


class LoraDtype(TrainerCallback):
    def on_step_begin(self, args, state, control, model=None, **kw):
        dtypes.append((state.global_step, next(p.dtype for n, p in model.named_parameters() if "lora_A" in n)))


def trainer(out, steps):
    args = SFTConfig(output_dir=out, per_device_train_batch_size=2, max_steps=steps, learning_rate=1e-2,
                     lr_scheduler_type="constant", bf16=False, max_length=None, save_strategy="steps", save_steps=2,
                     report_to=[], disable_tqdm=True, use_cpu=True, seed=0, logging_steps=100)
    return SFTTrainer(model=model(), args=args, train_dataset=data, processing_class=tok, callbacks=[LoraDtype()])


def lora(t):
    return {n: p.detach().float().clone() for n, p in t.model.named_parameters() if "lora_" in n}


straight = trainer(os.path.join(work, "a"), 4)
straight.train()
want, straight_dtypes = lora(straight), list(dtypes)
dtypes.clear()
trainer(os.path.join(work, "b"), 2).train()
resumed = trainer(os.path.join(work, "b"), 4)
resumed.train(resume_from_checkpoint=os.path.join(work, "b", "checkpoint-2"))
got = lora(resumed)
num = sum(float((got[n] - want[n]).norm() ** 2) for n in want) ** 0.5
den = sum(float(want[n].norm() ** 2) for n in want) ** 0.5
print("LoRA dtype at each step, uninterrupted run:", [str(d) for _, d in straight_dtypes])
print("LoRA dtype at each step, stopped at 2, resumed:", [f"{s}:{d}" for s, d in dtypes])
print(f"LoRA factors after 4 steps, resumed vs uninterrupted: relative L2 difference {num / den:.3e} (expected 0)")
shutil.rmtree(work, ignore_errors=True)
sys.exit(0 if num == 0 else 1)
