"""The target interface: what a code generator provides, and what the module it generates exposes.

A target (`Target`) turns a spec's IR into Python source: `pipeline(chunk_size)` is its pass string, `emit(program,
pipeline)` the source. Every generated module exposes one entry with one calling convention, whatever the target:

    MODULE_INFO = ModuleInfo(...)            # what the entry takes and returns (below)
    def <entry>(<params...>, *, mm, out_dtype[, interpret]) -> (outs..., final states...)

The params are the spec's `in` arrays and initial states in the module's order, each in its declared layout and any
float dtype (the entry moves them into the layout and dtype it computes in); the results come back in their
declared layouts, the outs in `out_dtype`, the states in float32 (float64 where the target computes float64).
`mm` is the matmul operand dtype. `Kernel` (ssmc/kernel.py) reads MODULE_INFO by attribute and checks it once,
when the module loads (`ModuleInfo.check`), so a broken module fails there and not inside a call.

An out may be indexed by chunk (`chunk_outs`: the chunk-index dim t# of a chunked program, e.g. the state entering
each chunk): t# has ceil(T / Q) entries, Q the chunk length MODULE_INFO records (`chunk`), entry c the chunk over
steps [c*Q, (c+1)*Q). A reverse-time program walks from the last step and stores its k-th chunk at entry nc-1-k
(where Q divides T, entry c again covers forward steps [c*Q, (c+1)*Q)). A sequential program has no such out, and a
packed call (cu_seqlens) of a program with one is refused.

An input may be indexed by chunk too (`chunk_inputs`, e.g. the forward's states entering each chunk): its t# must
have ceil(T / Q) entries (the call checks it), entry c read by the chunk over steps [c*Q, (c+1)*Q); a reverse-time
program's walk reads entry nc-1-k at its k-th chunk, like the stores. Such an input is given as it is (its dtype
kept in memory, widened to fp32 by the kernels); a sequential program has none, and packed calls refuse it.
"""
from __future__ import annotations

import abc
import dataclasses
import inspect
from typing import ClassVar

from ssmc.errors import SSMCError, TargetError
from ssmc.passes.chunk import chunk_dim

# Part of every disk-cache key of generated code (ssmc/api.py): bump it when the entry contract changes, so that
# modules written under an older contract are never loaded (the code fingerprint catches edits in a checkout; this
# catches installs where the fingerprint falls back to names and versions).
ENTRY_CONTRACT = "2"

# the line that brings the record's types into a generated module, and the identifiers it writes literally (the
# emitters' name tables keep the spec's names off them)
MODULE_IMPORT = "from ssmc.targets.base import ModuleInfo, Param, Result"
MODULE_NAMES = ("MODULE_INFO", "ModuleInfo", "Param", "Result")

BASE_OPTIONS = ("mm", "out_dtype")      # every entry takes these keywords
KERNEL_OPTIONS = BASE_OPTIONS + ("interpret", "segments")  # kernel targets: their CPU interpreter; segments
# entries that can run one part of a sequence split across devices (ssmc.shard) take `across=`: the mesh axis (or
# axes) the scan dim is split over, from inside a shard_map; the state entering this device's part then comes from
# the parts before it (a scan over the parts' own states and total decays)
ACROSS = "across"
# entries with a segment schedule also take `entering=`: {state: the states entering each chunk [t#, *its dims]},
# stored by an earlier walk of the same recurrence (the forward of a differentiated call, ssmc/backward.py). Every
# chunk is then a segment of its own: step (c) alone runs all chunks in parallel; the final states come back as None
ENTERING = "entering"
# entries that can run packed variable-length sequences take `cu_seqlens=`: int32 offsets [num_seqs + 1] of the
# sequences laid end to end along the scan dim of a batch of one (targets/packed.py)
CU_SEQLENS = "cu_seqlens"


def chunk_outs(p) -> tuple[str, ...]:
    """The declared outs of program `p` indexed by chunk: those with the chunk-index dim `t#` of the scan dim t
    (passes/chunk.py chunk_dim), e.g. the state entering each chunk; `t#` has ceil(T / Q) entries, Q the chunk length
    of the chunked program. Chunk 0 is the first one walked (a reverse-time program walks from its last step: see
    the targets' notes on reverse programs)."""
    cd = chunk_dim(p.scan)
    return tuple(o.name for o in p.outs if cd in o.dims)


def chunk_inputs(p) -> tuple[str, ...]:
    """The `in` arrays of program `p` indexed by chunk (dim `t#`, like chunk_outs): each chunk of the walk reads its
    own entry (ceil(T / Q) of them; a reverse-time program's k-th chunk from the last step reads entry nc-1-k)."""
    cd = chunk_dim(p.scan)
    return tuple(a.name for a in p.inputs if cd in a.dims)


def check_chunk_outs(p, target: str) -> int:
    """The chunk length Q of the chunked program `p` when it has outs or inputs indexed by chunk (chunk_outs,
    chunk_inputs), else 0; a program with such arrays and no chunked form (a sequential scan) raises SSMCError: it
    has no chunks to index."""
    names = chunk_outs(p)
    ins = chunk_inputs(p)
    if not names and not ins:
        return 0
    Q = next((i.attr("chunk") for i in p.instrs if i.op.startswith("chunk.") and i.attr("chunk")), None)
    if not Q:
        why = next((n.split("\n")[0] for n in reversed(p.notes) if n.startswith("chunk:")), "")
        what = f"out '{names[0]}'" if names else f"input '{ins[0]}'"
        raise SSMCError(f"{p.name}: {what} is indexed by chunk (dim '{chunk_dim(p.scan)}'), but the "
                        f"program runs as a sequential scan on the {target} target, which has no chunks"
                        + (f" ({why})" if why else ""))
    by = p.by_name()
    for n in names:
        if f"out.{n}" not in by:
            raise SSMCError(f"{p.name}: out '{n}' (indexed by chunk) has no `out` instruction in the chunked program")
    return int(Q)


def packed_batch_dim(p) -> str | None:
    """The dim a packed call (cu_seqlens) puts the sequences along: among the dims every state and every input and
    out with the scan dim has, and no input without it has, the first in the first timed input's declared order
    (Mamba2's b; heads are out, A[h] has them). None where there is no such dim or an out lacks the scan dim:
    then the spec takes no packed call."""
    timed = [a for a in p.inputs if p.scan in a.dims]
    if not timed or any(p.scan not in o.dims for o in p.outs):
        return None
    others = [a for a in p.inputs if p.scan not in a.dims]
    for d in timed[0].dims:
        if d != p.scan and all(d in a.dims for a in timed + list(p.states) + list(p.outs)) \
                and not any(d in a.dims for a in others):
            return d
    return None


@dataclasses.dataclass(frozen=True)
class Param:
    """One positional parameter of the entry: `py` its Python name, `name` the array's spec name, `kind` "input"
    (an `in` array) or "state" (an initial state, conv windows included), `dims` its declared dims."""
    py: str
    name: str
    kind: str
    dims: tuple[str, ...]

    def __repr__(self):  # the form the emitters write into the module
        return f"Param({self.py!r}, {self.name!r}, {self.kind!r}, {self.dims!r})"


@dataclasses.dataclass(frozen=True)
class Result:
    """One result of the entry, in order: `kind` "out" or "state" (a final state), `name`, declared `dims`."""
    kind: str
    name: str
    dims: tuple[str, ...]

    def __repr__(self):
        return f"Result({self.kind!r}, {self.name!r}, {self.dims!r})"


@dataclasses.dataclass(frozen=True)
class ModuleInfo:
    """What a generated module's entry takes and returns (see the module docstring)."""
    target: str
    entry: str                      # the entry function's name in the module
    params: tuple[Param, ...]
    returns: tuple[Result, ...]     # the outs in declared order, then the final states in declared order
    options: tuple[str, ...]        # the keyword options the entry takes
    # the chunk length Q where some out or input is indexed by chunk (dim `t#`, ceil(T / Q) entries: chunk_outs,
    # chunk_inputs); 0 where none
    # is (and then not written into the module)
    chunk: int = 0

    @classmethod
    def build(cls, target: str, entry: str, params, returns, options, chunk: int = 0) -> "ModuleInfo":
        """From plain tuples: params (py, name, kind, dims), returns (kind, name, dims), dims a sequence or a
        comma-joined str; the IR's leaf kinds map to input / state (a conv window is a state)."""
        ps = tuple(Param(py, name, "input" if kind == "input" else "state", _dims(dims))
                   for py, name, kind, dims in params)
        return cls(target, entry, ps, tuple(Result(k, n, _dims(d)) for k, n, d in returns), tuple(options),
                   int(chunk))

    def source(self) -> str:
        """The assignment an emitter writes into the generated module (one param / result a line)."""
        rows = ["MODULE_INFO = ModuleInfo(",
                f"    target={self.target!r}, entry={self.entry!r}, options={self.options!r},",
                *([f"    chunk={self.chunk!r},  # the chunk length: outs indexed by chunk have ceil(T / chunk) entries"]
                  if self.chunk else []),
                "    params=(",
                *(f"        {p!r}," for p in self.params),
                "    ),",
                "    returns=(",
                *(f"        {r!r}," for r in self.returns),
                "    ),",
                ")"]
        return "\n".join(rows)

    def check(self, module, target: str, inputs, states, outs):
        """The entry function of `module`, after checking that this record describes it and the spec: the entry
        exists and takes the params positionally then the options by keyword; the params are the spec's inputs
        and states (inputs, states) with their declared dims; the results are the outs then the states. Raises
        SSMCError naming what differs."""
        where = f"generated {target} module"
        if self.target != target:
            raise SSMCError(f"{where}: MODULE_INFO is for target '{self.target}'")
        fn = getattr(module, self.entry, None)
        if not callable(fn):
            raise SSMCError(f"{where}: MODULE_INFO names entry '{self.entry}', which the module does not define")
        sig = inspect.signature(fn)
        pos = [p.name for p in sig.parameters.values()
               if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        if pos != [p.py for p in self.params]:
            raise SSMCError(f"{where}: entry '{self.entry}' takes ({', '.join(pos)}), MODULE_INFO lists "
                            f"({', '.join(p.py for p in self.params)})")
        missing = [o for o in self.options if o not in sig.parameters]
        if missing:
            raise SSMCError(f"{where}: entry '{self.entry}' lacks the keyword option(s) {', '.join(missing)}")
        for o in BASE_OPTIONS:
            if o not in self.options:
                raise SSMCError(f"{where}: MODULE_INFO options {self.options} lack '{o}'")
        declared = {("input", n): tuple(d) for n, d in inputs} | {("state", n): tuple(d) for n, d in states}
        seen = set()
        for p in self.params:  # a subset: an input no result depends on may be gone
            key = (p.kind, p.name)
            if key not in declared or declared[key] != p.dims or key in seen:
                raise SSMCError(f"{where}: MODULE_INFO param {p!r} is not a distinct {p.kind} of the spec with "
                                f"its declared dims (inputs {list(inputs)}, states {list(states)})")
            seen.add(key)
        rets = [("out", n, tuple(d)) for n, d in outs] + [("state", n, tuple(d)) for n, d in states]
        if [(r.kind, r.name, r.dims) for r in self.returns] != rets:
            raise SSMCError(f"{where}: MODULE_INFO returns {[(r.kind, r.name, r.dims) for r in self.returns]}, "
                            f"the spec declares {rets}")
        # an out indexed by chunk (a dim `t#`; no spec dim has a '#') has ceil(T / chunk) entries along it: the
        # record must say the chunk length its entry was generated for
        indexed = ([f"out '{n}'" for n, d in outs if any(x.endswith("#") for x in d)]
                   + [f"input '{p.name}'" for p in self.params if any(x.endswith("#") for x in p.dims)])
        if indexed and not (isinstance(self.chunk, int) and self.chunk > 0):
            raise SSMCError(f"{where}: {indexed[0]} is indexed by chunk, but MODULE_INFO gives no chunk length "
                            f"(chunk={self.chunk!r})")
        return fn


def _dims(d) -> tuple[str, ...]:
    return tuple(x for x in d.split(",") if x) if isinstance(d, str) else tuple(d)


class Target(abc.ABC):
    """A code generator. Subclasses set `name` and `kernels` and implement `pipeline` and `emit`."""
    name: ClassVar[str] = ""
    kernels: ClassVar[bool] = False   # emits kernels: the entry takes interpret=, computes in float32 at most
    float64: ClassVar[bool] = False   # computes in float64 when every input is float64 (jax_enable_x64)
    chunk_multiple: ClassVar[int] = 1  # chunk lengths round up to a multiple of this
    # its interpreter synchronises the devices of a shard_map at every launch, so every device must launch each
    # kernel (ssmc.shard then never skips a launch on some devices)
    lockstep_interpreter: ClassVar[bool] = False
    # its kernels walk a reverse-time program (Program.reverse) in place; elsewhere the call flips the timed arrays
    # around the kernels (Kernel._entry)
    reverse_scan: ClassVar[bool] = False

    @abc.abstractmethod
    def pipeline(self, chunk_size: int | None) -> str:
        """The pass pipeline for a chunk length (None: the target's default; 1: the sequential form)."""

    @abc.abstractmethod
    def emit(self, program, pipeline: str = "") -> str:
        """The generated module's source for the IR after `pipeline`; it defines MODULE_INFO and the entry."""

    def prepare(self, interpret: bool) -> None:
        """Set up what running this target's code needs (e.g. the Triton interpreter); called by compile."""

    def annotate(self, program):
        """The final IR with the target's own notes (the kernel targets name their schedule); unchanged here."""
        return program

    @property
    def options(self) -> tuple[str, ...]:
        """The keyword options the entry of this target's modules takes."""
        return KERNEL_OPTIONS if self.kernels else BASE_OPTIONS


def checked_target(obj, label: str) -> Target:
    """`obj` if it is a complete Target, else a TargetError naming what it lacks (raised where targets are
    resolved, before anything is compiled)."""
    if not isinstance(obj, Target):
        raise TargetError(f"target '{label}': {type(obj).__name__} is not a ssmc.targets.base.Target")
    bad = []
    if not isinstance(obj.name, str) or not obj.name:
        bad.append("name (a non-empty str)")
    for attr, typ in (("kernels", bool), ("float64", bool), ("chunk_multiple", int)):
        if not isinstance(getattr(obj, attr, None), typ):
            bad.append(f"{attr} ({typ.__name__})")
    for meth in ("pipeline", "emit", "prepare", "annotate"):
        if not callable(getattr(obj, meth, None)):
            bad.append(f"{meth}()")
    if bad:
        raise TargetError(f"target '{label}' ({type(obj).__name__}) lacks or mistypes {', '.join(bad)}")
    return obj
