// The initializers of an rwkv-export .onnx graph, read in the browser without onnxruntime: a minimal protobuf reader
// for what our own runtimes (rt_webgpu.js, rt_wasm.js) need: each initializer's name, dims, data type and bytes, inline
// or in an external data file of the manifest. Errors are OnnxReadError with one line saying what is wrong.

import { checkFileName } from './manifest.js';

export class OnnxReadError extends Error {}
const fail = (msg) => { throw new OnnxReadError(msg); };

// ---- ONNX initializers: a minimal protobuf reader -------------------------------------------------------------

// Fields read (onnx.proto): ModelProto.graph = 7; GraphProto.initializer = 5; TensorProto dims = 1, data_type = 2,
// name = 8, raw_data = 9, external_data = 13 (StringStringEntryProto key = 1, value = 2), data_location = 14.
class Pb {
  constructor(bytes, start = 0, end = bytes.length) {
    Object.assign(this, { b: bytes, i: start, end });
  }

  varint() {
    let x = 0;
    let mul = 1;
    for (;;) {
      if (this.i >= this.end) fail('the .onnx file is truncated (a protobuf varint runs past its end)');
      const byte = this.b[this.i++];
      x += (byte & 0x7f) * mul; // Numbers, not bit ops: offsets and lengths pass 2^31
      if (byte < 0x80) return x;
      mul *= 128;
    }
  }

  // Calls fn(field, wire, pb) for each field; fn reads the value or returns false to have it skipped.
  fields(fn) {
    while (this.i < this.end) {
      const key = this.varint();
      const field = Math.floor(key / 8);
      const wire = key & 7;
      if (fn(field, wire, this) !== false) continue;
      if (wire === 0) this.varint();
      else if (wire === 1) this.i += 8;
      else if (wire === 2) { const n = this.varint(); this.i += n; } // (not this.i += this.varint(): i is read first)
      else if (wire === 5) this.i += 4;
      else fail(`the .onnx file is not a valid protobuf (wire type ${wire})`);
    }
    if (this.i !== this.end) fail('the .onnx file is not a valid protobuf (a field runs past its message)');
  }

  sub() {
    const n = this.varint();
    const p = new Pb(this.b, this.i, this.i + n);
    if (p.end > this.end) fail('the .onnx file is truncated');
    this.i += n;
    return p;
  }

  bytes() {
    const p = this.sub();
    return this.b.subarray(p.i, p.end);
  }

  string() {
    return new TextDecoder().decode(this.bytes());
  }
}

function readTensor(p) {
  const t = { dims: [], dtype: 0, name: '', raw: null, external: {}, location: 0 };
  p.fields((f, wire, q) => {
    if (f === 1 && wire === 2) { const s = q.sub(); while (s.i < s.end) t.dims.push(s.varint()); } // packed
    else if (f === 1 && wire === 0) t.dims.push(q.varint());
    else if (f === 2 && wire === 0) t.dtype = q.varint();
    else if (f === 8 && wire === 2) t.name = q.string();
    else if (f === 9 && wire === 2) t.raw = q.bytes();
    else if (f === 13 && wire === 2) {
      let key = '';
      let value = '';
      q.sub().fields((g, w2, r) => {
        if (g === 1 && w2 === 2) key = r.string();
        else if (g === 2 && w2 === 2) value = r.string();
        else return false;
        return true;
      });
      t.external[key] = value;
    } else if (f === 14 && wire === 0) t.location = q.varint();
    else return false;
    return true;
  });
  return t;
}

// name -> {dims, dtype (TensorProto code), raw | external {location, offset, length}} for every initializer.
export function onnxInitializers(bytes) {
  const out = new Map();
  new Pb(bytes).fields((f, wire, p) => {
    if (f !== 7 || wire !== 2) return false;
    p.sub().fields((g, w2, q) => {
      if (g !== 5 || w2 !== 2) return false;
      const t = readTensor(q.sub());
      out.set(t.name, t);
      return true;
    });
    return true;
  });
  if (!out.size) fail('the .onnx file has no graph initializers (not an rwkv-export step graph?)');
  return out;
}

// TensorProto data_type codes of the dtypes the browser runtimes read
export const DTYPE_CODES = { 1: 'float32', 2: 'uint8', 3: 'int8', 6: 'int32', 7: 'int64', 10: 'float16' };

// The bytes of an initializer: inline raw_data or a slice of an external data file (files: Map name -> bytes).
export function tensorBytes(t, graph, files) {
  if (t.location !== 1) {
    if (!t.raw) fail(`initializer ${t.name} has no raw_data (this runtime reads raw_data and external data only)`);
    return t.raw;
  }
  const dir = graph.file.includes('/') ? graph.file.slice(0, graph.file.lastIndexOf('/') + 1) : '';
  const file = checkFileName(dir + t.external.location, graph.file);
  const data = files.get(file);
  if (!data) fail(`initializer ${t.name} lives in ${file}, which the manifest does not list for ${graph.file}`);
  const offset = Number(t.external.offset ?? 0);
  const length = Number(t.external.length ?? data.length - offset);
  if (offset + length > data.length) fail(`${file} is too short for initializer ${t.name}: damaged or truncated`);
  return data.subarray(offset, offset + length);
}

