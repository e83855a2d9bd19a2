#!/usr/bin/env python3
"""tunecheck driver for LLaMA-Factory's SFT stage with LoRA (driver protocol v1, PROTOCOL.md).

Run by tunecheck, not by hand:

    tunecheck check --trainer "python harness/drivers/llamafactory_sft.py"

What `llamafactory-cli train` does for `stage: sft`, `finetuning_type: lora`
(`llamafactory.train.sft.workflow.run_sft`), object by object, with nothing written here to make a
property pass:
  * the arguments are LLaMA-Factory's own parse (`llamafactory.hparams.get_train_args`) of the
    configuration a user writes: `model_name_or_path` the synthetic base, `adapter_name_or_path`
    the adapter to continue training (LLaMA-Factory loads the last one trainable), `template:
    empty`, the recipe with transformers' names, `bf16: true` for a bf16 model, and for a 4-bit
    base `quantization_bit: 4` with the setup's `quantization_type` and `double_quantization`
    (with `--prequantized`, `model_name_or_path` the pre-quantized checkpoint and no
    `quantization_bit`: LLaMA-Factory then loads the checkpoint's own configuration);
  * the tokenizer (`load_tokenizer`, the one tunecheck writes beside the base), the template
    (`get_template_and_fix_tokenizer`), the model (`load_model(..., is_trainable=True)`:
    LLaMA-Factory's loader, its attention choice, gradient checkpointing and upcast of the
    trainable parameters to float32), its collator (`SFTDataCollatorWith4DAttentionMask`, padding
    to a multiple of 8) and its trainer (`CustomSeq2SeqTrainer`: its optimizer and scheduler
    creation, its loss);
  * the data are the pre-tokenized rows (`input_ids`, `attention_mask`, `labels`), the dataset a
    `tokenized_path` holds, collated by LLaMA-Factory's collator for single steps as for `fit`;
  * steps, `fit`, `save` and `load` as in `transformers_peft.py` (the Trainer's loop for a step,
    `Trainer.train()`, its checkpoints); `load` is LLaMA-Factory's own reload of a trained adapter:
    the same configuration with `adapter_name_or_path` the saved checkpoint.

What this stack cannot take is refused as unsupported, naming why: float16 models (LLaMA-Factory
trains half precision under autocast, which accelerate gives on CPU for bf16 only: its float32
`modules_to_save` copies then meet float16 activations), and, quantizing at load, a 4-bit
configuration whose compute dtype is not the one LLaMA-Factory derives (bf16 with `bf16: true`,
else float32) or whose blocks are not bitsandbytes' 64 (a pre-quantized base takes any).
"""
import json
import os
import random

os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")  # LLaMA-Factory picks its device by detection
os.environ.setdefault("LLAMAFACTORY_VERBOSITY", "WARN")

import tunecheck_driver as td  # noqa: E402  (first: moves library prints off the protocol channel)

import datasets  # noqa: E402
import llamafactory  # noqa: E402
import numpy as np  # noqa: E402
import peft  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from llamafactory.data import SFTDataCollatorWith4DAttentionMask, get_template_and_fix_tokenizer  # noqa: E402
from llamafactory.hparams import get_train_args  # noqa: E402
from llamafactory.model import load_model, load_tokenizer  # noqa: E402
from llamafactory.train.sft.trainer import CustomSeq2SeqTrainer  # noqa: E402

import transformers_peft as tf  # noqa: E402
from tunecheck_driver import IGNORE, Refusal, load_batch  # noqa: E402


def parse(args):
    """LLaMA-Factory's parse of a configuration, leaving the RNG as it was (it seeds on parsing,
    which a run does once: this driver parses for every trainer it makes)."""
    state = (torch.random.get_rng_state(), random.getstate(), np.random.get_state())
    try:
        return get_train_args(args)
    finally:
        torch.random.set_rng_state(state[0])
        random.setstate(state[1])
        np.random.set_state(state[2])


class Subject(tf.Subject):
    def config(self, **kw):
        """The configuration a user writes, as the dict `llamafactory-cli train` parses."""
        cfg = dict(stage="sft", do_train=True, finetuning_type="lora", model_name_or_path=self.base_dir,
                   adapter_name_or_path=self.adapter, template="empty", dataset="tunecheck",
                   overwrite_output_dir=True, use_cpu=True, report_to="none",
                   output_dir=os.path.join(self.work, "out"))
        if self.setup["dtype"] == "bf16":
            cfg["bf16"] = True
        q = self.setup.get("quantization")
        if q is not None and not tf.prequantized(self.base_dir):
            cfg.update(quantization_bit=4, quantization_type=q["bnb_4bit_quant_type"],
                       double_quantization=bool(q["bnb_4bit_use_double_quant"]))
        kw = {k: v for k, v in kw.items() if k not in ("report_to", "use_cpu")}
        cfg.update(kw)
        if cfg.get("eval_strategy", "no") != "no":
            cfg["eval_dataset"] = "tunecheck"
        return cfg

    def load_model(self, base_dir, adapter_dir, work, reload):
        dtype = self.setup["dtype"]
        if dtype == "f16":
            raise Refusal("LLaMA-Factory trains float16 models under autocast, which accelerate does not give on CPU",
                          kind="unsupported")
        q = self.setup.get("quantization")
        # Quantizing at load, LLaMA-Factory writes its own BitsAndBytesConfig (compute dtype and
        # storage = its compute dtype); a pre-quantized base keeps the checkpoint's configuration
        # (LLaMA-Factory passes none: "`quantization_bit` will not affect on the PTQ-quantized
        # models").
        if q is not None and not tf.prequantized(base_dir):
            if tf.compute_dtype_name(q) != dtype or q.get("tunecheck_blocksize", 64) != 64:
                raise Refusal("a 4-bit configuration other than LLaMA-Factory's (compute dtype bf16 with bf16: true, "
                              "else float32; bitsandbytes' blocks of 64)", kind="unsupported")
            self.check_storage(base_dir)
        self.adapter = td.adapter_for_this_peft(adapter_dir, os.path.join(work, "adapter"))
        model_args, data_args, _, self.finetuning_args, _ = parse(self.config())
        tm = load_tokenizer(model_args)
        self.tokenizer_module = tm
        template = get_template_and_fix_tokenizer(tm["tokenizer"], data_args)
        model = load_model(tm["tokenizer"], model_args, self.finetuning_args, is_trainable=True)
        if not isinstance(model, peft.PeftModel):
            raise RuntimeError(f"LLaMA-Factory's load_model gave a {type(model).__name__}, not the adapter's PeftModel")
        self.collator = SFTDataCollatorWith4DAttentionMask(
            template=template, model=model, pad_to_multiple_of=8, label_pad_token_id=IGNORE,
            block_diag_attn=model_args.block_diag_attn, neat_packing=data_args.neat_packing,
            attn_implementation=getattr(model.config, "_attn_implementation", None),
            compute_dtype=model_args.compute_dtype, **tm)
        return model

    def check_storage(self, base_dir):
        """LLaMA-Factory stores 4-bit weights in the compute dtype (`bnb_4bit_quant_storage`), and
        bitsandbytes can then pack a matrix only if its bytes of codes (two weights a byte) fill
        whole storage elements: refused as unsupported where a projection does not."""
        with open(os.path.join(base_dir, "config.json")) as f:
            c = json.load(f)
        h, inter = c["hidden_size"], c["intermediate_size"]
        heads, kv = c["num_attention_heads"], c.get("num_key_value_heads") or c["num_attention_heads"]
        hd = c.get("head_dim") or h // heads
        elem = 2 if self.setup["dtype"] == "bf16" else 4
        shapes = {"q_proj/o_proj": heads * hd * h, "k_proj/v_proj": kv * hd * h, "gate_proj/up_proj/down_proj": inter * h}
        for name, n in shapes.items():
            if n % (2 * elem):
                raise Refusal(f"LLaMA-Factory stores 4-bit codes in the compute dtype, and bitsandbytes cannot pack a "
                              f"matrix whose code bytes do not fill whole {elem}-byte elements ({name})",
                              kind="unsupported")

    def training_arguments(self, **kw):
        return parse(self.config(**kw))[2]

    def trainer_class(self):
        return CustomSeq2SeqTrainer

    def trainer_kwargs(self):
        return {"finetuning_args": self.finetuning_args, "data_collator": self.collator, **self.tokenizer_module}

    def dataset(self, paths):
        """The rows of the batch files as the dataset a `tokenized_path` holds, and the rows per
        micro-batch (the per-device batch size that gives back tunecheck's micro-batches)."""
        cols = {"input_ids": [], "attention_mask": [], "labels": []}
        rows = set()
        for p in paths:
            b = load_batch(p)
            rows.add(b["input_ids"].shape[0])
            for k in cols:
                cols[k] += b[k].tolist()
        if len(rows) > 1:
            raise Refusal(f"micro-batches of {sorted(rows)} rows: LLaMA-Factory batches a fixed number",
                          kind="unsupported")
        return datasets.Dataset.from_dict(cols), rows.pop()

    def micro_batches(self, paths):
        """LLaMA-Factory's collator, micro-batch by micro-batch, for a step outside
        `Trainer.train()`."""
        ds, rows = self.dataset(paths)
        return [self.collator([ds[j] for j in range(i, i + rows)]) for i in range(0, len(ds), rows)]


def main():
    import argparse
    ap = argparse.ArgumentParser(description="tunecheck driver for LLaMA-Factory's SFT stage with LoRA")
    tf.add_base_options(ap)
    tf.set_base_options(ap.parse_args())

    def hello():
        return tf.hello_fields(
            "llamafactory" + tf.base_label(),
            f"llamafactory {llamafactory.__version__}, transformers {transformers.__version__}, peft {peft.__version__}, "
            f"datasets {datasets.__version__}, torch {torch.__version__}",
            {"f32", "bf16"},
            lacking={"f16": "LLaMA-Factory trains float16 models under autocast, which accelerate gives on CPU for "
                            "bf16 only"})

    tf.serve_subjects(Subject, hello, "tunecheck-llamafactory")


if __name__ == "__main__":
    main()
