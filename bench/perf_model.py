"""A performance model read from the compiled code: H100 times of a kernel launch from its sm_90
SASS, with no GPU.

For one launch (a compiled kernel, its grid and ``num_warps``) it counts the SASS instructions
one warp executes, and of those the global and shared memory instructions, then takes three
times and their maximum:

- **issue**: instructions x warps x programs / (132 SMs x 4 schedulers x 1.755 GHz): the warp
  schedulers issue at most one instruction per clock each. Predicated-off instructions issue too.
  Programs are spread evenly over the SMs and a warp issues at most one instruction per clock,
  so a grid too small to fill the machine is bound by the schedulers it occupies.
- **L1**: memory wavefronts x warps x programs / (132 SMs x 1.755 GHz): an SM's L1/shared memory
  pipe serves 128 B per clock, so one warp-wide load or store of up to 128 B (32 lanes x 4 B) is
  one wavefront, a 64-bit one two, a 128-bit one four. Accesses are assumed coalesced (lanes on
  consecutive addresses, as the kernels lay pixels across lanes); misaligned rows cost up to
  twice this.
- **DRAM**: the bytes the design moves / 3.0 TB/s (the H100 copy bandwidth measured on the lent
  machines, read + written): every tensor a kernel streams is read or written once; the
  neighbours a stencil re-reads are assumed to hit L1/L2 (the L1 time covers them).

Counting executed instructions (``executed_counts``): the SASS is parsed into instructions; the
control-flow graph is followed from the entry (subroutines reached only by CALL, the slow paths
of division and square root for special inputs, are not counted, nor is the padding after the
final EXIT); every backward branch closes a loop from its target to itself; an instruction runs
once per iteration of every loop that contains it, with the trip counts the launch declares
(``trips``, outermost loop first, in address order). Straight-line code, static unrolling
included, counts once; both sides of a forward branch count (an upper bound; the kernels branch
only on loop conditions). The number of loops found must equal the number declared, or the
model refuses to guess.
"""

import math
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass, field

import triton

SMS, SCHEDULERS, CLOCK_HZ = 132, 4, 1.755e9
L1_BYTES_PER_CLOCK = 128
DRAM_BYTES_PER_S = 3.0e12
LAUNCH_S = 2e-6  # GPU-side gap per kernel launch, back to back in one stream (an assumption)
ISSUE_RATE = SMS * SCHEDULERS * CLOCK_HZ  # warp-instructions per second
WAVEFRONT_RATE = SMS * CLOCK_HZ  # 128-B L1 wavefronts per second

_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P[T0-9]+\s+)?([A-Z0-9_.]+)\s*([^;]*);")
_MEMORY = re.compile(r"^(LDG|STG|LDS|STS|LD|ST|ATOM|ATOMG|ATOMS|RED|LDGSTS|LDL|STL)(\.|$)")
_WIDTH = {"U8": 1, "S8": 1, "U16": 2, "S16": 2, "64": 8, "128": 16}


@dataclass
class Instr:
    addr: int
    predicated: bool
    opcode: str
    operands: str

    @property
    def base(self):
        return self.opcode.split(".")[0]

    def branch_target(self):
        if self.base not in ("BRA", "CALL", "JMP"):
            return None
        found = re.findall(r"0x([0-9a-f]+)", self.operands)
        return int(found[-1], 16) if found else None

    def memory_bytes(self):
        """Bytes one lane moves, or 0 for a non-memory instruction."""
        if not _MEMORY.match(self.opcode):
            return 0
        width = 4
        for part in self.opcode.split(".")[1:]:
            width = _WIDTH.get(part, width)
        return width


def parse_sass(text):
    instrs = []
    for line in text.splitlines():
        m = _LINE.search(line)
        if m:
            instrs.append(Instr(int(m.group(1), 16), bool(m.group(2)), m.group(3),
                                m.group(4).strip()))
    return instrs


def sass(cubin):
    """The SASS text of a cubin, from the cuobjdump that Triton's wheel carries."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin",
                        "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([tool, "--dump-sass", f.name], check=True, capture_output=True,
                              text=True).stdout


def _reachable(instrs):
    index = {ins.addr: i for i, ins in enumerate(instrs)}
    seen, todo = set(), [0]
    while todo:
        i = todo.pop()
        if i in seen or i >= len(instrs):
            continue
        seen.add(i)
        ins = instrs[i]
        target = ins.branch_target()
        if ins.base in ("EXIT", "RET") and not ins.predicated:
            continue
        if ins.base == "BRA":
            if target in index:
                todo.append(index[target])
            if not ins.predicated and "DIV" not in ins.opcode:
                continue
        todo.append(i + 1)
    return seen


def find_loops(instrs, reachable=None):
    """(header address, last backward-branch address) of every loop, sorted by header."""
    reachable = _reachable(instrs) if reachable is None else reachable
    ends = {}
    for i in sorted(reachable):
        ins = instrs[i]
        target = ins.branch_target()
        if ins.base == "BRA" and target is not None and target <= ins.addr:
            ends[target] = max(ends.get(target, target), ins.addr)
    return sorted(ends.items())


def executed_counts(instrs, trips):
    """How many times one warp executes each reachable instruction (a dict index -> count)."""
    reachable = _reachable(instrs)
    loops = find_loops(instrs, reachable)
    if len(loops) != len(trips):
        raise ValueError(f"the SASS has {len(loops)} loops (headers "
                         f"{[hex(h) for h, _ in loops]}), the launch declares {len(trips)} "
                         f"trip counts {list(trips)}")
    counts = {}
    for i in reachable:
        n = 1
        for (head, end), trip in zip(loops, trips):
            if head <= instrs[i].addr <= end:
                n *= trip
        counts[i] = n
    return counts


@dataclass
class KernelModel:
    """Per-launch figures; times in seconds."""
    name: str
    programs: int
    warps: int
    registers: int = 0
    spills: int = 0
    instructions: int = 0          # executed per warp
    memory_instructions: dict = field(default_factory=dict)  # base opcode -> executed per warp
    wavefronts: int = 0            # 128-B L1 wavefronts per warp
    dram_bytes: int = 0
    loops: list = field(default_factory=list)  # (header, trips)

    @property
    def issue_s(self):
        # The programs spread over the SMs; an SM's four schedulers each issue one instruction
        # per clock, from its warps (a warp at most one per clock): a small grid (the combine's
        # one program) is bound by the few schedulers it occupies.
        per_sm = math.ceil(self.programs / SMS) * self.warps
        return per_sm * self.instructions / (min(per_sm, SCHEDULERS) * CLOCK_HZ)

    @property
    def l1_s(self):
        return self.wavefronts * self.warps * self.programs / WAVEFRONT_RATE

    @property
    def dram_s(self):
        return self.dram_bytes / DRAM_BYTES_PER_S

    @property
    def time_s(self):
        return max(self.issue_s, self.l1_s, self.dram_s)

    @property
    def bound(self):
        times = {"issue": self.issue_s, "L1": self.l1_s, "DRAM": self.dram_s}
        return max(times, key=times.get)


def model_kernel(name, sass_text, trips, programs, warps, dram_bytes, registers=0, spills=0):
    instrs = parse_sass(sass_text)
    counts = executed_counts(instrs, trips)
    memory, wavefronts = {}, 0
    for i, n in counts.items():
        width = instrs[i].memory_bytes()
        if width:
            memory[instrs[i].base] = memory.get(instrs[i].base, 0) + n
            wavefronts += n * max(1, 32 * width // L1_BYTES_PER_CLOCK)
    loops = [(hex(h), t) for (h, _), t in zip(find_loops(instrs), trips)]
    return KernelModel(name, programs, warps, registers, spills, sum(counts.values()), memory,
                       wavefronts, dram_bytes, loops)


# --- the calibrated model: occupancy, latency, misaligned rows (issue 24) ---------------------
#
# The issue-only model above assumes the schedulers issue every clock. The H200 visits showed
# they do not: the old kernels' 244-255 registers per lane leave 8 warps per SM, 2 per scheduler,
# and a warp that issues its row's loads then waits a whole memory round trip before the
# multiply-adds that use them; the same forward ran 1.56x faster at a 168-register cap (12 warps)
# than at 255 (8). The calibrated model adds what decides that, read from the same SASS:
#
# - **warps per SM** (``warps_per_sm``): registers are allocated per warp in units of 256 (8 per
#   lane), 65536 per SM; shared memory per block (0 for these kernels) out of 228 KiB; at most 32
#   resident blocks (programs) and 64 warps per SM. Spread over 4 schedulers.
# - **memory rounds per warp** (``memory_rounds``): how many times a warp must wait for a global
#   load's round trip. The loads of one loop iteration are independent of each other (the
#   kernels issue a row's loads together, then use them), so an iteration of the innermost loop
#   that holds loads is one round, however many loads it issues; loads in straight-line code are
#   one round more.
# - **latency time** (``Calibrated.latency_s``): a scheduler with n resident warps overlaps n
#   warps' rounds; one warp's round costs the round trip L plus its own instructions, so the
#   scheduler's warps take (rounds x L + instructions) / n clocks each, and never less than
#   their instructions (the issue bound). L, in cycles, is fitted: it stands for the load's
#   latency under the load these kernels put on L1, L2 and DRAM, not for an unloaded round trip.
# - **issue time** with an efficiency (fitted): the fraction of clocks a scheduler with ready
#   warps actually issues (dependent arithmetic, register bank and shuffle stalls).
# - **L1 passes for misaligned rows** (``l1_passes``): a warp-wide load of 32 consecutive
#   elements is one 128-B wavefront only when it starts on a 128-B line; a 513-float row is
#   2052 B, so row starts drift by 4 B a row and nearly every load spans two lines.
# - **DRAM** at the H200's measured copy bandwidth (4.1 TB/s), not fitted.
#
# The kernel's time is the largest of the four. Two constants are fitted (``fit``): L and the
# issue efficiency; the machine's are from its data sheet and the visits' env.json.

@dataclass(frozen=True)
class Machine:
    sms: int = 132
    schedulers: int = 4
    clock_hz: float = 1.98e9           # nvidia-smi under load on the visits
    dram_bytes_per_s: float = 4.1e12   # bench.gpu's copy bandwidth, 4.02-4.17 TB/s
    registers_per_sm: int = 65536
    register_unit: int = 8             # per lane: 256 per warp
    shared_per_sm: int = 228 * 1024
    max_warps: int = 64
    max_blocks: int = 32


H200 = Machine()


def warps_per_sm(registers, warps_per_program=1, shared_bytes=0, machine=H200):
    """Resident warps per SM: the smallest of the register, shared-memory, block and warp
    limits (in whole programs)."""
    regs = max(1, math.ceil(registers / machine.register_unit) * machine.register_unit)
    programs = machine.registers_per_sm // (regs * 32 * warps_per_program)
    if shared_bytes:
        programs = min(programs, machine.shared_per_sm // shared_bytes)
    programs = min(programs, machine.max_blocks, machine.max_warps // warps_per_program)
    return max(programs, 1) * warps_per_program


def l1_passes(row_elems, elem_bytes, shifts=None, lanes=32, line=128):
    """Mean 128-B lines one warp-wide load of ``lanes`` consecutive elements touches, over the
    rows (row r starts at r x row_elems x elem_bytes) and over ``shifts``, the column offsets the
    kernel loads from a tile that starts on a multiple of ``lanes`` columns. ``shifts=None``: a
    start at any element (tiles that step by other than a multiple of 32 columns)."""
    span = lanes * elem_bytes
    if shifts is None:
        starts = range(0, line, elem_bytes)
    else:
        # Row offsets repeat after line / gcd(row bytes, line) rows.
        period = line // math.gcd(row_elems * elem_bytes, line)
        starts = [(r * row_elems + s) * elem_bytes % line
                  for r in range(period) for s in shifts]
    starts = list(starts)
    return sum(math.ceil((o % line + span) / line) for o in starts) / len(starts)


def memory_rounds(instrs, counts, loops):
    """Round trips one warp waits for: the executed iterations of every innermost loop that
    holds a global load, plus one if loads run outside any loop."""
    index = {ins.addr: i for i, ins in enumerate(instrs)}
    innermost, straight = set(), False
    for i in counts:
        if instrs[i].base not in ("LDG", "LDL"):
            continue
        inside = [(e - h, h) for h, e in loops if h <= instrs[i].addr <= e]
        if inside:
            innermost.add(min(inside)[1])
        else:
            straight = True
    return sum(counts[index[head]] for head in innermost) + straight


@dataclass
class Inputs:
    """What the calibrated model reads from one launch."""
    programs: int
    warps: int                 # per program
    instructions: int          # executed per warp
    rounds: int                # memory round trips per warp
    wavefronts: float          # 128-B L1 wavefronts per warp, aligned
    l1_passes: float           # lines per warp-wide global access (misaligned rows)
    dram_bytes: int
    warps_per_sm: int
    registers: int = 0
    spills: int = 0


def inputs_from_sass(instrs, counts, programs, warps, registers, dram_bytes, passes, spills=0,
                     shared_bytes=0, machine=H200):
    loops = find_loops(instrs)
    wavefronts = 0
    for i, n in counts.items():
        width = instrs[i].memory_bytes()
        if width:
            wavefronts += n * max(1, 32 * width // L1_BYTES_PER_CLOCK)
    return Inputs(programs, warps, sum(counts.values()), memory_rounds(instrs, counts, loops),
                  wavefronts, passes, dram_bytes,
                  warps_per_sm(registers, warps, shared_bytes, machine), registers, spills)


@dataclass(frozen=True)
class Params:
    latency_cycles: float
    issue_efficiency: float


@dataclass
class Calibrated:
    issue_s: float
    latency_s: float
    l1_s: float
    dram_s: float

    @property
    def time_s(self):
        return max(self.issue_s, self.latency_s, self.l1_s, self.dram_s)

    @property
    def bound(self):
        times = {"issue": self.issue_s, "latency": self.latency_s, "L1": self.l1_s,
                 "DRAM": self.dram_s}
        return max(times, key=times.get)


def calibrated(x, params, machine=H200):
    """The four times of one launch (see the comment above ``Machine``)."""
    warps_total = x.programs * x.warps
    # The busiest scheduler's warps, every wave together: programs spread over the SMs and an
    # SM's warps over its schedulers in whole warps, so a grid of a few programs per SM leaves
    # some schedulers a warp more than the average (684 one-warp programs: 2 on some, 1.3 mean)
    per_scheduler = math.ceil(math.ceil(x.programs / machine.sms) * x.warps / machine.schedulers)
    resident = max(1.0, min(x.warps_per_sm / machine.schedulers, per_scheduler))
    clock = machine.clock_hz
    issue = per_scheduler * x.instructions / (params.issue_efficiency * clock)
    latency = per_scheduler * (x.rounds * params.latency_cycles + x.instructions) / (
        resident * clock)
    l1 = x.wavefronts * x.l1_passes * warps_total / (machine.sms * clock)
    return Calibrated(issue, latency, l1, x.dram_bytes / machine.dram_bytes_per_s)


def fit(xs, measured_s, machine=H200):
    """The latency (cycles, 0-4000) and issue efficiency (0.1-1) that minimise the squared log
    error of the modelled times over ``xs``: a grid search, coarse then fine around the best
    (two constants and a max of four terms: no gradient to trust at the kinks)."""
    def error(p):
        return sum(math.log(calibrated(x, p, machine).time_s / t) ** 2
                   for x, t in zip(xs, measured_s))

    grid = [Params(float(lat), eff / 50) for lat in range(0, 4001, 40) for eff in range(5, 51)]
    best = min(grid, key=error)
    fine = [Params(max(0.0, best.latency_cycles + d), min(1.0, max(0.05, best.issue_efficiency + e / 500)))
            for d in range(-40, 41, 2) for e in range(-10, 11)]
    return min(fine, key=error)
