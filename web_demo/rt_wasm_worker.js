// A helper thread of wasm-native (rt_wasm.js): instantiates rwkv4_int8.wasm on the runner's shared memory, says
// ready, then stays in the module's `serve` loop (claiming chunks of every matvec; polling, then memory.atomic.wait64)
// until the runner sets the quit word. Message in: {module, memory, ctl, spin, thread} (thread: its number, 1 and up,
// which picks its own copy of the output slots); out: {} or {error}.
self.onmessage = async ({ data: { module, memory, ctl, spin, thread } }) => {
  let instance;
  try {
    instance = await WebAssembly.instantiate(module, { env: { mem: memory } });
  } catch (e) {
    self.postMessage({ error: e?.message ?? String(e) });
    return;
  }
  self.postMessage({});
  instance.exports.serve(ctl, spin, thread);
};
