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
without packing (this driver sets none).

`--packing STRATEGY` judges `SFTConfig(packing=True, packing_strategy=STRATEGY)` with TRL's
default `max_length` (1024) — "bfd" (TRL's default: best-fit bins, `position_ids` restarting
per example, padding-free collation), "bfd_split" or "wrapped" (the examples concatenated and
cut into rows, an all-ones attention mask: each example attends to the ones before it) — on
each micro-batch tunecheck gives: TRL's own preparation (`_prepare_dataset` with packing: the
labels from the completion mask, then `pack_dataset`) packs the examples of one micro-batch,
TRL's collator collates the result, and `fit` trains on those packed micro-batches in order
(`dataset_kwargs={"skip_prepare_dataset": True}`, one packed row per micro-batch). Packing the
whole training set at once, as `SFTTrainer` does with the raw dataset, re-forms the
micro-batches (bins mix examples of different micro-batches, and their number changes), which
no property's reference can follow; packing within each micro-batch judges what packing does to
the training signal while keeping tunecheck's steps. The driver checks that no token was
dropped or added (a micro-batch longer than `max_length` is refused as unsupported).

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
# `--packing STRATEGY`: TRL's packing applied to each micro-batch (None: no packing).
PACKING = None
# TRL's default `max_length`, which packing needs: the length of a packed row.
PACK_LENGTH = 1024


class Subject(tf.Subject):
    def __init__(self, base_dir, adapter_dir, train_json, work, reload=False):
        self.tokenizer = AutoTokenizer.from_pretrained(base_dir)
        super().__init__(base_dir, adapter_dir, train_json, work, reload)

    def training_arguments(self, **kw):
        # What a user writes for the model's dtype: mixed precision only for a bf16 model (TRL's
        # default is bf16=True, which would compute an f32 model in bf16). No truncation
        # (`max_length=None`): the sequences are a dozen tokens, and with a length TRL also drops
        # examples without a label, which would change the batches tunecheck gives.
        if PACKING:
            extra = dict(packing=True, packing_strategy=PACKING, max_length=PACK_LENGTH,
                         dataset_kwargs={"skip_prepare_dataset": True})
        else:
            extra = dict(max_length=None, padding_free=PADDING_FREE)
        return SFTConfig(completion_only_loss=True, bf16=self.setup["dtype"] == "bf16", **extra, **kw)

    def trainer_class(self):
        return SFTTrainer

    def make_trainer(self, accum, epochs, eval_on, train=None, evals=None, rows=1):
        # SFTTrainer insists on a training set even where it only takes single steps or
        # evaluates: one example of one word it never trains on.
        if train is None:
            if PACKING:  # already prepared: the packed micro-batches are TRL's preparation's output
                row = {"input_ids": [[4, 4]], "labels": [[4, 4]]}
                if PACKING != "wrapped":
                    row["seq_lengths"] = [[2]]
                train = datasets.Dataset.from_dict(row)
            else:
                train = datasets.Dataset.from_dict({"input_ids": [[4, 4]], "completion_mask": [[1, 1]]})
        return super().make_trainer(accum, epochs, eval_on, train, evals, rows)

    def trainer_kwargs(self):
        return {"processing_class": self.tokenizer}

    def dataset(self, paths):
        """The rows of the batch files as TRL's pre-tokenized examples, and the rows per
        micro-batch (the per-device batch size that gives back tunecheck's micro-batches); with
        `--packing`, each micro-batch packed by TRL into one row."""
        if PACKING:
            rows = [self.packed(p) for p in paths]
            if any(len(r) != 1 for r in rows):
                raise Refusal(f"a micro-batch packs into {max(map(len, rows))} rows of {PACK_LENGTH} tokens",
                              kind="unsupported")
            return datasets.concatenate_datasets(rows), 1
        return self.examples(paths)

    def packed(self, path):
        """TRL's preparation with packing of one micro-batch's examples; every token kept."""
        t = self.trainer
        ds, _ = self.examples([path])
        out = t._prepare_dataset(ds, self.tokenizer, t.args, True, None, "train")
        given, kept = sum(map(len, ds["input_ids"])), sum(map(len, out["input_ids"]))
        if given != kept:
            raise Refusal(f"TRL's packing kept {kept} of {given} tokens (max_length {PACK_LENGTH})", kind="unsupported")
        return out

    def examples(self, paths):
        """The rows of the batch files as TRL's pre-tokenized examples, and the rows per
        micro-batch."""
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
        if PACKING:
            out = []
            for p in paths:
                rows = self.packed(p)
                out.append(t.data_collator([rows[j] for j in range(len(rows))]))
            return out
        ds, rows = self.examples(paths)
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
    ap.add_argument("--packing", choices=["bfd", "bfd_split", "wrapped"], default=None,
                    help="judge SFTConfig(packing=True) with this packing_strategy, applied to each micro-batch")
    tf.add_base_options(ap)
    opts = ap.parse_args()
    tf.set_base_options(opts)
    global PADDING_FREE, PACKING
    PADDING_FREE, PACKING = opts.padding_free, opts.packing
    if PADDING_FREE and PACKING:
        ap.error("--padding-free and --packing: packing chooses its own collation")
    dtypes = set(opts.dtypes.split(","))
    if not dtypes <= set(tf.DTYPES):
        ap.error(f"--dtypes: {opts.dtypes!r} is not a subset of f32,bf16,f16")

    def hello():
        return tf.hello_fields("trl+peft" + (" (padding_free)" if PADDING_FREE else "")
                               + (f" (packing {PACKING})" if PACKING else "") + tf.base_label(),
                               f"trl {trl.__version__}, transformers {transformers.__version__}, peft {peft.__version__}, "
                               f"datasets {datasets.__version__}, torch {torch.__version__}", dtypes)

    tf.serve_subjects(Subject, hello, "tunecheck-trl")


if __name__ == "__main__":
    main()
