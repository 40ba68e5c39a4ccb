"""Composition formulas: `("a circle" & "something red") | "a blue square":0.5`, parsed once
into a tree whose every node has a weight vector kappa over the experts, a log-density and (for
the particle corrector) a Feynman-Kac potential (docs/correctors.md, "Formulas").

Syntax (lowest to highest precedence; `AND`, `OR`, `NOT` may be written for `&`, `|`, `~`):

    formula := or ;  or := and ("|" and)* ;  and := unary ("&" unary)* ;  unary := "~" unary | atom
    atom    := ( "quoted text" | bare-name | "(" formula ")" ) [":" weight]

Node rules (s: score, log q: log-density, kappa: weights over the experts' predictions):

    leaf i          kappa = e_i                 log q = log q_i (tracked)
    A | B (OR)      kappa = sum_c pi_c kappa_c  log q = logsumexp_c(log w_c + log q_c)
                    pi = softmax_c(log w_c + log q_c): the exact score of sum_c w_c q_c
                    (SMC under guidance w with a shared unconditional branch: the tree at the
                    guided leaves' w log q_i, see tree_potential and correctors.GuidedLeaves)
    A & B product   kappa = sum_c a_c kappa_c   log q = sum_c a_c log q_c   (p = prod_c q_c^a_c)
    A & B SuperDiff kappa = sum_c lambda_c kappa_c, lambda (sum 1) making every child's
                    Delta log q_c equal (the equal-density solve of superdiff.operators.solve_and
                    on the children's linear models), log q = mean_c log q_c
    ~A (NOT)        the product q_ref^(1 + gamma) q_A^(-gamma): s = (1 + gamma) s_ref - gamma s_A,
                    ref the reference expert (the unconditional prompt for text models)

A weight `:w` means: the mixture weight w under OR, the exponent a = w under a product AND,
the offset l = log w under a SuperDiff AND (final q_i / q_j = w_i / w_j), gamma = w under NOT.
The `&` of a formula is SuperDiff's equal-density AND unless and_mode="product" (sampled
exactly with the SMC corrector, superdiff.correctors).
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from .operators import Operator, StepState, _const, and_settings, check_clamp, solve_and

Tensor = torch.Tensor
_F64 = torch.float64

__all__ = [
    "FormulaError",
    "Leaf",
    "Not",
    "Or",
    "And",
    "parse",
    "Node",
    "Formula",
    "compile_formula",
    "FormulaOperator",
    "operator_tree",
    "evaluate_tree",
    "tree_potential",
    "check_reference_mixtures",
    "unequal_mixture",
    "node_text",
    "formula_log_density",
    "gmm_product",
    "formula_gmm",
    "grid_moments",
    "AND_MODES",
]

AND_MODES = ("superdiff", "product")


class FormulaError(ValueError):
    """A formula that cannot be parsed or compiled; the message says where and what was expected."""

    def __init__(self, text: str, pos: int, msg: str) -> None:
        self.text, self.pos, self.msg = text, pos, msg
        caret = " " * (2 + pos) + "^"
        super().__init__(f"formula error at column {pos + 1}: {msg}\n  {text}\n{caret}")


# --------------------------------------------------------------------------------------------
# syntax
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Leaf:
    text: str
    weight: float | None = None
    pos: int = 0


@dataclass(frozen=True)
class Not:
    child: Any
    weight: float | None = None
    pos: int = 0


@dataclass(frozen=True)
class Or:
    children: tuple
    weight: float | None = None
    pos: int = 0


@dataclass(frozen=True)
class And:
    children: tuple
    weight: float | None = None
    pos: int = 0


_WORD = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-/]*")
_NUMBER = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?")
_KEYWORDS = {"AND": "&", "OR": "|", "NOT": "~"}


def _tokens(text: str) -> list[tuple[str, Any, int]]:
    """(kind, value, column) with kind in: str, word, num, & | ~ ( ) :, end."""
    out: list[tuple[str, Any, int]] = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c.isspace():
            i += 1
        elif c in "&|~():":
            out.append((c, c, i))
            i += 1
        elif c in "\"'":
            j, buf = i + 1, []
            while j < n and text[j] != c:
                if text[j] == "\\" and j + 1 < n:
                    j += 1
                buf.append(text[j])
                j += 1
            if j >= n:
                raise FormulaError(text, i, f"unterminated quoted text: expected a closing {c}")
            out.append(("str", "".join(buf), i))
            i = j + 1
        elif out and out[-1][0] == ":" and (m := _NUMBER.match(text, i)):
            out.append(("num", float(m.group(0)), i))
            i = m.end()
        elif m := _WORD.match(text, i):
            w = m.group(0)
            if w.upper() in _KEYWORDS and w == w.upper():
                out.append((_KEYWORDS[w], w, i))
            else:
                out.append(("word", w, i))
            i = m.end()
        else:
            raise FormulaError(text, i, f"unexpected character {c!r}: expected a quoted prompt, a name, "
                                        "'(', '~', '&', '|' or ':weight'")
    out.append(("end", None, n))
    return out


def _describe(tok: tuple[str, Any, int]) -> str:
    kind, val, _ = tok
    if kind == "end":
        return "the end of the formula"
    if kind == "str":
        return f'the text "{val}"'
    return repr(val)


class _Parser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.toks = _tokens(text)
        self.i = 0

    def peek(self) -> tuple[str, Any, int]:
        return self.toks[self.i]

    def take(self) -> tuple[str, Any, int]:
        t = self.toks[self.i]
        self.i += 1
        return t

    def fail(self, expected: str, tok: tuple[str, Any, int] | None = None) -> FormulaError:
        tok = tok or self.peek()
        return FormulaError(self.text, tok[2], f"expected {expected}, found {_describe(tok)}")

    def parse(self) -> Any:
        if self.peek()[0] == "end":
            raise self.fail("a quoted prompt, a name, '(' or '~'")
        node = self.or_()
        if self.peek()[0] != "end":
            tok = self.peek()
            if tok[0] == ")":
                raise FormulaError(self.text, tok[2], "unbalanced parentheses: this ')' closes no '('")
            raise self.fail("'&', '|' or the end of the formula")
        return node

    def or_(self) -> Any:
        pos = self.peek()[2]
        kids = [self.and_()]
        while self.peek()[0] == "|":
            self.take()
            kids.append(self.and_())
        return kids[0] if len(kids) == 1 else Or(tuple(kids), None, pos)

    def and_(self) -> Any:
        pos = self.peek()[2]
        kids = [self.unary()]
        while self.peek()[0] == "&":
            self.take()
            kids.append(self.unary())
        return kids[0] if len(kids) == 1 else And(tuple(kids), None, pos)

    def unary(self) -> Any:
        tok = self.peek()
        if tok[0] == "~":
            self.take()
            return Not(self.unary(), None, tok[2])
        return self.atom()

    def atom(self) -> Any:
        tok = self.take()
        if tok[0] in ("str", "word"):
            node: Any = Leaf(tok[1], None, tok[2])
        elif tok[0] == "(":
            if self.peek()[0] == ")":
                raise self.fail("a formula inside the parentheses")
            node = self.or_()
            close = self.peek()
            if close[0] != ")":
                if close[0] == "end":
                    raise FormulaError(self.text, close[2], f"unbalanced parentheses: expected ')' to close the '(' "
                                                            f"at column {tok[2] + 1}, found the end of the formula")
                raise self.fail(f"')' to close the '(' at column {tok[2] + 1}")
            self.take()
        elif tok[0] == ")":
            raise FormulaError(self.text, tok[2], "unbalanced parentheses: this ')' closes no '(' "
                                                  "(or a prompt is missing before it)")
        else:
            raise self.fail("a quoted prompt, a name, '(' or '~'", tok)
        if self.peek()[0] == ":":
            colon = self.take()
            num = self.peek()
            if num[0] != "num":
                raise self.fail("a weight (a positive number) after ':'")
            self.take()
            w = float(num[1])
            if not (w > 0 and math.isfinite(w)):
                raise FormulaError(self.text, num[2], f"weights must be positive numbers, got {w:g} "
                                                      "(use ~ to negate)")
            if node.weight is not None:  # ("a":2):3: one node, two weights (the second would replace the first)
                raise FormulaError(self.text, num[2], f"a second weight on one term: the term before the ':' at "
                                                      f"column {colon[2] + 1} already has the weight {node.weight:g} "
                                                      "inside its parentheses; give it one weight (e.g. "
                                                      f":{_weight_text(node.weight * w)} if the two were meant "
                                                      "to multiply)")
            node = dataclasses.replace(node, weight=w)
        return node


def parse(text: str) -> Any:
    """The syntax tree of a formula (Leaf / Not / Or / And); raises FormulaError."""
    if not isinstance(text, str):
        raise ValueError(f"a formula is a string, got {type(text).__name__}")
    return _Parser(text).parse()


def _weight_text(w: float) -> str:
    """A weight as formula text that parses back to the same float (":g" where that is exact)."""
    short = f"{w:g}"
    return short if float(short) == w else repr(float(w))


def unparse(node: Any) -> str:
    """Formula text of a syntax tree (canonical spacing, parentheses everywhere needed):
    parse(unparse(tree)) is the tree again (up to positions) for every tree parse can return.

    An unweighted OR / AND is written bare, so it is parenthesised wherever it is an operand:
    under NOT (which binds tighter than both) and as a child of another OR / AND (an AND
    under an OR would not need them, but they keep nested groups of either kind apart)."""
    w = "" if node.weight is None else f":{_weight_text(node.weight)}"
    if isinstance(node, Leaf):
        return '"' + node.text.replace("\\", "\\\\").replace('"', '\\"') + '"' + w
    if isinstance(node, Not):
        inner = _operand(node.child)
        return f"~{inner}" if not w else f"(~{inner}){w}"
    sym = " | " if isinstance(node, Or) else " & "
    body = sym.join(_operand(c) for c in node.children)
    return f"({body}){w}" if w else body


def _operand(node: Any) -> str:
    """unparse(node) as an operand of ~, & or |: a bare (unweighted) OR / AND in parentheses;
    a leaf, a NOT and any weighted node are already atoms or unary terms."""
    s = unparse(node)
    return f"({s})" if isinstance(node, (Or, And)) and node.weight is None else s


# --------------------------------------------------------------------------------------------
# the compiled tree
# --------------------------------------------------------------------------------------------

@dataclass
class Node:
    """A compiled node. op: "leaf" (index), "or" (coeffs = mixture weights), "prod" (coeffs =
    exponents), "sand" (SuperDiff AND; coeffs = offsets log w)."""

    op: str
    children: tuple = ()
    coeffs: tuple = ()
    index: int = -1
    label: str = ""

    @property
    def kappa_sum(self) -> float | None:
        """sum_i kappa_i of this node (None when it depends on the state)."""
        if self.op == "leaf":
            return 1.0
        sums = [c.kappa_sum for c in self.children]
        if self.op == "prod":
            if any(s is None for s in sums):
                return None
            return sum(a * s for a, s in zip(self.coeffs, sums))
        if any(s is None for s in sums) or any(abs(s - sums[0]) > 1e-12 for s in sums):
            return None
        return sums[0]

    def walk(self):
        yield self
        for c in self.children:
            yield from c.walk()

    @property
    def has_or(self) -> bool:
        """Whether an OR node is anywhere in the tree (its mixture weights need every leaf's log q)."""
        return any(n.op == "or" for n in self.walk())

    def show(self, names: Sequence[str] | None = None, indent: int = 0) -> str:
        """The tree as indented text (what the studio shows)."""
        pad = "  " * indent
        if self.op == "leaf":
            nm = names[self.index] if names is not None else f"expert {self.index}"
            return f"{pad}{nm!r}"
        head = {"or": "OR (mixture)", "prod": "AND (product)", "sand": "AND (SuperDiff, equal density)"}[self.op]
        if self.label:
            head = self.label
        what = {"or": "weight", "prod": "exponent", "sand": "offset"}[self.op]
        lines = [f"{pad}{head}"]
        for c, a in zip(self.children, self.coeffs):
            sub = c.show(names, indent + 1).split("\n")
            sub[0] += f"   [{what} {a:g}]"
            lines.extend(sub)
        return "\n".join(lines)


@dataclass
class Formula:
    text: str
    root: Node
    names: list[str]  # one per expert (kappa column); the reference last when added
    and_mode: str
    reference: int | None = None
    syntax: Any = None

    @property
    def num_experts(self) -> int:
        return len(self.names)

    @property
    def has_superdiff_and(self) -> bool:
        return any(n.op == "sand" for n in self.root.walk())

    def show(self) -> str:
        return self.root.show(self.names)


def node_text(node: Node, names: Sequence[str] | None = None) -> str:
    """A compiled node as formula text (for messages): leaves by name, weights as written."""
    if node.op == "leaf":
        nm = names[node.index] if names is not None else f"expert {node.index}"
        return '"' + str(nm).replace("\\", "\\\\").replace('"', '\\"') + '"'
    if node.label.startswith("NOT"):
        gamma = -node.coeffs[1]
        return f"~{_node_operand(node.children[1], names)}" + ("" if gamma == 1.0 else f":{_weight_text(gamma)}")
    parts = []
    for c, a in zip(node.children, node.coeffs):
        w = math.exp(a) if node.op == "sand" else a
        parts.append(_node_operand(c, names) + ("" if w == 1.0 else f":{_weight_text(w)}"))
    return (" | " if node.op == "or" else " & ").join(parts)


def _node_operand(node: Node, names: Sequence[str] | None) -> str:
    s = node_text(node, names)
    return s if node.op == "leaf" or node.label.startswith("NOT") else f"({s})"


def unequal_mixture(root: Node) -> Node | None:
    """The first OR node whose children's kappa sums differ (sum_i kappa_i of each child,
    Node.kappa_sum), or None. Every child of such a node is completed by the step's reference
    prediction to a different power q_ref^(1 - sum kappa_c) (docs/correctors.md)."""
    for n in root.walk():
        if n.op == "or":
            sums = [c.kappa_sum for c in n.children]
            if all(v is not None for v in sums) and any(abs(v - sums[0]) > 1e-12 for v in sums):
                return n
    return None


def check_reference_mixtures(root: Node, names: Sequence[str] | None = None) -> None:
    """Refuse, for the particle corrector with an unconditional branch, an OR node whose
    children have different kappa sums: its target sum_c w_c p~_c q_u^(1 - sum kappa_c)
    (the guided leaves q_u^(1-w) q_i^w, each branch completed by the unconditional branch u)
    has responsibilities that depend on log q_u, which is not tracked (docs/correctors.md,
    "Guidance and the unconditional branch")."""
    bad = unequal_mixture(root)
    if bad is None:
        return
    sums = ", ".join(f"{c.kappa_sum:g}" for c in bad.children)
    raise ValueError(
        f"SMC with an unconditional branch (classifier-free guidance or a negative prompt) has no tracked "
        f"target for the OR {node_text(bad, names)}: its branches' weights over the experts sum to "
        f"different totals ({sums}), so the unconditional branch completes each to a different power "
        "q_u^(1 - sum kappa) and their mixture responsibilities need log q_u, which is not tracked. Give "
        'every branch of this OR the same total exponent (e.g. ("a" & "b") | ("c" & "c") in product mode), '
        "sample without an unconditional branch (guidance_scale=1 and no negative prompt), or drop the "
        "SMC corrector (particles=1)")


def _negated(node: Any) -> Any:
    """The first branch of a syntax node without an un-negated expert, or None when every
    branch keeps one (a leaf is positive, NOT never, AND when a child is, OR when all are)."""
    if isinstance(node, Leaf):
        return None
    if isinstance(node, Not):
        return node
    if isinstance(node, And):
        return None if any(_negated(c) is None for c in node.children) else node
    for c in node.children:
        bad = _negated(c)
        if bad is not None:
            return bad
    return None


def compile_formula(text: str | Any, names: Sequence[str] | None = None, *, and_mode: str = "superdiff",
                    reference: str | None = None) -> Formula:
    """Parse (if needed) and compile a formula.

    names: the experts' names (each leaf must be one of them; their order is the kappa order).
        None: the leaves are prompts, one expert per distinct text in order of appearance.
    reference: the expert NOT is relative to (with names: one of them; for prompts the default
        is the unconditional prompt "", appended as the last expert when NOT is used).
    """
    if and_mode not in AND_MODES:
        raise ValueError(f"unknown and_mode {and_mode!r}; expected one of {', '.join(AND_MODES)}")
    src = text if isinstance(text, str) else unparse(text)
    syn = parse(text) if isinstance(text, str) else text
    if syn.weight is not None:  # the weight of a term acts in its parent (|, & or ~); the root has none
        raise FormulaError(src, _tokens(src)[-2][2],
                           f"a weight on the whole formula has nothing to act on (a weight is a mixture weight "
                           f"under |, an exponent or offset under &, the strength under ~): remove "
                           f":{_weight_text(syn.weight)}, or put it on a term inside it")
    bad = _negated(syn)
    if bad is not None:
        raise FormulaError(src, bad.pos,
                           "this formula negates everything: some branch has no positive expert, so it has "
                           'nothing to sample. Add a positive term, e.g. "a cat" & ~"a dog"')
    leaves: list[Leaf] = []

    def collect(n: Any) -> None:
        if isinstance(n, Leaf):
            leaves.append(n)
        elif isinstance(n, Not):
            collect(n.child)
        else:
            for c in n.children:
                collect(c)

    collect(syn)
    uses_not = any(isinstance(n, Not) for n in _syntax_walk(syn))
    if names is not None:
        names = [str(n) for n in names]
        for lf in leaves:
            if lf.text not in names:
                import difflib

                close = difflib.get_close_matches(lf.text, names, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                raise FormulaError(src, lf.pos, f"unknown expert name {lf.text!r}{hint} Known experts: "
                                                + ", ".join(repr(n) for n in names))
        ref_idx = None
        if uses_not:
            if reference is None:
                raise FormulaError(src, next(n.pos for n in _syntax_walk(syn) if isinstance(n, Not)),
                                   "NOT needs a reference expert (s_not = (1 + gamma) s_ref - gamma s); "
                                   "pass reference=<one of the expert names>")
            if reference not in names:
                raise ValueError(f"reference {reference!r} is not one of the experts {names}")
            ref_idx = names.index(reference)
        out_names = names
    else:
        out_names = []
        for lf in leaves:
            if lf.text not in out_names:
                out_names.append(lf.text)
        ref_idx = None
        if uses_not:
            ref = "" if reference is None else reference
            if ref not in out_names:
                out_names.append(ref)
            ref_idx = out_names.index(ref)

    def build(n: Any) -> Node:
        if isinstance(n, Leaf):
            return Node("leaf", index=out_names.index(n.text))
        if isinstance(n, Not):
            gamma = n.child.weight if n.child.weight is not None else 1.0
            return Node("prod", (Node("leaf", index=ref_idx), build(n.child)), (1.0 + gamma, -gamma),
                        label=f"NOT (gamma {gamma:g}, relative to {out_names[ref_idx]!r})")
        kids = tuple(build(c) for c in n.children)
        ws = [c.weight for c in n.children]
        if isinstance(n, Or):
            return Node("or", kids, tuple(1.0 if w is None else w for w in ws))
        if and_mode == "product":
            return Node("prod", kids, tuple(1.0 if w is None else w for w in ws))
        return Node("sand", kids, tuple(0.0 if w is None else math.log(w) for w in ws))

    root = build(syn)
    return Formula(src, root, list(out_names), and_mode, ref_idx, syn)


def _syntax_walk(n: Any):
    yield n
    if isinstance(n, Not):
        yield from _syntax_walk(n.child)
    elif isinstance(n, (Or, And)):
        for c in n.children:
            yield from _syntax_walk(c)


# --------------------------------------------------------------------------------------------
# evaluating the tree: kappa, log q, D = d log q / d log q_leaf, score, potential
# --------------------------------------------------------------------------------------------

@dataclass
class _Val:
    kappa: Tensor  # [B, M]
    logq: Tensor  # [B]
    D: Tensor  # [B, M]
    score: Tensor | None = None  # [B, D]
    G: Tensor | None = None  # [B] potential times h


@dataclass
class _Ctx:
    logq: Tensor  # [B, M]
    linear: Callable[[], tuple[Tensor, Tensor]] | None = None
    step: int = 0
    num_steps: int = 1
    feedback: float = 1.0
    ridge: float = 1e-3
    floor: float = 1e-8
    clamp: tuple[float, float] | None = (-1.0, 2.0)
    scores: Tensor | None = None  # [M, B, D] leaf scores
    leaf_G: Tensor | None = None  # [B, M]
    g2h: float = 0.0
    fh: float = 0.0  # f_t h of the step (product nodes' (sum a - 1) d f h; 0 on VE)
    _lin: tuple[Tensor, Tensor] | None = None

    def lin(self) -> tuple[Tensor, Tensor]:
        if self._lin is None:
            if self.linear is None:
                raise ValueError("a SuperDiff AND node needs the step's linear model; sample through superdiff.sample")
            A, b = self.linear()
            self._lin = (A.to(_F64), b.to(_F64))
        return self._lin


def _eval(node: Node, ctx: _Ctx) -> _Val:
    logq = ctx.logq
    B, M = logq.shape
    with_scores = ctx.scores is not None
    if node.op == "leaf":
        e = torch.zeros(B, M, dtype=_F64, device=logq.device)
        e[:, node.index] = 1.0
        return _Val(e, logq[:, node.index], e.clone(),
                    ctx.scores[node.index] if with_scores else None,
                    ctx.leaf_G[:, node.index] if with_scores else None)
    kids = [_eval(c, ctx) for c in node.children]
    K = torch.stack([v.kappa for v in kids], 1)  # [B, C, M]
    Q = torch.stack([v.logq for v in kids], 1)  # [B, C]
    D = torch.stack([v.D for v in kids], 1)
    # the node's coefficients on the device once (a tensor made from Python numbers on a GPU
    # is a blocking copy, each step); their values are read from the Python tuple
    co = _const(("formula-coeffs", node.coeffs, str(logq.device)),
                lambda: torch.as_tensor(node.coeffs, dtype=_F64, device=logq.device))
    S = torch.stack([v.score for v in kids], 0) if with_scores else None  # [C, B, D]
    Gk = torch.stack([v.G for v in kids], 1) if with_scores else None  # [B, C]
    if node.op == "or":
        lw = torch.log(co)[None] + Q
        pi = torch.softmax(lw, -1)  # [B, C]
        val = _Val(torch.einsum("bc,bcm->bm", pi, K), torch.logsumexp(lw, -1), torch.einsum("bc,bcm->bm", pi, D))
        if with_scores:
            val.score = torch.einsum("bc,cbd->bd", pi, S)
            val.G = (pi * Gk).sum(-1)
        return val
    if node.op == "prod":
        a = co[None].expand(B, -1)
        val = _Val(torch.einsum("bc,bcm->bm", a, K), (a * Q).sum(-1), torch.einsum("bc,bcm->bm", a, D))
        if with_scores:
            from .correctors import product_potential

            val.score = torch.einsum("bc,cbd->bd", a, S)
            val.G = product_potential(S, a, ctx.g2h, Gk, ctx.fh)
        return val
    # SuperDiff AND over the children: Delta log q_c = D_c . (b + A kappa), kappa = sum_c lambda_c kappa_c
    A, b = ctx.lin()
    Ap = torch.einsum("bcm,bmn,bkn->bck", D, A, K)  # [B, C, C]
    bp = torch.einsum("bcm,bm->bc", D, b)
    if ctx.feedback:
        bp = bp + ctx.feedback * Q
    off = None
    if any(c != 0 for c in node.coeffs):  # not torch.any(co != 0): a host read every step
        frac = (1.0 / ctx.num_steps) + (ctx.feedback * ctx.step / ctx.num_steps)
        off = (co * frac)[None].expand(B, -1)
    lam = solve_and(Ap, bp, off, ctx.ridge, ctx.floor, ctx.clamp)
    if with_scores:
        raise ValueError("a SuperDiff AND node has no density, so it has no Feynman-Kac potential")
    return _Val(torch.einsum("bc,bcm->bm", lam, K), Q.mean(-1), D.mean(1))


def evaluate_tree(root: Node, logq: Tensor, linear: Callable[[], tuple[Tensor, Tensor]] | None = None,
                  **kw: Any) -> tuple[Tensor, Tensor]:
    """(kappa [B, M], log q [B]) of the root for tracked leaf log-densities logq [B, M]."""
    v = _eval(root, _Ctx(logq.to(_F64), linear, **kw))
    return v.kappa, v.logq


def tree_potential(root: Node, leaves: Any, logq: Tensor, kappa_step: Tensor, g2h: float,
                   fh: float = 0.0) -> tuple[Tensor, Tensor]:
    """The root's FK log-weight increment G h [B] for one step, and its log p [B].

    g2h = g_t^2 h and fh = f_t h of the step (h = t - t'): every product node carries
    (sum a - 1) d f h besides its score terms ([P]), x-dependent once an OR weights product
    children of different exponent sums (docs/correctors.md).

    leaves: superdiff.correctors.LeafScores at the step's start; logq [B, M] at the step's
    start. When the step's kappa does not sum to one, the rest (1 - sum kappa) goes to the
    reference prediction (the shared unconditional branch, or the zero-score null
    prediction); the whole is the product p_root * q_ref^(1 - sum kappa).

    Under guidance w with a shared unconditional branch u the leaves are the guided
    q_u^(1-w) q_i^w, and the tree is evaluated on them (docs/correctors.md, "Guidance and the
    unconditional branch"): a child c with kappa sum k_c is q_u^((1-w) k_c) times the child
    evaluated at the leaf values w log q_i, so where every OR's children have equal kappa sums
    (check_reference_mixtures refuses the others) the q_u factors cancel in [M]'s pi and the
    tree runs on w log q_i; log p adds (1 - w) sum kappa log q_u. Per-expert unconditional
    branches under guidance give no tracked target for an OR (each leaf its own q_u_i): refused."""
    from .correctors import product_potential

    w = float(getattr(leaves, "guidance", 1.0))
    guided = leaves.ref is not None and w != 1.0  # the guided leaves share the unconditional branch
    if w != 1.0 and leaves.ref is None and root.has_or:
        raise ValueError(
            "SMC on an OR under classifier-free guidance needs one unconditional branch shared by all experts: "
            "with one per expert (e.g. a negative prompt per prompt) each guided leaf q_u_i^(1-w) q_i^w has its "
            "own q_u_i, which is not tracked, so the mixture's responsibilities are unknown. Give one shared "
            "negative prompt (or none), guidance_scale=1, or drop the SMC corrector")
    lq = logq.to(_F64)
    v = _eval(root, _Ctx(w * lq if guided else lq, None, scores=leaves.scores, leaf_G=leaves.potentials, g2h=g2h,
                         fh=fh))
    G, logp = v.G, v.logq
    ksum = kappa_step.to(_F64).sum(-1)
    a_ref = 1.0 - ksum
    if leaves.ref is not None:
        S = torch.stack([v.score, leaves.ref.to(_F64)])
        coeffs = torch.stack([torch.ones_like(a_ref), a_ref], -1)
        G = G + product_potential(S, coeffs, g2h, fh=fh) - product_potential(S[:1], coeffs[:, :1], g2h, fh=fh)
        # log q_u is not tracked: its prior value at the start (the initial weight's only use of log p)
        logp = logp + ((a_ref + (1.0 - w) * ksum) if guided else a_ref) * logq.mean(-1)
    return G, logp


# --------------------------------------------------------------------------------------------
# the operator the pipelines use
# --------------------------------------------------------------------------------------------

class FormulaOperator(Operator):
    """Kappa from a compiled formula (see the module docstring); one column per expert of
    formula.names. SuperDiff AND nodes take AndOperator's ridge, floor, clamp and feedback."""

    name = "formula"

    def __init__(self, formula: Formula | str, names: Sequence[str] | None = None, and_mode: str = "superdiff",
                 reference: str | None = None, ridge: float = 1e-3, floor: float = 1e-8,
                 clamp: tuple[float, float] | None = (-1.0, 2.0), feedback: float = 1.0) -> None:
        if isinstance(formula, str):
            formula = compile_formula(formula, names, and_mode=and_mode, reference=reference)
        self.formula = formula
        self.ridge, self.floor, self.clamp, self.feedback = and_settings(ridge, floor, clamp, feedback)

    @property
    def needs_linear_model(self) -> bool:  # type: ignore[override]
        return self.formula.has_superdiff_and

    @property
    def needs_logq(self) -> bool:  # type: ignore[override]
        """An OR (mixture responsibilities) or a SuperDiff AND anywhere in the formula."""
        return any(n.op in ("or", "sand") for n in self.formula.root.walk())

    @property
    def affine(self) -> bool:  # type: ignore[override]
        s = self.formula.root.kappa_sum
        return s is not None and abs(s - 1.0) < 1e-12

    def params(self) -> dict[str, Any]:
        return {"formula": self.formula.text, "and_mode": self.formula.and_mode,
                "experts": list(self.formula.names)}

    def validate(self, num_experts: int) -> None:
        super().validate(num_experts)
        if num_experts != self.formula.num_experts:
            raise ValueError(f"the formula {self.formula.text!r} composes {self.formula.num_experts} experts "
                             f"({', '.join(map(repr, self.formula.names))}), but {num_experts} were given")
        for n in self.formula.root.walk():  # each SuperDiff AND solves for weights summing to one over its children
            if n.op == "sand":
                check_clamp(self.clamp, len(n.children),
                            f"the {len(n.children)} children of the AND {node_text(n, self.formula.names)}")

    def kappa(self, state: StepState) -> Tensor:
        k, _ = evaluate_tree(self.formula.root, state.logq, state.linear_model, step=state.step,
                             num_steps=state.num_steps, feedback=self.feedback, ridge=self.ridge,
                             floor=self.floor, clamp=self.clamp)
        return k


def operator_tree(op: Operator, num_experts: int, for_potential: bool = False) -> Node:
    """The formula tree an operator denotes (for the particle corrector's potentials).
    for_potential: refuse operators that define no density (SuperDiff AND, OR with T != 1)."""
    from .operators import AndOperator, AverageOperator, OrOperator, SingleOperator

    leaves = tuple(Node("leaf", index=i) for i in range(num_experts))
    if isinstance(op, FormulaOperator):
        root = op.formula.root
    elif isinstance(op, AverageOperator):
        w = [1.0 / num_experts] * num_experts if op.weights is None else [float(v) for v in op.weights]
        root = Node("prod", leaves, tuple(w))
    elif isinstance(op, SingleOperator):
        root = Node("prod", (leaves[op.index],), (1.0,))
    elif isinstance(op, OrOperator) and op.temperature == 1.0:
        b = [0.0] * num_experts if op.bias is None else [float(v) for v in op.bias]
        root = Node("or", leaves, tuple(math.exp(v) for v in b))
    elif isinstance(op, OrOperator) and op.temperature == 0.0:
        b = torch.zeros(num_experts, dtype=_F64) if op.bias is None else op.bias
        root = Node("prod", leaves, tuple(torch.softmax(b, 0).tolist()))
    elif isinstance(op, AndOperator):
        root = Node("sand", leaves, tuple([0.0] * num_experts))
    else:
        raise ValueError(f"the {op.name!r} operator {op!r} defines no target density for the particle "
                         "corrector; use 'average' (fixed weights), 'single', 'or' (temperature 1) or a formula")
    if for_potential and any(n.op == "sand" for n in root.walk()):
        raise ValueError("SuperDiff's AND samples where the experts' densities are equal: that is not a density, "
                         "so the SMC corrector has no target. For the product of the experts use "
                         "operator='average' with weights [1, 1] (a formula with and_mode='product')")
    return root


# --------------------------------------------------------------------------------------------
# the density a formula denotes (exact targets for tests and benchmarks)
# --------------------------------------------------------------------------------------------

def formula_log_density(root: Node, leaf_log_probs: Tensor) -> Tensor:
    """log p(x) (unnormalised) of a product-mode tree, from the leaves' log-densities [B, M]."""
    if any(n.op == "sand" for n in root.walk()):
        raise ValueError("a SuperDiff AND has no density")
    return _eval(root, _Ctx(leaf_log_probs.to(_F64))).logq


def gmm_product(a: tuple[Tensor, Tensor, Tensor], b: tuple[Tensor, Tensor, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """Product of two (unnormalised) diagonal Gaussian mixtures (means [K, d], variances [K, d],
    log-weights [K]), exactly: N(x; m_a, V_a) N(x; m_b, V_b) = N(m_a; m_b, V_a + V_b) N(x; m, V),
    V = (V_a^-1 + V_b^-1)^-1, m = V (V_a^-1 m_a + V_b^-1 m_b)."""
    ma, va, la = (t.to(_F64) for t in a)
    mb, vb, lb = (t.to(_F64) for t in b)
    s = va[:, None] + vb[None]  # [Ka, Kb, d]
    diff = ma[:, None] - mb[None]
    lz = -0.5 * (diff**2 / s).sum(-1) - 0.5 * torch.log(2 * math.pi * s).sum(-1)
    v = 1.0 / (1.0 / va[:, None] + 1.0 / vb[None])
    m = v * (ma[:, None] / va[:, None] + mb[None] / vb[None])
    d = ma.shape[1]
    return m.reshape(-1, d), v.reshape(-1, d), (la[:, None] + lb[None] + lz).reshape(-1)


def formula_gmm(root: Node, leaves: Sequence[Any]) -> tuple[Tensor, Tensor, Tensor]:
    """The exact (unnormalised) Gaussian mixture a product-mode formula denotes at t = 0 when
    its leaves are GaussianMixtureExperts: OR concatenates (log-weights + log w), a product
    with positive integer exponents multiplies (gmm_product). Other exponents (NOT, q^beta
    with beta not an integer) are not mixtures: use grid_moments."""

    def rec(n: Node) -> tuple[Tensor, Tensor, Tensor]:
        if n.op == "leaf":
            e = leaves[n.index]
            return e.means, e.variances, e.log_weights
        parts = [rec(c) for c in n.children]
        if n.op == "or":
            return (torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]),
                    torch.cat([p[2] + math.log(w) for p, w in zip(parts, n.coeffs)]))
        if n.op == "prod":
            out = None
            for p, a in zip(parts, n.coeffs):
                if a != int(a) or a < 1:
                    raise ValueError(f"exponent {a:g} is not a positive integer: the target is not a Gaussian "
                                     "mixture; use grid_moments")
                for _ in range(int(a)):
                    out = p if out is None else gmm_product(out, p)
            return out
        raise ValueError("a SuperDiff AND has no density")

    return rec(root)


def grid_moments(log_density: Callable[[Tensor], Tensor], lo: Sequence[float], hi: Sequence[float],
                 n: int = 400, centres: Tensor | None = None) -> dict[str, Any]:
    """Mean, covariance and (with centres [C, d]) the mass of each centre's Voronoi cell of an
    unnormalised density in d <= 2, by quadrature on an n^d grid over the box [lo, hi]."""
    d = len(lo)
    if d not in (1, 2):
        raise ValueError("grid_moments integrates in d = 1 or 2")
    axes = [torch.linspace(float(a), float(b), n, dtype=_F64) for a, b in zip(lo, hi)]
    pts = torch.cartesian_prod(*axes).reshape(-1, d) if d == 2 else axes[0][:, None]
    lp = log_density(pts)
    w = torch.softmax(lp, 0)
    mean = (w[:, None] * pts).sum(0)
    dev = pts - mean
    cov = (w[:, None, None] * dev[:, :, None] * dev[:, None, :]).sum(0)
    out: dict[str, Any] = {"mean": mean, "cov": cov,
                           "edge_mass": float(w.reshape([n] * d).flatten()[_edge(n, d)].sum())}
    if centres is not None:
        lab = torch.cdist(pts, centres.to(_F64)).argmin(-1)
        out["mode_weights"] = torch.zeros(len(centres), dtype=_F64).index_add_(0, lab, w)
    return out


def _edge(n: int, d: int) -> Tensor:
    idx = torch.arange(n)
    if d == 1:
        return torch.tensor([0, n - 1])
    ii, jj = torch.meshgrid(idx, idx, indexing="ij")
    m = (ii == 0) | (jj == 0) | (ii == n - 1) | (jj == n - 1)
    return m.flatten().nonzero()[:, 0]
