"""The derived backward of a compiled spec: the adjoint programs (passes/adjoint.py) compiled for the kernel's
target, and the state-free glue around them.

A call's vector-Jacobian product, for cotangents of the outs (dy) and of the final states (dS_T):
  1. the epilogue (outs from the readouts and the inputs) is differentiated by jax over ssmc/ir_eval.py's jnp
     evaluation: its cotangents of the readouts dr (when the outs are nonlinear in the readouts, their state
     terms come first from the `readouts` program) and of the inputs it reads directly (D in D*x);
  2. the `dq` program (the forward recurrence) gives the cotangents of the readout terms' query factors and the
     final states S_T; the `adj` program, over reversed time from dS_T, those of the update factors and G_0;
  3. the log-decays' cotangent is a reverse cumulative sum of <q, dq> - <u, G> (+ <S_T, dS_T> at the last step);
  4. jax differentiates the prologue (inputs -> factors and log-decays) with those cotangents; the initial
     states' cotangent is a_0 ⊙ G_0.
Nothing per step is saved by the forward: the backward recomputes from the inputs (per-chunk states live only
inside the kernels).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from .ir import Program
from .ir_eval import Env, align, contract, to_dims


class Backward:
    """The derived backward kernels of one forward kernel (built once, on first use)."""

    def __init__(self, kernel, compile_program):
        from ssmc.passes.adjoint import derive
        self.k = kernel
        self.d = derive(kernel.program)
        self.p: Program = kernel.program
        opts = dict(target=kernel.target, matmul=kernel.matmul, interpret=kernel.interpret, out_dtype="float32",
                    pipeline=kernel.pipeline)
        self.kernels = {part: compile_program(prog, **opts) for part, prog in self.d.programs.items()}
        self.by = self.p.by_name()
        for i in self.d.helpers:
            self.by.setdefault(i.name, i)

    # ---- inspection -------------------------------------------------------------------------------------
    @property
    def source(self) -> str:
        return "\n\n".join(f"# ==== adjoint part '{part}' ====\n{k.source}" for part, k in self.kernels.items())

    @property
    def passes(self) -> list[tuple[str, str]]:
        return [(f"adjoint{{part={part}}} | {name}", text) for part, k in self.kernels.items()
                for name, text in k.passes]

    # ---- evaluation of the state-free parts ---------------------------------------------------------------
    def _env(self, xs: dict, sizes: dict) -> Env:
        """Every state-free value of the forward program (and the analysis helpers) from the inputs `xs` (forward
        input / window instruction name -> array in the IR layout)."""
        env = Env(self.p, sizes)
        env.by.update(self.by)
        for i in self.p.instrs:
            if i.op in ("input", "window"):
                env.set(i.name, xs[i.name])
            elif i.op in ("state", "update", "out", "final") or self._dep(i.name):
                continue
            else:
                env.run(i)
        for i in self.d.helpers:
            env.run(i)
        return env

    def _dep(self, name) -> bool:
        dep = self.__dict__.get("_depmap")
        if dep is None:
            dep = {}
            for i in self.p.instrs:
                dep[i.name] = i.op == "state" or any(dep[a] for a in i.args)
            self._depmap = dep
        return dep[name]

    def _epilogue(self, xs, terms, sizes):
        """(outs, window finals) from the inputs and the readouts' state terms."""
        env = self._env(xs, sizes)
        for r, (dims, _) in self.d.readouts.items():
            v = terms[r]
            for prod in self.d.rest[r]:
                v = v + _product(env, prod, dims)
            env.set(r, v)
        outs, finals = {}, {}
        for i in self.p.instrs:
            if i.name in env or i.op in ("state", "update"):
                continue
            if i.op == "out":
                outs[i.attr("out")] = env[i.args[0]]
            elif i.op == "final":
                finals[i.attr("state")] = env[i.args[0]]
            elif all(a in env for a in i.args):
                env.run(i)
        return outs, finals

    # ---- the vjp -----------------------------------------------------------------------------------------
    def vjp(self, meta, arrays: dict, cts: dict, dtype):
        """Cotangents of `arrays` (inputs by name, initial states as "state:<name>") for cotangents `cts` of the
        call's results ({out name: array, "state:<name>": array}, declared layouts)."""
        p, d, scan = self.p, self.d, self.p.scan
        sizes = dict(meta.state_sizes(None))
        decl = {a.name: a.dims for a in p.inputs + p.states + p.outs}
        leaves = [i for i in p.instrs if i.op in ("input", "window")]
        key = {i.name: (i.attr("array") if i.op == "input" else "state:" + i.attr("state")) for i in leaves}
        xs = {}
        for i in leaves:
            a = arrays.get(key[i.name])
            name = key[i.name].split(":")[-1]
            if a is None:
                a = jnp.zeros([sizes[dd] for dd in decl[name]], dtype)
            xs[i.name] = to_dims(jnp.asarray(a).astype(jnp.promote_types(a.dtype, dtype)), decl[name], i.dims)
        states0 = {s.name: arrays.get("state:" + s.name) for s in d.states.values()}
        # 1. the epilogue's cotangents
        zeros = {r: jnp.zeros([sizes[x] for x in dims], dtype) for r, (dims, _) in d.readouts.items()}
        env = self._env(xs, sizes)
        logs = {s: self._log(env, st, sizes) for s, st in d.states.items()}
        if d.linear_outs:
            terms = zeros
        else:
            rk = self.kernels["readouts"]
            res = rk.apply(self._feed("readouts", env, {}, logs), _init(states0, d.states, decl))
            named = dict(zip([n for n, _ in rk.outs], res))
            terms = {r: named[out] for r, (_, out) in d.readouts.items()}
        dy = {o.name: _ct(cts.get(o.name), o.dims, o.dims, sizes, dtype) for o in p.outs}
        windows = [s.name for s in p.states if s.name not in d.states]
        dwin = {w: _ct(cts.get("state:" + w), decl[w], decl[w], sizes, dtype) for w in windows}
        by = self.by

        def epi(xs_, terms_):
            outs, finals = self._epilogue(xs_, terms_, sizes)
            return ({o.name: to_dims(outs[o.name], by[_out_value(p, o.name)].dims, o.dims) for o in p.outs},
                    {w: to_dims(finals[w], _final_dims(p, w), decl[w]) for w in windows})

        _, epi_vjp = jax.vjp(epi, xs, terms)
        dxs_e, dterms = epi_vjp((dy, dwin))
        # 2. the recurrences' adjoints
        dq_k = self.kernels["dq"]
        res = dq_k.apply(self._feed("dq", env, dterms, logs), _init(states0, d.states, decl))
        n_out = len(dq_k.outs)
        dq = dict(zip([n for n, _ in dq_k.outs], res[:n_out]))
        finals = dict(zip([n for n, _ in dq_k.states], res[n_out:]))
        dST = {s: _ct(cts.get("state:" + s), decl[s], d.states[s].dims, sizes, dtype) for s in d.states}
        adj_k = self.kernels["adj"]
        flip = self._flipper()
        feed = self._feed("adj", env, dterms, {s: self._shift(lg, d.states[s]) for s, lg in logs.items()})
        res = adj_k.apply({n: flip(n, v, adj_k) for n, v in feed.items()},
                          {s: dST[s] for s in d.states})
        n_out = len(adj_k.outs)
        du = {n: flip(n, v, adj_k, out=True) for n, v in zip([n for n, _ in adj_k.outs], res[:n_out])}
        G0 = dict(zip([n for n, _ in adj_k.states], res[n_out:]))
        # 3. the factors' cotangents and the log-decays'
        cot: dict[str, jax.Array] = {}
        dL = {s: None for s in d.states}
        for part, vals in (("dq", dq), ("adj", du)):
            for c in d.cots[part]:
                v = vals[c.out].astype(jnp.float32)
                fd = by[c.factor].dims
                cot[c.factor] = cot.get(c.factor, 0) + _to(v, c.dims, fd, sizes)
                st = d.states[c.state]
                if c.for_decay and st.log is not None:
                    ldl = _ldims(p, st)
                    share = c.sign * to_dims(v * align(env[c.factor], fd, c.dims), c.dims, ldl)
                    if part == "dq" and c.when == "prev":  # a read of S_{t-1}: its share belongs to step t-1
                        share = _shift_back(share, ldl.index(scan))
                    dL[c.state] = share if dL[c.state] is None else dL[c.state] + share
        dlog = {}
        for s, st in d.states.items():
            if st.log is None:
                continue
            ldl = _ldims(p, st)
            last = to_dims(finals[s].astype(jnp.float32) * dST[s], st.dims, tuple(x for x in ldl if x != scan))
            ax = ldl.index(scan)
            g = dL[s] + jnp.expand_dims(last, ax) * _onehot_last(sizes[scan], ax, len(ldl))
            dlog[s] = jnp.flip(jnp.cumsum(jnp.flip(g, ax), axis=ax), ax)
        # 4. the prologue's vjp
        factors = sorted(cot)

        def pro(xs_):
            e = self._env(xs_, sizes)
            return ({f: e[f] for f in factors},
                    {s: jnp.broadcast_to(align(e[d.states[s].log], by[d.states[s].log].dims, _ldims(p, d.states[s])),
                                         dlog[s].shape) for s in dlog})

        _, pro_vjp = jax.vjp(pro, xs)
        (dxs_p,) = pro_vjp(({f: cot[f].astype(env[f].dtype) if hasattr(env[f], "dtype") else cot[f] for f in factors},
                            dlog))
        grads = {}
        for i in leaves:
            g = dxs_e[i.name] + dxs_p[i.name]
            name = key[i.name].split(":")[-1]
            grads[key[i.name]] = to_dims(g, i.dims, decl[name])
        for s, st in d.states.items():
            g = G0[s].astype(jnp.float32)
            if st.when == "new" and st.log is not None:
                a0 = jnp.exp(lax_index(logs[s][0], st.ldims.index(scan), 0))
                if st.signs:
                    a0 = a0 * lax_index(logs[s][1], st.ldims.index(scan), 0)
                g = g * align(a0, tuple(x for x in st.ldims if x != scan), st.dims)
            grads["state:" + s] = to_dims(g, st.dims, decl[s])
        return grads

    # ---- helpers ---------------------------------------------------------------------------------------
    def _log(self, env, st, sizes):
        """(log|a_t|, sign) over the state's log-decay dims (the scan dim included), or None (a = 1)."""
        if st.log is None:
            return None
        full = [sizes[x] for x in st.ldims]
        lg = jnp.broadcast_to(align(env[st.log], self.by[st.log].dims, st.ldims), full).astype(jnp.float32)
        sg = None
        if st.signs:
            sg = jnp.ones(full, jnp.float32)
            for s in st.signs:
                sg = sg * jnp.broadcast_to(align(jnp.sign(env[s]), self.by[s].dims, st.ldims), full)
        return lg, sg

    def _shift(self, log, st):
        """The adjoint's decay at reversed step t is a_{t+1} (1 past the end) for reads after the update."""
        if log is None or st.when == "prev":
            return log
        ax = st.ldims.index(self.p.scan)
        lg, sg = log
        lg = _shift_forward(lg, ax, 0.0)
        sg = None if sg is None else _shift_forward(sg, ax, 1.0)
        return lg, sg

    def _feed(self, part, env, dterms, logs) -> dict:
        out = {}
        for name, holds in self.d.inputs[part].items():
            kind, _, what = holds.partition(":")
            if kind == "dr":
                out[name] = dterms[what]
            elif kind == "ln":
                out[name] = logs[what][0]
            elif kind == "sign":
                out[name] = logs[what][1]
            else:
                out[name] = env[holds]
        return out

    def _flipper(self):
        scan = self.p.scan

        def flip(name, v, kern, out=False):
            dims = dict(kern.outs if out else kern.inputs)[name]
            return jnp.flip(v, dims.index(scan)) if scan in dims else v
        return flip


def lax_index(x, axis, i):
    return jax.lax.index_in_dim(x, i, axis=axis, keepdims=False)


def _ldims(p, st):
    """The dims of a state's log-decay cotangent: the log's dims, the scan dim and the state's batch dims."""
    return p.order(set(st.ldims) | set(st.batch) | {p.scan})


def _shift_forward(x, ax, fill):
    """y[t] = x[t+1], fill at the last step."""
    pad = jnp.full_like(jax.lax.slice_in_dim(x, 0, 1, axis=ax), fill)
    return jnp.concatenate([jax.lax.slice_in_dim(x, 1, x.shape[ax], axis=ax), pad], axis=ax)


def _shift_back(x, ax):
    """y[t] = x[t+1], 0 at the last step (a share at step t+1 credited to step t)."""
    return _shift_forward(x, ax, 0.0)


def _onehot_last(T, ax, ndim):
    shape = [1] * ndim
    shape[ax] = T
    return (jnp.arange(T) == T - 1).astype(jnp.float32).reshape(shape)


def _to(v, src, dst, sizes):
    """A cotangent over dims `src` as one over `dst`: extra dims summed, missing ones broadcast."""
    common = tuple(x for x in src if x in dst)
    v = to_dims(v, src, common)
    return jnp.broadcast_to(align(v, common, dst), [sizes[x] for x in dst])


def _ct(v, src, dst, sizes, dtype):
    if v is None or str(getattr(v, "dtype", "")) == "float0":  # a symbolic zero
        return jnp.zeros([sizes[x] for x in dst], dtype)
    return to_dims(jnp.asarray(v).astype(dtype), src, dst)


def _product(env, prod, dims):
    ops = [env[f] for f in prod.factors]
    v = contract(ops, [env.dims(f) for f in prod.factors], dims)
    return v * prod.coef if prod.coef != 1.0 else v


def _init(states0, infos, decl):
    return {s: to_dims(jnp.asarray(v), decl[s], infos[s].dims) for s, v in states0.items() if v is not None} or None


def _out_value(p, name):
    return next(i.args[0] for i in p.instrs if i.op == "out" and i.attr("out") == name)


def _final_dims(p, w):
    by = p.by_name()
    return next(by[i.args[0]].dims for i in p.instrs if i.op == "final" and i.attr("state") == w)
