"""Patient-level resampling end to end: generate copies group_id, evaluation resamples whole clusters."""
import json

import numpy as np
import pytest
from PIL import Image

from fairllava.fairness import evaluate_predictions


def test_generate_copies_group_id(tmp_path):
    from fairllava.generation import generate_predictions
    from fairllava.models.tiny import build_tiny_llava

    (tmp_path / "img").mkdir()
    recs = []
    for i in range(4):
        Image.fromarray(np.full((16, 16, 3), 40 * i, dtype="uint8")).save(tmp_path / "img" / f"{i}.png")
        recs.append({"id": f"s{i}", "group_id": f"patient{i // 2}", "image": f"{i}.png",
                     "conversations": [{"from": "human", "value": "<image>\nDescribe."},
                                       {"from": "gpt", "value": "Normal."}], "attributes": {"sex": "FM"[i % 2]}})
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    model, proc = build_tiny_llava(seed=0)
    generate_predictions(model, proc, tmp_path / "d.jsonl", tmp_path / "p.jsonl", image_root=tmp_path / "img",
                         max_new_tokens=2, progress=False)
    rows = [json.loads(x) for x in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert [r["group_id"] for r in rows] == ["patient0", "patient0", "patient1", "patient1"]


def _clustered_rows(n_patients=80, per=4, seed=0):
    """Every patient's samples get the same answer correctness: perfectly correlated within patient."""
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(n_patients):
        ok = rng.random() < 0.7
        sex = "FM"[p % 2]
        for k in range(per):
            label = "MEL" if k % 2 else "NV"
            pred = label if ok else ("NV" if label == "MEL" else "MEL")
            rows.append({"id": f"p{p}-{k}", "group_id": f"p{p}", "prediction": pred, "reference": label,
                         "label": label, "attributes": {"sex": sex}})
    return rows


def test_evaluation_resamples_clusters_when_present_and_says_so():
    rows = _clustered_rows()
    kw = dict(task="vqa", labels=["MEL", "NV"], metrics=["accuracy"], n_boot=400, n_perm=0, n_min=5,
              directions=["sex=F>M"])
    clus = evaluate_predictions(rows, **kw)
    iid = evaluate_predictions(rows, cluster=False, **kw)
    bare = evaluate_predictions([{k: v for k, v in r.items() if k != "group_id"} for r in rows], **kw)
    assert clus.meta["resampling"].startswith("cluster") and "80 clusters of 320" in clus.meta["resampling"]
    assert iid.meta["resampling"].startswith("iid") and bare.meta["resampling"].startswith("iid")

    def width(ci):
        return ci[1] - ci[0]

    # 4 identical samples per patient: the honest interval is about sqrt(4) = 2 times the iid one
    for get in (lambda r: r.ci["overall"]["accuracy"], lambda r: r.signed_gap["sex"]["accuracy"]["ci"]):
        ratio = width(get(clus)) / width(get(iid))
        assert 1.6 < ratio < 2.5, ratio
    assert width(bare.ci["overall"]["accuracy"]) == pytest.approx(width(iid.ci["overall"]["accuracy"]))
    cell = clus.signed_gap["sex"]["accuracy"]
    assert cell["units"] == {"advantaged": 40, "disadvantaged": 40} and cell["resampling"].startswith("cluster")
