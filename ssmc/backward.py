"""The derived backward of a compiled spec: the adjoint programs (passes/adjoint.py) compiled for the kernel's
target, and the state-free glue around them.

A call's vector-Jacobian product, for cotangents of the outs (dy) and of the final states (dS_T):
  1. the epilogue (outs from the readouts and the inputs) is differentiated by jax over ssmc/ir_eval.py's jnp
     evaluation: its cotangents of the readouts dr (when the outs are nonlinear in the readouts, their state
     terms come first from the `readouts` program) and of the inputs it reads directly (D in D*x);
  2. the `dq` program (the forward recurrence) gives the cotangents of the readout terms' query factors (and,
     where it walks, the final states S_T); the `adj` program, over reversed time from dS_T, those of the update
     factors and G_0;
  3. the log-decays' cotangent: per chunk from the programs' `pairs` outs (passes/adjoint.py; no term cancels
     another, so bf16 dots keep it exact to rounding), or else a reverse cumulative sum of <q, dq> - <u, G>
     (+ <S_T, dS_T> at the last step), whose terms cancel;
  4. jax differentiates the prologue (inputs -> factors and log-decays) with those cotangents; the initial
     states' cotangent is a_0 ⊙ G_0.
Nothing per step is saved by the forward. On the kernel targets, where every state's decay gradient has the
per-chunk form, the forward of a differentiated call (`forward`: the spec's program plus the state entering each
chunk, passes/adjoint.py forward_entering) saves those states, one per chunk; `dq` (and `readouts`) then run every
chunk at once from them (the modules' `entering=`), and `adj` reads them; `adj`'s recurrence alone
(`adj_entering`) stores the adjoint states entering each chunk, and `adj` runs every chunk at once from those, as
pieces (one kernel per set of state dims its outs keep: `runs["adj"]`). Elsewhere `dq` walks and stores them.
Inside a shard_map over the sequence (`across`) each device differentiates its part: the adjoint's parts chain in
reverse device order, and the steps after a part's last come from the next device.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from ssmc.targets.base import ACROSS, ENTERING

from .errors import SSMCError
from .ir import Program
from .ir_eval import Env, align, contract, to_dims


class Backward:
    """The derived backward kernels of one forward kernel (built once, on first use)."""

    def __init__(self, kernel, compile_program, pairs: bool = True, matmul: str | None = None):
        from ssmc.passes.adjoint import derive
        from ssmc.passes.chunk import NeedsChunks
        self.k = kernel
        self.p: Program = kernel.program
        self._compile = compile_program
        # kernel targets: the forward stores the states entering each chunk, and dq runs chunk-parallel from them
        split = pairs and kernel._target.kernels
        self.d = derive(kernel.program, pairs, split)
        try:
            self.kernels = self._build(matmul)
        except NeedsChunks:  # not chunked (chunk size 1, a sequential schedule): the form whose sum cancels
            self.d = derive(kernel.program, False)
            self.kernels = self._build(matmul)
        if self.d.forward_entering is not None and not all(
                ENTERING in self.kernels[key]._info.options for part in ("dq", "adj") for key in self.runs[part]):
            self.d = derive(kernel.program, pairs)  # no segment schedule: dq stores the states itself, adj walks
            self.kernels = self._build(matmul)
        self.forward_kernel = None  # the forward that also stores the states entering each chunk (split)
        if self.d.forward_entering is not None:
            self.forward_kernel = self._compile(
                self.d.forward_entering, target=kernel.target, matmul=kernel.matmul, interpret=kernel.interpret,
                out_dtype=kernel.out_dtype, pipeline=kernel.pipeline)
        self.pairs = any(st.pairs for st in self.d.states.values())
        # the chunk length of the per-chunk decay gradient (every part's chunks must be the same): the parts with
        # values indexed by chunk (the entering states, adj's across) record it in their modules
        Qs = ({k._info.chunk for _, _, k in self.parts() if k._info.chunk} if self.pairs else {None})
        if len(Qs) != 1:
            raise SSMCError(f"{self.p.name}: the derived backward's parts have different chunk lengths {sorted(Qs)}")
        self.Q = Qs.pop()
        self._flat = None  # the form without `pairs` (packed calls), built on first use
        # packed calls: every derived program takes cu_seqlens along the forward's packed dim (a causal conv is
        # evaluated per sequence by ir_eval, from each sequence's window)
        self._packable = kernel.packed_dim is not None and all(
            k.packed_dim == kernel.packed_dim for k in self.kernels.values())
        self.by = self.p.by_name()
        for i in self.d.helpers:
            self.by.setdefault(i.name, i)

    def _build(self, matmul: str | None) -> dict:
        """The derived programs compiled for the kernel's target. Their dots take `matmul` if given, else compile's
        backward_matmul ("auto": the activations' dtype, as the forward's) except where a decay's gradient is the
        sum whose terms cancel (no per-chunk form for it): full precision there, which bf16 operands would leave
        O(1) off."""
        k = self.k
        if matmul is None:
            cancelling = any(st.log is not None and st.pairs is None for st in self.d.states.values())
            matmul = "float32" if cancelling else k.backward_matmul
        self.matmul = matmul
        opts = dict(target=k.target, matmul=matmul, interpret=k.interpret, out_dtype=None, pipeline=k.pipeline)
        # where dq and adj run from given entering states they run as pieces (passes/adjoint.py pieces): one kernel
        # per set of state dims their outs keep, keyed "<part>:<dims>"
        self.runs = {part: [part] for part in self.d.programs}
        progs = dict(self.d.programs)
        for part, pieces in (self.d.pieces or {}).items():
            del progs[part]
            self.runs[part] = [f"{part}:{label}" for label in pieces]
            progs.update({f"{part}:{label}": prog for label, prog in pieces.items()})
        return {key: self._compile(prog, **opts) for key, prog in progs.items()}

    @property
    def packable(self) -> bool:
        """Whether packed calls (cu_seqlens) have a derived backward: the per-chunk form's chunks cannot align with
        every sequence, so they take the form without it (built here on first use)."""
        return self.flat()._packable if self.pairs else self._packable

    def flat(self) -> "Backward":
        """This backward without the per-chunk decay gradient (passes/adjoint.py derive(pairs=False)); its decay
        gradient is a sum of terms that cancel, so its dots run at full precision whatever backward_matmul says."""
        if not self.pairs:
            return self
        if self._flat is None:
            self._flat = Backward(self.k, self._compile, pairs=False, matmul="float32")
        return self._flat

    # ---- inspection -------------------------------------------------------------------------------------
    def parts(self) -> list[tuple[str, str, object]]:
        """(kind, part, kernel): the forward that stores the states entering each chunk ("forward", "entering"),
        if any, then the adjoint programs ("adjoint", "dq" / "adj" / "readouts")."""
        fw = [("forward", "entering", self.forward_kernel)] if self.forward_kernel is not None else []
        return fw + [("adjoint", part, k) for part, k in self.kernels.items()]

    @property
    def source(self) -> str:
        return "\n\n".join(f"# ==== {kind} part '{part}' ====\n{k.source}" for kind, part, k in self.parts())

    @property
    def passes(self) -> list[tuple[str, str]]:
        return [(f"{kind}{{part={part}}} | {name}", text) for kind, part, k in self.parts() for name, text in k.passes]

    # ---- evaluation of the state-free parts ---------------------------------------------------------------
    def _env(self, xs: dict, sizes: dict, packed=None) -> Env:
        """Every state-free value of the forward program (and the analysis helpers) from the inputs `xs` (forward
        input / window instruction name -> array in the IR layout)."""
        env = Env(self.p, sizes, packed)
        env.by.update(self.by)
        for i in self.p.instrs:
            if i.op in ("input", "window"):
                env.set(i.name, xs[i.name])
            elif i.op in ("state", "update", "out", "final") or self.d.dep[i.name]:
                continue
            else:
                env.run(i)
        for i in self.d.helpers:
            env.run(i)
        return env

    def _epilogue(self, xs, terms, sizes, packed=None):
        """(outs, window finals) from the inputs and the readouts' state terms."""
        env = self._env(xs, sizes, packed)
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

    def takes(self, options: dict) -> bool:
        """Whether these kernels differentiate a call with entry `options`: none, or `across` (a part of a sequence
        split over devices, ssmc.shard) where the forward stores the entering states and every kernel that walks
        takes `across` (the adjoint's parts chain in reverse device order)."""
        if not options:
            return True
        if set(options) != {ACROSS} or self.forward_kernel is None:
            return False
        return all(ACROSS in k._info.options for k in (self.forward_kernel, self.kernels["adj_entering"]))

    # ---- the forward of a differentiated call ---------------------------------------------------------------
    def forward(self, meta, arrays: dict, across=None):
        """(the call's results, the states entering each chunk {state: array} or None): the forward that also
        stores them where the backward takes them from it (forward_kernel), else the plain forward."""
        opts = {} if across is None else {ACROSS: across}
        if self.forward_kernel is None or meta.seqs:
            return self.k._entry(meta, arrays, **opts), None
        fk, n = self.forward_kernel, len(self.k.outs)
        res = fk._entry(meta, arrays, **opts)
        names = [o for o, _ in fk.outs]
        entering = {s: res[names.index(st.pairs["enter"])] for s, st in self.d.states.items()}
        return tuple(res[:n]) + tuple(res[len(names):]), entering

    # ---- the vjp -----------------------------------------------------------------------------------------
    def vjp(self, meta, arrays: dict, cts: dict, dtype, cu=None, entering=None, across=None):
        """Cotangents of `arrays` (inputs by name, initial states as "state:<name>") for cotangents `cts` of the
        call's results ({out name: array, "state:<name>": array}, declared layouts). `cu`: a packed call's
        offsets (the states then hold one entry per sequence along the kernel's packed dim). `entering`: the
        states entering each chunk, as `forward` stored them (needed where the forward stores them). `across`:
        inside a shard_map, the mesh axis this device's part of the sequence is split over (ssmc.shard, whose
        final states are the last part's): each device returns its part's share of every cotangent (the initial
        states' on the first part only), which the shard_map sums over the parts for the inputs without the scan
        dim."""
        if cu is not None and self.pairs:  # chunks cannot align with every packed sequence: the cancelling form
            return self.flat().vjp(meta, arrays, cts, dtype, cu)
        if self.forward_kernel is not None and entering is None:
            _, entering = self.forward(meta, arrays, across)
        p, d, scan = self.p, self.d, self.p.scan
        sizes = dict(meta.sizes)
        pd = self.k.packed_dim if cu is not None else None
        ssz = dict(meta.state_sizes(pd))  # the states' sizes (a packed call: one entry per sequence)
        time = _Time(sizes[scan], scan, cu, across)
        call = {} if cu is None else {"cu_seqlens": cu}
        decl = {a.name: a.dims for a in p.inputs + p.states + p.outs}
        leaves = [i for i in p.instrs if i.op in ("input", "window")]
        key = {i.name: (i.attr("array") if i.op == "input" else "state:" + i.attr("state")) for i in leaves}
        xs = {}
        for i in leaves:
            a = arrays.get(key[i.name])
            name = key[i.name].split(":")[-1]
            if a is None:
                a = jnp.zeros([ssz[dd] for dd in decl[name]], dtype)
            xs[i.name] = to_dims(jnp.asarray(a).astype(jnp.promote_types(a.dtype, dtype)), decl[name], i.dims)
        states0 = {s.name: arrays.get("state:" + s.name) for s in d.states.values()}
        # an input fed to the kernels as is goes in its own dtype (bf16 x, B, C stay bf16 in memory), the readouts'
        # cotangents in the backward's matmul dtype (backward_matmul: fp32, or the activations' bf16 with "auto");
        # computed factors and log-decays stay fp32
        mm = meta.dtypes(self.matmul)[1]
        own = {i.name: jnp.dtype(arrays[key[i.name]].dtype) for i in leaves
               if i.op == "input" and key[i.name] in arrays}
        low = {n: dt for n, dt in own.items() if dt.itemsize < jnp.dtype(dtype).itemsize}
        feed_dt = (low, None if mm == jnp.dtype(dtype) else mm)
        # 1. the epilogue's cotangents
        zeros = {r: jnp.zeros([sizes[x] for x in dims], dtype) for r, (dims, _) in d.readouts.items()}
        packed = None if cu is None else (cu, pd)  # a packed call's convs restart per sequence
        env = self._env(xs, sizes, packed)
        logs = {s: self._log(env, st, sizes) for s, st in d.states.items()}
        if d.linear_outs:
            terms = zeros
        else:
            rk = self.kernels["readouts"]
            # the forward recurrence again: every chunk at once from the forward's entering states where it has them
            ropts = ({"entering": entering} if entering and ENTERING in rk._info.options else
                     {"across": across} if across is not None else call)
            res = rk.apply(self._feed("readouts", env, {}, logs, feed_dt), _init(states0, d.states, decl), **ropts)
            named = dict(zip([n for n, _ in rk.outs], res))
            terms = {r: named[out] for r, (_, out) in d.readouts.items()}
        dy = {o.name: _ct(cts.get(o.name), o.dims, o.dims, sizes, dtype) for o in p.outs}
        windows = [s.name for s in p.states if s.name not in d.states]
        dwin = {w: _ct(cts.get("state:" + w), decl[w], decl[w], ssz, dtype) for w in windows}
        by = self.by

        def epi(xs_, terms_):
            outs, finals = self._epilogue(xs_, terms_, sizes, packed)
            return ({o.name: to_dims(outs[o.name], by[_out_value(p, o.name)].dims, o.dims) for o in p.outs},
                    {w: to_dims(finals[w], _final_dims(p, w), decl[w]) for w in windows})

        _, epi_vjp = jax.vjp(epi, xs, terms)
        dxs_e, dterms = epi_vjp((dy, dwin))
        # 2. the recurrences' adjoints
        T = sizes[scan]
        Tp = T if not self.pairs else -(-T // self.Q) * self.Q  # the per-chunk form: whole chunks both ways
        # where the forward stored the states entering each chunk, dq runs every chunk at once from them
        dq, finals = self._run("dq", self._pad("dq", self._feed("dq", env, dterms, logs, feed_dt), Tp),
                               _init(states0, d.states, decl), T, {"entering": entering} if entering else call)
        entering = entering or {s: dq[st.pairs["enter"]] for s, st in d.states.items() if st.pairs}
        dST = {s: _ct(cts.get("state:" + s), decl[s], d.states[s].dims, ssz, dtype) for s in d.states}
        if across is not None:  # the final states are the last part's: their cotangent starts every part's chain
            dST = {s: jax.lax.psum(v, across) for s, v in dST.items()}
        shifted = {s: self._shift(lg, d.states[s], time) for s, lg in logs.items()}
        feed = self._pad("adj", self._feed("adj", env, dterms, shifted, feed_dt,
                                           {"enter:" + s: entering[s] for s in entering}), Tp)
        # a reverse-time program: its walk starts at each sequence's last step (in place on triton; elsewhere
        # the call flips the timed arrays around the kernels, Kernel._entry)
        walk_opts = {"across": across} if across is not None else call
        if "adj_entering" in self.kernels:
            # adj's recurrence alone stores the adjoint states entering each chunk; adj then runs every chunk at once
            G, G0 = self._run("adj_entering", feed, dST, T, walk_opts)
            walk_opts = {"entering": {s: G[st.pairs["adj_enter"]] for s, st in d.states.items()}}
            du, _ = self._run("adj", feed, dST, T, walk_opts)
        else:
            du, G0 = self._run("adj", feed, dST, T, walk_opts)
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
                    ldl = st.ldims
                    if c.share:  # summed in the kernel
                        share = c.sign * to_dims(vals[c.share].astype(jnp.float32), c.share_dims, ldl)
                    else:
                        share = c.sign * to_dims(v * align(env[c.factor], fd, c.dims), c.dims, ldl)
                    if part == "dq" and c.when == "prev":  # a read of S_{t-1}: its share belongs to step t-1
                        share = time.next(share, ldl.index(scan), 0.0)
                    dL[c.state] = share if dL[c.state] is None else dL[c.state] + share
        dlog = {}
        for s, st in d.states.items():
            if st.log is None:
                continue
            if st.pairs:
                dlog[s] = self._per_chunk(st, dq, du, logs[s][0], T, time)
                continue
            ldl = st.ldims
            rest = tuple(x for x in ldl if x != scan)
            last = to_dims(finals[s].astype(jnp.float32) * dST[s], st.dims, rest)
            g = time.at_last(last, rest, ldl, pd)
            dlog[s] = time.revcumsum(g if dL[s] is None else dL[s] + g, ldl.index(scan))
        # 4. the prologue's vjp
        factors = sorted(cot)

        def pro(xs_):
            e = self._env(xs_, sizes, packed)
            return ({f: e[f] for f in factors},
                    {s: jnp.broadcast_to(align(e[d.states[s].log], by[d.states[s].log].dims, d.states[s].ldims),
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
            if st.when == "new" and st.log is not None:  # dS_0 = a_0 G_0 (a sequence's first step)
                a0, a0_dims = time.first(jnp.exp(logs[s][0]), st.ldims, pd)
                if st.signs:
                    a0 = a0 * time.first(logs[s][1], st.ldims, pd)[0]
                g = g * align(a0, a0_dims, st.dims)
            if across is not None:  # only the first part starts from the initial states
                g = jnp.where(jax.lax.axis_index(across) == 0, g, 0.0)
            grads["state:" + s] = to_dims(g, st.dims, decl[s])
        return grads

    # ---- the per-chunk decay gradient ------------------------------------------------------------------------
    def _run(self, part, feed, init, T, opts) -> tuple[dict, dict]:
        """({out: array}, {state: final state, None where it ran from given entering states}) of a derived part:
        each of its kernels (its pieces, where it has them) on its inputs from `feed` (padded: _pad), and the outs
        cut back to T."""
        outs, finals = {}, {}
        for key in self.runs[part]:
            k = self.kernels[key]
            res = k.apply({a.name: feed[a.name] for a in k.program.inputs}, init, **opts)
            outs.update(self._unpad(k, res[:len(k.outs)], T))
            finals.update(zip([n for n, _ in k.states], res[len(k.outs):]))
        for name, pieces in self.d.sums.get(part, {}).items():  # an out its pieces computed in parts (fp32)
            outs[name] = sum(outs.pop(x) for x in pieces)
        return outs, finals

    def _pad(self, part, feed, Tp):
        """The timed inputs of a derived program padded to Tp steps (zeros: log-decay 0, no update, no read), once
        for all its kernels (its pieces, adj's state walk: their inputs are among its own)."""
        prog, scan = self.d.programs[part], self.p.scan
        out = dict(feed)
        for a in prog.inputs:
            x = out.get(a.name)
            if x is not None and scan in a.dims and x.shape[a.dims.index(scan)] != Tp:
                ax = a.dims.index(scan)
                pad = [(0, 0)] * x.ndim
                pad[ax] = (0, Tp - x.shape[ax])
                out[a.name] = jnp.pad(x, pad)
        return out

    def _unpad(self, k, res, T):
        """A derived kernel's outs by name, the timed ones cut back to T steps (the chunk-indexed ones whole)."""
        scan = self.p.scan
        return {n: jax.lax.slice_in_dim(r, 0, T, axis=dims.index(scan)) if scan in dims else r
                for (n, dims), r in zip(k.outs, res)}

    def _per_chunk(self, st, dq, du, lg, T, time):
        """dℓ_i = a_i <S_{i-1}, G_i> from the per-chunk pieces (passes/adjoint.py): within each chunk of Q steps
        Σ_{t >= i} X_t + W_i + Σ_{s < i} Y_s + exp(Σ ℓ over the chunk and the next step) <S_enter, G_enter>.
        adj walks reversed time, so its straddle at step j counts the pairs across j and j + 1: W_i is its value
        at step i - 1 (0 at a chunk's first step)."""
        scan, Q, ldl = self.p.scan, self.Q, st.ldims
        ax = ldl.index(scan)
        f32 = jnp.float32
        nc = -(-T // Q)
        Tp = nc * Q

        def chunks(v):  # [.., T, ..] -> [.., nc, Q, ..] (zeros past T)
            v = v.astype(f32)
            pad = [(0, 0)] * v.ndim
            pad[ax] = (0, Tp - T)
            v = jnp.pad(v, pad)
            return v.reshape(v.shape[:ax] + (nc, Q) + v.shape[ax + 1:])

        X, Y = chunks(dq[st.pairs["read"]]), chunks(du[st.pairs["upd"]])
        reads = jnp.flip(jnp.cumsum(jnp.flip(X, ax + 1), axis=ax + 1), ax + 1)  # Σ_{t >= i} within the chunk
        upds = jnp.cumsum(Y, axis=ax + 1) - Y                                     # Σ_{s < i} within the chunk
        S = chunks(du[st.pairs["straddle"]])
        W = jnp.concatenate([jnp.zeros_like(jax.lax.slice_in_dim(S, 0, 1, axis=ax + 1)),
                             jax.lax.slice_in_dim(S, 0, Q - 1, axis=ax + 1)], axis=ax + 1)
        Z = chunks(du[st.pairs["across"]])  # <S_enter, G_enter> of each step's chunk
        L = chunks(jnp.broadcast_to(lg, dq[st.pairs["read"]].shape))
        first = jax.lax.slice_in_dim(L, 0, 1, axis=ax + 1)
        nxt = time.next(first, ax, 0.0)  # ℓ at the step after each chunk (0 at the end)
        across = jnp.exp(jnp.sum(L, axis=ax + 1, keepdims=True) + nxt) * Z
        dl = reads + upds + W + across
        dl = dl.reshape(dl.shape[:ax] + (Tp,) + dl.shape[ax + 2:])
        return jax.lax.slice_in_dim(dl, 0, T, axis=ax)

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

    def _shift(self, log, st, time):
        """The adjoint's decay at reversed step t is a_{t+1} (1 past a sequence's end) for reads after the update."""
        if log is None or st.when == "prev":
            return log
        ax = st.ldims.index(self.p.scan)
        lg, sg = log
        return time.next(lg, ax, 0.0), None if sg is None else time.next(sg, ax, 1.0)

    def _feed(self, part, env, dterms, logs, dts, given=None) -> dict:
        """The `part` program's inputs. dts: ({input instruction: its array's own narrower dtype}, the
        activations' matmul dtype or None); given: arrays by what they hold (another program's outs)."""
        low, mm = dts
        out = {}
        for name, holds in self.d.inputs[part].items():
            kind, _, what = holds.partition(":")
            if given and holds in given:
                out[name] = given[holds]
            elif kind == "dr":
                out[name] = dterms[what] if mm is None else dterms[what].astype(mm)
            elif holds in low:
                out[name] = env[holds].astype(low[holds])  # exact: it was widened from this dtype
            elif kind == "ln":
                out[name] = logs[what][0]
            elif kind == "sign":
                out[name] = logs[what][1]
            else:
                out[name] = env[holds]
        return out


class _Time:
    """Where sequences start and end along the scan dim: each batch row one sequence of all T steps, or packed
    sequences at offsets `cu` (in a batch of one; their states lie along the packed dim). `across`: inside a
    shard_map, the mesh axis the sequence is split over; this device holds one part, and the step after its last
    is the next part's first."""

    def __init__(self, T: int, scan: str, cu=None, across=None):
        self.T, self.scan, self.across = T, scan, across
        self.cu = cu = None if cu is None else jnp.asarray(cu, jnp.int32)
        if cu is not None:
            t = jnp.arange(T)
            self.end = cu[1:][jnp.searchsorted(cu[1:], t, side="right")]  # one past each step's sequence
            self.lens = cu[1:] - cu[:-1]

    def next(self, x, ax, fill):
        """y[t] = x[t+1] within a sequence, `fill` at each sequence's last step."""
        pad = jnp.full_like(jax.lax.slice_in_dim(x, 0, 1, axis=ax), fill)
        if self.across is not None:  # the last step's successor is the next part's first (none after the last)
            n = jax.lax.axis_size(self.across)
            after = jax.lax.ppermute(jax.lax.slice_in_dim(x, 0, 1, axis=ax), self.across,
                                     [(i + 1, i) for i in range(n - 1)])
            pad = jnp.where(jax.lax.axis_index(self.across) == n - 1, pad, after)
        y = jnp.concatenate([jax.lax.slice_in_dim(x, 1, x.shape[ax], axis=ax), pad], axis=ax)
        if self.cu is None:
            return y
        shape = [1] * x.ndim
        shape[ax] = self.T
        return jnp.where((jnp.arange(self.T) == self.end - 1).reshape(shape), fill, y)

    def revcumsum(self, x, ax):
        """Sum over the steps from t to the end of t's sequence."""
        r = jnp.flip(jnp.cumsum(jnp.flip(x, ax), axis=ax), ax)
        if self.cu is None:
            return r
        rp = jnp.concatenate([r, jnp.zeros_like(jax.lax.slice_in_dim(r, 0, 1, axis=ax))], axis=ax)
        return r - jnp.take(rp, self.end, axis=ax)

    def at_last(self, last, last_dims, dims, pd):
        """`last` (dims without the scan dim; packed: one entry per sequence along pd) placed at each sequence's
        last step of an array over `dims`, zero elsewhere."""
        scan = self.scan
        if self.cu is None:
            onehot = (jnp.arange(self.T) == self.T - 1).astype(jnp.float32)
            return align(last, last_dims, dims) * align(onehot, (scan,), dims)
        ax = last_dims.index(pd)
        lm = jnp.moveaxis(last, ax, 0)
        lm = jnp.where((self.lens > 0).reshape((-1,) + (1,) * (lm.ndim - 1)), lm, 0.0)
        out = jnp.zeros((self.T,) + lm.shape[1:], lm.dtype).at[jnp.maximum(self.cu[1:] - 1, 0)].add(lm)
        rest = tuple(x for x in last_dims if x != pd)
        return align(out, (scan,) + rest, dims)

    def first(self, x, dims, pd):
        """x at each sequence's first step: (array, its dims). Packed: one entry per sequence along pd (an empty
        sequence's is 1: its state passes through)."""
        scan_ax = dims.index(self.scan)
        if self.cu is None:
            return jax.lax.index_in_dim(x, 0, axis=scan_ax, keepdims=False), dims[:scan_ax] + dims[scan_ax + 1:]
        v = jnp.take(x, jnp.minimum(self.cu[:-1], self.T - 1), axis=scan_ax)
        shape = [1] * v.ndim
        shape[scan_ax] = -1
        v = jnp.where((self.lens > 0).reshape(shape), v, 1.0)
        v = jnp.squeeze(v, dims.index(pd))
        return v, tuple(pd if k == scan_ax else d for k, d in enumerate(dims) if d != pd)


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
