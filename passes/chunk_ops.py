"""Operand layout of the chunk-stage ops, shared by the chunk pass (encode) and every emitter (decode).

Stage ops (per state S, chunk length Q along the scan dim, `t#` = chunk index):
  chunk.cumsum  ell            -> L[t, decay dims]   inclusive cumsum of log|a| within each chunk
  chunk.cumsign sgn            -> sigma[t, ...]      cumulative sign of a within each chunk (only if a may be < 0)
  chunk.states  ell L [sigma] [sgn] u...      -> [t#, S]  each chunk's final state, starting from zero
  chunk.pass    L [sigma] chunks init         -> [t#, S]  the state entering each chunk (sequential over chunks)
  chunk.final   L [sigma] chunks enter        -> [S]      the state after the last step
  chunk.output  ell L [sigma] [sgn] enter q... u... -> [t, ...] q_t · S_t (when=new) or q_t · S_{t-1} (when=prev):
                in-chunk part Σ_s (q_t · u_s) exp(L_t - L_s) + state part exp(L_t) q_t · S_enter
`sgn` (the sign of a_t at each step) comes with form=scan, which walks the steps with a_t = sgn_t exp(ell_t), and
with a quadratic chunk.output that reads before the update (when=prev) of a signed decay: its target side takes
the sign through t-1, sigma_t * sign(a_t) (a zero decay counts as positive, as in the cumulative sign).
`sub` (on chunk.output of key-wise / value-wise states): the sub-chunk length C of the in-chunk part; C < Q splits
the chunk into Q/C sub-chunks (matmuls between them, diagonal blocks direct), C == Q is the [Q, Q, decay] form.
`bounded` (on chunk.cumsum, chunk.states, chunk.output): |a| <= 1 is proven (passes/bounds.py), so exponents
L_t - L_s (s <= t) may be clamped to <= 0; when False every exponent is used as it is (exact for growing decays).
Positions past the sequence end contribute nothing (log-decay 0, update 0); emitters mask them.
`part` (on chunk.output of a scalar decay, when=new): "state" keeps only the state part exp(L_t) q_t · S_enter;
"in" only the in-chunk part (the two sum to the whole value: the derived backward computes them in different
kernels, the state part where the state's tile is held whole, passes/adjoint.py pieces); "straddle" only the in-chunk pairs around each row i, Σ_{t >= i} Σ_{s < i} M[t, s] with M[t, s] the in-chunk
summand of row t from source s (the derived backward's decay gradient a_i <S_{i-1}, G_i>, passes/adjoint.py).
All are times qcoef; t and s lie in i's chunk and inside the sequence. Emitters compute "state" and "in" for any
quadratic chunk.output read after the update (no in-chunk part / no state part at all), "straddle" for a positive decay without state dims
(identity / constant / scalar class, no sigma, no sub-chunks) whose out dims are the decay's dims and the scan dim
(all else contracted), in fp32 as Σ_{j < i} (colsum_j - rowsum_j) of M (a pair counts for [s < i] - [t < i]);
else a TargetError.

Step-level ops of the derived backward that only this pass lowers (a program with them has no sequential form):
  pairs r {part}   a readout r's `part` (state / in / straddle) relative to the chunks: chunk.output{part}
  enter S.prev     [t#, S]: the state entering each chunk (chunk.pass's value), an out of the derived programs
  across X S.prev  [t, decay dims]: Σ over the state dims of X[chunk] * (the state entering the chunk), the same for
                   every step of a chunk (X: an input indexed by chunk, [t#, S]) -> chunk.across X enter
"""
from __future__ import annotations

from dataclasses import dataclass

from ssmc.ir import OP_ARITY, Instr

STAGE_OPS = ("chunk.cumsum", "chunk.cumsign", "chunk.states", "chunk.pass", "chunk.final", "chunk.output",
             "chunk.across")
STEP_CHUNK_OPS = ("pairs", "enter", "across")
OP_ARITY.update({"pairs": 1, "enter": 1, "across": 2, "chunk.across": 2, "chunk.cumsum": 1, "chunk.cumsign": 1,
                 "chunk.states": None, "chunk.pass": None, "chunk.final": None, "chunk.output": None, "final": 1})
STAGE_OF = {"chunk.cumsum": "cumsum", "chunk.cumsign": "cumsum", "chunk.states": "chunk_state",
            "chunk.pass": "state_passing", "chunk.final": "state_passing", "chunk.output": "chunk_output",
            "chunk.across": "chunk_output"}


@dataclass(frozen=True)
class ChunkArgs:
    ell: str | None = None
    L: str | None = None
    sigma: str | None = None
    sgn: str | None = None
    chunks: str | None = None
    enter: str | None = None
    init: str | None = None
    q: tuple[str, ...] = ()
    u: tuple[tuple[str, ...], ...] = ()   # update products (factor names each)
    qcoef: float = 1.0
    ucoef: tuple[float, ...] = ()

    def encode(self) -> tuple[tuple[str, ...], dict]:
        args, layout = [], []
        for role in ("ell", "L", "sigma", "sgn", "chunks", "enter", "init"):
            v = getattr(self, role)
            if v is not None:
                args.append(v)
                layout.append(role)
        if self.q:
            args.extend(self.q)
            layout.append(f"q:{len(self.q)}")
        for k, prod in enumerate(self.u):
            args.extend(prod)
            layout.append(f"u:{len(prod)}")
        attrs = {"layout": tuple(layout)}
        if self.q:
            attrs["qcoef"] = float(self.qcoef)
        if self.u:
            attrs["ucoef"] = tuple(float(c) for c in self.ucoef)
        return tuple(args), attrs


def decode(i: Instr) -> ChunkArgs:
    it = iter(i.args)
    kw: dict = {"u": []}
    for slot in i.attr("layout"):
        role, _, n = slot.partition(":")
        if not n:
            kw[role] = next(it)
        elif role == "q":
            kw["q"] = tuple(next(it) for _ in range(int(n)))
        else:
            kw["u"].append(tuple(next(it) for _ in range(int(n))))
    kw["u"] = tuple(kw["u"])
    kw["qcoef"] = i.attr("qcoef", 1.0)
    kw["ucoef"] = tuple(i.attr("ucoef", ()))
    return ChunkArgs(**kw)


SCALAR_CLASSES = ("identity", "constant", "scalar")  # decays the straddle part takes (a per-step scalar)


def part_problem(i: Instr, a: ChunkArgs, instrs) -> str | None:
    """What chunk.output `i` lacks for its `part` (passes/chunk_ops.py docstring), the same for every emitter, or
    None; each emitter checks its own layout on top (a straddle's out dims). `instrs`: the program's, where the
    state's chunk.states says its decay class."""
    part = i.attr("part")
    if part not in ("state", "in", "straddle"):
        return "unknown part (known: state, in, straddle)"
    if i.attr("form") == "scan" or i.attr("when") != "new":
        return (f"needs the chunked quadratic form read after the update (when=new), got form={i.attr('form')}, "
                f"when={i.attr('when')}")
    if part == "straddle":
        st = next((x for x in instrs if x.op == "chunk.states" and x.attr("state") == i.attr("state")), None)
        klass = st.attr("klass") if st is not None else None
        if klass not in SCALAR_CLASSES or a.sigma:
            return (f"needs a scalar positive decay (identity, constant or scalar class, no sign), got class "
                    f"{klass}{' with a sign' if a.sigma else ''}")
    return None
