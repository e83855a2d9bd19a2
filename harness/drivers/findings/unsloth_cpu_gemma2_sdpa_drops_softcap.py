#!/usr/bin/env python3
"""Unsloth's CPU backend trains Gemma 2 without its attention soft cap (transformers' SDPA path).

Found by tunecheck's P10 (the step loss and gradients must equal an f64 re-run of the model at
the subject's values): on Gemma 2, Unsloth's CPU backend is off by 9e-4 relative in the loss of
an f32 model whose attention logits reach the soft cap.

`FastLanguageModel.from_pretrained` on CPU (`unsloth_zoo/cpu/loader.py`,
`FastCPUModel.from_pretrained`) passes no `attn_implementation` ("Left to transformers when
unset"), and transformers 5.x then picks SDPA for Gemma 2. Gemma 2's attention hands
`softcap=config.attn_logit_softcapping` to the attention function
(`transformers/models/gemma2/modeling_gemma2.py`, `Gemma2Attention.forward`): the eager function
applies `tanh(scores / cap) * cap`, the SDPA one (`transformers/integrations/sdpa_attention.py`)
silently ignores the argument. The model trained and evaluated is then not Gemma 2: every
attention score above the cap passes uncapped. Unsloth's GPU path applies the soft cap in its
own Gemma 2 attention (`unsloth/models/gemma2.py`); passing `attn_implementation="eager"` to
`from_pretrained` avoids it on CPU.

Measured with unsloth 2026.10.9 (unsloth_zoo 2026.10.9), transformers 5.17.0, torch 2.14.1,
on a CPU. Plain public API, no tunecheck; runs in seconds:

    pip install unsloth   # on a machine without a GPU: the CPU backend
    python unsloth_cpu_gemma2_sdpa_drops_softcap.py

Prints (13 s on 2 cores): attention implementation sdpa; loss 3.479156 against 3.487299; logits
1.2e-1 apart (relative L2).
"""
import atexit
import shutil
import tempfile

import unsloth  # noqa: F401  (selects the CPU backend when torch sees no accelerator)
from unsloth import FastLanguageModel

import torch  # noqa: E402
from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402
from transformers import AutoModelForCausalLM, Gemma2Config, Gemma2ForCausalLM, PreTrainedTokenizerFast  # noqa: E402

work = tempfile.mkdtemp(prefix="unsloth-gemma2-softcap-")
atexit.register(shutil.rmtree, work, True)
vocab = {f"t{i}": i for i in range(32)}
tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t0")), pad_token="t0",
                              eos_token="t1")
tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
tok.save_pretrained(work)
# A small Gemma 2 with the usual soft caps (attention 50, final 30) whose attention scores pass
# the cap: query and key projections scaled up, as trained models' outlier heads are.
config = Gemma2Config(vocab_size=32, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16,
                      sliding_window=8, attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
                      pad_token_id=0, eos_token_id=1, bos_token_id=1)
torch.manual_seed(0)
model = Gemma2ForCausalLM(config)
with torch.no_grad():
    for name, p in model.named_parameters():
        if "q_proj" in name or "k_proj" in name:
            p.mul_(30)
model.save_pretrained(work)

ids = torch.randint(2, 32, (2, 16))
labels = ids.clone()

unsloth_model, _ = FastLanguageModel.from_pretrained(work, dtype=torch.float32, load_in_4bit=False)
eager = AutoModelForCausalLM.from_pretrained(work, dtype=torch.float32, attn_implementation="eager")
unsloth_model.eval()
eager.eval()
with torch.no_grad():
    a = unsloth_model(input_ids=ids, labels=labels)
    b = eager(input_ids=ids, labels=labels)
rel = float((a.logits - b.logits).norm() / b.logits.norm())
print(f"Unsloth's attention implementation: {unsloth_model.config._attn_implementation}")
print(f"loss: Unsloth {float(a.loss):.6f}, Gemma 2 (eager, soft-capped) {float(b.loss):.6f}")
print(f"logits: relative L2 difference {rel:.3e} (f32 rounding would be ~1e-7)")
print("BUG: attention soft cap ignored" if rel > 1e-5 else "ok: same model")
