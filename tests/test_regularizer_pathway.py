"""The regulariser on the paper's pathway (tiny LLaVA): the penalty's gradient reaches LoRA weights at or below the
tapped mid layer (not only the projector), the estimate stays fp32 under bf16 autocast, and the trainer runs the
new knobs end to end (separate penalty budget, other-sample negatives, label queue, CheXpert-rule strata) and
stops a dead-DAC run without leaving a checkpoint that looks complete."""
from __future__ import annotations

import json
import re

import pytest
import torch
from test_training import make_fixture, overrides

from fairllava import FairnessConfig, FairnessRegularizer
from fairllava.errors import FairllavaError


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_fixture(tmp_path_factory.mktemp("pathfix"), n=8)


def _lora_batch(data):
    from fairllava.data import VLMCollator, VLMDataset, vocabs_from_config
    from fairllava.models.loading import LoraSettings, apply_lora, load_vlm

    model, proc = load_vlm(str(data / "model"), dtype="float32")
    model = apply_lora(model, LoraSettings(r=4, alpha=8, dropout=0.0))
    vocabs = vocabs_from_config({"sex": "sex", "age_group": "age_group"})
    ds = VLMDataset(data / "train.jsonl", data / "img", vocabs)
    batch = VLMCollator(proc, ds.vocabs, mode="train", max_length=64)([ds[i] for i in range(8)])
    return model, batch


def _penalty_grads(model, batch, layer_index):
    from fairllava.models.hidden_states import HiddenStateCapture, decoder_layers

    n_hs = len(decoder_layers(model).layers) + 1
    reg = FairnessRegularizer(FairnessConfig(attributes={"sex": 2}, mi_layer_index=layer_index, mi_pooling="token",
                                             mi_l2_normalize=False, mi_penalty="signed"), hidden_size=64)
    torch.nn.init.normal_(reg.heads["sex"].weight, std=1.0)  # a DAC that reads z, so dP/dz != 0
    idx = reg.layer_indices(n_hs)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values")}
    model.zero_grad(set_to_none=True)
    with HiddenStateCapture(model, idx) as cap:
        model(**inputs, use_cache=False)
    mask = reg.select_tokens(batch["attention_mask"], batch["image_mask"])
    out = reg([cap.states[i] for i in idx], mask, {"sex": batch["attr_labels"]["sex"]}, step=0)
    out["dim_loss"].backward()
    reached = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            reached[name] = p.grad is not None and bool(p.grad.abs().sum() > 0)
    return idx[0], n_hs, reached


def test_penalty_gradient_reaches_lora_at_the_mid_layer_not_only_the_projector(data):
    model, batch = _lora_batch(data)
    idx, n_hs, reached = _penalty_grads(model, batch, None)  # mi_layer_frac 0.5 -> the paper's mid layer
    assert idx == n_hs // 2 == 2
    layer = {n: int(m.group(1)) for n in reached if (m := re.search(r"layers\.(\d+)\.", n))}
    lora_b = [n for n in reached if "lora_B" in n]
    below = [n for n in lora_b if layer[n] < idx]   # blocks whose output feeds hidden-state index idx
    above = [n for n in lora_b if layer[n] >= idx]
    assert below and above
    assert all(reached[n] for n in below), [n for n in below if not reached[n]]
    assert not any(reached[n] for n in above)  # nothing above the tap: it is the penalty's gradient alone
    assert any(reached[n] for n in reached if "multi_modal_projector" in n)
    # the demo's index-0 setting (the projector's output) reaches no LoRA weight at all: the point
    _, _, reached0 = _penalty_grads(model, batch, 0)
    assert not any(reached0[n] for n in lora_b)
    assert any(reached0[n] for n in reached0 if "multi_modal_projector" in n)


def test_estimate_stays_fp32_under_bf16_autocast():
    g = torch.Generator().manual_seed(0)
    h = (3 * torch.randn(6, 5, 16, generator=g)).to(torch.bfloat16)
    mask = torch.ones(6, 5, dtype=torch.bool)
    lab = {"sex": torch.tensor([0, 1, 0, 1, 1, 0])}
    kw = dict(attributes={"sex": 2}, mi_pooling="masked_mean", mi_penalty="signed")
    reg = FairnessRegularizer(FairnessConfig(**kw), hidden_size=16)
    torch.nn.init.normal_(reg.heads["sex"].weight, std=1.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = reg([h], mask, lab, step=0)
    from fairllava import club_mi

    z = h.float().mean(1)  # the pooled states, upcast *before* the head
    ref = club_mi(reg.heads["sex"](z).double(), lab["sex"])
    assert out["dim_loss"].dtype == torch.float32
    assert abs(out["logs"]["mi/sex"] - ref.item()) < 1e-5  # bf16 pooling or a bf16 head matmul: off by ~1e-2


def _metrics(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_trainer_runs_the_new_knobs_end_to_end(data, tmp_path):
    from fairllava.training.config import load_config
    from fairllava.training.trainer import FairTrainer

    run = tmp_path / "run"
    sets = ["method=fairllava", "optim.max_steps=3", "fairness.penalty_grad_clip=0.01", "fairness.penalty_grad_ratio=0.5",
            "fairness.mi_pooling=token", "fairness.negatives=other_samples", "fairness.queue_size=64",
            "fairness.mi_conditional=true", "fairness.mi_strata_source=chexpert_rules",
            "fairness.mi_skip_single_group_strata=true", "fairness.dac_lr=0.01", "fairness.mi_standardize=true",
            "fairness.mi_l2_normalize=false"]
    cfg = load_config(None, overrides(data, run, *sets), preset_name="cpu")
    FairTrainer(cfg).train()
    rows = _metrics(run)
    assert (run / "run.json").is_file() and len(rows) == 3
    for r in rows:
        assert 0.0 <= r["penalty_grad_scale"] <= 1.0 and r["penalty_grad_norm"] >= 0.0
        assert r["penalty_grad_norm"] * r["penalty_grad_scale"] <= min(0.01, 0.5 * min(r["grad_norm"], 1.0)) + 1e-6
        assert "dac_bacc/sex" in r
    assert any(r["penalty_grad_norm"] > 0 for r in rows)  # the penalty was active and went through the budget


def test_dead_dac_error_leaves_no_complete_checkpoint(data, tmp_path):
    from fairllava.training import checkpoint as ck
    from fairllava.training.config import load_config
    from fairllava.training.trainer import FairTrainer

    run = tmp_path / "dead"
    # margin 1.0: any DAC counts as "at chance", so the check trips deterministically at step 2, after the
    # checkpoint of step 1 was published
    sets = ["method=fairllava", "optim.max_steps=4", "checkpointing.every_n_steps=1", "fairness.on_dead_dac=error",
            "fairness.dac_health_warmup_steps=2", "fairness.dac_health_window=8", "fairness.dac_health_margin=1.0"]
    cfg = load_config(None, overrides(data, run, *sets), preset_name="cpu")
    with pytest.raises(FairllavaError, match=r"DEAD DAC .*fairness\.on_dead_dac=error"):
        FairTrainer(cfg).train()
    assert not (run / "run.json").exists()
    assert ck.latest_checkpoint(run) is None
    assert list((run / "checkpoints").glob(".failed-checkpoint-*"))  # kept for inspection, not resumable


def test_chexpert_strata_from_target_reports():
    from fairllava.regularizer.strata import chexpert_strata

    recs = [{"id": i, "conversations": [{"from": "human", "value": "<image>\ndescribe"}, {"from": "gpt", "value": t}]}
            for i, t in enumerate(["No acute cardiopulmonary process.", "Mild cardiomegaly.",
                                   "Small left pleural effusion. Mild cardiomegaly.", "Lungs are clear."])]
    assert chexpert_strata(recs, ["No Finding"]) == {"0": 1, "1": 0, "2": 0, "3": 1}
    two = chexpert_strata(recs, ["Cardiomegaly", "Pleural Effusion"])
    assert two["1"] != two["2"] and two["0"] == two["3"] and len(set(two.values())) == 3
    with pytest.raises(FairllavaError, match="mi_strata_source=chexpert_rules: no training record"):
        chexpert_strata([{"id": 0, "conversations": [{"from": "human", "value": "x"}]}], ["No Finding"])
    with pytest.raises(FairllavaError, match="not CheXpert findings"):
        FairnessConfig(mi_strata_source="chexpert_rules", mi_strata_findings=["Fractured Ego"])
