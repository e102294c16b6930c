"""`headshare.methods.base`: the registry, `make_plan`, method configs and options, every method's budget."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import IDS, bias_flags, corpus_ids, outputs

import headshare
from headshare.arch import layout_of
from headshare.methods import METHODS, make_config, parse_option, register_method
from headshare.plan import units_for_ratio
from headshare.sharing import unique_parameters


def test_registry_entries_describe_their_methods():
    assert list(METHODS)[0] == "directshare"  # the default, first in --method's choices
    assert set(METHODS) == {"directshare", "alignshare", "random", "layerwise", "prune", "actshare", "fitshare",
                            "fitprune", "basisshare", "choiceshare", "autoshare"}
    for name, m in METHODS.items():
        assert m.name == name and m.help and callable(m.fn)
        assert issubclass(m.config, headshare.MethodConfig)
        assert m.needs_tokenizer == ("calib" in m.config.options()), name
    assert METHODS["random"].config is headshare.RandomConfig
    assert headshare.RandomConfig.options() == {"seed": 0}


PLUS = ("actshare", "fitshare", "fitprune", "alignshare")


def test_registered_for_the_cli():
    from headshare.cli import build_parser

    assert set(PLUS) <= set(METHODS)
    args = build_parser().parse_args(["share", "m", "--method", "fitshare", "--ratio", "0.3", "--out", "o"])
    assert args.method == "fitshare"


def test_a_registered_method_is_used_by_make_plan_and_refused_twice(tiny_llama, monkeypatch):
    from dataclasses import dataclass

    from headshare.plan import Assignment, new_plan

    # a copy of the registry for this test: registering must not leak into other tests
    registry = dict(METHODS)
    monkeypatch.setattr(headshare.methods.base, "METHODS", registry)
    monkeypatch.setattr(headshare.methods, "METHODS", registry)
    @dataclass
    class LastConfig(headshare.MethodConfig):
        source: int = 0

    @register_method("last-from-first", LastConfig, "every unit of the last layer borrows unit `source` of layer 0")
    def last_from_first(model, cfg, tokenizer, progress):
        layout = layout_of(model.config)
        return new_plan(model, "last-from-first", cfg.ratio,
                        assignments=[Assignment(layout.num_layers - 1, u, 0, cfg.source)
                                     for u in range(layout.units_per_layer)])

    assert headshare.methods.METHODS["last-from-first"].config is LastConfig
    model = tiny_llama(num_hidden_layers=3)
    plan = headshare.make_plan(model, 0.0, "last-from-first", source=1)
    assert plan.method == "last-from-first" and plan.config == {"ratio": 0.0, "source": 1, "version": 1}
    assert [(a.layer, a.source_unit) for a in plan.assignments] == [(2, 1), (2, 1)]
    with pytest.raises(ValueError, match="already registered"):
        register_method("last-from-first", LastConfig)(last_from_first)
    with pytest.raises(ValueError, match="either a config or a method name"):
        headshare.make_plan(model, LastConfig(), "random")


def test_unknown_method_is_refused(tiny_model):
    with pytest.raises(ValueError, match="unknown method"):
        headshare.make_plan(tiny_model("llama-gqa"), 0.3, "nope")


def test_prune_needs_a_tokenizer(tiny_llama):
    with pytest.raises(ValueError, match="tokenizer"):
        headshare.make_plan(tiny_llama(), 0.25, "prune")


def test_plan_records_its_config_and_never_edits_the_model(tiny_llama, calib_file, tiny_plan):
    model = tiny_llama(num_hidden_layers=3)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for method in ("random", "layerwise", "prune"):
        plan = tiny_plan(model, 0.5, method)
        assert METHODS[method].config.from_dict(plan.config).to_dict() == plan.config  # a config that reads back
        assert plan.config["ratio"] == 0.5 and plan.fitted == {} and plan.base_sha1 is None
    assert tiny_plan(model, 0.5, "prune").config == \
        {"ratio": 0.5, "calib": calib_file, "calib_tokens": 128, "relative": True, "version": 1}
    assert state.keys() == model.state_dict().keys()
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("method, option", [("directshare", "calib"), ("fitshare", "seed"), ("random", "metric"),
                                            ("prune", "window"), ("layerwise", "nope")])
def test_an_unknown_option_is_refused_by_name(method, option, tiny_llama, tiny_tokenizer):
    model = tiny_llama()
    with pytest.raises(ValueError, match=f"has no option '{option}'; its options: "):
        headshare.make_plan(model, 0.25, method, tokenizer=tiny_tokenizer, **{option: 1})
    with pytest.raises(ValueError, match=f"has no option '{option}'"):
        make_config(method, 0.25, **{option: 1})
    with pytest.raises(ValueError, match=f"has no option '{option}'"):
        parse_option(METHODS[method].config, f"{option}=1")


@pytest.mark.parametrize("method, options, message", [
    ("random", {"seed": 1.5}, "seed must be an integer"),
    ("directshare", {"metric": "qq"}, "metric must be one of"),
    ("prune", {"calib_tokens": 1}, "calib_tokens must be an integer >= 2"),
    ("actshare", {"window": 0}, "window must be an integer >= 1 or none"),
    ("directshare", {"ratio": 1.0}, r"ratio must be a number in \[0, 1\)"),
])
def test_bad_option_values_are_refused(method, options, message):
    with pytest.raises(ValueError, match=message):
        make_config(method, **{"ratio": 0.3, **options})


def test_parse_option_reads_each_option_by_its_type():
    fit = METHODS["fitshare"].config
    assert parse_option(fit, "rho=0.5") == ("rho", 0.5)
    assert parse_option(fit, "window=none") == ("window", None)
    assert parse_option(fit, "window=3") == ("window", 3)
    assert parse_option(fit, "heldout=false") == ("heldout", False)
    assert parse_option(fit, "calib-tokens=64") == ("calib_tokens", 64)
    assert parse_option(fit, "calib=a=b.txt") == ("calib", "a=b.txt")
    with pytest.raises(ValueError, match="option calib_tokens: 'many' is not"):
        parse_option(fit, "calib_tokens=many")
    with pytest.raises(ValueError, match="expected KEY=VALUE"):
        parse_option(fit, "rho")
    with pytest.raises(ValueError, match="has no option 'ratio'"):  # the ratio has its own flag
        parse_option(fit, "ratio=0.3")


# -- every method's plan removes exactly its budget ----------------------------------------------------------

@pytest.mark.parametrize("arch", ["llama-gqa", "llama-mha", "llama-mqa", "qwen2-bias", "gpt2"])
@pytest.mark.parametrize("method", PLUS)
@pytest.mark.parametrize("ratio", [0.0, 0.3, 0.6])
def test_exact_unit_count_and_valid_plan(arch, method, ratio, tiny_tokenizer, tiny_model, tiny_plan):
    if method == "alignshare" and arch == "gpt2":
        pytest.skip("alignshare needs RoPE (llama-like) attention")
    model = tiny_model(arch)
    layout = layout_of(model.config)
    plan = tiny_plan(model, ratio, method, **({"min_gain": 0.0} if method == "fitshare" else {}))
    assert plan.units_removed == units_for_ratio(ratio, layout)
    plan.validate(layout)
    if method in ("actshare", "alignshare"):
        assert plan.pruned == [] and len(plan.assignments) == plan.units_removed
    if method == "fitprune":
        assert plan.assignments == []
    removed = {(a.layer, a.unit) for a in plan.assignments} | set(plan.pruned)
    assert len(removed) == plan.units_removed
    if method != "alignshare":  # (the paper's selection allows chains, resolved to their root)
        # sources are kept units: every borrowed unit reads exactly the source it was fitted with
        assert all((a.source_layer, a.source_unit) not in removed for a in plan.assignments)
    params0, _ = headshare.unique_parameters(model)
    headshare.share(model, plan)
    params1, _ = headshare.unique_parameters(model)
    assert params0 - params1 == plan.units_removed * layout.unit_params(bias_flags(model))
    assert torch.isfinite(outputs(model, corpus_ids(tiny_tokenizer))).all()


CALIBRATED = ["prune", "actshare", "fitprune", "fitshare", "basisshare", "choiceshare"]


@pytest.mark.parametrize("method", CALIBRATED)
def test_calibrated_methods_remove_exactly_their_budget(method, tiny_tokenizer, tiny_llama):
    model = tiny_llama(num_hidden_layers=4)
    plan = headshare.make_plan(model, 0.5, method, unit="query", tokenizer=tiny_tokenizer, calib_tokens=256)
    assert plan.unit_kind == "query" and plan.layout["units_per_layer"] == 4
    shared = copy.deepcopy(model)
    p0 = unique_parameters(shared)[0]
    headshare.share(shared, plan)
    removed = p0 - unique_parameters(shared)[0]
    if method == "basisshare":  # a basis spends the budget to within its last rank
        assert 8 * 512 <= removed <= 1.05 * 8 * 512
    elif method == "choiceshare":  # ranks from a grid: at least the budget
        assert removed >= 8 * 512
    else:
        assert removed == 8 * 512
    assert torch.isfinite(outputs(shared, IDS)).all()
