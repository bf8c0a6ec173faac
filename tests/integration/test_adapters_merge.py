"""`swarm merge`: adapters combined exactly as peft combines them, refusals, and the export of a merge."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from adapterkit import make_lora_run
from swarm.cli import main
from swarm.export import export_run
from swarm.export.card import front_matter
from swarm.tiny import make_tiny_model
from trainkit import DEMO_TEXT

pytestmark = pytest.mark.integration

# method -> extra CLI flags; weights 0.7,0.3 for all
METHODS = {
    "linear": [], "cat": [], "svd": ["--rank", "6"], "ties": ["--density", "0.5"],
    "dare_linear": ["--density", "0.6"], "dare_ties": ["--density", "0.6", "--seed", "7"],
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("merge")
    base = make_tiny_model(root / "tiny-llama", [DEMO_TEXT], tokenizer="sentencepiece")
    other_base = make_tiny_model(root / "other-llama", [DEMO_TEXT], tokenizer="sentencepiece", seed=1)
    return SimpleNamespace(
        root=root, base=base,
        a=make_lora_run(root / "runs", "run-a", base, seed=1),
        b=make_lora_run(root / "runs", "run-b", base, seed=2),
        low_rank=make_lora_run(root / "runs", "run-r4", base, seed=3, r=4),
        elsewhere=make_lora_run(root / "runs", "run-other-base", other_base, seed=4),
        rs_a=make_lora_run(root / "runs", "run-rs-a", base, seed=5, rslora=True),
        rs_b=make_lora_run(root / "runs", "run-rs-b", base, seed=6, r=4, rslora=True),
    )


def peft_reference(runs, method: str, weights: list[float], density=None, svd_rank=None, seed=0, sources=None):
    """peft's own add_weighted_adapter on the real base, as a user would call it."""
    from peft import PeftModel
    from peft.utils import get_peft_model_state_dict
    from transformers import AutoModelForCausalLM

    sources = sources or [runs.a, runs.b]
    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(runs.base, dtype=torch.float32), sources[0] / "adapter", adapter_name="s0"
    )
    for i, source in enumerate(sources[1:], start=1):
        model.load_adapter(source / "adapter", adapter_name=f"s{i}")
    torch.manual_seed(seed)
    model.add_weighted_adapter(
        [f"s{i}" for i in range(len(sources))], weights, "merged", combination_type=method, density=density,
        svd_rank=svd_rank,
    )
    state = get_peft_model_state_dict(model, adapter_name="merged")
    return {k: v.detach().clone() for k, v in state.items()}, model


@pytest.mark.parametrize("method", list(METHODS))
def test_each_method_gives_peft_own_result(runs, tmp_path, method, capsys):
    out = tmp_path / f"mix-{method.replace('_', '-')}"
    args = ["merge", str(runs.a), str(runs.b), "--method", method, "--weights", "0.7,0.3", *METHODS[method]]
    assert main([*args, "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == f"adapter: {out}"
    flags = dict(zip(METHODS[method][::2], METHODS[method][1::2]))
    expected, _ = peft_reference(
        runs, method, [0.7, 0.3], density=float(flags["--density"]) if "--density" in flags else None,
        svd_rank=int(flags["--rank"]) if "--rank" in flags else None, seed=int(flags.get("--seed", 0)),
    )
    got = load_file(out / "adapter_model.safetensors")
    assert set(got) == set(expected) and len(got) == 2 * 7 * 2  # A and B of 7 linear layers in 2 blocks
    for key, tensor in expected.items():
        assert torch.equal(got[key], tensor), key
    # The merge differs from either source (a pruned or summed update, not a copy).
    source = load_file(runs.a / "adapter" / "adapter_model.safetensors")
    key = next(k for k in got if "q_proj.lora_B" in k)
    assert got[key].shape != source[key].shape or not torch.equal(got[key], source[key])

    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == {"cat": 16, "svd": 6}.get(method, 8) and config["base_model_name_or_path"] == str(runs.base)
    record = json.loads((out / "swarm-merge.json").read_text())
    assert record["method"] == method and record["weights"] == [0.7, 0.3]
    assert [s["name"] for s in record["sources"]] == ["run-a", "run-b"]
    readme = (out / "README.md").read_text()
    assert "run-a" in readme and "run-b" in readme and f"| Method | {method}:" in readme
    assert front_matter(readme)["base_model"] == str(runs.base)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["{a}", "{low_rank}", "--method", "ties", "--density", "0.5"],
         "method ties needs adapters of equal rank (run-a r=8, run-r4 r=4); use svd or cat for unequal ranks"),
        (["{a}", "{elsewhere}"], "run-a and run-other-base were trained on different bases"),
        (["{a}", "{b}", "--method", "dare_ties"], "method dare_ties needs --density"),
        (["{a}", "{b}", "--density", "0.5"], "--density applies to ties, dare_linear and dare_ties, not to cat"),
        (["{a}", "{b}", "--weights", "1"], "--weights gives 1 weight(s) for 2 adapters"),
        (["{a}", "{b}", "--weights", "a,b"], "is not a list of numbers"),
        (["{a}"], "needs at least two adapters"),
        (["{a}", "{base}"], "is neither a swarm run folder nor a `swarm merge` folder"),
        (["{a}", "{b}", "--method", "ties", "--density", "1.5"], "--density 1.5 must be above 0 and at most 1"),
    ],
)
def test_refusals_are_one_line(runs, tmp_path, capsys, args, message):
    folders = {k: str(v) for k, v in vars(runs).items() if isinstance(v, Path)}
    out = tmp_path / "refused"
    assert main(["merge", *(a.format(**folders) for a in args), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and message in err, err
    assert not out.exists() and not list(tmp_path.iterdir())


def updates(adapter: Path) -> dict[str, torch.Tensor]:
    """Each module's update scaling * B @ A, from an adapter's files (as peft applies it, not as peft merges)."""
    import math

    config = json.loads((adapter / "adapter_config.json").read_text())
    assert not config.get("rank_pattern") and not config.get("alpha_pattern")  # one scaling for all modules
    r, alpha = config["r"], config["lora_alpha"]
    scaling = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
    tensors = load_file(adapter / "adapter_model.safetensors")
    return {key.removesuffix(".lora_A.weight"): scaling * tensors[key.replace("lora_A", "lora_B")] @ tensors[key]
            for key in tensors if key.endswith(".lora_A.weight")}


def relative_error(got: dict, want: dict) -> float:
    """The largest difference of an update over the largest value of the expected update, across modules."""
    assert set(got) == set(want) and len(want) == 14
    return max(((got[k] - want[k]).abs().max() / want[k].abs().max()).item() for k in want)


@pytest.mark.parametrize("pair", [("a", "b"), ("rs_a", "rs_b")], ids=["lora", "rslora-unequal-ranks"])
def test_the_default_merge_is_the_weighted_sum_of_the_updates(runs, tmp_path, capsys, pair):
    """`swarm merge` without --method: the merged adapter's update is w1 dW1 + w2 dW2, module by module."""
    first, second = (getattr(runs, name) for name in pair)
    out = tmp_path / "mix"
    assert main(["merge", str(first), str(second), "--weights", "0.7,0.3", "--out", str(out)]) == 0
    assert json.loads((out / "swarm-merge.json").read_text())["method"] == "cat"
    want = {k: 0.7 * v + 0.3 * updates(second / "adapter")[k] for k, v in updates(first / "adapter").items()}
    error = relative_error(updates(out), want)
    assert error < 1e-5, error
    if pair == ("a", "b"):  # linear (equal ranks only) adds each adapter's A times the other's B
        assert main(["merge", str(first), str(second), "--weights", "0.7,0.3", "--method", "linear",
                     "--out", str(tmp_path / "linear")]) == 0
        linear = relative_error(updates(tmp_path / "linear"), want)
        assert linear > 0.1, linear
        with capsys.disabled():
            print(f"\nmerged update against 0.7 dW_a + 0.3 dW_b (largest error / largest value): cat {error:.1e}, "
                  f"linear {linear:.2f}")


def test_unequal_ranks_merge_with_cat_and_export_folds_them(runs, tmp_path):
    """A merge is an adapter `swarm export` folds into the base (and makes GGUF files of)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    merged_adapter = tmp_path / "mix"
    assert main(["merge", str(runs.a), str(runs.low_rank), "--method", "cat", "--out", str(merged_adapter)]) == 0
    assert json.loads((merged_adapter / "adapter_config.json").read_text())["r"] == 12

    result = export_run(merged_adapter, merge=True, dtype="fp32")
    assert result.merged == tmp_path / "mix-merged" and result.adapter == merged_adapter
    ids = torch.tensor([[1, 293, 308, 286, 485, 263, 331, 469, 325]])
    with torch.no_grad():
        got = AutoModelForCausalLM.from_pretrained(result.merged).eval()(ids).logits
        base = AutoModelForCausalLM.from_pretrained(runs.base, dtype=torch.float32)
        expected = PeftModel.from_pretrained(base, merged_adapter).eval()(ids).logits
        # cat is exact: the sum of both adapters' updates, applied one after the other by peft.
        both = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(runs.base, dtype=torch.float32),
                                         runs.a / "adapter", adapter_name="a")
        both.load_adapter(runs.low_rank / "adapter", adapter_name="b")
        both.base_model.set_adapter(["a", "b"])
        summed = both.eval()(ids).logits
    assert (got - expected).abs().max() < 1e-4
    assert (got - summed).abs().max() < 1e-4
    meta = front_matter((result.merged / "README.md").read_text())
    assert meta["base_model_relation"] == "merge" and meta["library_name"] == "transformers"
    assert (result.merged / "tokenizer.model").is_file()

    assert main(["export", str(merged_adapter)]) == 2  # an adapter already: asks what to make
    assert main(["merge", str(merged_adapter), str(runs.b), "--method", "svd", "--out", str(tmp_path / "again")]) == 0
    sources = json.loads((tmp_path / "again" / "swarm-merge.json").read_text())["sources"]
    assert sources[0]["method"] == "cat" and sources[0]["sources"] == ["run-a", "run-r4"]


def test_merge_exports_to_gguf(runs, tmp_path):
    pytest.importorskip("llama_cpp", reason="needs the gguf extra")
    merged_adapter = tmp_path / "mix"
    assert main(["merge", str(runs.a), str(runs.b), "--method", "ties", "--density", "0.5", "--out",
                 str(merged_adapter)]) == 0
    result = export_run(merged_adapter, gguf=["q8_0"])
    assert result.merged is None and [f.path.name for f in result.gguf_files] == ["mix-Q8_0.gguf"]
    assert (result.gguf / "Modelfile").is_file() and "mix-Q8_0.gguf" in (result.gguf / "README.md").read_text()
