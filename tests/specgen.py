"""Specs written differently from the examples: the same maths with dims declared in another order, arrays in other
layouts (time-major, head-first, any permutation), dims and values renamed, `over=` lists with or without the head
dim, groups on inputs and on states.

A `Base` is one model written once with placeholder names (`%h` a dim, `$x` a value, `$yd[]` a value declared with
its dims, `$OVER` the rmsnorm's `over=` list), a float64 numpy reference and an input maker, all in the base's own
layout. `Case` is one rewriting of a base: `case.text` is the spec, `case.call_args(canon)` renames and permutes
inputs drawn in the base layout, `case.expected(canon, init)` runs the reference and moves its results into the
case's layout. `cases()` is the hypothesis strategy; `Case.make` builds one by hand.
"""
from __future__ import annotations

import keyword
import re
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

import reference as R

# names a generated spec must not use: DSL words and builtins, Python keywords and builtins, and identifiers the
# generated code uses for itself (other tests cover those collisions)
_DSL = {"ssm", "dims", "scan", "group", "in", "state", "out", "over", "eps", "exp", "log", "softplus", "silu",
        "sigmoid", "tanh", "sqrt", "rsqrt", "abs", "min", "max", "clamp", "sum", "mean", "rmsnorm", "outer", "dot",
        "conv"}
_GENERATED = {"jax", "jnp", "lax", "np", "rt", "tl", "triton", "pl", "pltpu", "math", "functools", "T", "Tp", "Q",
              "TB", "MM", "PREC", "TRIL", "PARAMS", "RETURNS", "LAYOUT", "HI", "nc", "valid", "pid", "bid", "tt",
              "ttc", "c", "a", "s", "S", "carry", "step", "inp", "xs", "y", "mm", "sizes", "arrays", "interpret",
              "range", "len", "float", "int", "tuple", "list", "dict", "print", "type", "object", "id", "all", "any",
              "map", "zip", "iter", "next", "set", "str", "bool", "vars", "input", "format", "hash", "slice", "super"}
_TEMP = re.compile(r"^(v|c|ms)\d+$")


def usable(name: str) -> bool:
    return not (keyword.iskeyword(name) or name in _DSL or name in _GENERATED or _TEMP.match(name))


@dataclass(frozen=True)
class Base:
    name: str
    dims: tuple[str, ...]
    scan: str
    groups: tuple[tuple[str, str], ...]        # (g, h)
    ins: tuple[tuple[str, tuple[str, ...]], ...]
    states: tuple[tuple[str, tuple[str, ...]], ...]
    outs: tuple[tuple[str, tuple[str, ...]], ...]
    named: tuple[tuple[str, tuple[str, ...]], ...]   # intermediate values declared with dims (`yd[b,t,h,p] = ...`)
    values: tuple[str, ...]                    # other intermediate value names
    body: tuple[str, ...]
    reference: Callable = field(repr=False)   # (inputs, initial states) -> (outs, states), base layout, float64
    make_inputs: Callable = field(repr=False)  # (rng, sizes) -> {name: float32 array}, base layout
    norm_head: str | None = None               # the head dim a grouped rmsnorm may list in `over=`
    norm_over: tuple[str, ...] = ()            # its other dims

    def arrays(self) -> dict[str, tuple[str, ...]]:
        return dict(self.ins + self.states + self.outs + self.named)

    def value_names(self) -> list[str]:
        return [n for n, _ in self.ins + self.states + self.outs + self.named] + list(self.values)


# ---- a GQA linear attention (no example of it): keys, values and the state per group of query heads ----------------
def ref_gqa(inputs, initial_states=None):
    """S[b,g] = exp(-softplus(w)) S[b,g] + k⊗v ;  o[b,t,h] = q[b,t,h]·S[b, h // (H/G)]."""
    q, k, v, w = (np.asarray(inputs[n], np.float64) for n in ("q", "k", "v", "w"))
    nb, nt, nh, ndk = q.shape
    ng, ndv = k.shape[2], v.shape[-1]
    S = R._init(initial_states, "S", (nb, ng, ndk, ndv))
    o = np.zeros((nb, nt, nh, ndv))
    for t in range(nt):
        a = np.exp(-R.softplus(w[:, t]))                                   # b,g
        S = a[:, :, None, None] * S + k[:, t][:, :, :, None] * v[:, t][:, :, None, :]
        Sh = np.repeat(S, nh // ng, axis=1)                                # head i reads group i // (H/G)
        o[:, t] = np.einsum("bhk,bhkv->bhv", q[:, t], Sh)
    return (o,), (S,)


def _in_gqa(rng, d):
    b, t, h, g, dk, dv = (d[k] for k in ("b", "t", "h", "g", "dk", "dv"))
    return {"q": R._randn(rng, b, t, h, dk), "k": R._randn(rng, b, t, g, dk), "v": R._randn(rng, b, t, g, dv),
            "w": R._randn(rng, b, t, g)}


_QKV = (("q", ("b", "t", "h", "dk")), ("k", ("b", "t", "h", "dk")), ("v", ("b", "t", "h", "dv")))
_S = (("S", ("b", "h", "dk", "dv")),)
_O = (("o", ("b", "t", "h", "dv")),)

BASES: dict[str, Base] = {b.name: b for b in [
    Base("mamba2", ("b", "t", "h", "p", "n", "g"), "t", (("g", "h"),),
         (("x", ("b", "t", "h", "p")), ("dt", ("b", "t", "h")), ("A", ("h",)), ("B", ("b", "t", "g", "n")),
          ("C", ("b", "t", "g", "n")), ("D", ("h",))),
         (("h", ("b", "h", "p", "n")),), (("y", ("b", "t", "h", "p")),), (), (),
         ("$h = exp($dt*$A)*$h + $dt*$B⊗$x", "$y = $C·$h + $D*$x"),
         R.ref_mamba2, R._in_mamba2),
    Base("mamba2_gated", ("b", "t", "h", "p", "n", "g"), "t", (("g", "h"),),
         (("x", ("b", "t", "h", "p")), ("dt_raw", ("b", "t", "h")), ("dt_bias", ("h",)), ("A_log", ("h",)),
          ("B", ("b", "t", "g", "n")), ("C", ("b", "t", "g", "n")), ("D", ("h",)), ("z", ("b", "t", "h", "p")),
          ("norm_w", ("h", "p"))),
         (("s", ("b", "h", "p", "n")),), (("y", ("b", "t", "h", "p")),), (("yd", ("b", "t", "h", "p")),), ("dt", "A"),
         ("$dt = softplus($dt_raw + $dt_bias)", "$A = -exp($A_log)", "$s = exp($dt*$A)*$s + $dt*$B⊗$x",
          "$yd[] = $C·$s + $D*$x", "$y = rmsnorm($yd * silu($z), over=$OVER, group=%g, eps=1e-5) * $norm_w"),
         R.ref_mamba2_gated, R._in_mamba2_gated, norm_head="h", norm_over=("p",)),
    Base("gla", ("b", "t", "h", "dk", "dv"), "t", (), _QKV + (("g_raw", ("b", "t", "h", "dk")),), _S, _O, (),
         ("gk",), ("$gk = -softplus(-$g_raw) / 16", "$S = exp($gk)*$S + $k⊗$v", "$o = $q·$S"),
         R.ref_gla, R._in_gla),
    Base("retnet", ("b", "t", "h", "dk", "dv"), "t", (), _QKV + (("gamma", ("h",)),), _S, _O, (), (),
         ("$S = $gamma*$S + $k⊗$v", "$o = $q·$S"), R.ref_retnet, R._in_retnet),
    Base("linear_attention", ("b", "t", "h", "dk", "dv"), "t", (), _QKV,
         (("S", ("b", "h", "dk", "dv")), ("z", ("b", "h", "dk"))), (("o", ("b", "t", "h", "dv")), ("den", ("b", "t", "h"))),
         (("num", ("b", "t", "h", "dv")),), ("fq", "fk"),
         ("$fq = softplus($q); $fk = softplus($k)", "$S = $S + $fk⊗$v", "$z = $z + $fk", "$den = $fq·$z",
          "$num[] = $fq·$S", "$o = $num / $den"),
         R.ref_linear_attention, R._in_linear_attention),
    Base("gqa", ("b", "t", "h", "g", "dk", "dv"), "t", (("g", "h"),),
         (("q", ("b", "t", "h", "dk")), ("k", ("b", "t", "g", "dk")), ("v", ("b", "t", "g", "dv")),
          ("w", ("b", "t", "g"))),
         (("S", ("b", "g", "dk", "dv")),), _O, (), (),
         ("$S = exp(-softplus($w))*$S + $k⊗$v", "$o = $q·$S"), ref_gqa, _in_gqa),
]}


@dataclass
class Case:
    base: Base
    dim_names: dict[str, str]                  # base dim -> its name in the case
    value_names: dict[str, str]                # base value -> its name in the case
    dim_order: tuple[str, ...]                 # base dims in the order the case declares them
    layouts: dict[str, tuple[str, ...]]        # base array -> its dims (base names) in the case's layout
    over: tuple[str, ...] = ()                 # the rmsnorm's over= list (base names)
    shuffle: int = 0                           # seed of the order arrays are declared in

    @classmethod
    def make(cls, base: str | Base, dim_names=None, value_names=None, dim_order=None, layouts=None, over=None,
             shuffle=0) -> "Case":
        b = BASES[base] if isinstance(base, str) else base
        arrays = b.arrays()
        return cls(b, {d: d for d in b.dims} | dict(dim_names or {}),
                   {v: v for v in b.value_names()} | dict(value_names or {}),
                   tuple(dim_order or b.dims), {n: tuple(ds) for n, ds in arrays.items()} | dict(layouts or {}),
                   tuple(over if over is not None else b.norm_over), shuffle)

    # ---- the spec ---------------------------------------------------------------------------------------------
    def _decl(self, name) -> str:
        dn = self.dim_names
        return f"{self.value_names[name]}[{','.join(dn[d] for d in self.layouts[name])}]"

    def _order(self, items):
        items = list(items)
        if self.shuffle:
            np.random.default_rng(self.shuffle).shuffle(items)
        return items

    @property
    def ins(self):
        return [n for n, _ in self._order(self.base.ins)]

    @property
    def states(self):
        return [n for n, _ in self._order(self.base.states)]

    @property
    def outs(self):
        return [n for n, _ in self._order(self.base.outs)]

    @property
    def text(self) -> str:
        b, dn = self.base, self.dim_names
        lines = [f"ssm {b.name}_x {{", f"  dims {', '.join(dn[d] for d in self.dim_order)}", f"  scan {dn[b.scan]}"]
        lines += [f"  group {dn[g]} -> {dn[h]}" for g, h in b.groups]
        lines.append(f"  in {', '.join(self._decl(n) for n in self.ins)}")
        lines.append(f"  state {', '.join(self._decl(n) for n in self.states)}")
        lines.append(f"  out {', '.join(self._decl(n) for n in self.outs)}")
        lines.append("")

        def sub(m):
            kind, key, decl = m.group(1), m.group(2), m.group(3)
            if kind == "%":
                return dn[key]
            if key == "OVER":
                return "[" + ",".join(dn[d] for d in self.over) + "]"
            return self._decl(key) if decl else self.value_names[key]
        for s in b.body:
            lines.append("  " + re.sub(r"([%$])(\w+)(\[\])?", sub, s))
        lines.append("}")
        return "\n".join(lines) + "\n"

    # ---- arrays -------------------------------------------------------------------------------------------------
    def to_case(self, name, x):
        """An array in the base layout -> the case's layout."""
        base = self.base.arrays()[name]
        return np.transpose(np.asarray(x), [base.index(d) for d in self.layouts[name]])

    def to_base(self, name, x):
        lay = self.layouts[name]
        return np.transpose(np.asarray(x), [lay.index(d) for d in self.base.arrays()[name]])

    def sizes_in_case_names(self, sizes):
        return {self.dim_names[d]: n for d, n in sizes.items()}

    def call_args(self, inputs: dict, init: dict | None = None) -> dict:
        """Keyword arguments of the compiled kernel: base-layout inputs renamed and permuted."""
        kw = {self.value_names[n]: self.to_case(n, inputs[n]) for n in self.ins}
        if init is not None:
            kw["initial_states"] = {self.value_names[n]: self.to_case(n, init[n]) for n in self.states}
        return kw

    def expected(self, inputs: dict, init: dict | None = None) -> list[tuple[str, np.ndarray]]:
        """(label, float64 reference) of every result in the order the kernel returns them, in the case's layout."""
        outs, states = self.base.reference(inputs, init)
        byname = dict(zip([n for n, _ in self.base.outs], outs)) | dict(zip([n for n, _ in self.base.states], states))
        return ([(f"out {self.value_names[n]}", self.to_case(n, byname[n])) for n in self.outs]
                + [(f"state {self.value_names[n]}", self.to_case(n, byname[n])) for n in self.states])

    def initial_states(self, rng, sizes) -> dict:
        out = {}
        for n, ds in self.base.states:
            shape = tuple(sizes[d] for d in ds)
            out[n] = (R._unif(rng, 0.5, 1.5, *shape) if (self.base.name, n) == ("linear_attention", "z")
                      else R._randn(rng, *shape, scale=0.5))  # a normaliser state stays positive
        return out

    def describe(self) -> str:
        return f"spec:\n{self.text}"


# ---- hypothesis strategies -------------------------------------------------------------------------------------
def _strategies():
    from hypothesis import strategies as st

    # short names the generated code builds its own identifiers from (o_t, i_chunk, N_x, ...), then any
    tricky = st.sampled_from(["t", "chunk", "o", "i", "j", "N", "BLOCK", "x", "h", "g", "Tq", "stride", "tile"])
    ident = st.one_of(tricky, st.from_regex(r"[A-Za-z][A-Za-z0-9]{0,5}", fullmatch=True)).filter(usable)

    @st.composite
    def cases(draw, base: str, rename=None):
        b = BASES[base]
        rename = draw(st.booleans()) if rename is None else rename
        keys = list(b.dims) + ["$" + v for v in b.value_names()]
        if rename:
            names = draw(st.lists(ident, min_size=len(keys), max_size=len(keys), unique_by=str.lower))
        else:
            names = [k.lstrip("$") for k in keys]
        dim_names = dict(zip(b.dims, names[:len(b.dims)]))
        value_names = dict(zip(b.value_names(), names[len(b.dims):]))
        dim_order = tuple(draw(st.permutations(b.dims)))
        layouts = {n: tuple(draw(st.permutations(ds))) for n, ds in b.arrays().items()}
        over = b.norm_over
        if b.norm_head:
            over = draw(st.sampled_from([b.norm_over, (b.norm_head,) + b.norm_over, b.norm_over + (b.norm_head,)]))
        shuffle = draw(st.integers(0, 1000))
        return Case(b, dim_names, value_names, dim_order, layouts, over, shuffle)

    @st.composite
    def sizes(draw, base: str, max_t: int = 33, max_feat: int = 8):
        b = BASES[base]
        d = {"b": draw(st.integers(1, 2)), "t": draw(st.integers(1, max_t))}
        if b.groups:
            d["h"] = draw(st.sampled_from([2, 4]))
            d["g"] = draw(st.sampled_from([g for g in (1, 2, 4) if d["h"] % g == 0 and g <= d["h"]]))
        else:
            d["h"] = draw(st.integers(1, 3))
        for x in b.dims:
            if x not in d:
                d[x] = draw(st.integers(2, max_feat))
        return d

    return cases, sizes


def cases(base: str, rename=None):
    return _strategies()[0](base, rename)


def sizes(base: str, **kw):
    return _strategies()[1](base, **kw)
