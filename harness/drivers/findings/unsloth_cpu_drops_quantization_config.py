#!/usr/bin/env python3
"""Unsloth's CPU backend silently replaces a user's 4-bit `quantization_config` by its own.

Found while putting Unsloth under tunecheck's properties (the 4-bit setups carry a quant type,
double quantization and compute dtype, as a `BitsAndBytesConfig` does): whatever
`quantization_config` is passed to `FastLanguageModel.from_pretrained`, the model is quantized
with NF4, double quantization and the model's dtype as compute dtype.

`FastCPUModel.from_pretrained` (`unsloth_zoo/cpu/loader.py`) pops `quantization_config` from its
keyword arguments together with GPU-only options and, with `load_in_4bit=True` (its default),
builds its own `BitsAndBytesConfig(nf4, double quant, compute dtype = dtype)`; with
`load_in_4bit=False` the given config is dropped too and the model loads in 16 bits. No warning
says so. A user who quantized with FP4, without double quantization or with another compute
dtype — or who reloads an adapter trained on such a base — gets a different base than asked for:
the save/reload drift "a different 4-bit config on reload".

Measured with unsloth 2026.10.9 (unsloth_zoo 2026.10.9), transformers 5.17.0, bitsandbytes
0.50.2, torch 2.14.1, on a CPU. Plain public API, no tunecheck:

    pip install unsloth bitsandbytes   # on a machine without a GPU: the CPU backend
    python unsloth_cpu_drops_quantization_config.py

Prints (about 20 s, most of it importing): asked fp4 / no double quant / float32 compute, got
nf4 / double quant / the model's dtype.
"""
import shutil
import tempfile

import unsloth  # noqa: F401  (selects the CPU backend when torch sees no accelerator)
from unsloth import FastLanguageModel

import torch  # noqa: E402
from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402
from transformers import BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast  # noqa: E402

work = tempfile.mkdtemp(prefix="unsloth-quant-config-")
try:
    vocab = {f"t{i}": i for i in range(64)}
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t0")),
                                  pad_token="t0", eos_token="t1")
    tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save_pretrained(work)
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=128, intermediate_size=256, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=1, pad_token_id=0, eos_token_id=1,
                                 bos_token_id=1)).to(torch.bfloat16).save_pretrained(work)

    asked = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_use_double_quant=False,
                               bnb_4bit_compute_dtype=torch.float32)
    model, _ = FastLanguageModel.from_pretrained(work, dtype=torch.bfloat16, load_in_4bit=True,
                                                 quantization_config=asked)
    layer = model.model.layers[0].self_attn.q_proj
    state = layer.weight.quant_state
    got = (state.quant_type, state.nested, layer.compute_dtype)
    print(f"asked: quant type fp4, double quant False, compute dtype {torch.float32}")
    print(f"got:   quant type {got[0]}, double quant {got[1]}, compute dtype {got[2]}")
    print("BUG: the quantization_config was replaced" if got != ("fp4", False, torch.float32) else "ok")
finally:
    shutil.rmtree(work, ignore_errors=True)
