"""TrainConfig: strict schema, overrides, presets (METHOD.md §9.4), errors before any training."""
from __future__ import annotations

import dataclasses

import pytest
import yaml

from fairllava.errors import FairllavaError
from fairllava.regularizer import FairnessConfig
from fairllava.training.config import (
    AdversarialConfig, CheckpointConfig, DataConfig, ErasureConfig, LoggingConfig, LoraSection, ModelConfig, OptimConfig,
    ResampleConfig, ReweightConfig, TrainConfig, apply_overrides, list_presets, load_config, preset, preset_dict,
)

PATHS = ["model.path=/m", "data.train=/d/train.jsonl", "output_dir=/o"]


def _minimal(**extra) -> dict:
    d = {"model": {"path": "/m"}, "data": {"train": "/t.jsonl", "attributes": {"sex": "sex"}}, "output_dir": "/o",
         "method": "lora"}
    d.update(extra)
    return d


def test_presets_listed_and_unknown_lists_them():
    names = list_presets()
    assert set(names) >= {"mimic_cxr", "mimic_cxr_lambda_ablate", "padchest", "ham10000", "ham10000_stronger", "cpu"}
    with pytest.raises(FairllavaError, match=r"unknown preset 'nope'.*mimic_cxr"):
        preset("nope")


# Only the run-specific paths may be absent from a preset.
_RUN_SPECIFIC = {("model", "path"), ("data", "train"), ("data", "val"), ("data", "image_root"), ("output_dir",)}
_SECTIONS = {"model": ModelConfig, "data": DataConfig, "lora": LoraSection, "adversarial": AdversarialConfig,
             "reweight": ReweightConfig, "resample": ResampleConfig, "erasure": ErasureConfig, "optim": OptimConfig,
             "checkpointing": CheckpointConfig, "logging": LoggingConfig}


@pytest.mark.parametrize("name", ["mimic_cxr", "mimic_cxr_lambda_ablate", "padchest", "ham10000", "ham10000_stronger", "cpu"])
def test_every_preset_states_every_key_and_validates(name):
    d = preset_dict(name)
    for f in dataclasses.fields(TrainConfig):
        if (f.name,) in _RUN_SPECIFIC:
            continue
        assert f.name in d, f"{name}: top-level key {f.name} not stated"
        if f.name in _SECTIONS:
            for sf in dataclasses.fields(_SECTIONS[f.name]):
                if (f.name, sf.name) not in _RUN_SPECIFIC:
                    assert sf.name in d[f.name], f"{name}: {f.name}.{sf.name} not stated"
    assert set(d["fairness"]) == set(FairnessConfig.valid_keys()), f"{name}: fairness keys incomplete"
    cfg = preset(name, PATHS)
    assert cfg.model.path == "/m" and cfg.output_dir == "/o"
    fc = cfg.fairness_config()
    assert fc.mi_token_mode == "image" and fc.mi_drop_bos_eos is False


@pytest.mark.parametrize(
    "name,weights,w_dac,lam,w_ce,frac",
    [
        ("mimic_cxr", {"race": 0.2, "age_group": 0.6, "sex": 0.1}, 1.0, 1.0, 1.0, 0.5),
        ("padchest", {"age_group": 3.0, "sex": 2.0}, 5.0, 0.5, 1.0, 0.5),
        ("ham10000", {"age_group": 0.6, "sex": 0.2}, 1.0, 0.5, 1.0, 0.5),
        ("ham10000_stronger", {"age_group": 0.4, "sex": 0.15}, 0.2, 0.5, 1.0, 0.8),
    ],
)
def test_preset_values_match_method_table(name, weights, w_dac, lam, w_ce, frac):
    fc = preset(name, PATHS).fairness_config()
    assert {a: s.weight for a, s in fc.attributes.items()} == weights
    assert (fc.dac_loss_weight, fc.fairness_lambda, fc.ce_loss_weight, fc.mi_layer_frac) == (w_dac, lam, w_ce, frac)
    cfg = preset(name, PATHS)
    assert (cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout) == (64, 128, 0.05)
    assert cfg.optim.lr == 1e-4 and cfg.optim.warmup_ratio == 0.03 and cfg.optim.scheduler == "cosine"
    assert cfg.optim.max_grad_norm == 1.0 and cfg.optim.seed == 42
    if "race" in fc.attributes:
        assert fc.attributes["race"].num_classes == 8


def test_lambda_ablate_is_single_attribute_with_half_lambda():
    fc = preset("mimic_cxr_lambda_ablate", PATHS).fairness_config()
    assert len(fc.attributes) == 1 and fc.fairness_lambda == 0.5


def test_unknown_key_names_path_and_valid_keys():
    with pytest.raises(FairllavaError, match=r"config\.optim\.lr_rate: unknown key \(valid keys: lr, dac_lr"):
        TrainConfig.from_dict(_minimal(optim={"lr_rate": 1e-4}))
    with pytest.raises(FairllavaError, match=r"config\.bogus: unknown key"):
        TrainConfig.from_dict(_minimal(bogus=1))


def test_missing_required_key():
    d = _minimal()
    del d["model"]["path"]
    with pytest.raises(FairllavaError, match=r"config\.model\.path: missing required key"):
        TrainConfig.from_dict(d)
    d = _minimal()
    del d["output_dir"]
    with pytest.raises(FairllavaError, match=r"config\.output_dir: missing required key"):
        TrainConfig.from_dict(d)


def test_unknown_method_and_bad_types():
    with pytest.raises(FairllavaError, match=r"config\.method: expected one of \['lora', 'fairllava'"):
        TrainConfig.from_dict(_minimal(method="dro"))
    with pytest.raises(FairllavaError, match=r"config\.optim\.grad_accum: expected an integer"):
        TrainConfig.from_dict(_minimal(optim={"grad_accum": "2"}))
    with pytest.raises(FairllavaError, match=r"config\.stage: expected one of \[1, 2\]"):
        TrainConfig.from_dict(_minimal(stage=3))
    with pytest.raises(FairllavaError, match=r"stage 1 trains the projector"):
        TrainConfig.from_dict(_minimal(stage=1, method="reweight"))


def test_fairness_block_validated_strictly():
    with pytest.raises(FairllavaError, match=r"fairness: .*unknown key\(s\) \['mi_ce_loss_weight'\]"):
        TrainConfig.from_dict(_minimal(method="fairllava", fairness={"attributes": {"sex": 2}, "mi_ce_loss_weight": 1.0}))
    with pytest.raises(FairllavaError, match=r"fairness\.attributes: \['race'\] have no vocabulary in data\.attributes"):
        TrainConfig.from_dict(_minimal(method="fairllava", fairness={"attributes": {"race": 8}}))
    with pytest.raises(FairllavaError, match=r"needs a fairness block"):
        TrainConfig.from_dict(_minimal(method="fairllava"))


def test_overrides_are_yaml_typed(tmp_path):
    p = tmp_path / "run.yaml"
    p.write_text(yaml.safe_dump({"preset": "cpu", "model": {"path": "/m"}, "data": {"train": "/t"}, "output_dir": "/o"}))
    cfg = load_config(p, ["optim.lr=2e-4", "logging.tensorboard=true", "optim.max_steps=7", "adversarial.taps=[1, 2]",
                          "fairness.fairness_lambda=0.25", "model.projector_path=null"])
    assert cfg.optim.lr == 2e-4 and isinstance(cfg.optim.lr, float)
    assert cfg.logging.tensorboard is True and cfg.optim.max_steps == 7 and cfg.adversarial.taps == [1, 2]
    assert cfg.fairness_config().fairness_lambda == 0.25 and cfg.model.projector_path is None
    with pytest.raises(FairllavaError, match=r"--set 'optim\.lr': expected key\.path=value"):
        apply_overrides({}, ["optim.lr"])
    with pytest.raises(FairllavaError, match=r"config\.optim\.lrr: unknown key"):
        load_config(p, ["optim.lrr=1"])


def test_file_replaces_attribute_sets_whole(tmp_path):
    p = tmp_path / "run.yaml"
    p.write_text(yaml.safe_dump({"preset": "mimic_cxr", "model": {"path": "/m"}, "data": {"train": "/t", "attributes": {"sex": "sex"}},
                                 "fairness": {"attributes": {"sex": {"num_classes": 2, "weight": 0.1}}}, "output_dir": "/o"}))
    cfg = load_config(p)
    assert list(cfg.data.attributes) == ["sex"]
    fc = cfg.fairness_config()
    assert list(fc.attributes) == ["sex"] and fc.dac_loss_weight == 1.0  # the rest still comes from the preset


def test_config_file_errors(tmp_path):
    with pytest.raises(FairllavaError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(FairllavaError, match="invalid YAML"):
        load_config(bad)


def test_resolved_config_round_trips(tmp_path):
    from fairllava.training.config import save_config

    cfg = preset("padchest", PATHS)
    save_config(cfg, tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    assert again.to_dict() == cfg.to_dict()


def test_cli_presets_lists_all():
    from typer.testing import CliRunner

    from fairllava.cli import app

    res = CliRunner().invoke(app, ["presets"])
    assert res.exit_code == 0
    for name in list_presets():
        assert name in res.output
    assert "mimic_cxr\tmethod=fairllava\tstage=2\tattributes=race,age_group,sex" in res.output


def test_resume_treats_a_config_saved_before_fp32_sum_as_none(tmp_path):
    """A checkpoint from before ``lora.fp32_sum`` existed summed in the compute dtype: resuming it under the new
    default (auto = all) would silently change the computation, so the resume check must see a difference."""
    from fairllava.training.checkpoint import check_same_config
    from fairllava.training.config import save_config

    base = {"model": {"path": "m"}, "data": {"train": "t.jsonl"}, "output_dir": str(tmp_path / "o"),
            "method": "lora"}
    cfg = TrainConfig.from_dict(base)
    save_config(cfg, tmp_path / "config.yaml")
    check_same_config(cfg, tmp_path / "config.yaml")  # the same config resumes
    old = yaml.safe_load((tmp_path / "config.yaml").read_text())
    del old["lora"]["fp32_sum"]  # what an older version wrote
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(old))
    with pytest.raises(FairllavaError, match=r"differs from the checkpoint's .* at lora\.fp32_sum;"):
        check_same_config(cfg, tmp_path / "config.yaml")
    check_same_config(TrainConfig.from_dict({**base, "lora": {"fp32_sum": "none"}}), tmp_path / "config.yaml")
