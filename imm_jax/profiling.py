"""Where a compiled step's device time goes, from a JAX profiler trace.

  python -m imm_jax.benchmark --config ... --profile_dir DIR     # times, then traces a few steps
  python -m imm_jax.profiling DIR/plugins/profile/<run>/<host>.trace.json.gz --steps 3

:func:`capture` runs a function a few times under ``jax.profiler.trace`` (the trace can also be opened
in XProf / TensorBoard or Perfetto); :func:`summarize` reads the Chrome-trace JSON that the profiler
writes beside its ``.xplane.pb`` and adds up the accelerator's kernels: how much of each step the device
was busy, and the busy time by kind (matrix multiplies, fused attention, convolutions, fused elementwise
and reduction work, copies, collectives) with the most expensive kernels. It needs no profiler plugin.

Device lines are the trace's ``/device:GPU:n`` / ``/device:TPU:n`` processes: on GPUs their stream lines
("Stream #..."), one event per kernel; on TPUs the "XLA Ops" line. A CPU-only trace has no device lines
(XLA:CPU's work is on host threads), so its summary says so and carries no breakdown.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
from typing import Any, Callable, Iterable

import jax

# Kinds of device work, tested in this order against a kernel's name and its HLO op (lower case): the
# first kind with a matching key wins (a cuDNN convolution is "implicit_gemm", not a matrix multiply; a
# Triton GEMM fusion is a matrix multiply, not a fusion; "loop_convert_fusion" is not a convolution).
KINDS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("attention", ("fmha", "flash", "sdpa", "attention")),
    ("convolution", ("convolution", "fprop", "dgrad", "wgrad", "implicit_gemm", "conv2d", "conv_")),
    ("matmul", ("gemm", "nvjet", "cublas", "cutlass", "xmma", "dot", "matmul")),
    ("collective", ("nccl", "all-reduce", "all_reduce", "all-gather", "all_gather", "reduce-scatter",
                    "reduce_scatter", "collective", "all-to-all")),
    ("copy", ("memcpy", "memset", "copy", "transpose")),
    ("fusion", ("fusion", "reduce", "loop_", "input_", "convert", "broadcast", "select", "scatter",
                "gather", "slice", "concatenate", "pad", "iota", "compare")),
)
OTHER = "other"


def kind_of(name: str, hlo_op: str = "") -> str:
  text = f"{name} {hlo_op}".lower()
  for kind, keys in KINDS:
    if any(k in text for k in keys):
      return kind
  return OTHER


def capture(fn: Callable[[], Any], steps: int, log_dir: str) -> str:
  """Run ``fn`` ``steps`` times under the profiler (each call waited for); returns the trace JSON's path."""
  os.makedirs(log_dir, exist_ok=True)
  before = set(_trace_files(log_dir))
  with jax.profiler.trace(log_dir):
    for _ in range(steps):
      jax.block_until_ready(fn())
  new = sorted(set(_trace_files(log_dir)) - before, key=os.path.getmtime)
  if not new:
    raise FileNotFoundError(f"the profiler wrote no *.trace.json.gz under {log_dir}")
  return new[-1]


def _trace_files(log_dir: str) -> list[str]:
  return glob.glob(os.path.join(log_dir, "plugins", "profile", "*", "*.trace.json.gz"))


def load_events(path: str) -> list[dict]:
  opener = gzip.open if path.endswith(".gz") else open
  with opener(path, "rt") as f:
    data = json.load(f)
  return data["traceEvents"] if isinstance(data, dict) else data


def device_kernels(events: Iterable[dict]) -> list[dict]:
  """The complete ("X") events of the kernels on the first accelerator in the trace."""
  events = list(events)
  processes, threads = {}, {}
  for e in events:
    if e.get("ph") == "M" and "name" in e.get("args", {}):
      if e.get("name") == "process_name":
        processes[e["pid"]] = e["args"]["name"]
      elif e.get("name") == "thread_name":
        threads[(e["pid"], e.get("tid"))] = e["args"]["name"]
  complete = [e for e in events if e.get("ph") == "X" and e.get("dur", 0) > 0]
  devices = sorted(pid for pid, name in processes.items() if name.startswith("/device:") and "CPU" not in name)
  if not devices:  # unnamed processes: the profiler numbers devices from 1 and the host above 100
    devices = sorted({e["pid"] for e in complete if isinstance(e.get("pid"), int) and e["pid"] < 100})
  if not devices:
    return []
  pid = devices[0]
  lines = {e.get("tid") for e in complete if e["pid"] == pid}
  names = {tid: threads.get((pid, tid), "") for tid in lines}
  kernel_lines = {tid for tid, name in names.items() if name.startswith("Stream")}  # GPU: one event per kernel
  if not kernel_lines:  # TPU: the per-HLO-op line
    kernel_lines = {tid for tid, name in names.items() if name == "XLA Ops"}
  if not kernel_lines:  # unnamed lines: the streams have small ids, derived lines (XLA Ops, ...) large ones
    kernel_lines = {tid for tid in lines if isinstance(tid, int) and tid < 100}
  return [e for e in complete if e["pid"] == pid and e.get("tid") in kernel_lines]


def _union_length(intervals: list[tuple[float, float]]) -> float:
  total, end = 0.0, float("-inf")
  for a, b in sorted(intervals):
    if b <= end:
      continue
    total += b - max(a, end)
    end = b
  return total


def summarize(events: Iterable[dict], steps: int, seconds_per_step: float | None = None,
              top: int = 10) -> dict:
  """Per-step device time of the kernels in a trace of ``steps`` calls.

  ``busy_ms`` is the union of kernel intervals (kernels on parallel streams count once), ``span_ms`` the
  first kernel's start to the last one's end; both per step. ``kinds``: milliseconds per step of each kind
  of work, summed over kernels. ``seconds_per_step`` (the benchmark's timing) gives ``busy_fraction``:
  the share of a timed step the device was computing; the rest is launch and host overhead or gaps.
  """
  kernels = device_kernels(events)
  if not kernels:
    return {"steps": steps, "kernels": 0}
  intervals = [(float(e["ts"]), float(e["ts"]) + float(e["dur"])) for e in kernels]
  kinds = collections.Counter()
  by_name: dict[str, list] = {}  # kernel name -> [kind, calls, microseconds]
  for e in kernels:
    kind = kind_of(e["name"], str(e.get("args", {}).get("hlo_op", "")))
    kinds[kind] += float(e["dur"])
    entry = by_name.setdefault(e["name"], [kind, 0, 0.0])
    entry[1] += 1
    entry[2] += float(e["dur"])
  ms = lambda us: us / 1e3 / steps  # microseconds in the trace -> milliseconds per step
  summary = {
      "steps": steps, "kernels": len(kernels), "kernels_per_step": len(kernels) / steps,
      "busy_ms": ms(_union_length(intervals)),
      "span_ms": ms(max(b for _, b in intervals) - min(a for a, _ in intervals)),
      "kinds": {k: ms(v) for k, v in kinds.most_common()},
      "top": [{"name": name, "kind": kind, "calls_per_step": n / steps, "ms": ms(us)}
              for name, (kind, n, us) in sorted(by_name.items(), key=lambda kv: -kv[1][2])[:top]],
  }
  if seconds_per_step:
    summary["step_ms"] = 1e3 * seconds_per_step
    summary["busy_fraction"] = summary["busy_ms"] / summary["step_ms"]
  return summary


def one_line(summary: dict) -> str:
  """'profile: device busy 93% of the step; matmul 61%, attention 14%, ... of the kernel time'."""
  if not summary.get("kernels"):
    return "profile: no accelerator kernels in the trace (a CPU run); open it in XProf or Perfetto"
  total = sum(summary["kinds"].values())
  kinds = ", ".join(f"{k} {100 * v / total:.0f}%" for k, v in summary["kinds"].items())
  busy = (f"device busy {100 * summary['busy_fraction']:.0f}% of the step"
          if "busy_fraction" in summary else f"device busy {summary['busy_ms']:.2f} ms per step")
  return f"profile: {busy}; {kinds} of the kernel time"


def describe(summary: dict) -> str:
  lines = [one_line(summary)]
  if summary.get("kernels"):
    lines.append(f"  {summary['kernels_per_step']:.0f} kernels per step, busy {summary['busy_ms']:.2f} ms "
                 f"of a {summary['span_ms']:.2f} ms span" + (f" (timed step {summary['step_ms']:.2f} ms)"
                                                             if "step_ms" in summary else ""))
    for k in summary["top"]:
      lines.append(f"  {k['ms']:8.3f} ms  {k['calls_per_step']:5.0f}x  {k['kind']:<11} {k['name'][:90]}")
  return "\n".join(lines)


def profile(fn: Callable[[], Any], steps: int, log_dir: str, seconds_per_step: float | None = None) -> dict:
  """:func:`capture` then :func:`summarize`; the summary also names the trace file."""
  path = capture(fn, steps, log_dir)
  summary = summarize(load_events(path), steps, seconds_per_step)
  summary["trace"] = path
  return summary


def main(argv=None) -> int:
  from imm_jax.io_utils import fail  # pylint: disable=import-outside-toplevel
  p = argparse.ArgumentParser(prog="python -m imm_jax.profiling", description=__doc__.split("\n\n")[0])
  p.add_argument("trace", help="A *.trace.json.gz written by jax.profiler (or a log dir holding one).")
  p.add_argument("--steps", type=int, default=1, help="How many steps the trace holds (figures are per step).")
  p.add_argument("--step_ms", type=float, default=None, help="Timed milliseconds per step, for the busy share.")
  p.add_argument("--top", type=int, default=10, help="How many of the most expensive kernels to list.")
  args = p.parse_args(argv)
  path = args.trace
  if os.path.isdir(path):
    found = sorted(_trace_files(path), key=os.path.getmtime)
    if not found:
      fail(f"{path}: no plugins/profile/*/*.trace.json.gz under this folder; give the trace file itself")
    path = found[-1]
  if not os.path.isfile(path):
    fail(f"{path}: no such trace file")
  if args.steps < 1:
    fail(f"--steps={args.steps}: give the number of steps the trace holds (>= 1)")
  try:
    events = load_events(path)
  except (OSError, ValueError, KeyError) as e:
    fail(f"{path}: not a JAX profiler trace (Chrome trace JSON, optionally gzipped): {e}")
  summary = summarize(events, args.steps, None if args.step_ms is None else args.step_ms / 1e3, top=args.top)
  print(describe(summary))
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
