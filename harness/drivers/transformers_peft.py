#!/usr/bin/env python3
"""tunecheck driver for transformers' Trainer + PEFT LoRA (driver protocol v1, PROTOCOL.md).

Run by tunecheck, not by hand:

    tunecheck check --trainer "python harness/drivers/transformers_peft.py"

What is judged is the framework's own machinery, never a loop written here:
  * the model is transformers' (eager attention) loaded from the Hugging Face checkpoint
    tunecheck wrote — for a 4-bit setup quantized as it loads by bitsandbytes
    (`from_pretrained(..., quantization_config=BitsAndBytesConfig(...))` with the recorded quant
    type, double quantization and compute dtype; bitsandbytes' blocks of 64 only), or with
    `--prequantized` loaded from the pre-quantized checkpoint tunecheck writes beside it (its
    own `quantization_config`, nothing passed at load) — the adapter PEFT's, loaded with
    `PeftModel.from_pretrained`;
  * the loss is the model's own from `labels` (transformers shifts them);
  * `gradients` and `step` run `Trainer.training_step` on each micro-batch exactly as
    `Trainer._inner_training_loop` does (the same token count `num_items_in_batch` from
    `Trainer.get_batch_samples` where the version has it, the same accumulation settings),
    then, for `step`, the Trainer's clipping, optimizer and scheduler;
  * `fit` is `Trainer.train()` itself (epochs, gradient accumulation, evaluation each epoch,
    the scheduler, resuming from a checkpoint written by `Trainer._save_checkpoint`);
  * `save` is `Trainer._save_checkpoint` (adapter, optimizer, scheduler, RNG and trainer
    state) plus a copy of the base; `load` rebuilds from that directory alone and restores
    with the Trainer's own loaders.

stdout carries the protocol only: everything the libraries print goes to stderr.
Works with transformers 4.45 .. 5.x and peft 0.13 .. current; what a version lacks (Gemma 3
before 4.50) is declared unsupported in the handshake.
"""
import json
import math
import os
import shutil

import tunecheck_driver as td  # first: moves library prints off the protocol channel

import torch  # noqa: E402
import transformers  # noqa: E402
import peft  # noqa: E402
from packaging.version import Version  # noqa: E402
from peft import PeftModel  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments  # noqa: E402
from tunecheck_driver import Refusal, base_key, first, load_batch, saved_key  # noqa: E402

TF = Version(transformers.__version__)
torch.set_num_threads(1)  # tiny models: threads only add overhead (results are the same)
DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}


def families():
    have, unsupported = ["llama"], {}
    for name, cls, since in [("gemma", "GemmaForCausalLM", "4.38"), ("gemma2", "Gemma2ForCausalLM", "4.42"),
                             ("gemma3", "Gemma3ForCausalLM", "4.50")]:
        if hasattr(transformers, cls):
            have.append(name)
        else:
            unsupported[name] = f"transformers {transformers.__version__} has no {cls} (added in {since})"
    return have, unsupported


def bnb_version():
    """bitsandbytes' version, or None when it is not installed (then no 4-bit base)."""
    try:
        import bitsandbytes
        return bitsandbytes.__version__
    except ImportError:
        return None


def compute_dtype_name(q):
    """A recorded 4-bit configuration's compute dtype as a model dtype name (f32, bf16, f16)."""
    return {"float32": "f32", "bfloat16": "bf16", "float16": "f16"}[q["bnb_4bit_compute_dtype"]]


def hello_fields(framework, version, dtypes, quant4=None, lacking=None):
    """The handshake of a Trainer-based driver: the families this transformers has, the model
    dtypes it declares (`dtypes`; the others named as left out, or with the reason in
    `lacking`), 4-bit bases where bitsandbytes is installed (unless `quant4` says otherwise),
    and PEFT's dropout seeded by the Trainer."""
    have, unsupported = families()
    bnb = bnb_version()
    why = {d: "left out by the driver's --dtypes" for d in ("bf16", "f16") if d not in dtypes}
    why.update(lacking or {})
    return dict(framework=framework, version=version + (f", bitsandbytes {bnb}" if bnb else ""),
                capabilities={"save_load": True, "grad_accum": True, "train_embeddings": True,
                              "bf16": "bf16" in dtypes, "f16": "f16" in dtypes,
                              "quant4": bnb is not None if quant4 is None else quant4,
                              # PEFT's lora_dropout, torch's RNG seeded by the Trainer.
                              "dropout": True, "reproducible_dropout": True},
                families=have, unsupported={**unsupported, **why})


# `--prequantized`: a 4-bit setup's base is loaded from the pre-quantized checkpoint tunecheck
# writes beside the dense one (`base-4bit/`, as transformers + bitsandbytes save a 4-bit model;
# its `config.json` carries the `quantization_config`) instead of being quantized at load.
PREQUANTIZED = False


def add_base_options(ap):
    """The option every driver takes for how a 4-bit base reaches the framework."""
    ap.add_argument("--prequantized", action="store_true",
                    help="load a 4-bit setup's base from its pre-quantized checkpoint (base-4bit/) "
                         "instead of quantizing the dense base at load")


def set_base_options(opts):
    global PREQUANTIZED
    PREQUANTIZED = opts.prequantized


def base_label():
    """What the framework name in the handshake gains with `--prequantized`."""
    return " (pre-quantized 4-bit bases)" if PREQUANTIZED else ""


def prequantized(base_dir):
    """Whether `base_dir` is a pre-quantized checkpoint (its config has a `quantization_config`):
    then its own configuration is the 4-bit one, and none is passed at load."""
    with open(os.path.join(base_dir, "config.json")) as f:
        return json.load(f).get("quantization_config") is not None


def serve_subjects(subject_cls, hello, name):
    """Serve the protocol with `subject_cls` built from a setup directory (base/ — base-4bit/
    with `--prequantized` for a 4-bit setup — adapter/, train.json) and loaded by its `load`."""
    def build(d, work):
        base = os.path.join(d, "base-4bit")
        if not (PREQUANTIZED and os.path.isdir(base)):
            base = os.path.join(d, "base")
        return subject_cls(base, os.path.join(d, "adapter"), os.path.join(d, "train.json"), work)

    td.serve(hello, build, subject_cls.load, name=name)


def bnb_config(q):
    """The `BitsAndBytesConfig` a user writes for tunecheck's recorded 4-bit configuration (the
    dense base is quantized as it loads, as `from_pretrained(..., quantization_config=...)`
    does). bitsandbytes' `Linear4bit` quantizes in blocks of 64: another blocksize is a case
    this stack cannot take."""
    from transformers import BitsAndBytesConfig
    if q.get("tunecheck_blocksize", 64) != 64:
        raise Refusal(f"bitsandbytes quantizes in blocks of 64, not {q['tunecheck_blocksize']}", kind="unsupported")
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=q["bnb_4bit_quant_type"],
                              bnb_4bit_use_double_quant=q["bnb_4bit_use_double_quant"],
                              bnb_4bit_compute_dtype=DTYPES[compute_dtype_name(q)],
                              bnb_4bit_quant_storage=torch.uint8)


class Batches(torch.utils.data.Dataset):
    """Pre-collated micro-batches (one dataset item is one micro-batch)."""

    def __init__(self, paths):
        self.items = [load_batch(p) for p in paths]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


class Subject:
    def __init__(self, base_dir, adapter_dir, train_json, work, reload=False):
        self.base_dir, self.work = base_dir, work
        with open(train_json) as f:
            self.setup = json.load(f)
        family = self.setup["family"]
        have, unsupported = families()
        if family not in have:
            raise RuntimeError(unsupported.get(family, f"family {family} not supported"))
        tc = self.setup["train"]
        self.tc = tc
        transformers.set_seed(int(tc["seed"]))
        self.model = self.load_model(base_dir, adapter_dir, work, reload)
        # Whether this version's Trainer hands the accumulation count to accelerate (which then
        # divides each micro-batch's loss by it, as transformers < 4.46 does) or keeps it at 1.
        probe = self.make_trainer(2, 1, eval_on=False)
        self.accelerate_divides = probe.accelerator.gradient_accumulation_steps == 2
        del probe
        self.trainer = self.make_trainer(tc["gradient_accumulation_steps"], tc["num_train_epochs"], eval_on=False)
        self.trainer.create_optimizer_and_scheduler(num_training_steps=tc["total_steps"])
        # What the Trainer's loop does before its first step: accelerate prepares the model, and
        # with mixed precision (`bf16`/`fp16` in the arguments) that wraps the model's forward in
        # autocast for good (the Trainer itself enters no autocast).
        self.trainer.accelerator.prepare_model(self.model)
        self.resume = None  # a checkpoint the next fit resumes from
        self.dirty = False  # trained since the last checkpoint

    # -- the framework's objects (a Trainer-based stack overrides these) ----------------------
    def load_model(self, base_dir, adapter_dir, work, reload):
        """The trainable PEFT model: the base as the framework loads it, the adapter on top.
        `reload` is true when `adapter_dir` is a checkpoint this driver saved."""
        dtype = DTYPES[self.setup["dtype"]]
        kw = {"dtype": dtype} if TF >= Version("4.56") else {"torch_dtype": dtype}
        if self.setup.get("quantization") is not None and not prequantized(base_dir):
            kw["quantization_config"] = bnb_config(self.setup["quantization"])
        try:
            base = AutoModelForCausalLM.from_pretrained(base_dir, attn_implementation="eager", **kw)
        except ValueError as e:
            # The version's own validation of the configuration (e.g. transformers 4.45's Gemma
            # wants the heads to divide the hidden size): a case it cannot take, not a failure.
            raise Refusal(f"transformers {transformers.__version__} rejects this configuration: {e}",
                          kind="unsupported")
        adapter_dir = td.adapter_for_this_peft(adapter_dir, os.path.join(work, "adapter"))
        return PeftModel.from_pretrained(base, adapter_dir, is_trainable=True)

    def training_arguments(self, **kw):
        """The framework's arguments class, with what `make_trainer` fills in."""
        return TrainingArguments(remove_unused_columns=False, **kw)

    def trainer_class(self):
        """The framework's Trainer class."""
        return Trainer

    def trainer_kwargs(self):
        """What the Trainer class takes beyond model, args and datasets."""
        return {"data_collator": first}

    def dataset(self, paths):
        """The framework's dataset of the batch files `paths` and its per-device batch size: here
        each item is a whole pre-collated micro-batch."""
        return Batches(paths), 1

    def micro_batches(self, paths):
        """The micro-batches of a step as the framework's data pipeline delivers them."""
        return [load_batch(p) for p in paths]

    def make_trainer(self, accum, epochs, eval_on, train=None, evals=None, rows=1):
        tc = self.tc
        sched = "cosine"
        sched_kw = {}
        if tc["min_lr_ratio"] > 0:
            sched, sched_kw = "cosine_with_min_lr", {"min_lr_rate": tc["min_lr_ratio"]}
        eval_key = "eval_strategy" if TF >= Version("4.41") else "evaluation_strategy"
        args = self.training_arguments(
            output_dir=os.path.join(self.work, "out"), per_device_train_batch_size=rows,
            per_device_eval_batch_size=rows, gradient_accumulation_steps=accum, learning_rate=tc["learning_rate"],
            adam_beta1=tc["adam_beta1"], adam_beta2=tc["adam_beta2"], adam_epsilon=tc["adam_epsilon"],
            weight_decay=tc["weight_decay"], max_grad_norm=tc["max_grad_norm"] or 0.0, lr_scheduler_type=sched,
            lr_scheduler_kwargs=sched_kw, warmup_steps=tc["warmup_steps"], num_train_epochs=epochs,
            optim="adamw_torch", seed=int(tc["seed"]), report_to=[], save_strategy="no", logging_steps=1,
            disable_tqdm=True, dataloader_num_workers=0, use_cpu=True,
            **{eval_key: "epoch" if eval_on else "no"})
        total = tc["total_steps"]

        class T(self.trainer_class()):
            # The schedule's horizon is the configuration's, not the length of this call.
            def create_scheduler(self, num_training_steps, optimizer=None):
                return super().create_scheduler(total, optimizer)

            # Data in the given order (the properties choose it).
            def _get_train_sampler(self, *a, **k):
                return torch.utils.data.SequentialSampler(self.train_dataset)

        return T(model=self.model, args=args, train_dataset=train, eval_dataset=evals, **self.trainer_kwargs())

    def set_accumulation(self, k):
        """What the Trainer's loop sets up for a step of k micro-batches."""
        t = self.trainer
        t.args.gradient_accumulation_steps = k
        t.accelerator.gradient_state.plugin_kwargs["num_steps"] = k if self.accelerate_divides else 1
        t.current_gradient_accumulation_steps = k

    def accumulate(self, paths):
        """Forward + backward of every micro-batch as one optimizer step of the Trainer's loop."""
        t = self.trainer
        batches = self.micro_batches(paths)
        self.check_untrained(batches)
        self.set_accumulation(len(batches))
        num_items = None
        if hasattr(t, "get_batch_samples"):
            import inspect
            it = iter(batches)
            if "device" in inspect.signature(t.get_batch_samples).parameters:
                batches, num_items = t.get_batch_samples(it, len(paths), t.args.device)
            else:
                batches, num_items = t.get_batch_samples(it, len(paths))
        loss = 0.0
        for i, b in enumerate(batches):
            t.accelerator.gradient_state._set_sync_gradients(i == len(batches) - 1)
            if num_items is None:
                step_loss = t.training_step(self.model, b)
            else:
                step_loss = t.training_step(self.model, b, num_items)
            loss += float(step_loss)
        # The subject's own count of the step's target tokens: the Trainer's loss denominator
        # where this version computes one, else the shifted labels' count.
        if num_items is not None:
            tokens = int(num_items)
        else:
            tokens = td.shifted_tokens(batches)
        if not math.isfinite(loss):
            raise Refusal(f"non-finite loss {loss}", kind="non_finite", what="loss", value=None,
                          step=t.state.global_step)
        return loss, tokens

    def check_untrained(self, batches):
        """transformers does not refuse untrained tokens: nothing to do (P2 judges it)."""

    def trainables(self):
        return [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]

    def frozen(self):
        """The base's frozen tensors by base name, each once (tied ones share a name)."""
        out = {}
        for n, p in self.model.named_parameters():
            if not p.requires_grad and ".modules_to_save." not in n:
                out.setdefault(base_key(n), p)
        return out

    def describe(self):
        tr = [[saved_key(n), list(p.shape)] for n, p in self.trainables()]
        fr = [[k, list(p.shape)] for k, p in self.frozen().items()]
        return {"vocab_size": self.model.config.vocab_size, "trainable": tr, "frozen": fr}

    # -- operations ---------------------------------------------------------------------------
    def logits(self, req):
        b = load_batch(req["batch"])
        self.model.train(req["mode"] == "train")
        with torch.no_grad():
            out = self.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        save_file({"logits": out.float().contiguous()}, req["out"])
        return {}

    def gradients(self, req):
        self.model.zero_grad(set_to_none=True)
        loss, tokens = self.accumulate(req["batches"])
        grads = {saved_key(n): p.grad.detach().float().contiguous() for n, p in self.trainables() if p.grad is not None}
        self.model.zero_grad(set_to_none=True)
        save_file(grads, req["out"])
        return {"loss": loss, "tokens": tokens}

    def step(self, req):
        t = self.trainer
        loss, tokens = self.accumulate(req["batches"])
        grad_norm = None
        if t.args.max_grad_norm and t.args.max_grad_norm > 0:
            grad_norm = float(t.accelerator.clip_grad_norm_(self.model.parameters(), t.args.max_grad_norm))
        else:
            grad_norm = float(torch.linalg.vector_norm(
                torch.stack([p.grad.detach().float().norm() for _, p in self.trainables() if p.grad is not None])))
        if not math.isfinite(grad_norm):
            self.model.zero_grad(set_to_none=True)
            raise Refusal(f"non-finite gradient norm {grad_norm}", kind="non_finite", what="gradient norm",
                          value=None, step=t.state.global_step)
        lr = t.lr_scheduler.get_last_lr()[0]
        t.optimizer.step()
        t.lr_scheduler.step()
        self.model.zero_grad(set_to_none=True)
        t.state.global_step += 1
        self.dirty = True
        return {"loss": loss, "tokens": tokens, "grad_norm": grad_norm, "lr": lr}

    def eval_loss(self, req):
        evals, rows = self.dataset(req["batches"])
        t = self.make_trainer(1, 1, eval_on=False, evals=evals, rows=rows)
        return {"loss": float(t.evaluate()["eval_loss"])}

    def checkpoint(self):
        """Write the Trainer's own checkpoint of the current state; returns its path."""
        t = self.trainer
        t._save_checkpoint(self.model, trial=None)
        path = os.path.join(t.args.output_dir, f"checkpoint-{t.state.global_step}")
        self.resume, self.dirty = path, False
        return path

    def fit(self, req):
        tc = self.tc
        train, rows = self.dataset(req["train"])
        evals = self.dataset(req["eval"])[0] if req["eval"] else None
        resume = self.checkpoint() if self.dirty else self.resume
        t = self.make_trainer(tc["gradient_accumulation_steps"], req["epochs"], evals is not None, train, evals, rows)
        hist = {"train": [], "eval": []}
        acc = {"loss": 0.0, "epoch": 0}
        max_steps = req.get("max_steps")
        start = {"step": None}
        inner = t.training_step

        def training_step(*a, **k):
            loss = inner(*a, **k)
            acc["loss"] += float(loss)
            return loss
        t.training_step = training_step

        class Record(TrainerCallback):
            def on_train_begin(self, args, state, control, **kw):
                start["step"] = state.global_step

            def on_epoch_begin(self, args, state, control, **kw):
                acc["epoch"] = int(math.floor(state.epoch + 1e-9)) if state.epoch else 0

            def on_step_end(self, args, state, control, **kw):
                hist["train"].append([state.global_step, acc["epoch"], acc["loss"]])
                acc["loss"] = 0.0
                if max_steps is not None and state.global_step - start["step"] >= max_steps:
                    control.should_training_stop = True

            def on_evaluate(self, args, state, control, metrics=None, **kw):
                if metrics and "eval_loss" in metrics:
                    hist["eval"].append([state.global_step, float(metrics["eval_loss"])])

        t.add_callback(Record())
        t.train(resume_from_checkpoint=resume)
        # Steps after this fit use the Trainer that ran it (its optimizer and scheduler).
        self.trainer = t
        t.training_step = inner
        self.dirty = True
        return hist

    def tensors(self, req):
        if req["which"] == "trainable":
            out = {saved_key(n): p.detach().float().contiguous() for n, p in self.trainables()}
        else:
            out = {k: p.detach().contiguous() for k, p in self.frozen().items()}
        save_file(out, req["out"])
        return {}

    def save(self, req):
        d = req["dir"]
        ck = self.checkpoint()
        os.makedirs(d, exist_ok=True)
        shutil.copytree(self.base_dir, os.path.join(d, "base"), dirs_exist_ok=True)
        shutil.copytree(ck, os.path.join(d, "checkpoint"), dirs_exist_ok=True)
        with open(os.path.join(d, "train.json"), "w") as f:
            json.dump(self.setup, f)
        return {}

    @classmethod
    def load(cls, d, work):
        ck = os.path.join(d, "checkpoint")
        s = cls(os.path.join(d, "base"), ck, os.path.join(d, "train.json"), work, reload=True)
        t = s.trainer
        t._load_optimizer_and_scheduler(ck)
        state_cls = type(t.state)
        t.state = state_cls.load_from_json(os.path.join(ck, "trainer_state.json"))
        t._load_rng_state(ck)
        s.resume = ck
        return s


def main():
    import argparse
    ap = argparse.ArgumentParser(description="tunecheck driver for transformers + PEFT")
    ap.add_argument("--dtypes", default="f32,bf16,f16",
                    help="model dtypes to declare (comma-separated among f32, bf16, f16; f32 is always taken)")
    add_base_options(ap)
    opts = ap.parse_args()
    set_base_options(opts)
    dtypes = set(opts.dtypes.split(","))
    if not dtypes <= set(DTYPES):
        ap.error(f"--dtypes: {opts.dtypes!r} is not a subset of f32,bf16,f16")

    def hello():
        return hello_fields("transformers+peft" + base_label(), f"transformers {transformers.__version__}, peft {peft.__version__}, "
                                                 f"torch {torch.__version__}", dtypes)

    serve_subjects(Subject, hello, "tunecheck-tfpeft")


if __name__ == "__main__":
    main()
