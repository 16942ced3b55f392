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
