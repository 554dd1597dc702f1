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
import math
import os
import re
from typing import Any, Callable, Iterable

import jax

# Kinds of device work, tested in this order against a kernel's name and its HLO op (lower case): the
# first kind with a matching key wins (a cuDNN convolution is "implicit_gemm", not a matrix multiply; a
# Triton GEMM fusion is a matrix multiply, not a fusion; "loop_convert_fusion" is not a convolution).
KINDS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("attention", ("fmha", "flash", "sdpa", "attention")),
    ("convolution", ("convolution", "cudnn$conv", "fprop", "dgrad", "wgrad", "implicit_gemm", "conv2d", "conv_")),
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


# ---------------------------------------------------------------------------------------------------
# A static account: the same kinds, from a compiled program's optimised HLO instead of a trace.

_FREE_OPS = frozenset({"parameter", "get-tuple-element", "tuple", "bitcast", "constant", "after-all",
                       "partition-id", "replica-id", "opt-barrier", "add-dependency", "domain"})
_ASYNC_DONE = ("-done", "-update")  # the second half of an async pair: its work is counted at the start
# XLA's rematerialisation pass names each instruction it adds (a recomputed value) <name>.remat[N][.N].
_REMATERIALIZED = re.compile(r"\.remat\d*(?:\.\d+)?$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+) = (.+?) ([a-z][a-z0-9\-]*)\((.*)$")
_ARRAY = re.compile(r"\b(pred|token|[a-z]+\d+[a-z0-9]*)\[([0-9,]*)\]")


def _dims(text: str) -> list[list[int]]:
  return [[int(d) for d in dims.split(",") if d] for _, dims in _ARRAY.findall(text)]


def _array_bytes(text: str) -> int:
  total = 0
  for dtype, dims in _ARRAY.findall(text):
    bits = 8 if dtype == "pred" else (0 if dtype == "token" else int(re.search(r"\d+", dtype).group()))
    total += (bits * math.prod(int(d) for d in dims.split(",") if d) + 7) // 8
  return total


def _balanced(text: str, start: int, open_: str, close: str) -> str:
  """The text from ``text[start] == open_`` to its matching ``close`` (exclusive of both)."""
  depth = 0
  for i in range(start, len(text)):
    if text[i] == open_:
      depth += 1
    elif text[i] == close:
      depth -= 1
      if depth == 0:
        return text[start + 1:i]
  return text[start + 1:]


def _backend_config(attrs: str) -> dict:
  i = attrs.find("backend_config=")
  if i < 0 or attrs[i + len("backend_config=")] != "{":
    return {}
  try:
    return json.loads("{" + _balanced(attrs, i + len("backend_config="), "{", "}") + "}")
  except ValueError:
    return {}


def parse_hlo_module(text: str) -> tuple[dict[str, list[dict]], str]:
  """The computations of an HLO module's text (``Compiled.as_text()``): name -> instructions (each a dict
  of name, shape (its type text), op, operands (names), attrs (the text after the operands)), and the
  entry computation's name."""
  computations: dict[str, list[dict]] = {}
  entry, current = "", None
  for line in text.splitlines():
    stripped = line.strip()
    if stripped.endswith("{") and not line.startswith((" ", "\t")):
      header = re.match(r"^(ENTRY\s+)?%?([\w.\-]+)", stripped)
      if header and " = " not in stripped.split("(")[0]:
        current = header.group(2)
        computations[current] = []
        entry = current if header.group(1) else entry
        continue
    if current is None or stripped == "}":
      continue
    m = _INSTRUCTION.match(line)
    if not m:
      continue
    name, shape, op, rest = m.groups()
    args = _balanced("(" + rest, 0, "(", ")")
    computations[current].append({
        "name": name, "shape": shape, "op": op, "operands": re.findall(r"%([\w.\-]+)", args),
        "args": args, "attrs": rest[len(args) + 1:]})
  return computations, entry


def _called(attrs: str, key: str) -> list[str]:
  m = re.search(key + r"=\{?(%[\w.\-]+(?:,\s*%[\w.\-]+)*)\}?", attrs)
  return re.findall(r"%([\w.\-]+)", m.group(1)) if m else []


def _dot_flops(inst: dict, shapes: dict[str, str]) -> float:
  m = re.search(r"lhs_contracting_dims=\{([0-9,]*)\}", inst["attrs"])
  lhs = _dims(shapes.get(inst["operands"][0], "")) if inst["operands"] else []
  out = _dims(inst["shape"])
  if not (m and lhs and out):
    return 0.0
  contracted = math.prod(lhs[0][int(d)] for d in m.group(1).split(",") if d)
  return 2.0 * math.prod(out[0]) * contracted


def _conv_flops(inst: dict, shapes: dict[str, str], target: str = "") -> float:
  """2 x (forward output elements) x (kernel elements per output feature), for XLA convolutions and
  cuDNN's forward / backward-input / backward-filter calls."""
  labels = re.search(r"dim_labels=\w+_(\w+)->\w+", inst["attrs"])
  operands = [_dims(shapes.get(o, "")) for o in inst["operands"][:2]]
  result = _dims(inst["shape"])
  if not labels or len(operands) < 2 or not all(operands) or not result:
    return 0.0
  if "BackwardFilter" in target:
    forward_out, kernel = operands[1][0], result[0]
  elif "BackwardInput" in target:
    forward_out, kernel = operands[0][0], operands[1][0]
  else:
    forward_out, kernel = result[0], operands[1][0]
  per_output = math.prod(kernel) // max(kernel[labels.group(1).index("o")], 1)
  return 2.0 * math.prod(forward_out) * per_output


def _custom_call_flops(inst: dict, shapes: dict[str, str], target: str) -> float:
  config = _backend_config(inst["attrs"])
  if "fmha" in target:  # QK^T and PV: 2 x 2 x (B H Sq Sk) x head_dim; the backward does 5 such products
    fmha = config.get("cudnn_fmha_backend_config", {})
    scores = [int(d) for d in fmha.get("intermediate_tensor_shape", {}).get("dimensions", [])]
    q = _dims(shapes.get(inst["operands"][0], "")) if inst["operands"] else []
    if not (scores and q):
      return 0.0
    return 4.0 * math.prod(scores) * q[0][-1] * (2.5 if "Backward" in target else 1.0)
  if "conv" in target:
    return _conv_flops(inst, shapes, target)
  if "gemm" in target or "matmul" in target:  # cuBLAS: the result is the first element of the tuple
    numbers = config.get("gemm_backend_config", {}).get("dot_dimension_numbers", {})
    lhs = _dims(shapes.get(inst["operands"][0], "")) if inst["operands"] else []
    out = _dims(inst["shape"])
    if not (lhs and out):
      return 0.0
    contracted = math.prod(lhs[0][int(d)] for d in numbers.get("lhs_contracting_dimensions", []))
    return 2.0 * math.prod(out[0]) * contracted
  return 0.0


def _computation_flops(computations, name: str, cache: dict) -> float:
  """FLOPs of the dots and convolutions inside a fused computation (nested fusions included)."""
  if name in cache:
    return cache[name]
  insts = computations.get(name, [])
  shapes = {i["name"]: i["shape"] for i in insts}
  flops = 0.0
  for inst in insts:
    if inst["op"] == "dot":
      flops += _dot_flops(inst, shapes)
    elif inst["op"] == "convolution":
      flops += _conv_flops(inst, shapes)
    elif inst["op"] == "custom-call":
      target = re.search(r'custom_call_target="([^"]+)"', inst["attrs"])
      flops += _custom_call_flops(inst, shapes, target.group(1) if target else "")
    for called in _called(inst["attrs"], "calls"):
      flops += _computation_flops(computations, called, cache)
  cache[name] = flops
  return flops


def _operand_reads(computations, name: str, cache: dict) -> dict[int, int]:
  """Bytes a fused computation reads of its operands that it only slices: parameter index -> the sum of
  its slices' sizes (operands used otherwise are read whole)."""
  if name in cache:
    return cache[name]
  insts = computations.get(name, [])
  params = {i["name"]: int(i["args"]) for i in insts if i["op"] == "parameter" and i["args"].strip().isdigit()}
  users: dict[str, list[dict]] = collections.defaultdict(list)
  for inst in insts:
    for operand in inst["operands"]:
      if operand in params:
        users[operand].append(inst)
  reads = {params[p]: sum(_array_bytes(u["shape"]) for u in us) for p, us in users.items()
           if all(u["op"] in ("slice", "dynamic-slice") and u["operands"][0] == p for u in us)}
  cache[name] = reads
  return reads


def _trip_count(inst: dict) -> int | None:
  n = _backend_config(inst["attrs"]).get("known_trip_count", {}).get("n")
  return int(n) if n is not None else None


def reduction_bytes(text: str, in_loops: bool = False) -> collections.Counter:
  """Element type -> bytes of the arrays a compiled program's cross-device sums (all-reduce,
  reduce-scatter; each instruction once, wherever it sits) add up in it, e.g. Counter({'f32': ...}) for
  a data-parallel step that sums its gradients in float32. ``in_loops``: only the sums inside loop
  bodies, which run once per trip (with gradient accumulation: once per micro-batch, not per step)."""
  computations, _ = parse_hlo_module(text)
  names = set(computations)
  if in_loops:
    names, todo = set(), [b for insts in computations.values() for i in insts if i["op"] == "while"
                          for b in _called(i["attrs"], "body")]
    while todo:  # the bodies and what they call
      name = todo.pop()
      if name not in names:
        names.add(name)
        todo += [c for i in computations.get(name, [])
                 for key in ("body", "calls", "to_apply", "branch_computations") for c in _called(i["attrs"], key)]
  found = collections.Counter()
  for name in names:
    for inst in computations.get(name, []):
      # An asynchronous all-reduce by its -done: newer XLA gives -start the shape ((operands), result).
      if inst["op"] in ("all-reduce", "all-reduce-done", "reduce-scatter"):
        for dtype, dims in _ARRAY.findall(inst["shape"]):
          found[dtype] += _array_bytes(f"{dtype}[{dims}]")
  return found


def hlo_account(text: str, peak_flops: float, bandwidth: float, top: int = 10) -> dict:
  """Where a compiled program's time would go if each kernel ran at its roofline, from its optimised HLO.

  Each instruction of the entry computation (and of the bodies of its loops, times their known trip
  counts) that does work is one kernel: a fusion, a library call (cuBLAS, cuDNN), a copy, a collective.
  Its FLOPs are those of the dots, convolutions and fused attention inside it; its bytes are its result
  plus its operands (each read once; of an operand a fusion only slices, the slices); its time is
  max(FLOPs / ``peak_flops``, bytes / ``bandwidth``). The sum over kernels is a lower bound of a step on
  one stream (caches aside: an operand re-read from L2 is charged again; collectives are charged their
  bytes at memory bandwidth, not the interconnect's). Kinds are :func:`kind_of`'s,
  with any kernel that does FLOPs counted as its matmul / attention / convolution work.
  ``rematerialized`` counts the kernels (and their time) that XLA's rematerialisation pass added: it
  recomputes values when the program's peak memory crosses the compiler's limit for the device.
  """
  computations, entry = parse_hlo_module(text)
  flops_cache: dict[str, float] = {}
  reads_cache: dict[str, dict[int, int]] = {}
  kinds: dict[str, list[float]] = collections.defaultdict(lambda: [0, 0.0, 0.0, 0.0])
  kernels: list[dict] = []
  unknown_loops = 0

  def visit(name: str, times: float):
    nonlocal unknown_loops
    insts = computations.get(name, [])
    shapes = {i["name"]: i["shape"] for i in insts}
    for inst in insts:
      op = inst["op"]
      if op in _FREE_OPS or op.endswith(_ASYNC_DONE):
        continue
      if op == "while":
        trips = _trip_count(inst)
        unknown_loops += trips is None
        for body in _called(inst["attrs"], "body"):
          visit(body, times * (trips or 1))
        continue
      if op in ("call", "conditional", "async-start"):  # a conditional: as if its first branch ran
        for called in _called(inst["attrs"], "to_apply") + _called(inst["attrs"], "calls") + \
            _called(inst["attrs"], "branch_computations")[:1]:
          visit(called, times)
        continue
      target = re.search(r'custom_call_target="([^"]+)"', inst["attrs"])
      target = target.group(1) if target else ""
      reads: dict[int, int] = {}
      if op == "fusion":
        called = _called(inst["attrs"], "calls")
        flops = sum(_computation_flops(computations, c, flops_cache) for c in called)
        called_text = " ".join(i["op"] + " " + i["attrs"] for c in called for i in computations.get(c, []))
        reads = _operand_reads(computations, called[0], reads_cache) if called else {}
      else:
        flops = (_dot_flops(inst, shapes) if op == "dot" else _conv_flops(inst, shapes) if op == "convolution"
                 else _custom_call_flops(inst, shapes, target) if op == "custom-call" else 0.0)
        called_text = ""
      first = {o: i for i, o in reversed(list(enumerate(inst["operands"])))}  # each operand read once
      nbytes = _array_bytes(inst["shape"]) + sum(reads.get(i, _array_bytes(shapes.get(o, "")))
                                                 for o, i in first.items())
      kind = kind_of(f"{target} {op}", "")
      if flops and kind not in ("matmul", "attention", "convolution"):
        kind = next((k for k in ("attention", "convolution") if kind_of(called_text) == k), "matmul")
      seconds = max(flops / peak_flops, nbytes / bandwidth)
      row = kinds[kind]
      row[0] += times
      row[1] += flops * times
      row[2] += nbytes * times
      row[3] += seconds * times
      metadata = re.search(r'op_name="([^"]+)"', inst["attrs"])
      kernels.append({"name": inst["name"], "kind": kind, "op_name": metadata.group(1) if metadata else "",
                      "count": times, "flops": flops * times, "bytes": nbytes * times, "ms": 1e3 * seconds * times,
                      "rematerialized": bool(_REMATERIALIZED.search(inst["name"]))})

  visit(entry, 1.0)
  total_ms = sum(k["ms"] for k in kernels)
  recomputed = [k for k in kernels if k["rematerialized"]]
  return {
      "kernels": sum(k["count"] for k in kernels), "flops": sum(k["flops"] for k in kernels),
      "bytes": sum(k["bytes"] for k in kernels), "roofline_ms": total_ms,
      "peak_flops": peak_flops, "bandwidth": bandwidth, "loops_without_trip_count": unknown_loops,
      "kinds": {k: {"kernels": v[0], "flops": v[1], "bytes": v[2], "ms": 1e3 * v[3]}
                for k, v in sorted(kinds.items(), key=lambda kv: -kv[1][3])},
      "rematerialized": {"kernels": sum(k["count"] for k in recomputed), "ms": sum(k["ms"] for k in recomputed)},
      "top": sorted(kernels, key=lambda k: -k["ms"])[:top],
  }


def describe_account(account: dict, unit: str = "step") -> str:
  """A few lines: the roofline time per ``unit`` (one run of the program), then per kind its kernels,
  TFLOPs, GB moved and milliseconds."""
  lines = [f"roofline: {account['roofline_ms']:.1f} ms per {unit} at {account['peak_flops'] / 1e12:.0f} TFLOP/s "
           f"and {account['bandwidth'] / 1e12:.2f} TB/s ({account['kernels']:.0f} kernels, "
           f"{account['flops'] / 1e12:.2f} TFLOP, {account['bytes'] / 1e9:.1f} GB moved)"]
  for kind, v in account["kinds"].items():
    lines.append(f"  {kind:<11} {v['kernels']:6.0f} kernels {v['flops'] / 1e12:9.3f} TFLOP "
                 f"{v['bytes'] / 1e9:8.2f} GB {v['ms']:9.2f} ms")
  if account["loops_without_trip_count"]:
    lines.append(f"  ({account['loops_without_trip_count']} loop(s) without a known trip count: counted once)")
  remat = account["rematerialized"]
  if remat["kernels"]:
    lines.append(f"  recomputed: {remat['kernels']:.0f} of the kernels, {remat['ms']:.2f} ms, added by XLA's "
                 f"rematerialisation pass: the program's peak memory crossed the compiler's limit for the device "
                 f"(fewer examples per device or micro-batch avoid that)")
  return "\n".join(lines)


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
