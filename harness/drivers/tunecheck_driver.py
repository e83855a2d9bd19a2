"""What every tunecheck driver shares (driver protocol v1, PROTOCOL.md): the JSON-lines loop on
stdin/stdout, typed refusals, batch and tensor files, PEFT's key names, and the adapter
directory as the installed PEFT reads it. A driver holds only its framework's calls: it
imports this module first (it moves library prints off the protocol channel), defines a
subject class, and calls `serve`.

    import tunecheck_driver as td            # before torch: stdout now goes to stderr
    ...
    td.serve(hello=lambda: {...}, build=MySubject.build, load=MySubject.load)

A subject answers the operations by methods of the same names, each taking the request and
returning the answer's fields: `describe()`, `logits`, `gradients`, `step`, `eval_loss`,
`fit`, `tensors`, `save`.
"""
import json
import math
import os
import sys
import traceback

sys.dont_write_bytecode = True  # drivers run from the source tree: leave no __pycache__ in it
PROTOCOL = 1
IGNORE = -100
_proto = sys.stdout
sys.stdout = sys.stderr  # library prints must not corrupt the protocol channel
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is local; never wait on the hub
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")  # keep the stderr tail readable


class Refusal(Exception):
    """An error answer with a protocol `kind` (`untrained_tokens`, `non_finite`, `unsupported`)."""

    def __init__(self, msg, **fields):
        super().__init__(msg)
        self.fields = fields


def work_dir(default_name):
    """The driver's own work directory: the one tunecheck hands over (it removes it), else a
    fresh one under the temp directory (removed after a clean shutdown)."""
    given = os.environ.get("TUNECHECK_DRIVER_WORK")
    work = given or os.path.join("/tmp", f"{default_name}-{os.getpid()}")
    os.makedirs(work, exist_ok=True)
    return work, given is None


def load_batch(path):
    """A batch file as torch tensors: `input_ids`, `attention_mask`, `labels` (i64 [b, s])."""
    from safetensors.torch import load_file
    t = load_file(path)
    return {"input_ids": t["input_ids"].long(), "attention_mask": t["attention_mask"].long(),
            "labels": t["labels"].long()}


def first(items):
    """The collator of a dataset whose items are whole micro-batches."""
    return items[0]


def shifted_tokens(batches):
    """Unmasked target positions after the causal shift (what a correct loss divides by)."""
    return sum(int((b["labels"][:, 1:] != IGNORE).sum()) for b in batches)


def saved_key(param_name):
    """PEFT's in-memory parameter name -> the key PEFT saves it under."""
    n = param_name.replace(".modules_to_save.default", "").replace(".original_module", "")
    return n.replace(".default.", ".").removesuffix(".default")


def base_key(param_name):
    """A frozen parameter's name in the base checkpoint."""
    n = param_name.removeprefix("base_model.model.")
    return n.replace(".base_layer", "").replace(".original_module", "")


def adapter_for_this_peft(adapter_dir, out):
    """The adapter directory as the installed PEFT reads it: fields an older `LoraConfig` does
    not know are dropped when they hold their neutral value (tunecheck's own
    `tunecheck_base_quantization` is informational), and refused otherwise."""
    import dataclasses
    import shutil
    import peft
    with open(os.path.join(adapter_dir, "adapter_config.json")) as f:
        cfg = json.load(f)
    known = {f.name for f in dataclasses.fields(peft.LoraConfig)}
    neutral = {"ensure_weight_tying": False, "tunecheck_base_quantization": None}
    unknown = [k for k in cfg if k not in known]
    if not unknown:
        return adapter_dir
    for k in unknown:
        if k in neutral and cfg[k] == neutral[k] or k == "tunecheck_base_quantization":
            del cfg[k]
        else:
            raise RuntimeError(f"peft {peft.__version__} does not support adapter_config field {k}={cfg[k]!r}")
    os.makedirs(out, exist_ok=True)
    shutil.copy(os.path.join(adapter_dir, "adapter_model.safetensors"), out)
    with open(os.path.join(out, "adapter_config.json"), "w") as f:
        json.dump(cfg, f)
    return out


def finite_or_null(v):
    """JSON has no NaN or infinity: a non-finite number is sent as null (read back as NaN)."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: finite_or_null(x) for k, x in v.items()}
    if isinstance(v, list):
        return [finite_or_null(x) for x in v]
    return v


OPERATIONS = ("logits", "gradients", "step", "eval_loss", "fit", "tensors", "save")


def serve(hello, build, load, name="tunecheck-driver"):
    """Answer requests on stdin until `shutdown` or end of input. `hello()` gives the handshake's
    fields (framework, version, capabilities, families, unsupported); `build(setup_dir, work)`
    and `load(checkpoint_dir, work)` make a subject, each in a fresh sub-directory of the
    driver's work directory."""
    work, own = work_dir(name)
    subject = None
    n = 0
    for line in sys.stdin:
        if not line.strip():
            continue
        req = json.loads(line)
        op = req.get("op")
        ans = {"id": req.get("id"), "ok": True}
        try:
            if op == "hello":
                ans.update(protocol=PROTOCOL, **hello())
            elif op == "shutdown":
                print(json.dumps(ans), file=_proto, flush=True)
                break
            elif op == "reset":
                subject = None
            elif op in ("build", "load"):
                n += 1
                sub_work = os.path.join(work, f"s{n}")
                subject = build(req["setup"], sub_work) if op == "build" else load(req["dir"], sub_work)
                ans.update(subject.describe())
            elif subject is None:
                raise RuntimeError("no subject: send build or load first")
            elif op in OPERATIONS:
                ans.update(getattr(subject, op)(req))
            else:
                raise RuntimeError(f"unknown operation {op!r}")
        except Refusal as e:
            ans = {"id": req.get("id"), "ok": False, "error": str(e), **e.fields}
        except Exception as e:  # reported to tunecheck, which fails the property with it
            traceback.print_exc(file=sys.stderr)
            ans = {"id": req.get("id"), "ok": False, "error": f"{type(e).__name__}: {e}"}
        print(json.dumps(finite_or_null(ans)), file=_proto, flush=True)
    if own:
        import shutil
        shutil.rmtree(work, ignore_errors=True)
