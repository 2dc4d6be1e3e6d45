"""This CPU's multiply-add peaks, one core: what an int8 or float kernel could reach at best.

    python tools/bench_peak.py [--instructions 200000000] [--json]

Each kernel is a loop of one instruction (or the short sequence an int8 dot product needs) on
`CHAINS` independent accumulators held in registers, so that the loop runs at the instruction's
throughput, not its latency (an empty asm statement makes every multiply read a "new" operand, so
that gcc cannot hoist or share it). A C file is compiled with gcc at run time (each kernel for its own
instruction set, `target` attributes) and a kernel the CPU lacks is reported as absent:

  fp32 fma            vfmadd231ps: 8 fp32 multiply-adds per ymm (16 per zmm)
  int16 pairs         vpmaddwd + vpaddd: 16 int16 multiply-adds per ymm into int32 (the TVM
                      engine's pmaddwd kernel, exact for any int8 values)
  u8*s8 (AVX2)        vpmaddubsw + vpmaddwd(ones) + vpaddd: 32 u8*s8 per ymm, exact when the
                      weights fit 7 bits (int16 pair sums saturate otherwise: ORT's reduce_range)
  u8*s8 vnni          vpdpbusd: 32 u8*s8 per ymm (64 per zmm) into int32, no saturation

Every number is the median of `REPEATS` runs: nanoseconds per instruction (per sequence) and
multiply-adds per nanosecond; GMAC/s = MACs per ns. Run it on a quiet machine (`uptime` below 0.5):
the peaks are what kernel efficiency (achieved GMAC/s of a layer / the peak of its instruction)
is measured against.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

CHAINS = 10  # independent accumulators: a 5-cycle latency at 2 per cycle, and room in 16 ymm registers
FEW_CHAINS = 4
REPEATS = 5

# name, gcc target, MACs per instruction (sequence), cpu feature test, setup, one step on chain c, finish
KERNELS = [
    ("fp32 fma ymm", "avx2,fma", 8, '__builtin_cpu_supports("fma")',
     "__m256 a[CHAINS]; __m256 x = _mm256_set1_ps(1.0001f), y = _mm256_set1_ps(0.9999f);"
     "for (int c = 0; c < CHAINS; c++) a[c] = _mm256_set1_ps((float)c);",
     "a[c] = _mm256_fmadd_ps(x, y, a[c]);",
     "float out[8]; __m256 s = a[0]; for (int c = 1; c < CHAINS; c++) s = _mm256_add_ps(s, a[c]);"
     "_mm256_storeu_ps(out, s); sink = out[0];"),
    ("fp32 fma zmm", "avx512f", 16, '__builtin_cpu_supports("avx512f")',
     "__m512 a[CHAINS]; __m512 x = _mm512_set1_ps(1.0001f), y = _mm512_set1_ps(0.9999f);"
     "for (int c = 0; c < CHAINS; c++) a[c] = _mm512_set1_ps((float)c);",
     "a[c] = _mm512_fmadd_ps(x, y, a[c]);",
     "__m512 s = a[0]; for (int c = 1; c < CHAINS; c++) s = _mm512_add_ps(s, a[c]); sink = _mm512_reduce_add_ps(s);"),
    ("int16 pairs ymm", "avx2", 16, '__builtin_cpu_supports("avx2")',
     "__m256i a[CHAINS]; __m256i x = _mm256_set1_epi16(3), y = _mm256_set1_epi16(-5);"
     "for (int c = 0; c < CHAINS; c++) a[c] = _mm256_set1_epi32(c);",
     "a[c] = _mm256_add_epi32(a[c], _mm256_madd_epi16(x, y));",
     "int out[8]; __m256i s = a[0]; for (int c = 1; c < CHAINS; c++) s = _mm256_add_epi32(s, a[c]);"
     "_mm256_storeu_si256((__m256i *)out, s); sink = (float)out[0];"),
    ("u8*s8 ymm (maddubs)", "avx2", 32, '__builtin_cpu_supports("avx2")',
     "__m256i a[CHAINS]; __m256i x = _mm256_set1_epi8(7), y = _mm256_set1_epi8(-3), one = _mm256_set1_epi16(1);"
     "for (int c = 0; c < CHAINS; c++) a[c] = _mm256_set1_epi32(c);",
     "a[c] = _mm256_add_epi32(a[c], _mm256_madd_epi16(_mm256_maddubs_epi16(x, y), one));",
     "int out[8]; __m256i s = a[0]; for (int c = 1; c < CHAINS; c++) s = _mm256_add_epi32(s, a[c]);"
     "_mm256_storeu_si256((__m256i *)out, s); sink = (float)out[0];"),
    ("u8*s8 ymm (vnni)", "avxvnni", 32, '__builtin_cpu_supports("avxvnni")',
     "__m256i a[CHAINS]; __m256i x = _mm256_set1_epi8(7), y = _mm256_set1_epi8(-3);"
     "for (int c = 0; c < CHAINS; c++) a[c] = _mm256_set1_epi32(c);",
     "a[c] = _mm256_dpbusd_avx_epi32(a[c], x, y);",
     "int out[8]; __m256i s = a[0]; for (int c = 1; c < CHAINS; c++) s = _mm256_add_epi32(s, a[c]);"
     "_mm256_storeu_si256((__m256i *)out, s); sink = (float)out[0];"),
    ("u8*s8 zmm (vnni)", "avx512f,avx512vnni", 64, '__builtin_cpu_supports("avx512vnni")',
     "__m512i a[CHAINS]; __m512i x = _mm512_set1_epi8(7), y = _mm512_set1_epi8(-3);"
     "for (int c = 0; c < CHAINS; c++) a[c] = _mm512_set1_epi32(c);",
     "a[c] = _mm512_dpbusd_epi32(a[c], x, y);",
     "__m512i s = a[0]; for (int c = 1; c < CHAINS; c++) s = _mm512_add_epi32(s, a[c]);"
     "sink = (float)_mm512_reduce_add_epi32(s);"),
]

SOURCE = """
#include <immintrin.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
static volatile float sink;
static double now(void) {{ struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + 1e-9 * t.tv_nsec; }}
{kernels}
int main(int argc, char **argv) {{
    long instructions = atol(argv[1]);
    printf("{{");
{calls}
    printf("}}\\n");
    return 0;
}}
"""

KERNEL = """
#undef CHAINS
#define CHAINS {chains}
__attribute__((target("{target}"), noinline)) static double kernel_{i}(long loops) {{
    {setup}
    double start = now();
    for (long i = 0; i < loops; i++) {{
        _Pragma("GCC unroll 16") for (int c = 0; c < CHAINS; c++) {{ {step} __asm__ volatile("" : "+v"(x)); }}
    }}
    double seconds = now() - start;
    {finish}
    return seconds;
}}
"""

CALL = """    printf("{comma}\\"{name}\\": ");
    if ({supported}) {{ double best[{repeats}]; for (int r = 0; r < {repeats}; r++) best[r] = kernel_{i}(instructions / {chains});
        for (int r = 1; r < {repeats}; r++) for (int s = r; s > 0 && best[s] < best[s - 1]; s--) {{ double t = best[s]; best[s] = best[s - 1]; best[s - 1] = t; }}
        printf("%.6f", best[{repeats} / 2]); }} else printf("null");
"""


def chains(name: str) -> int:
    """Accumulators of a kernel: its three-instruction sequence needs two temporaries per chain, and
    more chains than `FEW_CHAINS` spill ymm registers (its only loop-carried step is a 1-cycle add)."""
    return FEW_CHAINS if "maddubs" in name else CHAINS


def build(workdir: Path) -> Path:
    """Compile the kernels; the executable's path."""
    kernels = "".join(KERNEL.format(i=i, chains=chains(name), target=target, setup=setup, step=step, finish=finish)
                      for i, (name, target, _, _, setup, step, finish) in enumerate(KERNELS))
    calls = "".join(CALL.format(comma="" if i == 0 else ", ", name=name, supported=supported, repeats=REPEATS, i=i,
                                chains=chains(name)) for i, (name, _, _, supported, _, _, _) in enumerate(KERNELS))
    source = workdir / "peak.c"
    source.write_text(SOURCE.format(kernels=kernels, calls=calls))
    binary = workdir / "peak"
    done = subprocess.run(["gcc", "-O2", "-o", str(binary), str(source)], capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"bench_peak: gcc failed: {done.stderr.strip().splitlines()[-1:]}")
    return binary


def measure(instructions: int) -> dict[str, dict[str, float] | None]:
    """Per kernel: ns per instruction (sequence) and MACs per ns, or None where the CPU lacks it."""
    if platform.machine() not in ("x86_64", "AMD64"):
        raise SystemExit("bench_peak: x86-64 only (ARM's UDOT/SDOT are counted from the assembly instead)")
    with tempfile.TemporaryDirectory() as tmp:
        out = subprocess.run([str(build(Path(tmp))), str(instructions)], capture_output=True, text=True, check=True).stdout
    seconds = json.loads(out)
    macs = {name: per for name, _, per, *_ in KERNELS}
    count = {name: instructions // chains(name) * chains(name) for name in macs}
    return {name: None if s is None else {"ns_per_instruction": 1e9 * s / count[name],
                                          "macs_per_ns": macs[name] * count[name] / (1e9 * s)}
            for name, s in seconds.items()}


def table(peaks: dict[str, dict[str, float] | None]) -> str:
    lines = ["| kernel | ns per instruction | multiply-adds per ns (GMAC/s) |", "|---|---|---|"]
    for name, p in peaks.items():
        lines.append(f"| {name} | " + ("not on this CPU | |" if p is None else
                                        f"{p['ns_per_instruction']:.3f} | {p['macs_per_ns']:.1f} |"))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instructions", type=int, default=200_000_000, help="per kernel and run")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a Markdown table")
    args = parser.parse_args(argv)
    peaks = measure(args.instructions)
    print(json.dumps(peaks, indent=1) if args.json else table(peaks))
    return 0


if __name__ == "__main__":
    sys.exit(main())
