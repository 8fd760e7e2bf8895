"""TrainConfig: one strict YAML file per run, ``--set a.b=value`` overrides and packaged presets.

Why strict: the reference silently ignored misspelled keys (METHOD.md §12 #4) and its code defaults
differed from its configs (§12 #5). Here an unknown key is an error naming its path and the valid
keys, a missing required key is an error, every preset states every key, and the resolved config is
saved with the run.
"""
from __future__ import annotations

import dataclasses
import re
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from ..errors import FairllavaError

METHODS = ("lora", "fairllava", "reweight", "resample", "adversarial", "erasure")
_REQUIRED = dataclasses.MISSING
_NUMBER = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


@dataclass
class ModelConfig:
    """The base VLM (HF folder or hub id) and an optional stage-1 projector file to start from."""

    path: str
    # Compute precision (models/precision.py): frozen weights stored in it, trainable weights and optimizer state
    # fp32, the forward autocast to it, losses and the regulariser in fp32. auto = bf16 where the device has bf16
    # matmul (CUDA, or a CPU with avx512_bf16/AMX), else float32.
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    projector_path: Optional[str] = None
    trust_remote_code: bool = False
    gradient_checkpointing: bool = False
    # LM-head logits only where the loss reads them (same loss; x1.35 per step on the demo model); models whose
    # forward has no ``logits_to_keep`` get full logits.
    compact_logits: bool = True
    # Attention kernel for training: auto = eager (matmul + softmax, bf16 bmm on AMX) on a CPU, where torch's
    # flash-attention backward was a quarter of a bf16 step at the demo's 71 tokens; the model's own default (sdpa)
    # on a GPU. Or name one: eager, sdpa, flash_attention_2.
    attn_implementation: str = "auto"


@dataclass
class DataConfig:
    """Training records (DESIGN.md "Records") and the attribute vocabularies used for labels.

    ``attributes`` maps attribute name -> vocabulary spec (preset name such as ``race8`` or a mapping),
    see :func:`fairllava.data.attributes.vocabs_from_config`.
    """

    train: str
    attributes: dict = field(default_factory=dict)
    val: Optional[str] = None
    image_root: Optional[str] = None
    missing_labels: Literal["ignore", "drop", "error"] = "ignore"
    max_length: int = 2048
    limit: Optional[int] = None
    num_workers: int = 0
    # Chat-template system turn (null = the template's default). Generation and the audit must use the same
    # (`fairllava generate/audit --system-prompt`), otherwise the model is tested on prompts it never saw.
    system_prompt: Optional[str] = None


@dataclass
class LoraSection:
    r: int = 64
    alpha: int = 128
    dropout: float = 0.05
    shared_dropout: bool = True  # one mask per distinct input (q/k/v, gate/up share), drawn cheaply; false = PEFT's
    fused_forward: bool = True  # models/lora_fused.py: fewer, larger kernels for the same LoRA values
    # Under bf16/fp16 autocast: LoRA layers that add their update to the base output in fp32 and return fp32, so
    # early updates are not rounded away (models/lora_fused.py): none | residual (o_proj/down_proj: the residual
    # stream stays fp32) | all. all is the one that keeps bf16's 100-step loss curve within fp32's seed-to-seed variation
    # (bench/bf16_lora_lag.py), at x1.19 step time. residual and all need fused_forward; auto = all with it, none
    # without. No effect in fp32.
    fp32_sum: Literal["auto", "none", "residual", "all"] = "auto"


@dataclass
class AdversarialConfig:
    """Adv. MLP classifier baseline (METHOD.md §10): DACMLP on tapped layers behind a gradient reversal."""

    taps: list = field(default_factory=lambda: [14, 16, 20])
    hidden: Optional[int] = None
    dropout: float = 0.1
    fairness_lambda: float = 1.0
    ce_loss_weight: float = 1.0
    grl_start: float = 0.1
    grl_end: Optional[float] = None  # None -> fairness_lambda
    ramp_from_frac: float = 0.01
    ramp_to_frac: float = 0.9
    pretrain_steps: int = 0
    pretrain_lr: float = 1e-3
    loss_mode: Literal["ce", "focal", "balanced", "logit_adjusted"] = "balanced"
    token_mode: Literal["image", "text", "all"] = "image"


@dataclass
class ReweightConfig:
    """Reweighting-All baseline: inverse frequency of the intersectional cell (or per-attribute product)."""

    mode: Literal["intersectional", "product"] = "intersectional"
    clip_min: float = 0.1
    clip_max: float = 10.0


@dataclass
class ResampleConfig:
    """Resampling-All baseline: balanced round-robin over attributes in this order (null = data order)."""

    order: Optional[list] = None


@dataclass
class ErasureConfig:
    """Method ``erasure`` (fairllava/erasure): LEACE of the attributes from the projector's input (the frozen vision
    tower's output), fitted once on the training split before stage 2, applied as a fixed layer (docs/training.md)."""

    attributes: Optional[list] = None  # null = every data.attributes
    mode: Literal["conditional", "global"] = "conditional"  # conditional: within each task label (records' label)
    max_fit_samples: Optional[int] = None  # null = the whole training split
    svd_tol: float = 0.01  # concept-erasure's truncation of weak directions (whitened units)
    constrain_cov_trace: bool = False  # true trades exact erasure for a non-increasing feature variance


@dataclass
class OptimConfig:
    lr: float = 1e-4
    dac_lr: Optional[float] = None
    weight_decay: float = 0.0
    warmup_ratio: float = 0.03
    scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    epochs: float = 1.0
    max_steps: Optional[int] = None
    per_device_batch_size: int = 6
    grad_accum: int = 2
    max_grad_norm: float = 1.0
    seed: int = 42
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"


@dataclass
class CheckpointConfig:
    every_n_steps: int = 500
    keep_last: int = 2


@dataclass
class LoggingConfig:
    every_n_steps: int = 10
    tensorboard: bool = True
    progress: bool = True


@dataclass
class TrainConfig:
    """One training run. ``stage`` 1 trains the projector only; stage 2 trains LoRA + projector + method."""

    model: ModelConfig
    data: DataConfig
    output_dir: str
    stage: Literal[1, 2] = 2
    method: Literal["lora", "fairllava", "reweight", "resample", "adversarial", "erasure"] = "fairllava"
    lora: LoraSection = field(default_factory=LoraSection)
    fairness: dict = field(default_factory=dict)
    adversarial: AdversarialConfig = field(default_factory=AdversarialConfig)
    reweight: ReweightConfig = field(default_factory=ReweightConfig)
    resample: ResampleConfig = field(default_factory=ResampleConfig)
    erasure: ErasureConfig = field(default_factory=ErasureConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    checkpointing: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_dict(cls, d: Any, where: str = "config") -> "TrainConfig":
        cfg = _build(cls, d, where)
        cfg.check()
        return cfg

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def check(self) -> None:
        """Cross-field rules that need no data or model (those are in :func:`trainer.validate_run`)."""
        o = self.optim
        for name, val, lo in (("optim.per_device_batch_size", o.per_device_batch_size, 1),
                              ("optim.grad_accum", o.grad_accum, 1),
                              ("checkpointing.every_n_steps", self.checkpointing.every_n_steps, 1),
                              ("checkpointing.keep_last", self.checkpointing.keep_last, 1),
                              ("logging.every_n_steps", self.logging.every_n_steps, 1),
                              ("data.max_length", self.data.max_length, 8),
                              ("data.num_workers", self.data.num_workers, 0)):
            if val < lo:
                raise FairllavaError(f"{name}: expected >= {lo}, got {val}")
        if o.lr <= 0:
            raise FairllavaError(f"optim.lr: expected > 0, got {o.lr}")
        if o.max_steps is None and o.epochs <= 0:
            raise FairllavaError("optim: set epochs > 0 or max_steps")
        if o.max_steps is not None and o.max_steps < 1:
            raise FairllavaError(f"optim.max_steps: expected >= 1, got {o.max_steps}")
        if not 0 <= o.warmup_ratio < 1:
            raise FairllavaError(f"optim.warmup_ratio: expected in [0, 1), got {o.warmup_ratio}")
        if self.lora.fp32_sum in ("residual", "all") and not self.lora.fused_forward:
            raise FairllavaError(f"lora.fp32_sum: {self.lora.fp32_sum!r} needs lora.fused_forward: true (PEFT's own "
                                 "forward sums in the compute dtype); set fp32_sum: auto or fused_forward: true")
        if self.stage == 1 and self.method != "lora":
            raise FairllavaError(f"method: stage 1 trains the projector with the LM loss only; use method: lora (got {self.method!r})")
        if self.method == "fairllava" and not self.fairness:
            raise FairllavaError("fairness: method 'fairllava' needs a fairness block (attributes, weights, ...)")
        if self.method in ("fairllava", "reweight", "resample", "adversarial", "erasure") and not self.data.attributes:
            raise FairllavaError(f"data.attributes: method {self.method!r} needs at least one attribute")
        a = self.adversarial
        if not a.taps or any(not isinstance(t, int) or isinstance(t, bool) for t in a.taps):
            raise FairllavaError(f"adversarial.taps: expected a non-empty list of hidden-state indices, got {a.taps!r}")
        if not 0 <= a.ramp_from_frac < a.ramp_to_frac <= 1:
            raise FairllavaError("adversarial: expected 0 <= ramp_from_frac < ramp_to_frac <= 1")
        if self.reweight.clip_min <= 0 or self.reweight.clip_max < self.reweight.clip_min:
            raise FairllavaError("reweight: expected 0 < clip_min <= clip_max")
        e = self.erasure
        if e.attributes is not None:
            unknown = [x for x in e.attributes if x not in self.data.attributes]
            if not e.attributes or unknown:
                raise FairllavaError(f"erasure.attributes: {unknown or e.attributes} is not a non-empty subset of "
                                     f"data.attributes {sorted(self.data.attributes)}")
        if e.max_fit_samples is not None and e.max_fit_samples < 2:
            raise FairllavaError(f"erasure.max_fit_samples: expected >= 2 or null, got {e.max_fit_samples}")
        if e.svd_tol <= 0:
            raise FairllavaError(f"erasure.svd_tol: expected > 0, got {e.svd_tol}")
        if self.resample.order is not None:
            unknown = [x for x in self.resample.order if x not in self.data.attributes]
            if unknown:
                raise FairllavaError(f"resample.order: {unknown} not in data.attributes {sorted(self.data.attributes)}")
        if self.fairness:
            self.fairness_config()  # strict validation by the regulariser's own schema

    def fairness_config(self):
        """The regulariser's :class:`FairnessConfig` (strictly validated by ``FairnessConfig.from_dict``)."""
        from ..regularizer import FairnessConfig

        try:
            fc = FairnessConfig.from_dict(dict(self.fairness))
        except FairllavaError as e:
            raise FairllavaError(f"fairness: {e}") from None
        except (ValueError, TypeError, KeyError) as e:
            raise FairllavaError(f"fairness: {e}") from None
        names = list(_fairness_attr_names(fc))
        missing = [n for n in names if n not in self.data.attributes]
        if missing:
            raise FairllavaError(
                f"fairness.attributes: {missing} have no vocabulary in data.attributes {sorted(self.data.attributes)}"
            )
        return fc


def _fairness_attr_names(fc: Any) -> list[str]:
    attrs = getattr(fc, "attributes", {})
    if isinstance(attrs, dict):
        return list(attrs)
    return [getattr(a, "name", a) for a in attrs]


# ---------------------------------------------------------------------- strict builder
def _build(tp: Any, value: Any, where: str) -> Any:
    """Convert plain YAML data to ``tp`` (dataclass / Optional / Literal / scalar), strictly."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise FairllavaError(f"{where}: expected a mapping, got {type(value).__name__}")
        hints = typing.get_type_hints(tp)
        fields = {f.name: f for f in dataclasses.fields(tp)}
        unknown = [k for k in value if k not in fields]
        if unknown:
            raise FairllavaError(
                f"{where}.{unknown[0]}: unknown key (valid keys: {', '.join(fields)})"
            )
        kwargs = {}
        for name, f in fields.items():
            if name in value:
                kwargs[name] = _build(hints[name], value[name], f"{where}.{name}")
            elif f.default is _REQUIRED and f.default_factory is _REQUIRED:  # type: ignore[misc]
                raise FairllavaError(f"{where}.{name}: missing required key")
        return tp(**kwargs)
    if origin is Union:
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _build(inner[0], value, where)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices or isinstance(value, bool) != any(isinstance(c, bool) for c in choices):
            raise FairllavaError(f"{where}: expected one of {list(choices)}, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise FairllavaError(f"{where}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise FairllavaError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str) and _NUMBER.match(value.strip()):
            value = float(value)  # YAML 1.1 reads "2e-4" (no dot) as a string
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise FairllavaError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str) or not value:
            raise FairllavaError(f"{where}: expected a non-empty string, got {value!r}")
        return value
    if tp is dict or origin is dict:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise FairllavaError(f"{where}: expected a mapping, got {type(value).__name__}")
        return value
    if tp is list or origin is list:
        if not isinstance(value, list):
            raise FairllavaError(f"{where}: expected a list, got {value!r}")
        return value
    raise TypeError(f"unsupported config type {tp!r} at {where}")  # pragma: no cover - programming error


# ---------------------------------------------------------------------- YAML, overrides, presets
def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise FairllavaError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise FairllavaError(f"{path}: invalid YAML ({str(e).splitlines()[0]})") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise FairllavaError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def apply_overrides(data: dict, overrides: list[str] | tuple[str, ...]) -> dict:
    """Apply ``a.b.c=value`` overrides in place; ``value`` is parsed as YAML (``1e-4``, ``true``, ``[1,2]``)."""
    for ov in overrides or ():
        if "=" not in ov:
            raise FairllavaError(f"--set {ov!r}: expected key.path=value")
        key, raw = ov.split("=", 1)
        parts = [p for p in key.strip().split(".")]
        if not all(parts):
            raise FairllavaError(f"--set {ov!r}: empty key component")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            value = raw
        node = data
        for i, p in enumerate(parts[:-1]):
            nxt = node.get(p)
            if nxt is None:
                nxt = node[p] = {}
            if not isinstance(nxt, dict):
                raise FairllavaError(f"--set {ov!r}: {'.'.join(parts[:i + 1])} is not a mapping")
            node = nxt
        node[parts[-1]] = value
    return data


# Mappings whose keys are a set (attribute names): a file replaces them whole instead of merging,
# so a single-attribute run on top of a three-attribute preset really has one attribute.
_REPLACE_WHOLE = {("data", "attributes"), ("fairness", "attributes")}


def _deep_merge(base: dict, top: dict, prefix: tuple = ()) -> dict:
    out = dict(base)
    for k, v in top.items():
        key = prefix + (k,)
        if isinstance(v, dict) and isinstance(out.get(k), dict) and key not in _REPLACE_WHOLE:
            out[k] = _deep_merge(out[k], v, key)
        else:
            out[k] = v
    return out


def list_presets() -> list[str]:
    """Names of the packaged presets (``fairllava/presets/*.yaml``)."""
    root = resources.files("fairllava") / "presets"
    return sorted(p.name[:-5] for p in root.iterdir() if p.name.endswith(".yaml"))


def preset_dict(name: str) -> dict:
    names = list_presets()
    if name not in names:
        raise FairllavaError(f"unknown preset {name!r} (available: {', '.join(names)})")
    text = (resources.files("fairllava") / "presets" / f"{name}.yaml").read_text(encoding="utf-8")
    return yaml.safe_load(text) or {}


def preset(name: str, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """A packaged preset as a validated config (data paths usually come from ``overrides``)."""
    return TrainConfig.from_dict(apply_overrides(preset_dict(name), overrides), where=f"preset {name}")


def load_config(
    path: str | Path | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    preset_name: str | None = None,
) -> TrainConfig:
    """Load a run config: preset (optional) <- YAML file (optional) <- ``--set`` overrides, then validate.

    A YAML file may name its own base with a top-level ``preset: NAME`` key.
    """
    data: dict = {}
    where = "config"
    file_data: dict = {}
    if path is not None:
        file_data = _read_yaml(Path(path))
        where = f"{path}: config"
        base = file_data.pop("preset", None)
        if base is not None:
            if preset_name is not None and preset_name != base:
                raise FairllavaError(f"{path}: preset {base!r} conflicts with --preset {preset_name!r}")
            preset_name = base
    if preset_name is not None:
        data = preset_dict(preset_name)
    data = _deep_merge(data, file_data)
    apply_overrides(data, overrides)
    return TrainConfig.from_dict(data, where=where)


def save_config(cfg: TrainConfig, path: str | Path) -> None:
    """Write the resolved config atomically (YAML, every key stated)."""
    from ..io import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
