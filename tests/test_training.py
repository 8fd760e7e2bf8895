"""Trainer on the tiny LLaVA (CPU): every method trains, only intended parameters move, PEFT reload parity,
errors before training. Kill-and-resume and the 2-process run are in test_training_resume.py."""
from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fairllava.errors import FairllavaError
from fairllava.training.config import load_config
from fairllava.training.logging import read_metrics
from fairllava.training.trainer import FairTrainer


def make_fixture(root: Path, n: int = 12) -> Path:
    """A tiny LLaVA folder + images + a train.jsonl with sex/age_group labels (some missing)."""
    from PIL import Image

    from fairllava.models.tiny import save_tiny_llava

    root.mkdir(parents=True, exist_ok=True)
    save_tiny_llava(root / "model")
    (root / "img").mkdir(exist_ok=True)
    rng = random.Random(0)
    rows = []
    for i in range(n):
        Image.new("RGB", (32, 32), tuple(rng.randrange(256) for _ in range(3))).save(root / "img" / f"{i}.png")
        rows.append({
            "id": f"s{i}", "group_id": f"p{i}", "image": f"{i}.png",
            "conversations": [{"from": "human", "value": "<image>\ndescribe the chest"},
                              {"from": "gpt", "value": rng.choice(["no acute process.", "mild cardiomegaly.",
                                                                  "small left pleural effusion."])}],
            "label": ["normal", "abnormal"][i % 2],
            "attributes": {"sex": "F" if i % 3 == 0 else "M", "age_group": [None, "0-44", "45-65", "66+"][i % 4], "race": None},
        })
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def overrides(data: Path, out: Path, *extra: str) -> list[str]:
    return [f"model.path={data / 'model'}", f"data.train={data / 'train.jsonl'}", f"data.image_root={data / 'img'}",
            f"output_dir={out}", "optim.max_steps=2", "optim.per_device_batch_size=4", "data.max_length=64",
            "logging.progress=false", "checkpointing.every_n_steps=2", "lora.dropout=0.0", *extra]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_fixture(tmp_path_factory.mktemp("trainfix"))


@pytest.fixture(scope="module")
def base_state(data) -> dict[str, torch.Tensor]:
    from transformers import LlavaForConditionalGeneration

    m = LlavaForConditionalGeneration.from_pretrained(str(data / "model"))
    return {k: v.detach().clone() for k, v in m.named_parameters()}


def _base_name(name: str) -> str | None:
    """PEFT parameter name -> name in the saved base model (None for LoRA / trainable projector copies)."""
    if "lora_" in name or ".modules_to_save." in name:
        return None
    name = name.removeprefix("base_model.model.").replace(".base_layer.", ".").replace(".original_module.", ".")
    return name


def _check_only_intended_changed(trainer: FairTrainer, base: dict[str, torch.Tensor], stage: int = 2) -> None:
    model = trainer.module.model
    n_frozen = n_lora_moved = 0
    for name, p in model.named_parameters():
        key = _base_name(name) if stage == 2 else name
        if key is None:
            if "lora_B" in name:
                n_lora_moved += int(p.detach().abs().sum() > 0)  # lora_B starts at exactly 0
            continue
        if stage == 1 and "multi_modal_projector" in name:
            assert not torch.equal(p.detach(), base[key].to(p.dtype)), f"projector {name} did not train"
            continue
        # frozen weights are stored in the compute dtype (bf16 under model.dtype=auto on a bf16 CPU): compare in it
        assert torch.equal(p.detach(), base[key].to(p.dtype)), f"frozen parameter {name} changed"
        n_frozen += 1
    assert n_frozen > 20
    if stage == 2:
        assert n_lora_moved > 0, "no LoRA weight moved"
        proj = [(n, p) for n, p in model.named_parameters() if ".modules_to_save." in n]
        assert proj and any(not torch.equal(p.detach(), base[_proj_key(n)]) for n, p in proj), "projector did not train"


def _proj_key(name: str) -> str:
    return name.removeprefix("base_model.model.").replace(".modules_to_save.default.", ".")


def _heads_moved(run_dir: Path) -> bool:
    ck = sorted((run_dir / "checkpoints").glob("checkpoint-*"))
    first = load_file(str(ck[0] / "heads.safetensors"))
    last = load_file(str(run_dir / "heads.safetensors"))
    return any(not torch.equal(first[k], last[k]) for k in first)


CASES = {
    "lora": ([], ["lm_loss", "grad_norm", "lr"]),
    # fp32 here: _check_plain_peft_reload compares logits exactly (the bf16 path is the other cases' default)
    "fairllava": (["model.dtype=float32"], ["lm_loss", "fair_loss", "mi/sex", "dim/age_group", "dac_ce/sex", "dac_acc/age_group", "n_valid/sex"]),
    "fairllava_alt": (["method=fairllava", "fairness.update_mode=alternating"], ["lm_loss", "mi/sex", "dac_acc/sex", "n_valid/age_group"]),
    "fairllava_cond": (["method=fairllava", "fairness.mi_conditional=true"], ["lm_loss", "mi/sex", "n_valid/sex"]),
    "reweight": ([], ["lm_loss", "weighted_lm_loss", "mean_weight"]),
    "resample": ([], ["lm_loss"]),
    "adversarial": (["adversarial.pretrain_steps=1"], ["lm_loss", "adv_ce/sex", "adv_acc/age_group", "grl_strength", "n_valid/sex"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_method_trains_logs_and_moves_only_intended_params(case, data, base_state, tmp_path):
    extra, keys = CASES[case]
    method = case.split("_")[0]
    out = tmp_path / case
    every = "checkpointing.every_n_steps=1" if method in ("fairllava", "adversarial") else "checkpointing.every_n_steps=2"
    cfg = load_config(None, overrides(data, out, f"method={method}", every, *extra), preset_name="cpu")
    trainer = FairTrainer(cfg)
    assert trainer.train() == out
    rows = read_metrics(out)
    assert [r["step"] for r in rows if "phase" not in r] == [1, 2]
    for k in keys:
        assert k in rows[-1], f"{k} not logged ({sorted(rows[-1])})"
    assert all(r["lm_loss"] > 0 for r in rows if "lm_loss" in r)
    _check_only_intended_changed(trainer, base_state)
    for f in ("adapter_config.json", "adapter_model.safetensors", "projector.safetensors", "config.yaml", "run.json"):
        assert (out / f).is_file(), f
    assert json.loads((out / "run.json").read_text())["steps"] == 2
    if method in ("fairllava", "adversarial"):
        assert _heads_moved(out), "DAC heads / discriminator did not train"
    if case == "adversarial":
        pre = [r for r in rows if r.get("phase") == "pretrain"]
        assert pre and "adv_ce/sex" in pre[0]
    if case == "reweight":
        assert rows[-1]["weighted_lm_loss"] != rows[-1]["lm_loss"]
    if case == "fairllava":
        _check_plain_peft_reload(trainer, data, cfg, out)


def test_stage1_trains_projector_only(data, base_state, tmp_path):
    out = tmp_path / "s1"
    cfg = load_config(None, overrides(data, out, "stage=1", "method=lora", "optim.lr=1e-2"), preset_name="cpu")
    trainer = FairTrainer(cfg)
    trainer.train()
    _check_only_intended_changed(trainer, base_state, stage=1)
    assert (out / "projector.safetensors").is_file() and not (out / "adapter_config.json").exists()
    # The stage-1 projector seeds a stage-2 run.
    out2 = tmp_path / "s2"
    cfg2 = load_config(None, overrides(data, out2, "method=lora", f"model.projector_path={out / 'projector.safetensors'}",
                                       "optim.max_steps=1"), preset_name="cpu")
    t2 = FairTrainer(cfg2)
    t2.train()
    stage1 = load_file(str(out / "projector.safetensors"))
    orig = [p for n, p in t2.module.model.named_parameters() if ".original_module." in n and "projector" in n]
    assert orig and all(any(torch.equal(p.detach(), t) for t in stage1.values()) for p in orig)


def _check_plain_peft_reload(trainer, data, cfg, out):
    """The saved adapter reloads with plain PEFT on the base model and gives the trained model's logits."""
    from peft import PeftModel
    from transformers import LlavaForConditionalGeneration

    from fairllava.data import VLMCollator, VLMDataset, vocabs_from_config
    from fairllava.models.tiny import build_tiny_processor

    trained = trainer.module.model.eval()
    base = LlavaForConditionalGeneration.from_pretrained(str(data / "model"))
    reloaded = PeftModel.from_pretrained(base, str(out)).eval()
    vocabs = vocabs_from_config(cfg.data.attributes)
    ds = VLMDataset(data / "train.jsonl", data / "img", vocabs)
    batch = VLMCollator(build_tiny_processor(), vocabs, max_length=64)([ds[i] for i in range(3)])
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values")}
    with torch.no_grad():
        a = trained(**inputs).logits
        b = reloaded(**inputs).logits
        c = LlavaForConditionalGeneration.from_pretrained(str(data / "model"))(**inputs).logits
    # the trained model attends with the CPU training kernel (eager), the plain reload with the model's default
    # (sdpa): same function, other fp32 reduction order, so close rather than bit-equal; training's effect is larger
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(a, c, rtol=1e-3, atol=1e-3), "training changed nothing"


def test_errors_before_training(data, tmp_path):
    out = tmp_path / "bad_attr"
    cfg = load_config(None, overrides(data, out, "method=lora", "data.attributes={sex: sex, age_group: age_group, race: race8}"), preset_name="cpu")
    with pytest.raises(FairllavaError, match=r"attribute\(s\) \['race'\] in data\.attributes have no value in any record"):
        FairTrainer(cfg).train()
    assert not (out / "metrics.jsonl").exists()

    cfg = load_config(None, overrides(data, tmp_path / "bad_k", "fairness.attributes.sex.num_classes=3"), preset_name="cpu")
    with pytest.raises(FairllavaError, match=r"fairness\.attributes\.sex\.num_classes=3 but the vocabulary .* has 2"):
        FairTrainer(cfg).train()

    # A model whose image-token mask cannot be derived.
    import shutil

    bad = tmp_path / "noimg"
    shutil.copytree(data / "model", bad)
    c = json.loads((bad / "config.json").read_text())
    c["image_token_index"] = -1
    c.pop("image_token_id", None)
    (bad / "config.json").write_text(json.dumps(c))
    out = tmp_path / "bad_model"
    cfg = load_config(None, overrides(data, out, f"model.path={bad}"), preset_name="cpu")
    with pytest.raises(FairllavaError, match="cannot derive the image-token mask"):
        FairTrainer(cfg).train()
    assert not (out / "metrics.jsonl").exists()

    cfg = load_config(None, overrides(data, tmp_path / "taps", "method=adversarial", "adversarial.taps=[1, 40]"), preset_name="cpu")
    with pytest.raises(FairllavaError, match=r"adversarial.*taps: \[40\] out of range"):
        FairTrainer(cfg).train()


def test_refuses_to_overwrite_and_resume_refuses_a_changed_config(data, tmp_path):
    out = tmp_path / "once"
    cfg = load_config(None, overrides(data, out, "method=lora"), preset_name="cpu")
    FairTrainer(cfg).train()
    with pytest.raises(FairllavaError, match="already holds a finished run"):
        FairTrainer(cfg).train()
    with pytest.raises(FairllavaError, match="already finished"):
        FairTrainer(cfg, resume=True).train()
    (out / "run.json").unlink()  # as if killed after the last checkpoint
    changed = load_config(None, overrides(data, out, "method=lora", "optim.lr=5e-3"), preset_name="cpu")
    with pytest.raises(FairllavaError, match=r"--resume: the config differs .* at optim\.lr"):
        FairTrainer(changed, resume=True).train()
    same = load_config(None, overrides(data, out, "method=lora", "logging.every_n_steps=5"), preset_name="cpu")
    FairTrainer(same, resume=True).train()  # logging may change; nothing left to train, run completes
    assert json.loads((out / "run.json").read_text())["steps"] == 2
    assert [r["step"] for r in read_metrics(out)] == [1, 2]


def test_validation_loss_and_tensorboard(data, tmp_path):
    out = tmp_path / "val"
    # fp32: the check below recomputes the loss in one batch (other padding), exact only without bf16 rounding
    cfg = load_config(None, overrides(data, out, "method=lora", f"data.val={data / 'train.jsonl'}", "model.dtype=float32",
                                      "logging.tensorboard=true", "checkpointing.every_n_steps=2"), preset_name="cpu")
    trainer = FairTrainer(cfg)
    trainer.train()
    rows = read_metrics(out)
    assert "val/lm_loss" not in rows[0] and rows[1]["val/lm_loss"] > 0
    # the logged value is the token-mean LM loss of the final model on the val records
    from fairllava.data import VLMCollator, VLMDataset, vocabs_from_config
    from fairllava.training.methods import per_sample_lm_loss

    vocabs = vocabs_from_config(cfg.data.attributes)
    ds = VLMDataset(data / "train.jsonl", data / "img", vocabs)
    model = trainer.module.model.eval()
    b = VLMCollator(trainer_processor(data), vocabs, max_length=64)([ds[i] for i in range(len(ds))])
    with torch.no_grad():
        per, n = per_sample_lm_loss(model(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                                          pixel_values=b["pixel_values"]).logits, b["labels"])
    assert rows[1]["val/lm_loss"] == pytest.approx(float((per * n).sum() / n.sum()), rel=1e-4)
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))


def trainer_processor(data: Path):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(str(data / "model"))


def test_system_prompt_reaches_the_training_prompts(data, tmp_path):
    """data.system_prompt changes what the model is trained on (first-step loss); the same prompt reproduces it."""
    def first_loss(name, *extra):
        out = tmp_path / name
        cfg = load_config(None, overrides(data, out, "method=lora", "optim.max_steps=1", "logging.every_n_steps=1",
                                          *extra), preset_name="cpu")
        FairTrainer(cfg).train()
        return read_metrics(out)[0]["lm_loss"]

    default = first_loss("default")
    custom = first_loss("custom", "data.system_prompt=Be brief.")
    again = first_loss("again", "data.system_prompt=Be brief.")
    assert custom == again
    assert custom != default


def test_data_workers_give_the_same_batches_and_weights_as_in_process(data, tmp_path):
    """data.num_workers reads and collates in worker processes; batches, order and results are the same
    (one process computes both sides, so bit-exact). The adversary's pre-training re-reads batches 0..1 before
    the main loop starts again at 0, and 4 steps of 3 batches cross an epoch."""
    runs = {}
    for w in (0, 2):
        out = tmp_path / f"w{w}"
        cfg = load_config(None, overrides(data, out, "method=adversarial", "adversarial.pretrain_steps=2",
                                          "optim.max_steps=4", f"data.num_workers={w}"), preset_name="cpu")
        FairTrainer(cfg).train()
        runs[w] = load_file(str(out / "adapter_model.safetensors")), [
            {k: v for k, v in r.items() if k != "time"} for r in read_metrics(out)]
    (a0, m0), (a2, m2) = runs[0], runs[2]
    assert a0.keys() == a2.keys() and all(torch.equal(a0[k], a2[k]) for k in a0)
    assert m0 == m2


def test_batch_loader_follows_the_requests_in_any_order():
    from fairllava.training.data_order import BatchLoader

    class Order:
        def __getitem__(self, k):
            return divmod(k, 3)[0], [k % 3, (k + 1) % 3]

    def collate(items):
        return {"ids": torch.tensor(items)}

    loader = BatchLoader(Order(), dataset=[10, 11, 12], index_map=[2, 1, 0], collator=collate, num_workers=1, limit=4)
    seen = [(k, *loader(k)) for k in (0, 1, 2, 0, 1, 3, 4, 5, 7)]
    for k, epoch, batch in seen:
        want = [[12, 11], [11, 10], [10, 12]][k % 3]
        assert epoch == k // 3 and batch["ids"].tolist() == want, (k, epoch, batch)
    loader.close()
