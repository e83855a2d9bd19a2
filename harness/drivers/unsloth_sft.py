#!/usr/bin/env python3
"""tunecheck driver for Unsloth's CPU backend (driver protocol v1, PROTOCOL.md).

Run by tunecheck, not by hand:

    tunecheck check --trainer "python harness/drivers/unsloth_sft.py"

On a machine where torch sees no accelerator, `import unsloth` selects its CPU backend:
`FastLanguageModel` is `unsloth_zoo.cpu.FastCPUModel` — stock transformers + PEFT + TRL with
Unsloth's dtype policy, bitsandbytes 4-bit, a chunked cross entropy and trainer defaults it
installs into `TrainingArguments`/`SFTConfig` and TRL's `SFTTrainer` at import. What is judged is
that documented path, with nothing written here to make a property pass:
  * `build`: `FastLanguageModel.from_pretrained` on the synthetic checkpoint (`dtype` the model's,
    `load_in_4bit` for a 4-bit setup: Unsloth's own NF4 + double quantization with the model's
    dtype as compute dtype), then `FastLanguageModel.get_peft_model` with the adapter's
    configuration (rank, alpha, targets, dropout, rsLoRA, `modules_to_save`; gradient
    checkpointing as Unsloth sets it up); tunecheck's seeded initial adapter values are then put
    in with PEFT's `set_peft_model_state_dict` (every key must land);
  * training is TRL's `SFTTrainer` as patched by Unsloth (chunked cross entropy over the plain
    LM head of Llama and Gemma, `adamw_torch` swapped for `adamw_torch_fused`, bf16 mixed
    precision only on a CPU with native bf16), driven as `trl_sft.py` drives it: TRL prepares and
    collates pre-tokenized examples with a completion mask, `Trainer.train()` for `fit`, its
    checkpoints for `save`;
  * eval-mode logits go through `FastLanguageModel.for_inference` (what Unsloth's docs call
    before generating) and train-mode ones through `FastLanguageModel.for_training`;
  * `load`: `FastLanguageModel.from_pretrained` on the saved adapter directory — Unsloth's
    documented reload, which loads the base the adapter names (`base_model_name_or_path`, pointed
    at the base copied beside it, as a user shipping both does) and the adapter on top, trainable
    — then the Trainer's own loaders for optimizer, scheduler, RNG and state.

`--prequantized` loads a 4-bit setup's base from the pre-quantized checkpoint beside it
(`from_pretrained(..., load_in_4bit=True)` on it, as on Unsloth's own `-bnb-4bit` uploads): there
Unsloth keeps the checkpoint's configuration — any quant type, double quantization, compute
dtype and blocksize — so no 4-bit case is set aside.

`--attn-implementation NAME` passes the attention implementation to `from_pretrained` (default:
none, as Unsloth's examples; transformers then picks SDPA, which ignores Gemma 2's attention soft
cap: findings/unsloth_cpu_gemma2_sdpa_drops_softcap.py).

What this stack cannot take is refused as unsupported, naming why: float16 (Unsloth's CPU backend
replaces it by bfloat16 or float32), quantizing at load a 4-bit configuration other than
Unsloth's (its `from_pretrained` builds NF4, double quantization, compute dtype = model dtype,
blocks of 64, and drops a `quantization_config` passed to it), and a model that Unsloth loaded differently from
what was asked (another dtype, or 16-bit weights where bitsandbytes refused the layers).
"""
import json
import os

import tunecheck_driver as td  # first: moves library prints off the protocol channel

import unsloth  # noqa: E402  (before trl: installs its CPU defaults into TRL and transformers)
from unsloth import FastLanguageModel  # noqa: E402

import peft  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
import trl  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

import transformers_peft as tf  # noqa: E402
import trl_sft  # noqa: E402
from tunecheck_driver import Refusal  # noqa: E402

# Fields of an adapter configuration `get_peft_model` takes, and the neutral value of every other
# field tunecheck writes (a non-neutral one is a configuration Unsloth's call cannot express).
NEUTRAL = {"bias": "none", "layers_to_transform": None, "layers_pattern": None, "rank_pattern": {},
           "alpha_pattern": {}, "fan_in_fan_out": False, "use_dora": False, "init_lora_weights": True,
           "ensure_weight_tying": False}


def is_unsloths_4bit(q, dtype_name):
    """Whether tunecheck's 4-bit configuration is the one Unsloth's `load_in_4bit` builds: NF4,
    double quantization, bitsandbytes' blocks of 64, the model's dtype as compute dtype."""
    return (q["bnb_4bit_quant_type"] == "nf4" and bool(q["bnb_4bit_use_double_quant"])
            and q.get("tunecheck_blocksize", 64) == 64 and tf.compute_dtype_name(q) == dtype_name)


# `--attn-implementation NAME`: what a user passes to `from_pretrained` to choose the attention
# (default: none, as Unsloth's examples do; transformers then picks SDPA, which drops Gemma 2's
# attention soft cap — `eager` judges the rest of Gemma 2 beneath that bug).
ATTN = None


class Subject(trl_sft.Subject):
    def load_model(self, base_dir, adapter_dir, work, reload):
        dtype_name = self.setup["dtype"]
        dtype = tf.DTYPES[dtype_name]
        q = self.setup.get("quantization")
        if q is not None and not tf.prequantized(base_dir) and not is_unsloths_4bit(q, dtype_name):
            # One message for every such case (a skip names each distinct reason once).
            raise Refusal("a 4-bit configuration other than Unsloth's load_in_4bit (NF4, double quantization, "
                          "blocks of 64, compute dtype = the model's)", kind="unsupported")
        kw = dict(dtype=dtype, load_in_4bit=q is not None, max_seq_length=2048)
        if ATTN is not None:
            kw["attn_implementation"] = ATTN
        if reload:
            model, tokenizer = FastLanguageModel.from_pretrained(adapter_dir, **kw)
        else:
            model, tokenizer = FastLanguageModel.from_pretrained(base_dir, **kw)
            model = self.peft_model(model, adapter_dir)
        self.tokenizer = tokenizer
        if model.dtype != dtype:
            raise Refusal(f"Unsloth loaded the {dtype_name} checkpoint as {model.dtype}", kind="unsupported")
        n4 = sum(type(m).__name__ == "Linear4bit" for m in model.modules())
        if (q is not None) != (n4 > 0):
            raise Refusal(f"Unsloth loaded {n4} 4-bit layers for a {'4-bit' if q else 'dense'} setup "
                          "(it falls back to 16-bit weights where bitsandbytes refuses a layer)", kind="unsupported")
        return model

    def peft_model(self, model, adapter_dir):
        """`FastLanguageModel.get_peft_model` with the adapter's configuration, then tunecheck's
        initial values."""
        with open(os.path.join(adapter_dir, "adapter_config.json")) as f:
            cfg = json.load(f)
        for k, v in NEUTRAL.items():
            if k in cfg and cfg[k] != v and not (k == "init_lora_weights" and cfg[k] is not False):
                raise Refusal(f"adapter field {k}={cfg[k]!r} is not expressible through get_peft_model",
                              kind="unsupported")
        targets = cfg["target_modules"]
        if isinstance(targets, str) or {"embed_tokens", "lm_head"} & set(targets):
            # Unsloth trains embed_tokens / lm_head named as targets in full, not as LoRA.
            raise Refusal(f"LoRA targets {targets!r}: Unsloth trains embedding targets in full", kind="unsupported")
        model = FastLanguageModel.get_peft_model(
            model, r=cfg["r"], target_modules=list(targets), lora_alpha=cfg["lora_alpha"],
            lora_dropout=cfg["lora_dropout"], bias="none", use_rslora=bool(cfg.get("use_rslora", False)),
            modules_to_save=cfg.get("modules_to_save") or None, random_state=int(self.tc["seed"]))
        values = load_file(os.path.join(adapter_dir, "adapter_model.safetensors"))
        result = peft.set_peft_model_state_dict(model, values)
        unexpected = list(getattr(result, "unexpected_keys", []) or [])
        trainable = {td.saved_key(n) for n, p in model.named_parameters() if p.requires_grad}
        missing = sorted(trainable - set(values))
        if unexpected or missing:
            raise RuntimeError(f"the initial adapter does not fit get_peft_model's: unexpected {unexpected[:4]}, "
                               f"missing {missing[:4]}")
        return model

    def logits(self, req):
        if req["mode"] == "eval":
            FastLanguageModel.for_inference(self.model)
            try:
                return super().logits(req)
            finally:
                FastLanguageModel.for_training(self.model)
        FastLanguageModel.for_training(self.model)
        return super().logits(req)

    def save(self, req):
        out = super().save(req)
        # The adapter names its base by the path it was loaded from; the copy beside it is the one
        # a reload from this directory alone must use.
        d = req["dir"]
        cfg_path = os.path.join(d, "checkpoint", "adapter_config.json")
        with open(cfg_path) as f:
            cfg = json.load(f)
        cfg["base_model_name_or_path"] = os.path.join(d, "base")
        with open(cfg_path + ".tmp", "w") as f:
            json.dump(cfg, f, indent=2)
        os.replace(cfg_path + ".tmp", cfg_path)
        return out


def main():
    import argparse
    ap = argparse.ArgumentParser(description="tunecheck driver for Unsloth's CPU backend")
    ap.add_argument("--attn-implementation", default=None,
                    help="passed to FastLanguageModel.from_pretrained (default: none, Unsloth's default)")
    tf.add_base_options(ap)
    opts = ap.parse_args()
    tf.set_base_options(opts)
    global ATTN
    ATTN = opts.attn_implementation
    from unsloth_zoo.cpu import cpu_bf16_supported, cpu_bnb_4bit_supported
    import unsloth_zoo

    def hello():
        return tf.hello_fields(
            "unsloth-cpu" + (f" (attn_implementation={ATTN})" if ATTN else "") + tf.base_label(),
            f"unsloth {unsloth.__version__}, unsloth_zoo {unsloth_zoo.__version__}, trl {trl.__version__}, "
            f"transformers {transformers.__version__}, peft {peft.__version__}, torch {torch.__version__}, "
            f"native bf16 {cpu_bf16_supported()}",
            {"f32", "bf16"}, quant4=tf.bnb_version() is not None and cpu_bnb_4bit_supported(),
            lacking={"f16": "Unsloth's CPU backend loads float16 models as bfloat16 (CPUs with native bf16) or "
                            "float32"})

    tf.serve_subjects(Subject, hello, "tunecheck-unsloth")


if __name__ == "__main__":
    main()
