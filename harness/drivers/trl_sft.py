#!/usr/bin/env python3
"""tunecheck driver for TRL's SFTTrainer + PEFT LoRA (driver protocol v1, PROTOCOL.md).

Run by tunecheck, not by hand:

    tunecheck check --trainer "python harness/drivers/trl_sft.py"

TRL's own documented path, with nothing written here to make a property pass:
  * the model is transformers' loaded from the checkpoint tunecheck wrote, the adapter PEFT's
    (`PeftModel.from_pretrained(..., is_trainable=True)`), handed to `SFTTrainer` with the
    tokenizer saved beside the base as its `processing_class`;
  * the data are pre-tokenized examples, `input_ids` with a `completion_mask` (1 where
    tunecheck's labels are not -100), so TRL builds the labels (`completion_only_loss=True`),
    prepares the dataset and collates the micro-batches itself, for single steps as for `fit`;
  * the loss is `SFTTrainer.compute_loss` with TRL's defaults (its fused LM head, gradient
    checkpointing; `bf16` as a user sets it for the model's dtype), the accumulation and token
    count the Trainer's, and everything else as in `transformers_peft.py` (the Trainer's
    clipping, optimizer and scheduler for a step, `Trainer.train()` for `fit`, its checkpoints
    for `save`, its loaders for `load`).

`--padding-free` judges `SFTConfig(padding_free=True)`: TRL's collator flattens every
micro-batch into one row with `position_ids` restarting per example, and transformers builds a
per-example causal mask from them when there is no attention mask or KV cache (TRL trains with
`use_cache=False`), on eager and SDPA attention alike; TRL refuses it while `max_length` is set
without packing (this driver sets none). Packing is not judged here (it re-forms the
micro-batches from the whole dataset); measured directly, `packing_strategy="bfd"` (the
default) flattens the same way and keeps examples apart on eager and SDPA attention alike,
`"wrapped"` concatenates them so that each attends to the ones before it.

Labels that are not the input ids cannot be a completion mask: such a batch is refused as
unsupported (tunecheck's batches never have them). On a 4-bit base (bitsandbytes installed)
`SFTTrainer` casts the LoRA factors to bf16, and a run resumed from its checkpoint trains them
in f32: findings/trl_qlora_resume_upcasts_lora.py shows it without tunecheck.
"""

import tunecheck_driver as td  # first: moves library prints off the protocol channel

import datasets  # noqa: E402
import peft  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
import trl  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402
from trl import SFTConfig, SFTTrainer  # noqa: E402

import transformers_peft as tf  # noqa: E402
from tunecheck_driver import IGNORE, Refusal, load_batch  # noqa: E402


# `--padding-free`: TRL's padding-free batches (each micro-batch flattened into one row,
# `position_ids` restarting per example; transformers builds per-example masks from them).
PADDING_FREE = False


class Subject(tf.Subject):
    def __init__(self, base_dir, adapter_dir, train_json, work, reload=False):
        self.tokenizer = AutoTokenizer.from_pretrained(base_dir)
        super().__init__(base_dir, adapter_dir, train_json, work, reload)

    def training_arguments(self, **kw):
        # What a user writes for the model's dtype: mixed precision only for a bf16 model (TRL's
        # default is bf16=True, which would compute an f32 model in bf16). No truncation
        # (`max_length=None`): the sequences are a dozen tokens, and with a length TRL also drops
        # examples without a label, which would change the batches tunecheck gives.
        return SFTConfig(completion_only_loss=True, bf16=self.setup["dtype"] == "bf16", max_length=None,
                         padding_free=PADDING_FREE, **kw)

    def trainer_class(self):
        return SFTTrainer

    def make_trainer(self, accum, epochs, eval_on, train=None, evals=None, rows=1):
        # SFTTrainer insists on a training set even where it only takes single steps or
        # evaluates: one example of one word it never trains on.
        if train is None:
            train = datasets.Dataset.from_dict({"input_ids": [[4, 4]], "completion_mask": [[1, 1]]})
        return super().make_trainer(accum, epochs, eval_on, train, evals, rows)

    def trainer_kwargs(self):
        return {"processing_class": self.tokenizer}

    def dataset(self, paths):
        """The rows of the batch files as TRL's pre-tokenized examples, and the rows per
        micro-batch (the per-device batch size that gives back tunecheck's micro-batches)."""
        ids, masks, rows = [], [], set()
        for p in paths:
            b = load_batch(p)
            if not bool((b["attention_mask"] == 1).all()):
                raise Refusal("left-padded batches are not expressible as TRL examples", kind="unsupported")
            labels, x = b["labels"], b["input_ids"]
            if not bool(((labels == x) | (labels == IGNORE)).all()):
                raise Refusal("labels other than the input ids cannot be a completion mask", kind="unsupported")
            rows.add(x.shape[0])
            ids += x.tolist()
            masks += (labels != IGNORE).long().tolist()
        if len(rows) > 1:
            raise Refusal(f"micro-batches of {sorted(rows)} rows: TRL batches a fixed number", kind="unsupported")
        return datasets.Dataset.from_dict({"input_ids": ids, "completion_mask": masks}), rows.pop()

    def micro_batches(self, paths):
        """TRL's preparation (labels from the completion mask) and collator, micro-batch by
        micro-batch, for a step outside `Trainer.train()`."""
        t = self.trainer
        ds, rows = self.dataset(paths)
        prepared = t._prepare_dataset(ds, self.tokenizer, t.args, False, None, "train")
        if len(prepared) != len(ds):
            raise RuntimeError(f"TRL's preparation kept {len(prepared)} of {len(ds)} examples")
        out = [t.data_collator([prepared[j] for j in range(i, i + rows)]) for i in range(0, len(prepared), rows)]
        if PADDING_FREE and any(b["input_ids"].shape[0] != 1 or "position_ids" not in b for b in out):
            raise RuntimeError("padding_free=True, but TRL's collator did not flatten the micro-batches")
        return out


def main():
    import argparse
    ap = argparse.ArgumentParser(description="tunecheck driver for TRL's SFTTrainer + PEFT")
    ap.add_argument("--dtypes", default="f32,bf16,f16",
                    help="model dtypes to declare (comma-separated among f32, bf16, f16; f32 is always taken)")
    ap.add_argument("--padding-free", action="store_true",
                    help="judge SFTConfig(padding_free=True): every micro-batch flattened into one row")
    opts = ap.parse_args()
    global PADDING_FREE
    PADDING_FREE = opts.padding_free
    dtypes = set(opts.dtypes.split(","))
    if not dtypes <= set(tf.DTYPES):
        ap.error(f"--dtypes: {opts.dtypes!r} is not a subset of f32,bf16,f16")

    def hello():
        return tf.hello_fields("trl+peft" + (" (padding_free)" if PADDING_FREE else ""),
                               f"trl {trl.__version__}, transformers {transformers.__version__}, peft {peft.__version__}, "
                               f"datasets {datasets.__version__}, torch {torch.__version__}", dtypes)

    tf.serve_subjects(Subject, hello, "tunecheck-trl")


if __name__ == "__main__":
    main()
