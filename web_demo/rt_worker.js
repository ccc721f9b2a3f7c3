// runtimes.html's runners in a dedicated Web Worker (?worker=1; rt_common.js openInWorker is the page's side). A
// classic worker, not a module one: TF.js's packages are UMD scripts that tfjs-tflite loads with importScripts, which
// module workers lack; the adapters themselves come in through import(). Why a worker at all: on the page's thread
// a wasm runtime's threads cannot block (Atomics.wait is refused there), so the thread that waits spins instead.
//
// Messages: {id, op: 'open'|'step'|'prompt'|'reset'|'dispose', args} -> {id, value} or {id, error: {name, message, fix}}.

let runner = null;

async function handle(op, args) {
  if (op === 'open') {
    const adapter = await import(args.module);
    runner = await adapter.open(args.options);
    const { backend, threads, bytes, notes, promptInfo } = runner;
    return { backend, threads, bytes, notes, promptInfo, hasPrompt: runner.prompt != null };
  }
  if (!runner) throw new Error('no runner is open in the worker');
  if (op === 'step') return runner.step(args);
  if (op === 'prompt') return runner.prompt(args);
  if (op === 'reset') return runner.reset();
  if (op === 'dispose') {
    await runner.dispose();
    runner = null;
    return null;
  }
  throw new Error(`unknown worker op '${op}'`);
}

self.onmessage = async ({ data: { id, op, args } }) => {
  try {
    self.postMessage({ id, value: (await handle(op, args)) ?? null });
  } catch (e) {
    self.postMessage({ id, error: { name: e?.name ?? 'Error', message: e?.message ?? String(e), fix: e?.fix ?? null } });
  }
};
