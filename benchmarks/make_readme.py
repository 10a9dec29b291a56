"""Regenerates the numbers in benchmarks/README.md from benchmarks/results/*.json.

  python -m benchmarks.make_readme
"""
from __future__ import annotations

import json
import pathlib
import re

HERE = pathlib.Path(__file__).resolve().parent


def _odin(r: dict) -> str:
  def met(ok: bool) -> str:
    return "met" if ok else "**not met**"

  if r["released_torch_s"] is None:
    released = "| (2) released procedure, PyTorch twin | not run | |"
    diff = "The PyTorch run was skipped (`--skip-released`)."
  else:
    speedup, goal = r["speedup_over_released"], r["goal_speedup_over_released"]
    released = (f"| (2) released procedure, PyTorch twin | {r['released_torch_s']:.2f} | "
                f"(2)/(1) = **{speedup:.2f}x** (goal ≥ {goal:g}x, {met(speedup >= goal)}) |")
    diff = f"Largest score difference between (1) and (2): {r['max_abs_score_diff']:.1e}."
  ratio, goal = r["ratio_to_strict_floor"], r["goal_ratio_to_strict_floor"]
  header = (
      f"{r['grid'][0]} x {r['grid'][1]} grid, {r['images']} images, chunks of "
      f"{r['chunk_size']}, {r['cpu_threads']} CPU threads ({r['backend']}); medians of "
      f"{r['repeats']} interleaved repeats; load average (1 min, counting the benchmark's own "
      f"threads) {r['loadavg_start'][0]:.2f} at the start, {r['loadavg_end'][0]:.2f} at the end. "
      f"One forward over all {r['images']} images takes {r['forward_s'] * 1e3:.1f} ms, one "
      f"forward + backward {r['forward_backward_s'] * 1e3:.0f} ms "
      f"({r['forward_backward_s'] / r['forward_s']:.1f} forwards).")
  strict = (
      f"| (3a) strict floor T·(fwd+bwd) + T·E·fwd, one call over all images per pass | "
      f"{r['strict_floor_s']:.2f} | (1)/(3a) = **{ratio:.2f}x** (goal ≤ {goal:g}x, "
      f"{met(ratio <= goal)}) |")
  chunked = (
      f"| (3b) chunked floor, the same pieces over chunks of {r['chunk_size']} | "
      f"{r['chunked_floor_s']:.2f} | (1)/(3b) = {r['ratio_to_chunked_floor']:.2f}x |")
  forwards = (
      f"| 240 forwards (3·T + T·E), as if a backward cost two forwards | "
      f"{r['forwards_240_s']:.2f} | (1)/240 = {r['ratio_to_forwards_240']:.2f}x |")
  return "\n".join([
      header, "", "| | seconds | ratio |", "|---|---|---|",
      f"| (1) oodjax `odin_grid` | {r['oodjax_s']:.2f} | |",
      released, strict, chunked, forwards, "", diff])


def _load(m: dict) -> str:
  if "load_before" not in m:
    return "not recorded"
  return f"{m['load_before'][0]:.2f}, {m['load_after'][0]:.2f}"


def _whitebox(r: dict) -> str:
  lines = [
      f"Median of {r['models'][0]['repeats']} interleaved repeats, {r['cpu_threads']} CPU "
      f"threads of {r.get('cpu', 'an unrecorded CPU')} ({r['backend']}, jax {r['jax']}); load "
      f"average (1 min, counting the benchmark's own threads) {r['load_before'][0]:.2f} before, "
      f"{r['load_after'][0]:.2f} after.", "",
      "| model | input | images | forward (s) | indicators (s) | indicators / forward "
      "| goal | / chunked forward | unchunked / forward | load before, after |",
      "|---|---|---|---|---|---|---|---|---|---|"]
  for m in r["models"]:
    sec = m["seconds"]
    met = "met" if m["ratio"] <= m["goal"] else "**not met**"
    lines.append(
        f"| `{m['model']}` | {'x'.join(map(str, m['input_shape']))} | {m['images']} "
        f"| {sec['forward']:.3f} | {sec['indicators']:.3f} | **{m['ratio']:.2f}x** "
        f"| ≤ {m['goal']}x ({met}) | {m['ratio_to_chunked_forward']:.2f}x "
        f"| {m['ratio_unchunked']:.2f}x | {_load(m)} |")
  return "\n".join(lines)


def _metrics_grid(r: dict) -> str:
  met = "met" if r["speedup"] >= r["goal_speedup"] else "**not met**"
  sorts = ", ".join(f"`{name}` {seconds:.3f} s" for name, seconds in r["sort_s"].items())
  diffs = ", ".join(f"{key} {value:.1e}" for key, value in r["max_abs_diff"].items())
  header = (
      f"{r['grid'][0]} x {r['grid'][1]} grid, {r['n_in']} ID + {r['n_out']} OOD float32 scores "
      f"per configuration, {r['cpu_threads']} CPU threads ({r['backend']}, jax {r['jax']}); "
      f"medians of {r['repeats']} interleaved repeats; load average (1 min) "
      f"{r['loadavg_start'][0]:.2f} at the start, {r['loadavg_end'][0]:.2f} at the end.")
  loop = (
      f"| (b) scikit-learn loop over the {r['grid'][0] * r['grid'][1]} configurations | "
      f"{r['sklearn_loop_s']:.3f} | (b)/(a) = **{r['speedup']:.1f}x** "
      f"(goal ≥ {r['goal_speedup']:g}x, {met}) |")
  xla = (
      f"| (c) (a) with XLA's sort and scans (the GPU/TPU path) | {r['xla_sort_s']:.3f} | "
      f"(c)/(a) = {r['xla_sort_s'] / r['metrics_grid_s']:.1f}x |")
  return "\n".join([
      header, "", "| | seconds | ratio |", "|---|---|---|",
      f"| (a) oodjax `metrics_grid` | {r['metrics_grid_s']:.3f} | |", loop, xla, "",
      f"Sorts of the [{r['sort_shape'][0]}, {r['sort_shape'][1]}] merged scores: {sorts}.",
      f"Largest difference between (a) and (b): {diffs}."])


def _vmdls(r: dict) -> str:
  sc, ab = r["scoring"], r["ablation"]
  sec = sc["seconds"]

  def met(ratio: float) -> str:
    return "met" if ratio <= sc["goal"] else "**not met**"

  lines = [
      f"{r['cpu_threads']} CPU threads of {r.get('cpu', 'an unrecorded CPU')} ({r['backend']}, "
      f"jax {r['jax']}); medians of interleaved repeats; load average (1 min) "
      f"{sc['load_before'][0]:.2f} before, {ab['load_after'][0]:.2f} after.", "",
      f"Scoring {sc['images']} images (small CNN backbone, d = 16, feature ensemble of "
      f"{sc['feature_dim']} dimensions, batches of {sc['batch_size']}; {sc['repeats']} "
      "repeats):", "",
      "| | seconds | images/s | ratio to the floor |", "|---|---|---|---|"]
  for key in ("forward, one pass", "forward, batches", "VMDLS_b", "VMDLS"):
    ratio = f"{sec[key] / sec[sc['floor']]:.2f}x"
    if key in ("VMDLS_b", "VMDLS"):
      ratio = f"**{ratio}** (goal ≤ {sc['goal']}x, {met(sec[key] / sec[sc['floor']])})"
    elif key == sc["floor"]:
      ratio += " (the floor: the faster forward)"
    lines.append(f"| {key} | {sec[key]:.3f} | {sc['images'] / sec[key]:.0f} | {ratio} |")
  lines += [
      "", f"The Table 4 ablation: {ab['variants']} variants x {ab['steps']} training steps of "
      f"{ab['batch']} images ({ab['repeats']} repeats):", "",
      "| | seconds | first call (compile included) |", "|---|---|---|",
      f"| {ab['variants']} variants one after another (one compiled step reused) | "
      f"{ab['seconds']['sequential']:.3f} | {ab['compile_seconds']['sequential']:.1f} s |",
      f"| one vmapped step over the {ab['variants']} variants | {ab['seconds']['vmapped']:.3f} | "
      f"{ab['compile_seconds']['vmapped']:.1f} s |",
      f"| one step running the {ab['variants']} variants in turn (`lax.map`) | "
      f"{ab['seconds']['lax.map']:.3f} | {ab['compile_seconds']['lax.map']:.1f} s |", "",
      f"Sequential / vmapped: **{ab['speedup']:.2f}x**; sequential / `lax.map`: "
      f"**{ab['speedup_lax_map']:.2f}x**."]
  return "\n".join(lines)


def _envise_xnor(r: dict) -> str:
  g, st = r["gemm"], r["student"]
  mem = st["memory"]
  lines = [
      f"{r['cpu_threads']} CPU threads of {r.get('cpu', 'an unrecorded CPU')} ({r['backend']}, "
      f"jax {r['jax']}); medians of interleaved repeats; load average (1 min) "
      f"{g['load_before'][0]:.2f} before, {st['load_after'][0]:.2f} after.", "",
      f"±1 GEMM {g['m']}x{g['k']}x{g['n']} ({g['repeats']} repeats):", "",
      "| | ms | speed-up over the float32 matmul |", "|---|---|---|"]
  for key, sec in g["seconds"].items():
    lines.append(f"| {key} | {1e3 * sec:.1f} | {g['speedup'][key]:.2f}x |")
  shape = "x".join(str(v) for v in st["input"])
  lines += [
      "", f"`{st['student']}` ({st['num_classes']} classes, {shape}, batch {st['batch_size']}, "
      f"{st['binary_layers']} binary layers; {st['repeats']} repeats):", "",
      "| | ms per image |", "|---|---|"]
  for key, ms in st["ms_per_image"].items():
    lines.append(f"| {key} | {ms:.2f} |")
  met = "met" if st["speedup_binary_layers"] >= st["goal"] else "**not met**"
  lines += [
      "", f"Binary layers, float / packed: **{st['speedup_binary_layers']:.2f}x** (goal ≥ "
      f"{st['goal']}x, {met}); whole student: {st['speedup_student']:.2f}x; largest relative "
      f"difference of the packed layers' outputs: {st['max_relative_difference']:.1e}.",
      f"Memory: {mem['float_bits']['total'] / 8e6:.2f} MB float, "
      f"{mem['packed_bits']['total'] / 8e6:.2f} MB exported ({mem['ratio']['total']:.1f}x "
      f"smaller; the binary layers alone {mem['ratio']['binary']:.1f}x)."]
  return "\n".join(lines)


def _fsdp_memory(r: dict) -> str:
  mib = lambda b: f"{b / 2**20:.1f}"  # noqa: E731
  lines = [f"{r['devices']} fake {r['backend'].upper()} devices ({r['device_kind']}, "
           f"jax {r['jax']}), global batch {r['batch_size']} at 32x32x3, K = 10, SGD with "
           "momentum; MiB per device from XLA's memory analysis of the compiled step.", "",
           "| network | parameters | mesh | parameter sharding | state | step inputs | scratch "
           "| state vs data parallel |", "|---|---|---|---|---|---|---|---|"]
  base = {row["model"]: row["state_bytes"] for row in r["rows"]
          if row["param_sharding"] == "replicated"}
  for row in r["rows"]:
    mesh = " x ".join(f"{k} {v}" for k, v in row["mesh"].items())
    ratio = base[row["model"]] / row["state_bytes"]
    versus = "(the reference)" if row["param_sharding"] == "replicated" else \
        f"{ratio:.2f}x smaller"
    lines.append(f"| {row['model']} | {row['params'] / 1e6:.2f} M | {mesh} | "
                 f"{row['param_sharding']} | {mib(row['state_bytes'])} | "
                 f"{mib(row['argument_bytes'])} | {mib(row['temp_bytes'])} | {versus} |")
  return "\n".join(lines)


def _input_pipeline(r: dict) -> str:
  goal = r["goal"]
  shape = "x".join(map(str, r["image_shape"]))
  lines = [
      f"`{r['config']}`: `{r['model']}` on `{r['dataset']}` ({shape}), batch "
      f"{r['batch_size']}, {r['optimizer']}; {r['steps']} training steps per timing, medians of "
      f"{r['repeats']} interleaved repeats, prefetch {r['prefetch_size']} ahead; "
      f"{r['cpu_threads']} CPU threads of {r.get('cpu', 'an unrecorded CPU')} ({r['backend']}, "
      f"jax {r['jax']}); load average (1 min, counting the benchmark's own threads) in the "
      "last column.", "",
      "| augment | path | seconds | images/s | against the floor | load before, after |",
      "|---|---|---|---|---|---|"]
  for st in r["settings"]:
    floor = st["seconds"]["floor"]
    for name, sec in st["seconds"].items():
      if name == "floor":
        versus = "(the floor)"
      elif name == "device":
        ok = "met" if st["cost_device"] < goal else "**not met**"
        versus = f"**{100 * st['cost_device']:+.1f}%** (goal < {100 * goal:g}%, {ok})"
      else:
        versus = f"{100 * (sec - floor) / floor:+.1f}%"
      lines.append(f"| {st['augment']} | {name} | {sec:.3f} | {st['images_per_s'][name]:.0f} "
                   f"| {versus} | {st['load_before'][0]:.2f}, {st['load_after'][0]:.2f} |")
  lines += ["", "Median over repeats of each repeat's own ratio to the floor (the contenders of a "
            "repeat run back to back): " + "; ".join(
                f"augment={st['augment']}: device {100 * st['cost_device_paired']:+.1f}%, "
                f"host {100 * st['cost_host_paired']:+.1f}%" for st in r["settings"]) + "."]
  pieces = list(r["settings"][0]["ms_per_batch"])
  lines += ["", "Each path's input work alone, milliseconds per batch (medians):", "",
            "| augment | " + " | ".join(pieces) + " |", "|---" * (len(pieces) + 1) + "|"]
  for st in r["settings"]:
    lines.append(f"| {st['augment']} | "
                 + " | ".join(f"{st['ms_per_batch'][k]:.2f}" for k in pieces) + " |")
  return "\n".join(lines)


ACCELERATOR_COMMAND = "python3 -m benchmarks.accelerator"


def _accelerator_missing() -> str:
  return (
      "**Not measured yet: no accelerator (GPU or TPU) was available to the sessions that wrote this benchmark.** "
      "These numbers must come from one, never from a CPU. On a machine with one, from the "
      f"repository root: `{ACCELERATOR_COMMAND}` (or split into calls as its docstring shows), "
      "then `python -m benchmarks.make_readme`.")


def _accelerator(r: dict) -> str:
  d = r["device"]
  if d is None:  # every measurement of the run failed before reaching a device
    return _accelerator_missing() + " (A results file exists but records no device.)"
  gib = lambda b: "-" if b is None else f"{b / 2**30:.2f}"  # noqa: E731
  versions = ", ".join(f"{k} {v}" for k, v in d["versions"].items()
                       if k in ("jax", "jaxlib", "flax", "optax") or k.startswith("jax-cuda"))
  smi = f"; nvidia-smi: {d['nvidia_smi']}" if d.get("nvidia_smi") else ""
  runs = "; ".join(f"`{' '.join(run['argv']) or '(defaults)'}` on {run['started']}"
                   for run in r["runs"])
  lines = [
      f"{d['device_kind']} x {d['device_count']} ({d['platform']}, {d['platform_version']}"
      f"{smi}), memory limit {gib(d['bytes_limit'])} GiB; {versions}; host CPU "
      f"{r['host']['cpu']} ({r['host']['cpu_threads']} threads). Runs: {runs}."]
  if r["train"]:
    f32 = {}  # the float32 row timed just before, per network (the dtypes run back to back)
    lines += [
        "", "Training at 32x32x3, K = 10, synthetic data (50,000 uint8 images), SGD + Nesterov; "
        "images/s over the timed steps, fed by the trainer's input path and from batches "
        "already on the device; peak memory from the device allocator, scratch from XLA's "
        "analysis of the compiled step.", "",
        "| network | compute | params | batch x steps | images/s | images/s, batches on the "
        "device | vs float32 | compile (s) | peak memory (GiB) | XLA scratch (GiB) |",
        "|---|---|---|---|---|---|---|---|---|---|"]
    for row in r["train"]:
      if "error" in row:
        lines.append(f"| {row['model']} | {row['dtype']} | | {row['batch_size']} x "
                     f"{row['steps']} | failed: {row['error'][:120]} | | | | | |")
        continue
      if row["dtype"] == "float32":
        f32[row["model"]] = row
      base = f32.get(row["model"])
      versus = ("(the reference)" if row["dtype"] == "float32" else
                "-" if base is None else f"{row['images_per_s'] / base['images_per_s']:.2f}x")
      lines.append(
          f"| {row['model']} | {row['dtype']} | {row['params'] / 1e6:.2f} M | "
          f"{row['batch_size']} x {row['steps']} | **{row['images_per_s']:.0f}** | "
          f"{row['images_per_s_resident']:.0f} | {versus} | {row['compile_s']:.1f} | "
          f"{gib(row['memory']['peak_bytes_in_use'])} | {gib(row['xla_memory']['temp_bytes'])} |")
  floor = r.get("odin_floor")
  if r["odin"] or floor:
    done = [row for row in r["odin"] + [floor] if row and "grid" in row]
    grid = f"{done[0]['grid'][0]} x {done[0]['grid'][1]}" if done else "10 x 21"
    images = (r["odin"] or [floor])[0]["images"]
    lines += ["", f"ODIN's {grid} grid on `densenet_bc100` "
              f"(random weights), {images} synthetic 32x32x3 images, `odin_grid`; "
              "\"first call\" is one chunk, compilation included.", "",
              "| chunk | forward_batch | first call (s) | seconds | image-configs/s | vs floor "
              "| peak memory (GiB) |", "|---|---|---|---|---|---|---|"]
    for row in r["odin"]:
      if "error" in row:
        lines.append(f"| {row['chunk_size']} | {row['forward_batch']} | failed: "
                     f"{row['error'][:120]} | | | | |")
        continue
      versus = ("-" if not floor or "error" in floor else
                f"**{row['seconds'] / floor['floor_s']:.2f}x**")
      lines.append(
          f"| {row['chunk_size']} | {row['forward_batch']} ({row['forward_batch_used']}) | "
          f"{row['first_call_s']:.1f} | {row['seconds']:.2f} | "
          f"{row['image_configs_per_s']:.0f} | {versus} | "
          f"{gib(row['memory']['peak_bytes_in_use'])} |")
    if floor and "error" not in floor:
      lines += ["", f"Floor T·(fwd+bwd) + T·E·fwd = {floor['floor_s']:.2f} s, from one forward "
                f"({floor['forward_s']:.3f} s) and one forward + backward "
                f"({floor['forward_backward_s']:.3f} s) over all {floor['images']} images in "
                f"jitted calls of {floor['chunk_size']} (medians of {floor['calls']})."]
    elif floor:
      lines += ["", f"The floor failed: {floor['error'][:200]}"]
  return "\n".join(lines)


RENDER = {"odin_grid": _odin, "whitebox": _whitebox, "metrics_grid": _metrics_grid,
          "vmdls": _vmdls, "envise_xnor": _envise_xnor, "fsdp_memory": _fsdp_memory,
          "input_pipeline": _input_pipeline, "accelerator": _accelerator}
# What a section says while its results file does not exist yet (sections not named here keep
# whatever the README holds).
MISSING = {"accelerator": _accelerator_missing}


def main() -> None:
  readme = HERE / "README.md"
  text = readme.read_text()
  for name, render in RENDER.items():
    path = HERE / "results" / f"{name}.json"
    if path.is_file():
      body = render(json.loads(path.read_text()))
    elif name in MISSING:
      body = MISSING[name]()
    else:
      continue
    text = re.sub(rf"(<!-- bench:{name} -->\n).*?(<!-- /bench:{name} -->)",
                  lambda m: m.group(1) + body + "\n" + m.group(2), text, flags=re.DOTALL)
  readme.write_text(text)
  print(f"rewrote {readme}")


if __name__ == "__main__":
  main()
