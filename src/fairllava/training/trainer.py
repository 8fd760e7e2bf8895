"""FairTrainer: stage 1 / stage 2 training on accelerate, with exact resume and atomic checkpoints.

Why accelerate directly (not the HF ``Trainer``): the method needs hidden states through hooks, a
second optimizer in alternating mode, per-step loss terms and a data order we control exactly, so
that a run killed with SIGKILL and resumed ends bit-identical (CPU) to an uninterrupted one.
``accelerate launch`` with DDP / FSDP / DeepSpeed configs runs the same code (see configs/accelerate).

Data order: epoch ``e`` is a permutation seeded by ``(seed, e)`` (or the balanced sampler for
``resample``); optimizer step ``s`` consumes micro-batches ``s*ga .. s*ga+ga-1`` of the concatenated
epochs, so the step counter alone is the data position. Gradient accumulation is explicit
(``no_sync`` on all but the last micro-batch). The LR scheduler is not ``prepare``d (accelerate
would step it once per process) but checkpointed as a registered object.
"""
from __future__ import annotations

import contextlib
import math
import os
import platform
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn as nn

from ..errors import FairllavaError
from ..io import atomic_write_json
from ..regularizer.health import DeadDACError
from . import checkpoint as ck
from .config import TrainConfig, save_config
from .logging import MetricsLogger, Progress
from .methods import (
    AdversarialMethod, FairLLaVAMethod, LoraMethod, Method, ResampleMethod, ReweightMethod, StepOutput,
    per_sample_lm_loss,
)

from .data_order import _Batches, epoch_batches  # noqa: F401  (re-exported)
from .step import (  # noqa: F401  (re-exported: the wrapped forward lives in step.py)
    _BATCH_META, TrainingModule, _active_projector, _hidden_size, _n_hidden_states, _to_device,
    accepts_logits_to_keep, lm_forward,
)


# ----------------------------------------------------------------------------- registered state
class TrainState:
    """Step counter + extra RNG generators (e.g. the regulariser's token sampler), saved by accelerate."""

    def __init__(self, generators: dict[str, torch.Generator]) -> None:
        self.step = 0
        self.pretrain_done = False
        self.generators = generators

    def state_dict(self) -> dict:
        return {"step": self.step, "pretrain_done": self.pretrain_done,
                "generators": {k: g.get_state() for k, g in self.generators.items()}}

    def load_state_dict(self, sd: dict) -> None:
        self.step = int(sd["step"])
        self.pretrain_done = bool(sd["pretrain_done"])
        for k, st in sd.get("generators", {}).items():
            if k in self.generators:
                self.generators[k].set_state(st)


def _find_generators(*modules: Optional[nn.Module]) -> dict[str, torch.Generator]:
    out: dict[str, torch.Generator] = {}
    for j, mod in enumerate(m for m in modules if m is not None):
        for name, sub in mod.named_modules():
            for attr, val in vars(sub).items():
                if isinstance(val, torch.Generator):
                    out[f"{j}:{name}:{attr}"] = val
    return out


def versions() -> dict[str, str]:
    """Library versions recorded in ``run.json``."""
    import accelerate
    import peft
    import transformers

    try:
        from importlib.metadata import version

        fl = version("fairllava")
    except Exception:  # pragma: no cover - editable installs always have metadata
        fl = "unknown"
    return {"fairllava": fl, "torch": torch.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__, "accelerate": accelerate.__version__, "python": platform.python_version()}


def build_optimizer(model: nn.Module, method: Method, o) -> torch.optim.AdamW:
    """AdamW over the model's trainable parameters (lr) and the method's extras (``optim.dac_lr`` if set,
    else the method's own choice, e.g. ``fairness.dac_lr``, else lr). Heads never get weight decay."""
    groups = [{"params": [p for p in model.parameters() if p.requires_grad], "lr": o.lr,
               "weight_decay": o.weight_decay, "name": "model"}]
    extra = method.param_groups(o.lr)
    for g in extra:
        g.setdefault("weight_decay", 0.0)
        g.setdefault("name", method.name)
        if o.dac_lr is not None:
            g["lr"] = o.dac_lr
    return torch.optim.AdamW([g for g in groups + extra if g["params"]], lr=o.lr, weight_decay=o.weight_decay)


# ----------------------------------------------------------------------------- validation
def validate_data(cfg: TrainConfig, dataset) -> None:
    """Every configured attribute must occur in the data; fairness classes must match the vocabularies."""
    present: dict[str, int] = {a: 0 for a in cfg.data.attributes}
    for ids in dataset.attr_ids:
        for a, v in ids.items():
            if v != -100:
                present[a] += 1
    absent = [a for a, n in present.items() if n == 0]
    if absent:
        seen = sorted({k for r in dataset.records for k in (r.get("attributes") or {})})
        raise FairllavaError(
            f"{cfg.data.train}: attribute(s) {absent} in data.attributes have no value in any record "
            f"(attributes found in the data: {seen})"
        )
    if cfg.method == "fairllava":
        fc = cfg.fairness_config()
        for a, spec in fc.attributes.items():
            k = dataset.vocabs[a].num_classes
            if spec.num_classes != k:
                raise FairllavaError(
                    f"fairness.attributes.{a}.num_classes={spec.num_classes} but the vocabulary data.attributes.{a} has {k} classes"
                )


# ----------------------------------------------------------------------------- trainer
@dataclass
class _Loaded:
    model: nn.Module
    processor: Any
    dataset: Any
    indices: list[int]
    method: Method
    hidden_indices: list[int]
    val: Any = None
    compute_dtype: torch.dtype = torch.float32


class FairTrainer:
    """``FairTrainer(cfg).train() -> run_dir``. ``resume=True`` continues from the latest complete checkpoint."""

    def __init__(self, config: TrainConfig, resume: bool = False) -> None:
        self.cfg = config
        self.resume = resume
        self.run_dir = Path(config.output_dir)
        self.module: Optional[TrainingModule] = None

    # -- setup ---------------------------------------------------------------------------------
    def _check_run_dir(self) -> Optional[Path]:
        done = (self.run_dir / "run.json").is_file()
        latest = ck.latest_checkpoint(self.run_dir)
        if self.resume:
            if done:
                raise FairllavaError(f"{self.run_dir}: this run already finished (run.json exists); nothing to resume")
            return latest
        if done or latest is not None:
            raise FairllavaError(
                f"{self.run_dir}: already holds a {'finished run' if done else 'run with checkpoints'}; "
                "pass --resume to continue it or choose another --output-dir"
            )
        return None

    def _load(self, accelerator) -> _Loaded:
        from ..data import VLMDataset, vocabs_from_config
        from ..data.attributes import apply_missing_policy
        from ..models.loading import LoraSettings, apply_lora, image_token_id, load_vlm
        from ..models.precision import prepare_for_training, resolve_dtype, store_in_compute_dtype, training_attention

        cfg = self.cfg
        vocabs = vocabs_from_config(cfg.data.attributes)
        dataset = VLMDataset(cfg.data.train, cfg.data.image_root, vocabs)
        val = VLMDataset(cfg.data.val, cfg.data.image_root, vocabs) if cfg.data.val else None
        validate_data(cfg, dataset)
        if cfg.data.missing_labels != "ignore":
            kept, _ = apply_missing_policy(dataset.records, vocabs, cfg.data.missing_labels)
            keep = {r["id"] for r in kept}
            indices = [i for i, r in enumerate(dataset.records) if r["id"] in keep]
        else:
            indices = list(range(len(dataset)))
        if cfg.data.limit is not None:
            indices = indices[: cfg.data.limit]
        if not indices:
            raise FairllavaError(f"{cfg.data.train}: no training samples left after the missing-label policy/limit")

        compute_dtype = resolve_dtype(cfg.model.dtype, accelerator.device, key="model.dtype")
        _check_precision_agrees(cfg, compute_dtype)
        # Load in the checkpoint's own dtype, keep the projector (trained in both stages) at that precision in fp32,
        # and store every other weight in the compute dtype once, here (models/precision.py).
        model, processor = load_vlm(cfg.model.path, dtype="checkpoint", trust_remote_code=cfg.model.trust_remote_code)
        image_token_id(model)  # raises a clear error when the image-token mask cannot be derived
        store_in_compute_dtype(model, compute_dtype, keep_fp32=_active_projector(model))
        attn = training_attention(cfg.model.attn_implementation, accelerator.device)
        if attn is not None:
            try:
                model.set_attn_implementation(attn)
            except (ValueError, ImportError) as e:
                raise FairllavaError(f"model.attn_implementation={attn!r}: {str(e).splitlines()[0]}") from None
        if cfg.model.projector_path:
            ck.load_projector(_active_projector(model), cfg.model.projector_path)
        if cfg.model.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            if hasattr(model, "enable_input_require_grads"):
                model.enable_input_require_grads()
        model.config.use_cache = False
        if cfg.stage == 1:
            for p in model.parameters():
                p.requires_grad_(False)
            for p in _active_projector(model).parameters():
                p.requires_grad_(True)
        else:
            model = apply_lora(model, LoraSettings(r=cfg.lora.r, alpha=cfg.lora.alpha, dropout=cfg.lora.dropout,
                                                   shared_dropout=cfg.lora.shared_dropout,
                                                   fused_forward=cfg.lora.fused_forward,
                                                   fp32_sum=cfg.lora.fp32_sum))
        prepare_for_training(model, compute_dtype)
        model.train()

        n_hs = _n_hidden_states(model)
        method = self._build_method(model, dataset, indices, n_hs, accelerator, processor=processor)
        try:
            hidden_indices = method.hidden_indices(n_hs)
        except ValueError as e:
            raise FairllavaError(f"{cfg.method}: {e}") from None
        return _Loaded(model, processor, dataset, indices, method, hidden_indices, val, compute_dtype)

    def _total_steps(self, per_epoch: int) -> int:
        o = self.cfg.optim
        if o.max_steps is not None:
            return o.max_steps
        return max(1, math.ceil(o.epochs * per_epoch / o.grad_accum))

    def _build_method(self, model, dataset, indices, n_hs, accelerator, processor=None) -> Method:
        cfg = self.cfg
        if cfg.stage == 1 or cfg.method == "lora":
            return LoraMethod()
        if cfg.method == "resample":
            return ResampleMethod()
        if cfg.method == "reweight":
            from ..data.sampler import reweight_weights

            recs = [dataset.records[i] for i in indices]
            w = reweight_weights(recs, list(cfg.data.attributes), mode=cfg.reweight.mode,
                                 clip=(cfg.reweight.clip_min, cfg.reweight.clip_max), vocabs=dataset.vocabs)
            return ReweightMethod(w)
        if cfg.method == "erasure":
            from ..erasure.fit import build_erasure_method

            resume_dir = ck.latest_checkpoint(self.run_dir) if self.resume else None
            return build_erasure_method(cfg, model, processor, dataset, indices, accelerator.device, resume_dir,
                                        progress=accelerator.is_main_process and cfg.logging.progress)
        counts = {a: _counts([dataset.attr_ids[i][a] for i in indices], v.num_classes) for a, v in dataset.vocabs.items()}
        if cfg.method == "fairllava":
            from ..regularizer import FairnessRegularizer

            fc = cfg.fairness_config()
            reg = FairnessRegularizer(fc, hidden_size=_hidden_size(model))
            if fc.dac_loss in ("balanced", "logit_adjusted") and not fc.dac_class_counts:
                reg.set_class_counts({a: counts[a] for a in fc.attributes})
            if fc.update_mode == "alternating" and accelerator.num_processes > 1 and not fc.gather_across_ranks:
                raise FairllavaError(
                    "fairness.update_mode=alternating with several processes needs fairness.gather_across_ranks: true "
                    "(the heads are stepped outside DDP and stay identical only when every rank sees the global batch)"
                )
            method = FairLLaVAMethod(reg, fc)
            if fc.mi_conditional and fc.mi_strata_source == "chexpert_rules":  # strata derived from target reports
                from ..regularizer.strata import chexpert_strata

                method.strata_by_id = chexpert_strata([dataset.records[i] for i in indices], fc.mi_strata_findings)
            return method
        if cfg.method == "adversarial":
            nc = {a: v.num_classes for a, v in dataset.vocabs.items()}
            steps = self._total_steps(1)  # replaced once the data order is known
            return AdversarialMethod(_hidden_size(model), nc, cfg.adversarial, steps,
                                     {a: torch.tensor(c) for a, c in counts.items()})
        raise FairllavaError(f"method: unknown {cfg.method!r}")  # pragma: no cover - config validates

    # -- checkpoint hooks ----------------------------------------------------------------------
    @staticmethod
    def _install_hooks(accelerator) -> None:
        """Checkpoint only trainable weights (LoRA, projector, heads), not the frozen base model."""

        # Names without the DDP "module." prefix, so a checkpoint resumes under another process count.
        def plain(name: str) -> str:
            return name[len("module."):] if name.startswith("module.") else name

        def save_hook(models, weights, output_dir):
            for i, (m, w) in enumerate(zip(models, weights)):
                keep = {n for n, p in m.named_parameters() if p.requires_grad}
                sd = {plain(k): v for k, v in w.items() if k in keep}
                if accelerator.is_main_process:
                    ck.save_tensors(sd, Path(output_dir) / f"trainable_{i}.safetensors")
            weights.clear()

        def load_hook(models, input_dir):
            for i, m in enumerate(models):
                sd = ck.load_tensors(Path(input_dir) / f"trainable_{i}.safetensors")
                params = {plain(n): p for n, p in m.named_parameters() if p.requires_grad}
                if set(sd) != set(params):
                    diff = sorted(set(sd) ^ set(params))[:3]
                    raise FairllavaError(
                        f"{input_dir}: checkpoint weights do not match this run's trainable parameters (e.g. {diff})"
                    )
                with torch.no_grad():
                    for n, p in params.items():
                        p.copy_(sd[n].to(p.device, p.dtype))
            models.clear()

        accelerator.register_save_state_pre_hook(save_hook)
        accelerator.register_load_state_pre_hook(load_hook)

    def _write_artifacts(self, out: Path, model, method: Method) -> None:
        """Adapter (PEFT), projector, heads and config into ``out`` (main process)."""
        cfg = self.cfg
        if cfg.stage == 2:
            model.save_pretrained(str(out))
        ck.save_tensors(ck.module_state(_active_projector(model)), out / ck.PROJECTOR_FILE,
                        {"stage": cfg.stage, "base_model": cfg.model.path})
        heads = method.module if method.module is not None else getattr(method, "regularizer", None)
        if heads is not None:
            ck.save_tensors(ck.module_state(heads), out / ck.HEADS_FILE,
                            {"method": cfg.method, "attributes": list(cfg.data.attributes)})
        method.save_artifacts(out)
        save_config(cfg, out / "config.yaml")

    # -- main loop -----------------------------------------------------------------------------
    def train(self) -> Path:
        from accelerate import Accelerator
        from accelerate.utils import DistributedDataParallelKwargs, set_seed
        from transformers import get_scheduler

        from ..data import VLMCollator

        cfg = self.cfg
        o = cfg.optim
        find_unused = cfg.method == "adversarial" and cfg.adversarial.pretrain_steps > 0
        accelerator = Accelerator(
            mixed_precision=o.mixed_precision, cpu=not torch.cuda.is_available(),
            kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=find_unused)],
        )
        resume_from = self._check_run_dir()
        if resume_from is not None:
            ck.check_same_config(cfg, resume_from / "config.yaml")
        set_seed(o.seed)
        loaded = self._load(accelerator)
        model, method = loaded.model, loaded.method
        rank, world = accelerator.process_index, accelerator.num_processes

        balanced = None
        if isinstance(method, ResampleMethod):
            from ..data.sampler import AttributeBalancedBatchSampler

            ds = loaded.dataset
            labels = {a: [ds.attr_ids[i][a] for i in loaded.indices] for a in cfg.data.attributes}
            balanced = AttributeBalancedBatchSampler(labels, o.per_device_batch_size, order=cfg.resample.order,
                                                     seed=o.seed, rank=rank, world_size=world)
        batches = _Batches(len(loaded.indices), cfg, rank, world, balanced)
        total = self._total_steps(batches.per_epoch)
        if isinstance(method, AdversarialMethod):
            method.total_steps = total

        optimizer = build_optimizer(model, method, o)
        scheduler = get_scheduler(o.scheduler if o.scheduler != "constant" else "constant_with_warmup", optimizer,
                                  num_warmup_steps=int(round(o.warmup_ratio * total)), num_training_steps=total)
        module = TrainingModule(model, method, loaded.hidden_indices, compact_logits=cfg.model.compact_logits,
                                compute_dtype=loaded.compute_dtype)
        module, optimizer = accelerator.prepare(module, optimizer)
        extra_opt = None
        if isinstance(method, FairLLaVAMethod) and method.update_mode == "alternating":
            method.regularizer.to(accelerator.device)
            extra_opt = method.make_dac_optimizer(o.lr, override=o.dac_lr)
        pre_opt = None
        if isinstance(method, AdversarialMethod) and cfg.adversarial.pretrain_steps > 0:
            pre_opt = torch.optim.AdamW(method.module.parameters(), lr=cfg.adversarial.pretrain_lr, weight_decay=0.0)
        state = TrainState(_find_generators(module, getattr(method, "regularizer", None)))
        accelerator.register_for_checkpointing(scheduler, state)
        for opt in (extra_opt, pre_opt):
            if opt is not None:
                accelerator.register_for_checkpointing(opt)
        budget = None  # fairness.penalty_grad_clip / penalty_grad_ratio: the penalty's gradient clipped on its own
        if isinstance(method, FairLLaVAMethod) and method.separate_penalty:
            from ..regularizer.budget import PenaltyBudget

            budget = PenaltyBudget.for_optimizer(method.regularizer.cfg, optimizer, accelerator)
        if isinstance(method, FairLLaVAMethod):
            # Heads outside the wrapped module (alternating) and running statistics (mi_standardize) are not
            # trainable parameters of the model, so the save hook does not see them: checkpoint the whole regulariser.
            accelerator.register_for_checkpointing(method.regularizer)
        self._install_hooks(accelerator)

        main = accelerator.is_main_process
        if main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.run_dir / "config.yaml")
        logger = MetricsLogger(self.run_dir, enabled=main, tensorboard=cfg.logging.tensorboard)
        if resume_from is not None:
            accelerator.load_state(str(resume_from))
            logger.truncate_after(state.step)
        elif self.resume and main:
            from ..progress import console

            console.print(f"[yellow]no complete checkpoint in {self.run_dir}; starting from step 0[/yellow]")
        accelerator.wait_for_everyone()

        collator = VLMCollator(loaded.processor, loaded.dataset.vocabs, mode="train", max_length=cfg.data.max_length,
                               task_labels=_task_label_classes(cfg, loaded), system_prompt=cfg.data.system_prompt)
        from .data_order import BatchLoader

        loader = BatchLoader(batches, loaded.dataset, loaded.indices, collator, num_workers=cfg.data.num_workers,
                             limit=total * o.grad_accum, pin_memory=accelerator.device.type == "cuda")

        def get_batch(k: int) -> tuple[int, dict]:
            epoch, batch = loader(k)
            return epoch, _to_device(batch, accelerator.device)

        t0 = time.time()
        # ---- optional discriminator pre-training (adversarial): backbone frozen, LoRA off
        if pre_opt is not None and not state.pretrain_done:
            method.pretraining = True
            for s in range(cfg.adversarial.pretrain_steps):
                _, batch = get_batch(s)
                loss, logs, _ = module(batch, 0.0, 0, pretrain=True)
                pre_opt.zero_grad(set_to_none=True)
                accelerator.backward(loss)
                pre_opt.step()
                if main and (s + 1) % cfg.logging.every_n_steps == 0:
                    logger.log(0, {"phase": "pretrain", "pretrain_step": s + 1, **logs})
            optimizer.zero_grad(set_to_none=True)
            method.pretraining = False
            state.pretrain_done = True

        ga = o.grad_accum
        progress = Progress(total, state.step, enabled=main and cfg.logging.progress, description=f"stage {cfg.stage} {cfg.method}")
        params = [p for g in optimizer.param_groups for p in g["params"]]
        acc_logs: dict[str, list[float]] = {}
        try:
            while state.step < total:
                step = state.step
                frac = step / total
                for micro in range(ga):
                    epoch, batch = get_batch(step * ga + micro)
                    sync = micro == ga - 1
                    ctx = contextlib.nullcontext() if sync else accelerator.no_sync(module)
                    with ctx:
                        loss, logs, aux = module(batch, frac, step)
                        res = method.after_forward(StepOutput(loss, logs, aux), batch, step)
                        if budget is not None:
                            budget.accumulate(res.aux.get("penalty_loss"), 1.0 / ga)
                        accelerator.backward(res.loss / ga)
                    for k, v in res.logs.items():
                        acc_logs.setdefault(k, []).append(float(v))
                if budget is not None:
                    for k, v in budget.apply(o.max_grad_norm, accelerator).items():
                        acc_logs.setdefault(k, []).append(v)
                elif o.max_grad_norm and o.max_grad_norm > 0:
                    gn = accelerator.clip_grad_norm_(params, o.max_grad_norm)
                    acc_logs.setdefault("grad_norm", []).append(float(gn))
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                state.step = step + 1
                do_ckpt = state.step % cfg.checkpointing.every_n_steps == 0 or state.step == total
                extra = {}
                if do_ckpt and loaded.val is not None:
                    extra["val/lm_loss"] = self._validate(accelerator, module, loaded.val, collator)
                if state.step % cfg.logging.every_n_steps == 0 or state.step == total or extra:
                    row = self._reduce_logs(accelerator, acc_logs) if acc_logs else {}
                    row.update({"epoch": epoch, "lr": scheduler.get_last_lr()[0], **extra})
                    logger.log(state.step, row)
                    progress.update(state.step, row)
                    acc_logs = {}
                else:
                    progress.update(state.step)
                if do_ckpt:
                    self._save_checkpoint(accelerator, module, method, state.step)
        except DeadDACError:  # fairness.on_dead_dac=error: no checkpoint of this run may look complete
            if main:
                ck.discard_checkpoints(self.run_dir)
            raise
        finally:
            loader.close()
            progress.close()
            logger.close()

        accelerator.wait_for_everyone()
        self.module = accelerator.unwrap_model(module)  # for inspection after training (notebooks, tests)
        if main:
            self._finish(accelerator.unwrap_model(module).model, method, state.step, time.time() - t0, world, total)
        accelerator.wait_for_everyone()
        accelerator.end_training()
        return self.run_dir

    @staticmethod
    def _reduce_logs(accelerator, acc: dict[str, list[float]]) -> dict[str, float]:
        """Mean over micro-batches, then over processes (``n_valid`` with gathering is already global)."""
        keys = sorted(acc)
        local = torch.tensor([sum(v) / len(v) for v in (acc[k] for k in keys)], dtype=torch.float64)
        if accelerator.num_processes > 1:
            local = accelerator.reduce(local.to(accelerator.device), reduction="mean").cpu()
        return {k: float(x) for k, x in zip(keys, local.tolist())}

    def _validate(self, accelerator, module, val, collator) -> float:
        """Token-mean LM loss on ``data.val`` (eval mode, no grad; consumes no RNG, so resume stays exact)."""
        from ..models.precision import autocast

        wrapped = accelerator.unwrap_model(module)
        model = wrapped.model
        bs = self.cfg.optim.per_device_batch_size
        rank, world = accelerator.process_index, accelerator.num_processes
        mine = list(range(rank, len(val), world))
        tot = torch.zeros(2, dtype=torch.float64)
        was_training = model.training
        model.eval()
        with torch.no_grad():
            for i in range(0, len(mine), bs):
                batch = _to_device(collator([val[j] for j in mine[i:i + bs]]), accelerator.device)
                inputs = {k: v for k, v in batch.items() if k not in _BATCH_META and isinstance(v, torch.Tensor)}
                with autocast(accelerator.device, wrapped.compute_dtype):
                    out, labels = lm_forward(model, inputs, batch["labels"], wrapped.compact_logits)
                per, n = per_sample_lm_loss(out.logits.float(), labels)
                tot += torch.stack([(per * n).sum(), n.sum()]).double().cpu()
        model.train(was_training)
        if world > 1:
            tot = accelerator.reduce(tot.to(accelerator.device), reduction="sum").cpu()
        return float(tot[0] / tot[1].clamp_min(1))

    def _save_checkpoint(self, accelerator, module, method, step: int) -> None:
        tmp = ck.temp_checkpoint_dir(self.run_dir, step)
        if accelerator.is_main_process and tmp.exists():
            shutil.rmtree(tmp)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp))
        if accelerator.is_main_process:
            self._write_artifacts(tmp, accelerator.unwrap_model(module).model, method)
            atomic_write_json(tmp / ck.STATE_FILE, {"step": step, "method": self.cfg.method, "stage": self.cfg.stage})
            ck.publish_checkpoint(tmp, step)
            ck.prune_checkpoints(self.run_dir, self.cfg.checkpointing.keep_last)
        accelerator.wait_for_everyone()

    def _finish(self, model, method, steps: int, seconds: float, world: int, total: int) -> None:
        """Final artefacts at the top of the run dir; ``run.json`` last marks the run complete."""
        tmp = self.run_dir / ".final.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        self._write_artifacts(tmp, model, method)
        for f in tmp.iterdir():
            os.replace(f, self.run_dir / f.name)
        tmp.rmdir()
        atomic_write_json(self.run_dir / "run.json", {
            "status": "complete", "stage": self.cfg.stage, "method": self.cfg.method, "steps": steps,
            "total_steps": total, "processes": world, "seconds_last_session": round(seconds, 3),
            "base_model": self.cfg.model.path, "versions": versions(),
            "compute_dtype": str(self.module.compute_dtype).replace("torch.", "") if self.module is not None else None,
            "files": sorted(p.name for p in self.run_dir.iterdir() if p.is_file()),
        })


def _check_precision_agrees(cfg: TrainConfig, compute_dtype: torch.dtype) -> None:
    """``optim.mixed_precision`` (accelerate's autocast + fp16 loss scaling) must not contradict ``model.dtype``."""
    mp = cfg.optim.mixed_precision
    want = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mp)
    if want is not None and want != compute_dtype:
        raise FairllavaError(f"optim.mixed_precision={mp} contradicts model.dtype={cfg.model.dtype} (computes in "
                             f"{str(compute_dtype).replace('torch.', '')}); set them alike or mixed_precision: 'no'")
    if compute_dtype == torch.float16 and mp != "fp16":
        raise FairllavaError("model.dtype=float16 needs optim.mixed_precision: fp16 (its gradient scaler; fp16 "
                             "gradients underflow without it); or use bfloat16")


def _task_label_classes(cfg: TrainConfig, loaded: "_Loaded") -> Optional[list[str]]:
    """Task-label classes (records' ``label``) for ``fairness.mi_conditional``; None when it is off."""
    if cfg.method != "fairllava" or not cfg.fairness.get("mi_conditional", False) or \
            cfg.fairness.get("mi_strata_source", "label") != "label":
        return None
    recs = [loaded.dataset.records[i] for i in loaded.indices] + (loaded.val.records if loaded.val is not None else [])
    classes = sorted({str(r["label"]) for r in recs if r.get("label") is not None})
    if not classes:
        raise FairllavaError(f"{cfg.data.train}: fairness.mi_conditional needs a 'label' field in the records; none has "
                             "one (report generation: set fairness.mi_strata_source: chexpert_rules)")
    return classes


def _counts(values: list[int], k: int) -> list[int]:
    c = [0] * k
    for v in values:
        if v != -100:
            c[int(v)] += 1
    return c


def train(config: TrainConfig, resume: bool = False) -> Path:
    """Train one run; returns the run directory."""
    return FairTrainer(config, resume=resume).train()
