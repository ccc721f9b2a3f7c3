"""wasm-native (web_demo/rt_wasm.js) against onnxruntime-web's wasm backend on one int8 file, interleaved in one page.

    python benchmarks/bench_wasm_native.py FOLDER [--configs ort:2,native:u8:2,...] [--rounds 5] [--steps 16]

FOLDER: an ONNX export with the int8 variant (`rwkv-export onnx CKPT -o FOLDER --quant int8`; 169M shapes:
`rwkv-export onnx builtin:169m-synthetic ...`). Every config is loaded once into the same headless Chromium page
(runtimes.html's adapters rt_ort.js and rt_wasm.js, on the page's thread). Then --rounds rounds each time --steps
consecutive greedy steps of every config in turn, state fed back: each round starts at the next config, and configs
are timed 200 ms apart so that one config's idle threads have stopped spinning before the next is timed. Load from
other processes on the machine so falls on all configs alike. A row gives the median tok/s over the rounds, its
range, and the ratio to the first config's median; the load average before and after is printed: on a shared machine
compare ratios, not absolute numbers.

A config: ort:THREADS (onnxruntime-web wasm) or native:KERNEL:THREADS[:SPIN[:PATIENCE]] (KERNEL u8, nib, i16 or auto;
SPIN the helpers' polls before they sleep, rt_wasm.js's default 65536; 0 = sleep at once, woken by a notify every
matvec; empty = the default; PATIENCE the runner's polls for chunks still running on a helper at a matvec's end
before it computes them itself, default 8192; 0 = at once);
nativejs:KERNEL:THREADS[:SPIN[:PATIENCE]] is native with the step's elementwise float32 work in JavaScript
(rt_wasm.js's stepJs, the reference) instead of in the wasm module; listed after the same native config, it runs on
that config's runtime (the same memory and threads), which is the fair comparison: two identical runtimes loaded side
by side differed by 8 % in one run on this machine (list a config twice to see it).
Needs: pip install playwright; /usr/bin/chromium; npm ci --prefix web_demo (onnxruntime-web).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-quic", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--disable-gpu"]

OPEN_JS = """async ([configs]) => {
  const mf = await import('./manifest.js');
  const m = window.rwkvRuntimes.manifest;
  const graph = mf.stepGraph(m, 'int8');
  const modelBase = new URL('/model/', location.href).href;
  window.benchRunners = [];
  const info = [];
  const native = new Map();
  for (const c of configs) {
    const t0 = performance.now();
    const key = JSON.stringify([c.kernel, c.threads, c.spin, c.patience]);
    if (c.kind === 'nativejs' && native.has(key)) { // the same runtime (memory, threads) as that native config
      const r = native.get(key);
      window.benchRunners.push({ ...r, step: r.stepJs });
      info.push({ loadS: 0, threads: r.threads, notes: [r.notes[0], 'elementwise in js, on the runtime of ' + r.name] });
      continue;
    }
    const mod = await import(c.kind === 'ort' ? './rt_ort.js' : './rt_wasm.js');
    const backend = c.kind === 'ort' ? 'wasm' : (c.kernel === 'auto' ? 'wasm-native' : `wasm-native-${c.kernel}`);
    const extra = { ...(c.spin == null ? {} : { spin: c.spin }), ...(c.patience == null ? {} : { patience: c.patience }),
      ...(c.kind === 'nativejs' ? { elementwise: 'js' } : {}) };
    const opts = { manifest: m, modelBase, graph, seq: null, backend, threads: c.threads, verify: false, ...extra };
    const r = await mod.open(opts);
    for (let i = 0; i < 8; i++) await r.step(0); // warm-up (JIT tiers)
    await r.reset();
    window.benchRunners.push(r);
    if (c.kind === 'native') native.set(key, { ...r, name: c.name });
    info.push({ loadS: (performance.now() - t0) / 1000, threads: r.threads, notes: r.notes });
  }
  return info;
}"""

ROUND_JS = """async ([steps, first]) => {
  const rs = window.benchRunners;
  const out = new Array(rs.length);
  for (let k = 0; k < rs.length; k++) {
    const i = (first + k) % rs.length; // each round starts at another config
    const r = rs[i];
    await r.reset();
    await new Promise((res) => setTimeout(res, 200)); // let the previous config's threads stop spinning
    let id = 0;
    const t0 = performance.now();
    for (let i = 0; i < steps; i++) {
      const logits = await r.step(id);
      let b = 0;
      for (let j = 1; j < logits.length; j++) if (logits[j] > logits[b]) b = j;
      id = b;
    }
    out[i] = steps / ((performance.now() - t0) / 1000);
  }
  return out;
}"""


def parse(spec: str) -> list[dict]:
    out = []
    for c in spec.split(","):
        p = c.split(":")
        if p[0] == "ort" and len(p) == 2:
            out.append({"name": c, "kind": "ort", "threads": int(p[1])})
        elif p[0] in ("native", "nativejs") and 3 <= len(p) <= 5 and p[1] in ("u8", "nib", "i16", "auto"):
            spin = None if len(p) < 4 or p[3] == "" else int(p[3])
            patience = None if len(p) < 5 else int(p[4])
            out.append({"name": c, "kind": p[0], "kernel": p[1], "threads": int(p[2]), "spin": spin, "patience": patience})
        else:
            raise SystemExit(f"error: bad config '{c}' (ort:THREADS or native|nativejs:u8|nib|i16|auto:THREADS[:SPIN[:PATIENCE]])")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("folder", type=Path)
    ap.add_argument("--configs", default="ort:2,native:auto:2,nativejs:auto:2,native:auto:1,native:nib:2,native:i16:2")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=16)
    args = ap.parse_args()
    configs = parse(args.configs)
    from playwright.sync_api import sync_playwright

    from rwkv_export.serve import serve_in_thread

    load0 = os.getloadavg()
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
    server, url = serve_in_thread(args.folder)
    rates: list[list[float]] = []
    try:
        with sync_playwright() as p:
            b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
            pg = b.new_page()
            pg.set_default_timeout(1_800_000)
            pg.goto(url + "runtimes.html")
            pg.wait_for_function("['setup','error'].includes(document.body.dataset.status)")
            info = pg.evaluate(OPEN_JS, [configs])
            for k in range(args.rounds):
                rates.append(pg.evaluate(ROUND_JS, [args.steps, k]))
            b.close()
    finally:
        server.shutdown()
        server.server_close()
    load1 = os.getloadavg()
    print(f"machine: {cpu}, {os.cpu_count()} logical cores; Chromium {CHROMIUM}; {args.folder}; "
          f"{args.rounds} rounds x {args.steps} steps per config; "
          f"load average {load0[0]:.2f} before, {load1[0]:.2f} after\n")
    print("| config | threads | load | tok/s median (range) | vs first |")
    print("|---|---|---|---|---|")
    base = None
    for i, c in enumerate(configs):
        r = [x[i] for x in rates]
        med = statistics.median(r)
        base = base or med
        note = f" ({', '.join(info[i]['notes'][:2])})" if c["kind"] != "ort" and info[i]["notes"] else ""
        print(f"| {c['name']}{note} | {info[i]['threads']} | {info[i]['loadS']:.1f} s | "
              f"{med:.1f} ({min(r):.1f}–{max(r):.1f}) | {med / base:.2f} |")


if __name__ == "__main__":
    main()
