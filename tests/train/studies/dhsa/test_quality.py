"""``python -m train dhsa-quality``: the rows are the models they name, the scores are the plain mean loss over
the recorded windows, a budget covering the context gives dense, and predictor files of the wrong setting fail."""

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open

from arch.dhsa import DHSA
from arch.registry import ConfigError
from train.checkpoint import load_trained
from train.cli import main
from train.datamodules import LMDataModule
from train.studies.dhsa.boundaries import dhsa_boundaries
from train.studies.dhsa.quality import dhsa_quality, format_table, merge_results, predictor_switch, quality_variants

from ....conftest import CONFIGS, micro_overrides

TINY = str(CONFIGS / "lm/gpt-tiny.yaml")
T = 64
# blocks of 8 queries see 4 initial keys, 4 recent ones, themselves and the top-scored chunks: the chunks decide
SPARSE = ["query_block=8", "n_init=4", "n_recent=4", "chunk_size=8", "threshold=-100", "nms_radius=2"]


@pytest.fixture(scope="module")
def run(tmp_path_factory, cache_dir):
    """A micro dense LM (T 64, GQA 2/1) and its boundary predictors in both settings."""
    tmp = tmp_path_factory.mktemp("quality")
    assert main(["fit", TINY, *micro_overrides(tmp, cache_dir, **{"model.max_seq_len": T, "model.n_kv_heads": 1})]) == 0
    (run,) = (tmp / "runs" / "gpt-tiny").iterdir()
    kw = dict(batches=2, val_batches=1, steps=4, hidden=32, progress=False)
    files = {s: run / "dhsa" / f"{s}.safetensors" for s in ("ours", "authors")}
    for s, path in files.items():
        dhsa_boundaries(str(run), setting=s, out=str(path), **kw)
    return run, {s: str(p) for s, p in files.items()}


def test_each_row_builds_the_model_it_names(run, tmp_path):
    run, files = run
    moved = {s: tmp_path / f"moved-{s}.safetensors" for s in files}  # the switch reads the file given, not the old path
    for s, path in files.items():
        moved[s].write_bytes(Path(path).read_bytes())
        moved[s].with_suffix(".json").write_bytes(Path(path).with_suffix(".json").read_bytes())
    switches = {s: predictor_switch(str(p), s) for s, p in moved.items()}
    assert [o for o in switches["ours"] if "predictor=" in o] == [f"model.mixer.predictor={moved['ours']}"]
    rows = quality_variants(16, switches, SPARSE)
    assert rows["dense"] == [] and list(rows) == ["fixed", "ours", "authors", "dense"]
    models = {name: load_trained(run, extra)[1] for name, extra in rows.items() if name != "dense"}
    for model in models.values():
        for block in model.blocks:
            m = block.mixer
            assert isinstance(m, DHSA) and m.mode == "prefill" and m.budget == 16 and m.query_block == 8
    assert all(b.mixer.chunker == "fixed" for b in models["fixed"].blocks)
    with safe_open(files["ours"], framework="pt") as f:
        for i, block in enumerate(models["ours"].blocks):
            m = block.mixer
            assert m.chunker == "learned" and m.query_rep == "chunks" and m.boundary.residual
            assert not m.share_boundaries
            for key, p in m.boundary.state_dict().items():
                assert torch.equal(p, f.get_tensor(f"layers.{i}.{key}")), key
    with safe_open(files["authors"], framework="pt") as f:
        for block in models["authors"].blocks:
            m = block.mixer
            assert m.chunker == "learned" and m.query_rep == "block" and not m.boundary.residual
            assert m.share_boundaries
            for key, p in m.boundary.state_dict().items():
                assert torch.equal(p, f.get_tensor(f"shared.{key}")), key


def direct_loss(run, overrides: list[str], starts: list[int]) -> float:
    """The mean next-token cross-entropy over the held-out windows [s, s + T + 1), one window at a time."""
    cfg, model = load_trained(run, overrides)
    data = LMDataModule(cfg, full_validation=True)
    data.setup()
    val = torch.as_tensor(data.splits["validation"]["tokens"].astype("int64"))
    with torch.no_grad():
        losses = [F.cross_entropy(model(val[s : s + T][None])[0], val[s + 1 : s + T + 1]) for s in starts]
    return torch.stack(losses).mean().item()


def test_scores_against_a_direct_loss_and_a_budget_covering_the_context_against_dense(run, tmp_path):
    run, files = run
    r = dhsa_quality(
        str(run),
        ours=files["ours"],
        authors=files["authors"],
        budgets=[T, 16],
        mixer=SPARSE,
        tokens=6 * T,
        out=str(tmp_path / "q.json"),
    )
    starts, res = r["window_starts"], r["results"]
    assert len(starts) == 6 and len(set(starts)) == 6 and all(s % T == 0 for s in starts)
    assert json.loads((tmp_path / "q.json").read_text())["results"]["dense"]["loss"] == res["dense"]["loss"]
    assert res["dense"]["loss"] == pytest.approx(direct_loss(run, [], starts), rel=1e-5)
    for name in ("fixed", "ours", "authors"):
        full = res[f"{name}@{T}"]  # the budget counts the keys before a block: >= T - 1 is every key
        assert full["loss"] == pytest.approx(res["dense"]["loss"], rel=1e-5) and full["recall"] == pytest.approx(1)
        sparse = res[f"{name}@16"]
        assert sparse["loss"] == pytest.approx(direct_loss(run, sparse["overrides"], starts), rel=1e-5)
        assert 0 < sparse["recall"] < 0.99 and abs(sparse["loss"] - res["dense"]["loss"]) > 1e-5
    losses = {name: res[f"{name}@16"]["loss"] for name in ("fixed", "ours", "authors")}
    assert len({round(v, 6) for v in losses.values()}) == 3  # the three selections differ at this budget
    check_merge(run, r, tmp_path)


def check_merge(run, whole: dict, tmp_path):
    """Parts of one result (rows and budgets apart, as parallel runs write them) merge into its table."""
    parts = []
    split = [(["ours", "dense"], [T, 16]), (["fixed", "authors"], [16]), (["authors"], [T]), (["fixed"], [T])]
    for i, (rows, budgets) in enumerate(split):
        keep = {
            k: v
            for k, v in whole["results"].items()
            if k.split("@")[0] in rows and (k == "dense" or int(k.split("@")[1]) in budgets)
        }
        parts.append(tmp_path / f"part{i}.json")
        parts[-1].write_text(json.dumps({**whole, "rows": rows, "budgets": budgets, "results": keep}))
    merged = merge_results(str(run), [str(p) for p in parts])
    assert merged["budgets"] == [T, 16] and format_table(merged) == format_table(whole)
    with pytest.raises(ConfigError, match="--merge: no file holds fixed@64"):
        merge_results(str(run), [str(p) for p in parts[:3]])
    other = {**json.loads(parts[3].read_text()), "window_starts": whole["window_starts"][1:]}
    parts[3].write_text(json.dumps(other))
    with pytest.raises(ConfigError, match="part3.json has other window_starts"):
        merge_results(str(run), [str(p) for p in parts])


def test_cli_prints_the_table(run, tmp_path, capsys):
    run, files = run
    args = ["dhsa-quality", str(run), "--ours", files["ours"], "--authors", files["authors"], "--budgets", "16"]
    args += ["--tokens", str(2 * T), *[a for m in SPARSE for a in ("--mixer", m)], "--out", str(tmp_path / "q.json")]
    assert main(args) == 0
    out = capsys.readouterr().out
    for label in ("| fixed block-sparse |", "| DHSA, ours (query_rep chunks", "| DHSA, authors' options", "| dense |"):
        assert label in out
    dense = json.loads((tmp_path / "q.json").read_text())["results"]["dense"]["loss"]
    assert f"| dense | {dense:.4f} (" in out and "+0.00% | 1 |" in out


def test_errors_name_the_option(run, tmp_path):
    run, files = run
    with pytest.raises(ConfigError, match="--authors: .* was trained with --setting ours"):
        dhsa_quality(str(run), ours=files["ours"], authors=files["ours"], budgets=[16])
    with pytest.raises(ConfigError, match="--ours: the predictor file of row ours is required"):
        dhsa_quality(str(run), authors=files["authors"], budgets=[16])
    with pytest.raises(ConfigError, match="--ours: .*missing.safetensors"):
        dhsa_quality(str(run), ours=str(tmp_path / "missing.safetensors"), rows=["ours"])
    with pytest.raises(ConfigError, match="--budgets: 0"):
        dhsa_quality(str(run), rows=["fixed"], budgets=[0])
    with pytest.raises(ConfigError, match="--mixer 'n_init': expected key=value"):
        dhsa_quality(str(run), rows=["fixed"], mixer=["n_init"])
    with pytest.raises(ConfigError, match="row fixed at budget 16: .*query_block"):
        dhsa_quality(str(run), rows=["fixed"], budgets=[16], mixer=["query_block=0"])
