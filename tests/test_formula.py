"""Composition formulas: syntax, error messages, each node's kappa and log q, and the sampled
distribution of a nested formula against its exact mixture-of-products target."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from superdiff import GaussianMixtureExpert, VESigma, make_betas
from superdiff.formula import (And, FormulaError, FormulaOperator, Leaf, Not, Or, compile_formula, evaluate_tree,
                               formula_gmm, formula_log_density, grid_moments, operator_tree, parse, unparse)
from superdiff.operators import AndOperator, AverageOperator, OrOperator, StepState
from superdiff.sampling import sample

F64 = torch.float64
VE = VESigma.from_betas(make_betas(1000, 0.00085, 0.012, "scaled_linear"))


# --- syntax --------------------------------------------------------------------------------------

def test_precedence_nesting_weights_and_keywords():
    t = parse('("a circle" & "something red") | "a blue square":0.5')
    assert t == Or((And((Leaf("a circle", None, 1), Leaf("something red", None, 14)), None, 1),
                    Leaf("a blue square", 0.5, 33)), None, 0)
    # & binds tighter than |; ~ tighter than &
    t = parse('"a" | "b" & ~"c"')
    assert isinstance(t, Or) and isinstance(t.children[1], And) and isinstance(t.children[1].children[1], Not)
    assert _strip(parse('a AND NOT b OR c')) == _strip(parse('(a & ~b) | c'))
    assert parse(r'"say \"hi\""').text == 'say "hi"'
    assert parse('(("x"):2)').weight == 2.0
    assert parse('shapes-half-a & shapes-half-b:1.5').children[1] == Leaf("shapes-half-b", 1.5, 16)
    assert _strip(parse('"and" & "OR"')) == ("And", (("leaf", "and", None), ("leaf", "OR", None)), None)
    for text in ['("a circle" & "something red") | "a blue square":0.5', '~"a":0.3 & ("b" | "c"):2', 'x & y | z',
                 '(~"a"):2 & "b"']:
        assert _strip(parse(unparse(parse(text)))) == _strip(parse(text))


def _strip(n):
    """A syntax tree without positions."""
    if isinstance(n, Leaf):
        return ("leaf", n.text, n.weight)
    if isinstance(n, Not):
        return ("not", _strip(n.child), n.weight)
    return (type(n).__name__, tuple(_strip(c) for c in n.children), n.weight)


_TEXTS = ["a", "b", "c d", 'say "hi"', "back\\slash", "AND", "x:2 | y", ""]
_WEIGHTS = [None, None, None, 0.5, 2.0, 1.0 / 3.0, 0.1 + 0.2, 1e-7, 123456.789]


def _random_tree(rng, depth):
    """A syntax tree as parse returns them: OR / AND with two or more children, any weights."""
    kind = rng.choice(["leaf", "not", "or", "and"] if depth > 0 else ["leaf"])
    w = rng.choice(_WEIGHTS)
    if kind == "leaf":
        return Leaf(rng.choice(_TEXTS), w)
    if kind == "not":
        return Not(_random_tree(rng, depth - 1), w)
    kids = tuple(_random_tree(rng, depth - 1) for _ in range(rng.randint(2, 3)))
    return (Or if kind == "or" else And)(kids, w)


@pytest.mark.parametrize("tree,text", [
    (And((Leaf("a"), Not(Or((Leaf("b"), Leaf("c")))))), '"a" & ~("b" | "c")'),
    (And((Leaf("a"), Not(And((Leaf("b"), Leaf("c")))))), '"a" & ~("b" & "c")'),
    (Not(Not(Or((Leaf("a"), Leaf("b"))))), '~~("a" | "b")'),
    (Not(Or((Leaf("a"), Leaf("b")), 2.0)), '~("a" | "b"):2'),
    (Or((Leaf("a"), Not(Leaf("b"), 0.5))), '"a" | (~"b"):0.5'),
])
def test_unparse_keeps_the_parentheses_of_a_negated_group(tree, text):
    assert unparse(tree) == text
    assert _strip(parse(text)) == _strip(tree)


def test_unparse_round_trips_every_formula():
    """parse(unparse(tree)) is the tree (and compiles to the same formula) for many nested trees:
    negation of groups, weights anywhere (also ones ':g' would round), & inside |, | inside &."""
    import random

    rng = random.Random(0)
    for _ in range(600):
        tree = _random_tree(rng, rng.randint(1, 4))
        text = unparse(tree)
        assert _strip(parse(text)) == _strip(tree), text
        if tree.weight is not None:  # a weight on the whole formula: refused, from the tree and the text
            for src in (tree, text):
                with pytest.raises(FormulaError, match="a weight on the whole formula"):
                    compile_formula(src, and_mode="product")
            tree = dataclasses.replace(tree, weight=None)
            text = unparse(tree)
        try:
            want = compile_formula(tree, and_mode="product")
        except FormulaError:
            with pytest.raises(FormulaError, match="negates everything"):
                compile_formula(text, and_mode="product")
            continue
        got = compile_formula(want.text, and_mode="product")  # Formula.text is unparse(tree)
        assert (got.root, got.names, got.reference) == (want.root, want.names, want.reference), text


@pytest.mark.parametrize("text,column,expected", [
    ('("a" & "b"', 11, "unbalanced parentheses: expected ')' to close the '(' at column 1"),
    ('"a" & "b")', 10, "unbalanced parentheses: this ')' closes no '('"),
    ('("a" | "b" "c")', 12, "expected ')' to close the '(' at column 1, found the text \"c\""),
    ('"a" &', 6, "expected a quoted prompt, a name, '(' or '~', found the end of the formula"),
    ('', 1, "expected a quoted prompt, a name, '(' or '~'"),
    ('()', 2, "expected a formula inside the parentheses"),
    ('"a" | | "b"', 7, "expected a quoted prompt, a name, '(' or '~', found '|'"),
    ('"a":', 5, "expected a weight (a positive number) after ':'"),
    ('"a":-1', 5, "weights must be positive numbers, got -1 (use ~ to negate)"),
    ('"a":0', 5, "weights must be positive numbers"),
    ('"a" "b"', 5, "expected '&', '|' or the end of the formula"),
    ('"a', 1, "unterminated quoted text"),
    ('"a" # "b"', 5, "unexpected character '#'"),
])
def test_parse_errors_say_where_and_what_was_expected(text, column, expected):
    with pytest.raises(FormulaError) as e:
        parse(text)
    assert e.value.pos == column - 1
    assert f"at column {column}:" in str(e.value) and expected in str(e.value)
    assert str(e.value).splitlines()[-1].index("^") == column + 1  # the caret under the column


@pytest.mark.parametrize("text,column,expected", [
    ('("a":2):3 & "b"', 9, "a second weight on one term: the term before the ':' at column 8 already has the weight 2"),
    ('"c" | (("a" | "b"):2):0.5', 23, "already has the weight 2 inside its parentheses; give it one weight (e.g. :1"),
])
def test_a_second_weight_on_one_term_is_refused_at_its_column(text, column, expected):
    """Before: the second weight silently replaced the first (Leaf('a', 3.0))."""
    with pytest.raises(FormulaError) as e:
        parse(text)
    assert e.value.pos == column - 1 and expected in str(e.value)


@pytest.mark.parametrize("text,column", [('("a" | "b"):0.01', 13), ('"a":5', 5), ('("a" & "b"):2', 13),
                                         ('(("a" | "b")):3', 15)])
def test_a_weight_on_the_whole_formula_is_refused_at_its_column(text, column):
    """A weight acts in its parent (mixture weight, exponent, offset, NOT's strength); the
    root has none. Before: dropped without a word (the same tree as without it)."""
    for mode in ("product", "superdiff"):
        with pytest.raises(FormulaError) as e:
            compile_formula(text, and_mode=mode)
        assert e.value.pos == column - 1
        assert "a weight on the whole formula has nothing to act on" in str(e.value)
        assert f"remove :{text.rsplit(':', 1)[1]}, or put it on a term inside it" in str(e.value)
    assert parse(text).weight is not None  # the syntax itself is well formed (unparse round trips it)


@pytest.mark.parametrize("text", ['~"a"', '~"a" & ~"b"', '"a" | ~"b"', '~~"a"', '~("a" & "b")'])
def test_a_formula_that_negates_everything_is_refused(text):
    with pytest.raises(FormulaError, match="negates everything"):
        compile_formula(text)


def test_unknown_expert_names_and_missing_reference():
    names = ["shapes-half-a", "shapes-half-b", "uncond"]
    with pytest.raises(FormulaError, match=r"unknown expert name 'shapes-half-c'; did you mean 'shapes-half-b'\?"):
        compile_formula("shapes-half-a & shapes-half-c", names)
    with pytest.raises(FormulaError, match="NOT needs a reference expert"):
        compile_formula("shapes-half-a & ~shapes-half-b", names)
    f = compile_formula("shapes-half-a & ~shapes-half-b", names, reference="uncond", and_mode="product")
    assert f.names == names and f.reference == 2
    with pytest.raises(ValueError, match="and_mode"):
        compile_formula('"a" & "b"', and_mode="min")


def test_prompts_become_experts_in_order_and_not_adds_the_unconditional_prompt():
    f = compile_formula('("a circle" & "something red") | "a circle"', and_mode="product")
    assert f.names == ["a circle", "something red"]
    f = compile_formula('"a circle" & ~"something red":0.5', and_mode="product")
    assert f.names == ["a circle", "something red", ""] and f.reference == 2
    assert "NOT (gamma 0.5, relative to '')" in f.show()


# --- node rules ------------------------------------------------------------------------------------

def _state(logq):
    return StepState(torch.as_tensor(logq, dtype=F64), 0, 10)


def test_or_node_is_the_mixture_and_equals_the_or_operator():
    logq = torch.tensor([[-1.0, -3.0], [0.5, 0.2]], dtype=F64)
    f = FormulaOperator('"a":0.25 | "b":0.75')
    k = f.kappa(_state(logq))
    assert torch.allclose(k, OrOperator(weights=[0.25, 0.75]).kappa(_state(logq)))
    _, lq = evaluate_tree(f.formula.root, logq)
    assert torch.allclose(lq, torch.logsumexp(logq + torch.log(torch.tensor([0.25, 0.75], dtype=F64)), -1))


def test_product_and_not_nodes_are_composable_diffusion_weights():
    logq = torch.randn(3, 3, dtype=F64)
    f = FormulaOperator('"x":2 & "y"', and_mode="product")
    assert torch.allclose(f.kappa(_state(logq[:, :2])), torch.tensor([[2.0, 1.0]] * 3, dtype=F64))
    assert torch.allclose(evaluate_tree(f.formula.root, logq[:, :2])[1], 2 * logq[:, 0] + logq[:, 1])
    g = FormulaOperator('"x" & ~"y"', and_mode="product")  # experts x, y, "" (the reference)
    # q_x q_ref^2 / q_y: kappa (1, -1, 2). With the unconditional branch u as the reference (its
    # guided prediction is u) and the step's rest 1 - sum kappa = -1 also on u, the combined
    # prediction is p_x - p_y + u = u + w (c_x - c_y): Composable Diffusion's negation
    k = g.kappa(_state(logq))
    assert torch.allclose(k, torch.tensor([[1.0, -1.0, 2.0]] * 3, dtype=F64))
    from superdiff.step import combine

    u, cx, cy = torch.randn(3, 3, 5, dtype=F64).unbind(0)
    w = 3.0
    preds = torch.stack([u + w * (cx - u), u + w * (cy - u), u])
    assert torch.allclose(combine(preds, k, u), u + w * (cx - cy))
    assert torch.allclose(evaluate_tree(g.formula.root, logq)[1], logq[:, 0] + 2 * logq[:, 2] - logq[:, 1])
    assert not g.affine and FormulaOperator('"x" & ~"y"').affine and FormulaOperator('"x" | "y"').affine
    # nested: OR over a product and a leaf, kappa = pi_1 (1, 1, 0) + pi_2 (0, 0, 1)
    h = FormulaOperator('("a" & "b") | "c":2', and_mode="product")
    pi = torch.softmax(torch.stack([logq[:, 0] + logq[:, 1], logq[:, 2] + math.log(2)], -1), -1)
    expect = torch.stack([pi[:, 0], pi[:, 0], pi[:, 1]], -1)
    assert torch.allclose(h.kappa(_state(logq)), expect)


def test_superdiff_and_node_equals_the_and_operator():
    g = torch.Generator().manual_seed(0)
    A = torch.randn(4, 3, 3, generator=g, dtype=F64)
    b = torch.randn(4, 3, generator=g, dtype=F64)
    logq = torch.randn(4, 3, generator=g, dtype=F64)
    st = StepState(logq, 2, 10, lambda: (A, b))
    assert torch.allclose(FormulaOperator('"a" & "b" & "c"').kappa(st), AndOperator().kappa(st))
    st2 = StepState(logq, 2, 10, lambda: (A, b))
    assert torch.allclose(FormulaOperator('"a":2 & "b" & "c":0.5').kappa(st2),
                          AndOperator(offsets=[math.log(2), 0.0, math.log(0.5)]).kappa(st2))


def test_operators_denote_their_trees():
    assert operator_tree(AverageOperator([1.0, 1.0]), 2).coeffs == (1.0, 1.0)
    assert operator_tree(OrOperator(weights=[1, 3]), 2).op == "or"
    with pytest.raises(ValueError, match="not a density"):
        operator_tree(AndOperator(), 2, for_potential=True)
    with pytest.raises(ValueError, match="not a density"):
        operator_tree(FormulaOperator('("a" & "b") | "c"'), 3, for_potential=True)


# --- sampling a nested formula -----------------------------------------------------------------

EA = GaussianMixtureExpert([[-2.5, 0.0], [2.5, 0.0]], [0.4, 0.4], [0.5, 0.5])
EB = GaussianMixtureExpert([[-2.5, 0.5], [2.5, 0.5]], [1.2, 1.2], [0.8, 0.2])
EC = GaussianMixtureExpert([[2.5, -1.0]], 0.2)


def _mode_weights(x, centres):
    lab = torch.cdist(x.to(F64), centres).argmin(-1)
    return torch.bincount(lab, minlength=len(centres)).to(F64) / len(x)


@pytest.mark.slow
def test_nested_formula_reaches_its_exact_mixture_of_products_target():
    """"A" & ("B" | "C") in product mode denotes q_A (q_B + q_C), exactly a Gaussian mixture with
    three modes (0.36 / 0.14 / 0.50); SMC (K = 8, 50 steps) samples its mode weights within 0.05
    in total variation (measured 0.02; benchmarks/correctors_exact.py has the K sweep)."""
    f = compile_formula('"A" & ("B" | "C")', ["A", "B", "C"], and_mode="product")
    m, v, lw = formula_gmm(f.root, [EA, EB, EC])
    w = torch.softmax(lw, 0)
    centres = m[w > 0.01]
    xe, _ = GaussianMixtureExpert(m, v, w).sample(100000, torch.Generator().manual_seed(0))
    exact = _mode_weights(xe, centres)
    assert len(centres) == 3 and exact.min() > 0.1
    out = sample([EA, EB, EC], VE, 50, operator=FormulaOperator(f), integrator="em", shape=(1200, 2),
                 generator=torch.Generator().manual_seed(1), dtype=F64, progress=False, corrector={"particles": 8})
    tv = 0.5 * float((_mode_weights(out.samples, centres) - exact).abs().sum())
    assert tv < 0.05, (tv, exact)


def test_nested_formula_is_close_to_its_exact_target_in_a_short_run():
    """The same formula, 30 steps, 600 samples, K = 4: mode weights within 0.08 of the exact ones."""
    f = compile_formula('"A" & ("B" | "C")', ["A", "B", "C"], and_mode="product")
    m, v, lw = formula_gmm(f.root, [EA, EB, EC])
    w = torch.softmax(lw, 0)
    centres = m[w > 0.01]
    xe, _ = GaussianMixtureExpert(m, v, w).sample(50000, torch.Generator().manual_seed(0))
    out = sample([EA, EB, EC], VE, 30, operator=FormulaOperator(f), integrator="em", shape=(600, 2),
                 generator=torch.Generator().manual_seed(1), dtype=F64, progress=False, corrector={"particles": 4})
    tv = 0.5 * float((_mode_weights(out.samples, centres) - _mode_weights(xe, centres)).abs().sum())
    assert tv < 0.08, tv


def test_an_or_of_identical_experts_changes_nothing_under_smc():
    """A & (B | B) is A & B: same kappa, same potentials, same particles, bit for bit."""
    kw = dict(integrator="em", shape=(50, 2), dtype=F64, progress=False, corrector={"particles": 4})
    two = sample([EA, EB], VE, 12, operator=AverageOperator([1.0, 1.0]), generator=torch.Generator().manual_seed(0),
                 **kw)
    three = sample([EA, EB, EB], VE, 12, operator=FormulaOperator('"A" & ("B" | "C")', ["A", "B", "C"],
                                                                    and_mode="product"),
                   generator=torch.Generator().manual_seed(0), **kw)
    assert torch.allclose(two.samples, three.samples, atol=1e-12)
    assert np.allclose(two.trace.ess, three.trace.ess)


def test_formula_density_and_grid_quadrature_agree_with_the_closed_form():
    f = compile_formula('("A" & "B") | "C":0.01', ["A", "B", "C"], and_mode="product")
    m, v, lw = formula_gmm(f.root, [EA, EB, EC])
    T = GaussianMixtureExpert(m, v, torch.softmax(lw, 0))

    def logp(x):
        leaf = torch.stack([e.log_prob(x, 0.0, VE) for e in (EA, EB, EC)], -1)
        return formula_log_density(f.root, leaf)

    x = torch.randn(7, 2, dtype=F64)
    # the same unnormalised density: constant difference
    diff = logp(x) - T.log_prob(x, 0.0, VE)
    assert torch.allclose(diff, diff[0].expand(7), atol=1e-9)
    g = grid_moments(logp, [-7, -5], [7, 7], n=300)
    xe, _ = T.sample(200000, torch.Generator().manual_seed(0))
    assert torch.allclose(g["mean"], xe.mean(0), atol=0.02)
    assert torch.allclose(g["cov"], torch.cov(xe.T), atol=0.05)


def test_superdiff_formula_samples_like_the_and_operator():
    kw = dict(integrator="em", shape=(6, 2), dtype=F64, progress=False)
    a = sample([EA, EB], VE, 10, operator="and", generator=torch.Generator().manual_seed(0), **kw)
    b = sample([EA, EB], VE, 10, operator=FormulaOperator('"A" & "B"', ["A", "B"]),
               generator=torch.Generator().manual_seed(0), **kw)
    assert torch.allclose(a.samples, b.samples, atol=1e-10)
    assert b.trace.meta["operator"] == "formula" and b.trace.meta["operator_params"]["formula"] == '"A" & "B"'


# --- the composition front door (CLI, batch files, studio, benchmarks) ---------------------------

def test_composition_fields_compose_and_mode_corrector():
    from superdiff.compose import Composition

    c = Composition.from_dict({"compose": '("a circle" & "something red") | "a square":0.5', "and_mode": "product",
                               "corrector": "smc:4"})
    assert c.prompts == ["a circle", "something red", "a square"] and c.corrector == "smc:4"
    c = Composition.from_dict({"compose": '"a circle" & "something red"', "and_mode": "product",
                               "corrector": '{"particles": 2, "window": [0.2, 1.0]}'})
    assert c.corrector == {"particles": 2, "window": [0.2, 1.0]}
    assert Composition.from_dict(c.to_dict()) == c  # the PNG / settings round trip
    for d, msg in [({"compose": '("a" & "b"'}, "compose: formula error at column 11: unbalanced parentheses"),
                   ({"compose": '~"a"'}, "compose: formula error at column 1: this formula negates everything"),
                   ({"compose": '"a" & "b"', "prompts": ["x"]}, "prompts: give either prompts or a compose formula"),
                   ({"compose": '"a" & "b"', "and_mode": "min"}, "and_mode: choose one of superdiff, product"),
                   ({"corrector": "smc:0"}, "corrector: particles K must be an int >= 1"),
                   ({"compose": '"a" & "b"', "corrector": "smc:4"}, "corrector: SuperDiff's AND samples where"),
                   ({"corrector": {"particles": 4, "window": [0, 2]}}, "corrector: resampling window"),
                   ({"corrector": "{bad"}, "corrector: not a JSON object")]:
        with pytest.raises(ValueError, match=msg.replace("(", r"\(").replace("[", r"\[")):
            Composition.from_dict(d)


def test_a_formula_with_smc_runs_through_the_shapes_pipeline():
    """compose + and_mode product + corrector through run_composition (the CLI's and the
    studio's path) on the bundled shapes-t2i: the trace has the formula, ESS and resampling,
    and the image matches a second run from its own record."""
    from superdiff.compose import Composition, ModelCache, run_composition

    comp = Composition.from_dict({"model": "shapes-t2i", "compose": '"a circle" & "something red"',
                                  "and_mode": "product", "corrector": {"particles": 2, "ess_threshold": 1.0},
                                  "steps": 3, "seed": 0, "num_images": 1})
    cache = ModelCache()
    res = run_composition(comp, cache, progress=False)
    tr = res.trace
    assert tr.meta["operator"] == "formula" and tr.meta["corrector"]["particles"] == 2
    assert tr.ess.shape == (3, 1) and tr.resampled.all()
    again = run_composition(comp, cache, progress=False)
    assert np.array_equal(np.asarray(res.images[0]), np.asarray(again.images[0]))
    with pytest.raises(ValueError, match="not a density"):
        run_composition(comp.replace(and_mode="superdiff"), cache, progress=False)


def test_the_studio_shows_the_parsed_tree_and_round_trips_the_formula_fields():
    import ui.handlers as H

    tree = H.formula_tree('("a circle" & "something red") | "a square":0.5', "product")
    assert "OR (mixture)" in tree and "AND (product)" in tree and "'a square'   [weight 0.5]" in tree
    assert "unbalanced parentheses" in H.formula_tree('("a" & "b"')
    comp = H.DEFAULT_COMPOSITION.replace(prompts=[], compose='"a circle" & ~"red"', corrector={"particles": 4},
                                         and_mode="product")
    back, notes = H.parse_form(H.form_from_composition(comp))
    assert (back.compose, back.prompts, back.corrector, back.and_mode) == (comp.compose, ["a circle", "red", ""],
                                                                           {"particles": 4}, "product")
    assert notes == ["the prompt rows are ignored: the formula names its own prompts"]


def test_cli_flags_build_the_composition():
    from superdiff.cli import build_parser
    from superdiff.generate_cli import _composition_from_args

    args = build_parser().parse_args(["generate", "--compose", '("a circle" & "something red") | "a square"',
                                      "--and-mode", "product", "--corrector", '{"particles": 8, "mcmc": "ula"}'])
    c = _composition_from_args(args)
    assert c.prompts == ["a circle", "something red", "a square"] and c.and_mode == "product"
    assert c.corrector == {"particles": 8, "mcmc": "ula"}
    bad = build_parser().parse_args(["generate", "--compose", '"a circle" & "unknown', "--corrector", "smc:2"])
    with pytest.raises(ValueError, match="compose: formula error at column 14: unterminated quoted text"):
        _composition_from_args(bad)


@pytest.mark.parametrize("text,and_mode,refused", [('"a" | "b"', "superdiff", True), ('("a" & "b") | "c"', "product", True),
                                                    ('"a" & "b"', "superdiff", True), ('"a" & "b":2', "product", False)])
def test_a_formula_whose_weights_follow_log_q_needs_an_estimator(text, and_mode, refused):
    """An OR (its responsibilities) or a SuperDiff AND anywhere in a formula needs log q, as
    operator 'or' and 'and' do: estimator 'none' is refused; a product-only formula is not."""
    from _gmm import schedules, two_mixtures

    op = FormulaOperator(text, and_mode=and_mode)
    assert op.needs_logq is refused
    experts = (two_mixtures(2) + two_mixtures(2, seed=2))[:op.formula.num_experts]
    kw = dict(operator=op, estimator="none", integrator="euler", shape=(2, 2), progress=False)
    if refused:
        with pytest.raises(ValueError, match="needs log-density tracking"):
            sample(experts, schedules()["ve"], 3, **kw)
    else:
        assert torch.isfinite(sample(experts, schedules()["ve"], 3, **kw).samples).all()
