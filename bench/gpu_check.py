"""One prepared device check of the paper-scale path: 7B-architecture LLaVA in bf16 on one GPU.

Usage:  python bench/gpu_check.py [--tiny] [--json PATH] [--no-install]      (``make gpu-check``)
        python bench/gpu_check.py --tiny --no-install       (CPU, small config, < 2 min: what CI runs)

Phases (table in docs/gpu.md), each with its own time budget, each printing its figures the moment it has them; a
failing phase is reported and the others still run; a summary table closes the run (``--json`` writes it too):
install (pip -e ., no network) | versions | build (LLaVA-1.5-7B architecture from the configs in PAPER, random
weights, bf16, on the GPU) | train (interleaved stage-2 steps of lora / fairllava / adversarial through the
project's TrainingModule, method builder and optimizer: median s/step, tokens/s, peak memory, ratios to lora) |
generate (generate_predictions, greedy, 100 new tokens, batch 1 vs 16) | tests (pytest -m gpu) | fsdp (accelerate
launch with configs/accelerate/fsdp.yaml on one process). Exit code 0: every phase ran; 1: a phase failed.
Without a CUDA device and without --tiny: one line on stderr, exit code 2, nothing run.

H200 estimate (790 TFLOP/s dense bf16, 4.3 TB/s HBM; docs/gpu.md): one training step at batch 16 x ~700 tokens
is ~4.7e14 FLOP (LM forward + GC recompute + input-gradient backward = 3 forwards; the frozen vision tower once)
-> 0.6 s at peak, ~1.5 s at 40 % MFU; 5 rounds x 3 methods ~ 25-40 s. Decoding reads the 14 GB of weights per
token -> >= 3.3 ms/token at any batch: batch 1 ~ 30-60 tok/s (launch-bound eager HF), batch 16 ~ 10x that.
Expected wall: install 10 s, build 15 s, train 40 s, generate 45 s, tests 25 s, fsdp 45 s ~ 3 min; the budgets
below cap it at 8 min (run tool timeout_s <= 540).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, fields, replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

PEAK_FLOPS = 790e12  # H200 dense bf16 matmul
PEAK_BYTES = 4.3e12  # H200 HBM3e
METHODS = ("lora", "fairllava", "adversarial")

_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:  # also when imported from elsewhere (run as a script, bench/ is sys.path[0] already)
    sys.path.insert(0, _HERE)
from gpu_workload import PAPER, TINY, MemMeter, build_model, ideal_step_flops, write_records  # noqa: E402


# ----------------------------------------------------------------------------- reporting
class Report:
    """Figures printed the moment they exist, phase outcomes, and the closing summary table."""

    def __init__(self) -> None:
        self.figures: dict[str, tuple[object, str]] = {}
        self.phases: dict[str, dict] = {}

    def fig(self, key: str, value, unit: str = "", note: str = "") -> None:
        self.figures[key] = (value, unit)
        shown = f"{value:.4g}" if isinstance(value, float) else str(value)
        print(f"  {key} = {shown} {unit}{'  (' + note + ')' if note else ''}".rstrip(), flush=True)

    def info(self, text: str) -> None:
        print(f"  {text}", flush=True)

    def table(self, header: str) -> str:
        lines = [f"== summary: {header}", f"{'phase':10s} {'status':8s} {'seconds':>8s}  note"]
        for name, p in self.phases.items():
            lines.append(f"{name:10s} {p['status']:8s} {p['seconds']:8.1f}  {p.get('reason', '')}".rstrip())
        lines.append(f"{'figure':34s} {'value':>12s}  unit")
        for key, (v, unit) in self.figures.items():
            shown = f"{v:.4g}" if isinstance(v, float) else str(v)
            lines.append(f"{key:34s} {shown:>12s}  {unit}".rstrip())
        return "\n".join(lines)


def _error_line(text: str) -> str:
    """The last ``SomethingError: ...`` line of a subprocess's output (torchrun ends with banners), else its last line."""
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    errs = [ln for ln in lines if re.match(r"^[\w.]*(Error|Exception|Interrupt|ERROR)\b", ln) and "ChildFailedError" not in ln]
    return (errs or lines or [""])[-1][:300]


def run_phase(rep: Report, name: str, budget: float, deadline: float, fn, *args):
    """Run ``fn(phase_deadline, *args)``; an exception fails this phase only. Skipped when the run is out of time."""
    left = deadline - time.monotonic()
    print(f"== {name} (budget {budget:.0f} s)", flush=True)
    if left < min(budget, 10.0):
        rep.phases[name] = {"status": "skipped", "seconds": 0.0, "reason": f"out of time ({left:.0f} s left)"}
        print(f"  skipped: out of time ({left:.0f} s left)", flush=True)
        return None
    t0 = time.monotonic()
    try:
        out = fn(t0 + min(budget, left), *args)
        status, reason = ("skipped", out[1]) if isinstance(out, tuple) and out and out[0] == "skip" else ("ok", "")
    except Exception as e:  # noqa: BLE001 - one phase's failure must not stop the others
        traceback.print_exc(limit=6, file=sys.stderr)
        msg = str(e).strip().splitlines()
        out, status, reason = None, "FAILED", f"{type(e).__name__}: {msg[0][:300] if msg else ''}"
        print(f"  FAILED: {reason}", flush=True)
    if status == "skipped":
        print(f"  skipped: {reason}", flush=True)
    rep.phases[name] = {"status": status, "seconds": time.monotonic() - t0, "reason": reason}
    return None if status != "ok" else out


# ----------------------------------------------------------------------------- install + versions
def phase_install(deadline: float, rep: Report):
    """Editable install without network: no build isolation (it would fetch setuptools), no index."""
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index",
           "--disable-pip-version-check", "-e", str(REPO)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=max(5.0, deadline - time.monotonic()))
    if r.returncode != 0:
        raise RuntimeError(f"pip install -e . exited {r.returncode}: {_error_line(r.stderr + r.stdout)} "
                           "(the other phases use src/ on sys.path)")
    rep.info("pip install --no-deps -e . ok")
    return True


def phase_versions(deadline: float, rep: Report):
    """One line per library; the working tree's src/ goes first on sys.path whether or not the install ran."""
    if str(REPO / "src") not in sys.path:
        sys.path.insert(0, str(REPO / "src"))
    import importlib
    from importlib import metadata

    for mod in ("torch", "transformers", "peft", "accelerate", "safetensors", "sacrebleu", "yaml", "fairllava"):
        m = importlib.import_module(mod)  # a missing required library fails this phase, naming it
        rep.info(f"{mod:12s} {getattr(m, '__version__', '?'):14s} {Path(m.__file__).parent}")
    for opt in ("rouge_score", "gguf", "psutil", "pytest"):
        try:
            rep.info(f"{opt:12s} {metadata.version(opt.replace('_', '-')):14s} (optional)")
        except metadata.PackageNotFoundError:
            rep.info(f"{opt:12s} {'absent':14s} (optional; a phase that needs it is skipped)")
    import torch

    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        rep.info(f"cuda         {torch.version.cuda}  {p.name}  {p.total_memory / 2**30:.0f} GiB  "
                 f"capability {p.major}.{p.minor}  bf16 {torch.cuda.is_bf16_supported()}")
    rep.info(f"python       {sys.version.split()[0]}  torch threads {torch.get_num_threads()}")
    return True


# ----------------------------------------------------------------------------- build
def phase_build(deadline: float, rep: Report, ctx: dict):
    import torch

    t0 = time.perf_counter()
    model, processor = build_model(ctx["spec"], ctx["device"], torch.bfloat16)
    if ctx["device"].type == "cuda":
        torch.cuda.synchronize()
    n = sum(p.numel() for p in model.parameters())
    rep.fig("build.seconds", time.perf_counter() - t0, "s")
    rep.fig("build.params_b", n / 1e9, "B params")
    rep.fig("build.weights_gb", sum(p.numel() * p.element_size() for p in model.parameters()) / 1e9, "GB (bf16)")
    ctx["model"], ctx["processor"] = model, processor
    return True


# ----------------------------------------------------------------------------- training steps
def _move_extras(method, opt, device) -> None:
    """Keep only the running method's extras and optimizer moments on the GPU, so each peak is that method's own."""
    import torch

    if method.module is not None:
        method.module.to(device)
    for st in opt.state.values():
        for k, v in st.items():
            if torch.is_tensor(v) and v.dim() > 0:
                st[k] = v.to(device)


def phase_train(deadline: float, rep: Report, ctx: dict):
    import torch

    from fairllava.data import VLMCollator, VLMDataset, vocabs_from_config
    from fairllava.models.loading import LoraSettings, apply_lora
    from fairllava.models.precision import prepare_for_training
    from fairllava.training.config import apply_overrides, preset_dict, TrainConfig
    from fairllava.training.methods import StepOutput
    from fairllava.training.trainer import FairTrainer, TrainingModule, _n_hidden_states, _to_device, build_optimizer

    spec, dev, model = ctx["spec"], ctx["device"], ctx["model"]
    tmp = Path(ctx["tmp"])
    train_path, images = write_records(tmp / "train", max(spec.batch, spec.gen_prompts), spec)
    ctx["records"], ctx["images"] = train_path, images
    n_hs = spec.text_layers + 1
    L = spec.text_layers  # the preset's taps [14, 16, 20] are for 32 blocks; a smaller model taps around its middle
    taps = [14, 16, 20] if L == 32 else [max(1, L // 2 - 1), L // 2, min(L, L // 2 + 1)]
    base = apply_overrides(preset_dict("mimic_cxr"), [f"model.path={tmp / 'model'}", f"data.train={train_path}",
                                                       f"data.image_root={images}", f"output_dir={tmp / 'run'}",
                                                       f"adversarial.taps={taps}"])
    cfgs = {m: TrainConfig.from_dict({**base, "method": m}, where=f"mimic_cxr preset ({m})") for m in METHODS}
    c0 = cfgs["lora"]
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    model.config.use_cache = False
    model = apply_lora(model, LoraSettings(**_accepted(LoraSettings, asdict(c0.lora))))
    prepare_for_training(model, torch.bfloat16)  # bf16 frozen weights, fp32 trainable ones
    model.train()
    ctx["model"] = model
    assert _n_hidden_states(model) == n_hs
    vocabs = vocabs_from_config(c0.data.attributes)
    ds = VLMDataset(train_path, images, vocabs)
    idx = list(range(spec.batch))
    collator = VLMCollator(ctx["processor"], vocabs, mode="train", max_length=c0.data.max_length)
    t0 = time.perf_counter()
    batch = collator([ds[i] for i in idx])
    rep.fig("train.collate_s", time.perf_counter() - t0, "s/batch", "on the training loop's thread")
    batch = _to_device(batch, dev)
    n_tok = int(batch["attention_mask"].sum())
    seq = batch["input_ids"].shape[1]
    rep.info(f"batch {spec.batch} x {seq} tokens ({int(batch['image_mask'][0].sum())} image tokens/sample), "
             f"{int((batch['labels'] != -100).sum()) // spec.batch} target tokens/sample")
    runs = {}
    for m, cfg in cfgs.items():
        method = FairTrainer(cfg)._build_method(model, ds, idx, n_hs, _OneProcess(), processor=ctx["processor"])
        mod = TrainingModule(model, method, method.hidden_indices(n_hs), compact_logits=cfg.model.compact_logits,
                             compute_dtype=torch.bfloat16)
        opt = build_optimizer(model, method, cfg.optim)
        params = [p for g in opt.param_groups for p in g["params"]]
        runs[m] = (method, mod, opt, params, cfg)
        rep.info(f"{m}: taps {mod.indices}, trainable {sum(p.numel() for p in params) / 1e6:.1f} M params")
    times = {m: [] for m in METHODS}
    peaks = {m: [] for m in METHODS}
    # accelerate's mixed_precision=bf16 wraps the prepared module's forward in autocast; the module itself turns
    # autocast off again for the losses and the regulariser (fp32), so wrapping here is the trainer's situation
    amp = torch.autocast(dev.type, dtype=torch.bfloat16)
    for rnd in range(spec.steps + 1):  # round 0 warms up (kernels, allocator, optimizer state)
        for m in METHODS:
            method, mod, opt, params, cfg = runs[m]
            _move_extras(method, opt, dev)
            with MemMeter(dev, list(model.parameters()) + list(mod.extras.parameters()), opt) as mem:
                t = time.perf_counter()
                with amp:
                    loss, logs, aux = mod(batch, 0.5, rnd)
                res = method.after_forward(StepOutput(loss, logs, aux), batch, rnd)
                mem.stop_saving()
                res.loss.backward()
                gn = torch.nn.utils.clip_grad_norm_(params, cfg.optim.max_grad_norm)
                opt.step()
                peak = mem.peak_gb()  # before zero_grad: the CPU estimate counts the gradients
                opt.zero_grad(set_to_none=True)
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                dt = time.perf_counter() - t
            lv, gv = float(res.loss.detach()), float(gn)
            if not (math.isfinite(lv) and math.isfinite(gv)):
                raise FloatingPointError(f"{m}: non-finite loss {lv} or gradient norm {gv}")
            if rnd == 0:
                keys = [k for k in res.logs if k.split("/")[0] in ("lm_loss", "mi", "adv_ce", "fair_loss")]
                rep.info(f"{m}: first step {dt:.2f} s; " + ", ".join(f"{k} {res.logs[k]:.3g}" for k in keys[:5]))
            else:
                times[m].append(dt)
                peaks[m].append(peak)
            _move_extras(method, opt, torch.device("cpu"))
        if time.monotonic() > deadline and rnd >= 1:
            rep.info(f"train budget reached after {rnd} timed round(s)")
            break
    ideal = ideal_step_flops(spec, n_tok, seq, int((batch["labels"] != -100).any(0).sum()) + 1, spec.batch) / PEAK_FLOPS
    for m in METHODS:
        med = statistics.median(times[m])
        rep.fig(f"train.{m}.step_s", med, "s", f"median of {len(times[m])}")
        rep.fig(f"train.{m}.tokens_per_s", n_tok / med, "tok/s")
        rep.fig(f"train.{m}.peak_gb", max(peaks[m]), "GB", "allocator peak" if dev.type == "cuda" else "CPU estimate")
    lo = statistics.median(times["lora"]), max(peaks["lora"])
    for m in METHODS[1:]:
        tr, mr = statistics.median(times[m]) / lo[0], max(peaks[m]) / lo[1]
        target = "" if m != "fairllava" else ("target <= 1.05: " + ("met" if max(tr, mr) <= 1.05 else "MISSED"))
        rep.fig(f"train.{m}.time_ratio", tr, "x lora", target)
        rep.fig(f"train.{m}.mem_ratio", mr, "x lora")
    rep.fig("train.ideal_step_s", ideal, "s", "dense FLOPs at 790 TFLOP/s")
    rep.fig("train.lora.mfu", ideal / lo[0], "of H200 peak", "meaningful on an H200 only")
    for m in METHODS:
        _move_extras(runs[m][0], runs[m][2], torch.device("cpu"))
        runs[m][2].state.clear()
    return True


class _OneProcess:  # what the trainer's method builder asks its accelerator
    num_processes, is_main_process = 1, True


def _accepted(cls, values: dict) -> dict:
    """The entries of ``values`` that dataclass ``cls`` has fields for (config LoRA section -> LoraSettings)."""
    names = {f.name for f in fields(cls)}
    return {k: v for k, v in values.items() if k in names}


# ----------------------------------------------------------------------------- generation
def phase_generate(deadline: float, rep: Report, ctx: dict):
    import torch

    from fairllava.data import VLMDataset
    from fairllava.generation import generate_predictions
    from fairllava.models.precision import prepare_for_inference

    spec, model = ctx["spec"], ctx["model"]
    model = prepare_for_inference(model, torch.bfloat16)  # as load_vlm(dtype=bf16, adapter=...)
    model.eval()
    if ctx.get("records") is None:
        ctx["records"], ctx["images"] = write_records(Path(ctx["tmp"]) / "train", spec.gen_prompts, spec)
    ds = VLMDataset(ctx["records"], ctx["images"])
    recs = ds.records[: spec.gen_prompts]
    out = Path(ctx["tmp"]) / "gen"
    kw = dict(image_root=ctx["images"], max_new_tokens=spec.gen_new_tokens, progress=False, resume=False)
    generate_predictions(model, ctx["processor"], recs[: spec.gen_batch], out / "warm.jsonl", batch_size=spec.gen_batch,
                         **{**kw, "max_new_tokens": 2})
    res = {}
    for name, bs, n in (("bs1", 1, spec.gen_bs1_prompts), ("batched", spec.gen_batch, spec.gen_prompts)):
        tokens, secs, done = 0, 0.0, 0
        while done < n:  # chunked, so the budget can stop it between batches
            r = generate_predictions(model, ctx["processor"], recs[done:done + bs], out / f"{name}_{done}.jsonl",
                                     batch_size=bs, **kw)
            tokens, secs, done = tokens + r.new_tokens, secs + r.seconds, done + len(recs[done:done + bs])
            if time.monotonic() > deadline and done < n:
                rep.info(f"generate budget reached at batch size {bs} after {done} prompts")
                break
        res[name] = tokens / secs
        rep.fig(f"gen.{name}.tokens_per_s", res[name], "tok/s",
                f"batch {bs}, {done} prompts, <= {spec.gen_new_tokens} new tokens each")
    rep.fig("gen.speedup", res["batched"] / res["bs1"], "x", f"batch {spec.gen_batch} vs 1")
    wbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    rep.fig("gen.ideal_bs1_tokens_per_s", PEAK_BYTES / wbytes, "tok/s", "weights read once per token at 4.3 TB/s")
    return True


# ----------------------------------------------------------------------------- subprocess phases
def _run(cmd: list[str], ctx: dict, deadline: float) -> subprocess.CompletedProcess:
    """Run in its own process group, so a timeout also ends the launcher's workers (no orphan holding the GPU)."""
    p = subprocess.Popen(cmd, cwd=REPO, env=_sub_env(ctx), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)
    try:
        out, err = p.communicate(timeout=max(5.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        p.communicate()
        raise TimeoutError(f"{' '.join(cmd[1:4])}: over the phase budget, killed") from None
    return subprocess.CompletedProcess(cmd, p.returncode, out, err)


def _sub_env(ctx: dict) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src")] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    if ctx["device"].type != "cuda":
        env["FAIRLLAVA_GPU_TESTS_ON_CPU"] = "1"  # --tiny: the same tests, bf16 autocast on the CPU
    return env


def phase_tests(deadline: float, rep: Report, ctx: dict):
    import importlib.util

    if importlib.util.find_spec("pytest") is None:
        return ("skip", "pytest is not installed")
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", "-o", "addopts=",
           str(REPO / "tests" / "test_gpu.py")]
    r = _run(cmd, ctx, deadline)
    last = [ln for ln in r.stdout.strip().splitlines() if ln.strip()][-1:] or [""]
    counts = {k: int(v) for v, k in re.findall(r"(\d+) (passed|failed|skipped|error|errors)", last[0])}
    passed, total = counts.get("passed", 0), sum(counts.values())
    rep.fig("tests.passed", passed, f"of {total}", last[0].strip("= "))
    if r.returncode != 0 or total == 0 or passed != total:
        sys.stderr.write(r.stdout[-4000:] + r.stderr[-2000:])
        raise RuntimeError(f"pytest -m gpu: {last[0].strip('= ')} (exit {r.returncode})")
    return True


def phase_fsdp(deadline: float, rep: Report, ctx: dict):
    """The shipped FSDP config through the real CLI on one process (tiny model: this checks the wiring, not speed)."""
    import yaml

    from fairllava.models.tiny import save_tiny_llava

    tmp = Path(ctx["tmp"]) / "fsdp"
    model_dir = save_tiny_llava(tmp / "model", seed=0)
    train, images = write_records(tmp / "data", 16, TINY)
    steps = 4
    run_cfg = {"preset": "mimic_cxr", "model": {"path": str(model_dir)},
               "data": {"train": str(train), "image_root": str(images), "num_workers": 0},
               "output_dir": str(tmp / "run"), "adversarial": {"taps": [1, 2, 3]},
               "optim": {"max_steps": steps, "per_device_batch_size": 4, "grad_accum": 1},
               "checkpointing": {"every_n_steps": 2}, "logging": {"every_n_steps": 1, "tensorboard": False,
                                                                  "progress": False}}
    (tmp / "run.yaml").write_text(yaml.safe_dump(run_cfg), encoding="utf-8")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(REPO / "configs" / "accelerate" / "fsdp.yaml"), "--num_processes", "1", "--main_process_port", "29533"]
    if ctx["device"].type != "cuda":
        cmd.append("--cpu")  # --tiny: accelerate's single-process CPU launcher (FSDP itself needs GPUs)
    cmd += ["-m", "fairllava", "train", str(tmp / "run.yaml")]
    t0 = time.perf_counter()
    r = _run(cmd, ctx, deadline)
    secs = time.perf_counter() - t0
    run_json = tmp / "run" / "run.json"
    if r.returncode != 0 or not run_json.is_file():
        sys.stderr.write(r.stdout[-3000:] + r.stderr[-4000:])
        raise RuntimeError(f"accelerate launch (fsdp.yaml) exited {r.returncode}: {_error_line(r.stdout + r.stderr)}")
    done = json.loads(run_json.read_text())
    rep.fig("fsdp.steps", int(done["steps"]), f"of {steps}", "one process, tiny model, checkpoint every 2 steps")
    rep.fig("fsdp.seconds", secs, "s", "launch + load + train + save")
    return True


# ----------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="small config on the CPU (or the GPU if present), < 2 min")
    ap.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    ap.add_argument("--install", dest="install", action="store_true", default=None, help="pip install -e . first")
    ap.add_argument("--no-install", dest="install", action="store_false", help="skip the install (default with --tiny)")
    ap.add_argument("--skip", action="append", default=[], choices=[n for n, _ in PAPER.budgets], help="skip a phase")
    ap.add_argument("--json", type=Path, default=None, help="write the figures and phase outcomes here")
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--steps", type=int, default=None, help="timed rounds per method")
    ap.add_argument("--budget-s", type=float, default=480.0, help="whole-run limit (phases past it are skipped)")
    a = ap.parse_args(argv)
    import torch

    cuda = torch.cuda.is_available()
    if (a.device == "cuda" or not a.tiny) and not cuda:
        print("gpu_check: no CUDA device visible (torch.cuda.is_available() is False); run with --tiny for the CPU "
              "check", file=sys.stderr)
        return 2
    device = torch.device("cuda" if cuda and a.device != "cpu" else "cpu")
    spec = TINY if a.tiny else PAPER
    spec = replace(spec, batch=a.batch_size or spec.batch, steps=a.steps or spec.steps)
    install = (not a.tiny) if a.install is None else a.install
    date = _dt.date.today().isoformat()
    where = torch.cuda.get_device_name(0) if device.type == "cuda" else "CPU"
    print(f"gpu_check {spec.name} on {where} ({date}); batch {spec.batch}, {spec.steps} timed rounds", flush=True)
    rep = Report()
    budgets = dict(spec.budgets)
    deadline = time.monotonic() + a.budget_s
    with tempfile.TemporaryDirectory(prefix="fairllava-gpu-check-") as tmp:
        ctx = {"spec": spec, "device": device, "tmp": tmp}

        def phase(name, fn, *args, needs=None):
            if name in a.skip:
                rep.phases[name] = {"status": "skipped", "seconds": 0.0, "reason": "--skip"}
            elif needs is not None and ctx.get(needs) is None:
                rep.phases[name] = {"status": "skipped", "seconds": 0.0, "reason": f"no {needs} (an earlier phase failed)"}
            else:
                return run_phase(rep, name, budgets[name], deadline, fn, *args)

        if install:
            phase("install", phase_install, rep)
        else:
            rep.phases["install"] = {"status": "skipped", "seconds": 0.0, "reason": "--no-install (default with --tiny)"}
        if phase("versions", phase_versions, rep) is None:
            for name in ("build", "train", "generate", "tests", "fsdp"):
                rep.phases[name] = {"status": "skipped", "seconds": 0.0, "reason": "versions failed (a library is missing)"}
        else:
            phase("build", phase_build, rep, ctx)
            phase("train", phase_train, rep, ctx, needs="model")
            phase("generate", phase_generate, rep, ctx, needs="model")
            ctx.pop("model", None)
            if device.type == "cuda":  # the subprocess phases get the GPU to themselves
                import gc

                gc.collect()
                torch.cuda.empty_cache()
            phase("tests", phase_tests, rep, ctx)
            phase("fsdp", phase_fsdp, rep, ctx)
    header = f"{spec.name} on {where}, {date}, batch {spec.batch}"
    print(rep.table(header), flush=True)
    if a.json is not None:
        data = {"spec": asdict(spec), "device": where, "date": date, "phases": rep.phases,
                "figures": {k: {"value": v, "unit": u} for k, (v, u) in rep.figures.items()}}
        tmp_json = a.json.with_name(a.json.name + ".tmp")
        tmp_json.write_text(json.dumps(data, indent=2), encoding="utf-8")
        os.replace(tmp_json, a.json)
    return 1 if any(p["status"] == "FAILED" for p in rep.phases.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
