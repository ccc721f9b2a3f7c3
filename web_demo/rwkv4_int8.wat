;; rwkv4_int8.wat: the integer matrix-vector products and the float32 elementwise work of rt_wasm.js (wasm-native),
;; hand-written WebAssembly SIMD.
;; Built with wabt's wat2wasm (features simd, relaxed-simd, threads): `node web_demo/build_wasm.mjs` writes
;; rwkv4_int8.wasm, and tests/test_wasm_native.py checks that rebuilding gives the same bytes.
;;
;; A matvec computes y[n] = sum_k a[k] * w[k, n] exactly in int32 for 16 outputs ("a block") at a time; then the
;; thread that computed a chunk of blocks subtracts zp * colsum[n] and applies the scales there ($dequant). The weights of a block are one contiguous stream (rt_wasm.js packs
;; them at load): for each quad of k (4 consecutive k) four 16-byte chunks, chunk j holding outputs 4j..4j+3.
;; Three kernels, one per way of multiplying bytes (rt_wasm.js picks one; benchmarks/bench_web.py times them):
;;   mv_u8  (mode 0): relaxed i32x4.relaxed_dot_i8x16_i7x16_add_s(w, a) with the uint8 activations a as the i7
;;          operand. Outside [0, 127] the spec leaves the result to the implementation; x86 Chromium computes
;;          pmaddubsw (a unsigned, w signed; |w| <= 64 keeps its int16 pair sums from saturating) or VNNI (exact):
;;          used only where rt_wasm.js's probe proved this exact and every weight is in [-64, 64].
;;          Chunk j of a quad: [n 4j: k0..k3, n 4j+1: k0..k3, ...]; a quad of a is splatted to the 4 lanes.
;;   mv_nib (mode 1): the same layout, a = 16 * hi + lo with nibbles hi, lo in [0, 15] (within i7 everywhere):
;;          exact on every implementation; twice the dot products.
;;   mv_i16 (mode 2): plain SIMD128, no relaxed ops: w sign-extended to int16, a - zp as int16, i32x4.dot_i16x8_s.
;;          Chunk j of a quad: bytes 0..7 = [n 4j: k0 k1, n 4j+1: k0 k1, ...], bytes 8..15 the same for k2 k3.
;;
;; Threads: a job is up to 4 matvecs of one mode (e.g. att key, value and receptance); thread 0 (the runner's thread)
;; calls `run`, helpers (rt_wasm_worker.js) sit in `serve`, and all claim chunks of 4 blocks (see $work; the control
;; block's words are listed at `run`). Thread 0 waits for a helper at most `patience` polls (see "Work sharing").
;; Then the step's elementwise float32 work (layernorm, mix, wkv, add, relusq, addsigmul; exp in double).
(module
  (import "env" "mem" (memory 1 65536 shared))

  ;; mode 0: blocks [b0, b1) of W (at w, 16 * K bytes a block), a = K uint8 at x, y = 16 int32 a block
  (func $mv_u8 (param $w i32) (param $x i32) (param $y i32) (param $K i32) (param $b0 i32) (param $b1 i32)
    (local $b i32) (local $p i32) (local $q i32) (local $end i32) (local $s v128)
    (local $a0 v128) (local $a1 v128) (local $a2 v128) (local $a3 v128)
    (local.set $b (local.get $b0))
    (block $done
      (loop $blocks
        (br_if $done (i32.ge_u (local.get $b) (local.get $b1)))
        (local.set $p (i32.add (local.get $w) (i32.mul (local.get $b) (i32.shl (local.get $K) (i32.const 4)))))
        (local.set $q (local.get $x))
        (local.set $end (i32.add (local.get $x) (local.get $K)))
        (local.set $a0 (v128.const i32x4 0 0 0 0))
        (local.set $a1 (v128.const i32x4 0 0 0 0))
        (local.set $a2 (v128.const i32x4 0 0 0 0))
        (local.set $a3 (v128.const i32x4 0 0 0 0))
        (loop $k ;; two quads of k an iteration (K % 8 == 0)
          (local.set $s (v128.load32_splat (local.get $q)))
          (local.set $a0 (i32x4.relaxed_dot_i8x16_i7x16_add_s (v128.load (local.get $p)) (local.get $s) (local.get $a0)))
          (local.set $a1 (i32x4.relaxed_dot_i8x16_i7x16_add_s (v128.load offset=16 (local.get $p)) (local.get $s) (local.get $a1)))
          (local.set $a2 (i32x4.relaxed_dot_i8x16_i7x16_add_s (v128.load offset=32 (local.get $p)) (local.get $s) (local.get $a2)))
          (local.set $a3 (i32x4.relaxed_dot_i8x16_i7x16_add_s (v128.load offset=48 (local.get $p)) (local.get $s) (local.get $a3)))
          (local.set $s (v128.load32_splat offset=4 (local.get $q)))
          (local.set $a0 (i32x4.relaxed_dot_i8x16_i7x16_add_s (v128.load offset=64 (local.get $p)) (local.get $s) (local.get $a0)))
          (local.set $a1 (i32x4.relaxed_dot_i8x16_i7x16_add_s (v128.load offset=80 (local.get $p)) (local.get $s) (local.get $a1)))
          (local.set $a2 (i32x4.relaxed_dot_i8x16_i7x16_add_s (v128.load offset=96 (local.get $p)) (local.get $s) (local.get $a2)))
          (local.set $a3 (i32x4.relaxed_dot_i8x16_i7x16_add_s (v128.load offset=112 (local.get $p)) (local.get $s) (local.get $a3)))
          (local.set $p (i32.add (local.get $p) (i32.const 128)))
          (local.set $q (i32.add (local.get $q) (i32.const 8)))
          (br_if $k (i32.lt_u (local.get $q) (local.get $end))))
        (local.set $p (i32.add (local.get $y) (i32.shl (local.get $b) (i32.const 6))))
        (v128.store (local.get $p) (local.get $a0))
        (v128.store offset=16 (local.get $p) (local.get $a1))
        (v128.store offset=32 (local.get $p) (local.get $a2))
        (v128.store offset=48 (local.get $p) (local.get $a3))
        (local.set $b (i32.add (local.get $b) (i32.const 1)))
        (br $blocks))))

  ;; mode 1: as mode 0, the activations as nibbles: hi = K bytes at x, lo = K bytes at x + K; y = 16 * dot(hi) + dot(lo)
  (func $mv_nib (param $w i32) (param $x i32) (param $y i32) (param $K i32) (param $b0 i32) (param $b1 i32)
    (local $b i32) (local $p i32) (local $q i32) (local $end i32) (local $h v128) (local $l v128) (local $v v128)
    (local $h0 v128) (local $h1 v128) (local $h2 v128) (local $h3 v128)
    (local $l0 v128) (local $l1 v128) (local $l2 v128) (local $l3 v128)
    (local.set $b (local.get $b0))
    (block $done
      (loop $blocks
        (br_if $done (i32.ge_u (local.get $b) (local.get $b1)))
        (local.set $p (i32.add (local.get $w) (i32.mul (local.get $b) (i32.shl (local.get $K) (i32.const 4)))))
        (local.set $q (local.get $x))
        (local.set $end (i32.add (local.get $x) (local.get $K)))
        (local.set $h0 (v128.const i32x4 0 0 0 0))
        (local.set $h1 (v128.const i32x4 0 0 0 0))
        (local.set $h2 (v128.const i32x4 0 0 0 0))
        (local.set $h3 (v128.const i32x4 0 0 0 0))
        (local.set $l0 (v128.const i32x4 0 0 0 0))
        (local.set $l1 (v128.const i32x4 0 0 0 0))
        (local.set $l2 (v128.const i32x4 0 0 0 0))
        (local.set $l3 (v128.const i32x4 0 0 0 0))
        (loop $k
          (local.set $h (v128.load32_splat (local.get $q)))
          (local.set $l (v128.load32_splat (i32.add (local.get $q) (local.get $K))))
          (local.set $v (v128.load (local.get $p)))
          (local.set $h0 (i32x4.relaxed_dot_i8x16_i7x16_add_s (local.get $v) (local.get $h) (local.get $h0)))
          (local.set $l0 (i32x4.relaxed_dot_i8x16_i7x16_add_s (local.get $v) (local.get $l) (local.get $l0)))
          (local.set $v (v128.load offset=16 (local.get $p)))
          (local.set $h1 (i32x4.relaxed_dot_i8x16_i7x16_add_s (local.get $v) (local.get $h) (local.get $h1)))
          (local.set $l1 (i32x4.relaxed_dot_i8x16_i7x16_add_s (local.get $v) (local.get $l) (local.get $l1)))
          (local.set $v (v128.load offset=32 (local.get $p)))
          (local.set $h2 (i32x4.relaxed_dot_i8x16_i7x16_add_s (local.get $v) (local.get $h) (local.get $h2)))
          (local.set $l2 (i32x4.relaxed_dot_i8x16_i7x16_add_s (local.get $v) (local.get $l) (local.get $l2)))
          (local.set $v (v128.load offset=48 (local.get $p)))
          (local.set $h3 (i32x4.relaxed_dot_i8x16_i7x16_add_s (local.get $v) (local.get $h) (local.get $h3)))
          (local.set $l3 (i32x4.relaxed_dot_i8x16_i7x16_add_s (local.get $v) (local.get $l) (local.get $l3)))
          (local.set $p (i32.add (local.get $p) (i32.const 64)))
          (local.set $q (i32.add (local.get $q) (i32.const 4)))
          (br_if $k (i32.lt_u (local.get $q) (local.get $end))))
        (local.set $p (i32.add (local.get $y) (i32.shl (local.get $b) (i32.const 6))))
        (v128.store (local.get $p) (i32x4.add (i32x4.shl (local.get $h0) (i32.const 4)) (local.get $l0)))
        (v128.store offset=16 (local.get $p) (i32x4.add (i32x4.shl (local.get $h1) (i32.const 4)) (local.get $l1)))
        (v128.store offset=32 (local.get $p) (i32x4.add (i32x4.shl (local.get $h2) (i32.const 4)) (local.get $l2)))
        (v128.store offset=48 (local.get $p) (i32x4.add (i32x4.shl (local.get $h3) (i32.const 4)) (local.get $l3)))
        (local.set $b (i32.add (local.get $b) (i32.const 1)))
        (br $blocks))))

  ;; mode 2: a - zp as K int16 at x; the weights in mode 2's chunk layout
  (func $mv_i16 (param $w i32) (param $x i32) (param $y i32) (param $K i32) (param $b0 i32) (param $b1 i32)
    (local $b i32) (local $p i32) (local $q i32) (local $end i32) (local $s01 v128) (local $s23 v128) (local $v v128)
    (local $a0 v128) (local $a1 v128) (local $a2 v128) (local $a3 v128)
    (local.set $b (local.get $b0))
    (block $done
      (loop $blocks
        (br_if $done (i32.ge_u (local.get $b) (local.get $b1)))
        (local.set $p (i32.add (local.get $w) (i32.mul (local.get $b) (i32.shl (local.get $K) (i32.const 4)))))
        (local.set $q (local.get $x))
        (local.set $end (i32.add (local.get $x) (i32.shl (local.get $K) (i32.const 1))))
        (local.set $a0 (v128.const i32x4 0 0 0 0))
        (local.set $a1 (v128.const i32x4 0 0 0 0))
        (local.set $a2 (v128.const i32x4 0 0 0 0))
        (local.set $a3 (v128.const i32x4 0 0 0 0))
        (loop $k
          (local.set $s01 (v128.load32_splat (local.get $q)))
          (local.set $s23 (v128.load32_splat offset=4 (local.get $q)))
          (local.set $v (v128.load (local.get $p)))
          (local.set $a0 (i32x4.add (local.get $a0) (i32x4.add
            (i32x4.dot_i16x8_s (i16x8.extend_low_i8x16_s (local.get $v)) (local.get $s01))
            (i32x4.dot_i16x8_s (i16x8.extend_high_i8x16_s (local.get $v)) (local.get $s23)))))
          (local.set $v (v128.load offset=16 (local.get $p)))
          (local.set $a1 (i32x4.add (local.get $a1) (i32x4.add
            (i32x4.dot_i16x8_s (i16x8.extend_low_i8x16_s (local.get $v)) (local.get $s01))
            (i32x4.dot_i16x8_s (i16x8.extend_high_i8x16_s (local.get $v)) (local.get $s23)))))
          (local.set $v (v128.load offset=32 (local.get $p)))
          (local.set $a2 (i32x4.add (local.get $a2) (i32x4.add
            (i32x4.dot_i16x8_s (i16x8.extend_low_i8x16_s (local.get $v)) (local.get $s01))
            (i32x4.dot_i16x8_s (i16x8.extend_high_i8x16_s (local.get $v)) (local.get $s23)))))
          (local.set $v (v128.load offset=48 (local.get $p)))
          (local.set $a3 (i32x4.add (local.get $a3) (i32x4.add
            (i32x4.dot_i16x8_s (i16x8.extend_low_i8x16_s (local.get $v)) (local.get $s01))
            (i32x4.dot_i16x8_s (i16x8.extend_high_i8x16_s (local.get $v)) (local.get $s23)))))
          (local.set $p (i32.add (local.get $p) (i32.const 64)))
          (local.set $q (i32.add (local.get $q) (i32.const 8)))
          (br_if $k (i32.lt_u (local.get $q) (local.get $end))))
        (local.set $p (i32.add (local.get $y) (i32.shl (local.get $b) (i32.const 6))))
        (v128.store (local.get $p) (local.get $a0))
        (v128.store offset=16 (local.get $p) (local.get $a1))
        (v128.store offset=32 (local.get $p) (local.get $a2))
        (v128.store offset=48 (local.get $p) (local.get $a3))
        (local.set $b (i32.add (local.get $b) (i32.const 1)))
        (br $blocks))))

;; DynamicQuantizeLinear (ONNX, as onnxruntime computes it) of K float32 at x (K % 16 == 0) into the activation
  ;; format of `mode` at dst; writes the scale (f32) and zero point (i32) at info. lo = min(0, min x), hi = max(0, max x),
  ;; scale = hi == lo ? 1 : (hi - lo) / 255, zp = roundeven(clamp(0 - lo / scale, 0, 255)),
  ;; q = clamp(roundeven(x / scale) + zp, 0, 255) (f32x4.nearest rounds half to even).
  (func (export "quant") (param $x i32) (param $K i32) (param $dst i32) (param $mode i32) (param $info i32)
    (local $p i32) (local $end i32) (local $o i32) (local $lo v128) (local $hi v128) (local $v v128)
    (local $l f32) (local $h f32) (local $scale f32) (local $zp i32) (local $vs v128) (local $vz v128)
    (local $q0 v128) (local $q1 v128) (local $q2 v128) (local $q3 v128) (local $w0 v128) (local $w1 v128)
    (local.set $end (i32.add (local.get $x) (i32.shl (local.get $K) (i32.const 2))))
    (local.set $lo (v128.const f32x4 0 0 0 0))
    (local.set $hi (v128.const f32x4 0 0 0 0))
    (local.set $p (local.get $x))
    (loop $mm
      (local.set $v (v128.load (local.get $p)))
      (local.set $lo (f32x4.min (local.get $lo) (local.get $v)))
      (local.set $hi (f32x4.max (local.get $hi) (local.get $v)))
      (local.set $p (i32.add (local.get $p) (i32.const 16)))
      (br_if $mm (i32.lt_u (local.get $p) (local.get $end))))
    (local.set $l (f32.min (f32.min (f32x4.extract_lane 0 (local.get $lo)) (f32x4.extract_lane 1 (local.get $lo)))
                           (f32.min (f32x4.extract_lane 2 (local.get $lo)) (f32x4.extract_lane 3 (local.get $lo)))))
    (local.set $h (f32.max (f32.max (f32x4.extract_lane 0 (local.get $hi)) (f32x4.extract_lane 1 (local.get $hi)))
                           (f32.max (f32x4.extract_lane 2 (local.get $hi)) (f32x4.extract_lane 3 (local.get $hi)))))
    (local.set $scale (select (f32.const 1) (f32.div (f32.sub (local.get $h) (local.get $l)) (f32.const 255))
                              (f32.eq (local.get $h) (local.get $l))))
    (local.set $zp (i32.trunc_f32_s (f32.nearest (f32.min (f32.const 255) (f32.max (f32.const 0)
      (f32.sub (f32.const 0) (f32.div (local.get $l) (local.get $scale))))))))
    (f32.store (local.get $info) (local.get $scale))
    (i32.store offset=4 (local.get $info) (local.get $zp))
    (local.set $vs (f32x4.splat (local.get $scale)))
    (local.set $vz (i32x4.splat (local.get $zp)))
    (local.set $p (local.get $x))
    (local.set $o (local.get $dst))
    (loop $q ;; 16 values an iteration
      (local.set $q0 (i32x4.min_s (i32x4.max_s (i32x4.add (i32x4.trunc_sat_f32x4_s (f32x4.nearest
        (f32x4.div (v128.load (local.get $p)) (local.get $vs)))) (local.get $vz)) (v128.const i32x4 0 0 0 0)) (v128.const i32x4 255 255 255 255)))
      (local.set $q1 (i32x4.min_s (i32x4.max_s (i32x4.add (i32x4.trunc_sat_f32x4_s (f32x4.nearest
        (f32x4.div (v128.load offset=16 (local.get $p)) (local.get $vs)))) (local.get $vz)) (v128.const i32x4 0 0 0 0)) (v128.const i32x4 255 255 255 255)))
      (local.set $q2 (i32x4.min_s (i32x4.max_s (i32x4.add (i32x4.trunc_sat_f32x4_s (f32x4.nearest
        (f32x4.div (v128.load offset=32 (local.get $p)) (local.get $vs)))) (local.get $vz)) (v128.const i32x4 0 0 0 0)) (v128.const i32x4 255 255 255 255)))
      (local.set $q3 (i32x4.min_s (i32x4.max_s (i32x4.add (i32x4.trunc_sat_f32x4_s (f32x4.nearest
        (f32x4.div (v128.load offset=48 (local.get $p)) (local.get $vs)))) (local.get $vz)) (v128.const i32x4 0 0 0 0)) (v128.const i32x4 255 255 255 255)))
      (if (i32.eq (local.get $mode) (i32.const 2))
        (then ;; int16 a - zp
          (v128.store (local.get $o) (i16x8.narrow_i32x4_s (i32x4.sub (local.get $q0) (local.get $vz)) (i32x4.sub (local.get $q1) (local.get $vz))))
          (v128.store offset=16 (local.get $o) (i16x8.narrow_i32x4_s (i32x4.sub (local.get $q2) (local.get $vz)) (i32x4.sub (local.get $q3) (local.get $vz))))
          (local.set $o (i32.add (local.get $o) (i32.const 32))))
        (else
          (local.set $w0 (i16x8.narrow_i32x4_s (local.get $q0) (local.get $q1)))
          (local.set $w1 (i16x8.narrow_i32x4_s (local.get $q2) (local.get $q3)))
          (if (i32.eq (local.get $mode) (i32.const 0))
            (then (v128.store (local.get $o) (i8x16.narrow_i16x8_u (local.get $w0) (local.get $w1))))
            (else ;; nibbles: hi at o, lo at o + K
              (v128.store (local.get $o) (i8x16.narrow_i16x8_u (i16x8.shr_u (local.get $w0) (i32.const 4)) (i16x8.shr_u (local.get $w1) (i32.const 4))))
              (v128.store (i32.add (local.get $o) (local.get $K)) (i8x16.narrow_i16x8_u
                (v128.and (local.get $w0) (v128.const i16x8 15 15 15 15 15 15 15 15))
                (v128.and (local.get $w1) (v128.const i16x8 15 15 15 15 15 15 15 15))))))
          (local.set $o (i32.add (local.get $o) (i32.const 16)))))
      (local.set $p (i32.add (local.get $p) (i32.const 64)))
      (br_if $q (i32.lt_u (local.get $p) (local.get $end)))))

  ;; In place at y: float32(acc[n] - zp * colsum[n]) * float32(scale * wscale[n]) for n < N (N padded to 16), with scale
  ;; and zp at info (quant's), colsum int32 and wscale f32 of the matrix (padded with zeros).
  (func $dequant (export "dequant") (param $y i32) (param $colsum i32) (param $wscale i32) (param $N i32) (param $info i32)
    (local $i i32) (local $vs v128) (local $vz v128) (local $o i32)
    (local.set $vs (f32x4.splat (f32.load (local.get $info))))
    (local.set $vz (i32x4.splat (i32.load offset=4 (local.get $info))))
    (loop $n
      (local.set $o (i32.shl (local.get $i) (i32.const 2)))
      (v128.store (i32.add (local.get $y) (local.get $o))
        (f32x4.mul
          (f32x4.convert_i32x4_s (i32x4.sub (v128.load (i32.add (local.get $y) (local.get $o)))
            (i32x4.mul (local.get $vz) (v128.load (i32.add (local.get $colsum) (local.get $o))))))
          (f32x4.mul (local.get $vs) (v128.load (i32.add (local.get $wscale) (local.get $o))))))
      (local.set $i (i32.add (local.get $i) (i32.const 4)))
      (br_if $n (i32.lt_u (local.get $i) (local.get $N)))))

  ;; ---- The elementwise float32 work of a step (rt_wasm.js calls these between the matvecs). Every operation is one
  ;; float32 operation in the order of rt_wasm.js's JS reference (stepJs: Math.fround after each), so the results are
  ;; bit-identical to it, except exp: there JS has fround(Math.exp(x)) (V8's double exp, rounded to float32), and this
  ;; module has $exp64, a double exp with a relative error below 1e-14, rounded to float32: the two differ only where
  ;; exp(x) lies within ~1e-14 (relative) of a float32 rounding midpoint (tests/test_wasm_native.py counts them).
  ;; n (the element count) is a multiple of 16 everywhere (rt_wasm.js's unsupported() checks C and F).

  ;; exp of two doubles: x = k ln2 + r (Cody-Waite, ln2 split as fdlibm's), e^r by its Taylor series to degree 11
  ;; (|r| <= 0.35: truncation error < 7e-15), times 2^k built in the exponent bits. x is clamped to [-120, 100] first:
  ;; far beyond float32's range (e^-120 -> +0, e^100 -> inf after rounding to float32, as Math.exp's are).
  (func $exp64 (param $x v128) (result v128)
    (local $t v128) (local $n v128) (local $r v128) (local $p v128)
    (local.set $x (f64x2.min (f64x2.max (local.get $x) (v128.const f64x2 -120 -120)) (v128.const f64x2 100 100)))
    ;; t = x * log2(e) + 1.5 * 2^52: k = round(x * log2 e) in t's low mantissa bits
    (local.set $t (f64x2.add (f64x2.mul (local.get $x) (v128.const f64x2 1.4426950408889634 1.4426950408889634))
                             (v128.const f64x2 6755399441055744 6755399441055744)))
    (local.set $n (f64x2.sub (local.get $t) (v128.const f64x2 6755399441055744 6755399441055744)))
    (local.set $r (f64x2.sub (f64x2.sub (local.get $x) (f64x2.mul (local.get $n) (v128.const f64x2 0x1.62e42feep-1 0x1.62e42feep-1)))
                             (f64x2.mul (local.get $n) (v128.const f64x2 0x1.a39ef35793c76p-33 0x1.a39ef35793c76p-33))))
    (local.set $p (v128.const f64x2 2.505210838544172e-08 2.505210838544172e-08))
    (local.set $p (f64x2.add (f64x2.mul (local.get $p) (local.get $r)) (v128.const f64x2 2.755731922398589e-07 2.755731922398589e-07)))
    (local.set $p (f64x2.add (f64x2.mul (local.get $p) (local.get $r)) (v128.const f64x2 2.7557319223985893e-06 2.7557319223985893e-06)))
    (local.set $p (f64x2.add (f64x2.mul (local.get $p) (local.get $r)) (v128.const f64x2 2.48015873015873e-05 2.48015873015873e-05)))
    (local.set $p (f64x2.add (f64x2.mul (local.get $p) (local.get $r)) (v128.const f64x2 0.0001984126984126984 0.0001984126984126984)))
    (local.set $p (f64x2.add (f64x2.mul (local.get $p) (local.get $r)) (v128.const f64x2 0.001388888888888889 0.001388888888888889)))
    (local.set $p (f64x2.add (f64x2.mul (local.get $p) (local.get $r)) (v128.const f64x2 0.008333333333333333 0.008333333333333333)))
    (local.set $p (f64x2.add (f64x2.mul (local.get $p) (local.get $r)) (v128.const f64x2 0.041666666666666664 0.041666666666666664)))
    (local.set $p (f64x2.add (f64x2.mul (local.get $p) (local.get $r)) (v128.const f64x2 0.16666666666666666 0.16666666666666666)))
    (local.set $p (f64x2.add (f64x2.mul (local.get $p) (local.get $r)) (v128.const f64x2 0.5 0.5)))
    (local.set $p (f64x2.add (f64x2.mul (local.get $p) (local.get $r)) (v128.const f64x2 1 1)))
    (local.set $p (f64x2.add (f64x2.mul (local.get $p) (local.get $r)) (v128.const f64x2 1 1)))
    ;; 2^k: (t's bits << 52) holds k mod 2^12 in the exponent field; + 1023 << 52 biases it (k + 1023 in [849, 1168])
    (f64x2.mul (local.get $p)
      (i64x2.add (i64x2.shl (local.get $t) (i32.const 52)) (v128.const i64x2 4607182418800017408 4607182418800017408))))

  ;; exp of four float32, each computed in double and rounded to float32 (as fround(Math.exp(x)))
  (func $expf4 (param $x v128) (result v128)
    (i8x16.shuffle 0 1 2 3 4 5 6 7 16 17 18 19 20 21 22 23
      (f32x4.demote_f64x2_zero (call $exp64 (f64x2.promote_low_f32x4 (local.get $x))))
      (f32x4.demote_f64x2_zero (call $exp64 (f64x2.promote_low_f32x4
        (i8x16.shuffle 8 9 10 11 12 13 14 15 8 9 10 11 12 13 14 15 (local.get $x) (local.get $x)))))))

  ;; 1 / (1 + exp(-x)), each step rounded to float32
  (func $sigmoid4 (param $x v128) (result v128)
    (f32x4.div (v128.const f32x4 1 1 1 1) (f32x4.add (v128.const f32x4 1 1 1 1) (call $expf4 (f32x4.neg (local.get $x))))))

  ;; y[i] = exp(x[i]) for n floats (for tests: rt_wasm.js's expf)
  (func (export "expf") (param $x i32) (param $y i32) (param $n i32)
    (local $i i32)
    (loop $l
      (v128.store (i32.add (local.get $y) (local.get $i)) (call $expf4 (v128.load (i32.add (local.get $x) (local.get $i)))))
      (local.set $i (i32.add (local.get $i) (i32.const 16)))
      (br_if $l (i32.lt_u (local.get $i) (i32.shl (local.get $n) (i32.const 2))))))

  ;; LayerNorm of n floats at x into out, as rt_wasm.js's layerNorm: sum and sum of squares accumulated in float32 in
  ;; order (scalar, so the order is the JS one), var = E[x^2] - mean^2, sd = sqrt(var + eps), y = (x - mean) / sd * w + b
  (func (export "layernorm") (param $x i32) (param $w i32) (param $b i32) (param $out i32) (param $n i32)
    (local $i i32) (local $end i32) (local $v f32) (local $sum f32) (local $sq f32) (local $nf f32)
    (local $mean f32) (local $vm v128) (local $vsd v128)
    (local.set $end (i32.shl (local.get $n) (i32.const 2)))
    (loop $acc
      (local.set $v (f32.load (i32.add (local.get $x) (local.get $i))))
      (local.set $sum (f32.add (local.get $sum) (local.get $v)))
      (local.set $sq (f32.add (local.get $sq) (f32.mul (local.get $v) (local.get $v))))
      (local.set $i (i32.add (local.get $i) (i32.const 4)))
      (br_if $acc (i32.lt_u (local.get $i) (local.get $end))))
    (local.set $nf (f32.convert_i32_u (local.get $n)))
    (local.set $mean (f32.div (local.get $sum) (local.get $nf)))
    (local.set $vm (f32x4.splat (local.get $mean)))
    (local.set $vsd (f32x4.splat (f32.sqrt (f32.add (f32.sub (f32.div (local.get $sq) (local.get $nf))
      (f32.mul (local.get $mean) (local.get $mean))) (f32.const 0x1.4f8b58p-17)))))
    (local.set $i (i32.const 0))
    (loop $y
      (v128.store (i32.add (local.get $out) (local.get $i))
        (f32x4.add (f32x4.mul (f32x4.div (f32x4.sub (v128.load (i32.add (local.get $x) (local.get $i))) (local.get $vm))
          (local.get $vsd)) (v128.load (i32.add (local.get $w) (local.get $i)))) (v128.load (i32.add (local.get $b) (local.get $i)))))
      (local.set $i (i32.add (local.get $i) (i32.const 16)))
      (br_if $y (i32.lt_u (local.get $i) (local.get $end)))))

  ;; token shift mix: out = s + (xx - s) * mix, n floats
  (func (export "mix") (param $xx i32) (param $s i32) (param $mix i32) (param $out i32) (param $n i32)
    (local $i i32) (local $sv v128)
    (loop $l
      (local.set $sv (v128.load (i32.add (local.get $s) (local.get $i))))
      (v128.store (i32.add (local.get $out) (local.get $i))
        (f32x4.add (local.get $sv) (f32x4.mul (f32x4.sub (v128.load (i32.add (local.get $xx) (local.get $i))) (local.get $sv))
          (v128.load (i32.add (local.get $mix) (local.get $i))))))
      (local.set $i (i32.add (local.get $i) (i32.const 16)))
      (br_if $l (i32.lt_u (local.get $i) (i32.shl (local.get $n) (i32.const 2))))))

  ;; WKV of RWKV-4 with the state aa, bb, pp updated in place; out = sigmoid(r) * wkv. Of the two exps of each
  ;; max-subtracted pair one is exp(0) = 1, the other exp(-|d|) with d the difference (rounding is sign-symmetric, so
  ;; this is the JS's exp(p0 - p), exp(ww - p) exactly).
  (func (export "wkv") (param $k i32) (param $v i32) (param $r i32) (param $u i32) (param $w i32)
    (param $aa i32) (param $bb i32) (param $pp i32) (param $out i32) (param $n i32)
    (local $i i32) (local $kc v128) (local $vc v128) (local $a0 v128) (local $b0 v128) (local $p0 v128) (local $ww v128)
    (local $ge v128) (local $e v128) (local $e1 v128) (local $e2 v128) (local $wkv v128)
    (loop $l
      (local.set $kc (v128.load (i32.add (local.get $k) (local.get $i))))
      (local.set $vc (v128.load (i32.add (local.get $v) (local.get $i))))
      (local.set $a0 (v128.load (i32.add (local.get $aa) (local.get $i))))
      (local.set $b0 (v128.load (i32.add (local.get $bb) (local.get $i))))
      (local.set $p0 (v128.load (i32.add (local.get $pp) (local.get $i))))
      ;; ww = u + k; p = max(p0, ww); e1 = exp(p0 - p), e2 = exp(ww - p)
      (local.set $ww (f32x4.add (v128.load (i32.add (local.get $u) (local.get $i))) (local.get $kc)))
      (local.set $ge (f32x4.ge (local.get $p0) (local.get $ww)))
      (local.set $e (call $expf4 (f32x4.neg (f32x4.abs (f32x4.sub (local.get $p0) (local.get $ww))))))
      (local.set $e1 (v128.bitselect (v128.const f32x4 1 1 1 1) (local.get $e) (local.get $ge)))
      (local.set $e2 (v128.bitselect (local.get $e) (v128.const f32x4 1 1 1 1) (local.get $ge)))
      (local.set $wkv (f32x4.div (f32x4.add (f32x4.mul (local.get $e1) (local.get $a0)) (f32x4.mul (local.get $e2) (local.get $vc)))
                                 (f32x4.add (f32x4.mul (local.get $e1) (local.get $b0)) (local.get $e2))))
      ;; ww2 = p0 + w; p2 = max(ww2, k); e1b = exp(ww2 - p2), e2b = exp(k - p2)
      (local.set $ww (f32x4.add (local.get $p0) (v128.load (i32.add (local.get $w) (local.get $i)))))
      (local.set $ge (f32x4.ge (local.get $ww) (local.get $kc)))
      (local.set $e (call $expf4 (f32x4.neg (f32x4.abs (f32x4.sub (local.get $ww) (local.get $kc))))))
      (local.set $e1 (v128.bitselect (v128.const f32x4 1 1 1 1) (local.get $e) (local.get $ge)))
      (local.set $e2 (v128.bitselect (local.get $e) (v128.const f32x4 1 1 1 1) (local.get $ge)))
      (v128.store (i32.add (local.get $aa) (local.get $i))
        (f32x4.add (f32x4.mul (local.get $e1) (local.get $a0)) (f32x4.mul (local.get $e2) (local.get $vc))))
      (v128.store (i32.add (local.get $bb) (local.get $i)) (f32x4.add (f32x4.mul (local.get $e1) (local.get $b0)) (local.get $e2)))
      (v128.store (i32.add (local.get $pp) (local.get $i)) (f32x4.max (local.get $ww) (local.get $kc)))
      (v128.store (i32.add (local.get $out) (local.get $i))
        (f32x4.mul (call $sigmoid4 (v128.load (i32.add (local.get $r) (local.get $i)))) (local.get $wkv)))
      (local.set $i (i32.add (local.get $i) (i32.const 16)))
      (br_if $l (i32.lt_u (local.get $i) (i32.shl (local.get $n) (i32.const 2))))))

  ;; x += y, n floats
  (func (export "add") (param $x i32) (param $y i32) (param $n i32)
    (local $i i32)
    (loop $l
      (v128.store (i32.add (local.get $x) (local.get $i))
        (f32x4.add (v128.load (i32.add (local.get $x) (local.get $i))) (v128.load (i32.add (local.get $y) (local.get $i)))))
      (local.set $i (i32.add (local.get $i) (i32.const 16)))
      (br_if $l (i32.lt_u (local.get $i) (i32.shl (local.get $n) (i32.const 2))))))

  ;; out = relu(x)^2, n floats (max with +0: -0 and negatives give +0, as the JS's `x > 0 ? x : 0`)
  (func (export "relusq") (param $x i32) (param $out i32) (param $n i32)
    (local $i i32) (local $a v128)
    (loop $l
      (local.set $a (f32x4.max (v128.load (i32.add (local.get $x) (local.get $i))) (v128.const f32x4 0 0 0 0)))
      (v128.store (i32.add (local.get $out) (local.get $i)) (f32x4.mul (local.get $a) (local.get $a)))
      (local.set $i (i32.add (local.get $i) (i32.const 16)))
      (br_if $l (i32.lt_u (local.get $i) (i32.shl (local.get $n) (i32.const 2))))))

  ;; x += sigmoid(r) * v, n floats
  (func (export "addsigmul") (param $x i32) (param $r i32) (param $v i32) (param $n i32)
    (local $i i32)
    (loop $l
      (v128.store (i32.add (local.get $x) (local.get $i))
        (f32x4.add (v128.load (i32.add (local.get $x) (local.get $i)))
          (f32x4.mul (call $sigmoid4 (v128.load (i32.add (local.get $r) (local.get $i)))) (v128.load (i32.add (local.get $v) (local.get $i))))))
      (local.set $i (i32.add (local.get $i) (i32.const 16)))
      (br_if $l (i32.lt_u (local.get $i) (i32.shl (local.get $n) (i32.const 2))))))

;; Work sharing: a job's blocks go in chunks of 4 (a chunk never spans two segments), claimed one at a time by
  ;; whichever thread comes first (a 64-bit compare-exchange on the claim word = job number << 32 | chunk count << 16 |
  ;; next chunk; a job has fewer than 65536 chunks: rt_wasm.js checks).
  ;; Thread t != 0 writes its outputs to its own copy of the output slots (y + t * span) and then tags the chunk done
  ;; (done[i] = job << 3 | t). Thread 0, once no chunk is left to claim, goes over all chunks: it copies a helper's
  ;; outputs of this job into y, and computes itself every chunk not done after `patience` polls (claimed by a helper
  ;; that the OS has not run since: the sums are exact, so the helper's late result would be the same numbers, and it
  ;; lands in the helper's own copy, which is read only for chunks tagged with the current job). So a helper that the
  ;; OS preempts mid-chunk costs thread 0 the patience and that chunk's work, not the preemption.

  ;; The segment of chunk i of the job at ctl: (address of its 8 words, or 0 when i is past the job; i within it)
  (func $locate (param $ctl i32) (param $i i32) (result i32 i32)
    (local $s i32) (local $end i32) (local $nc i32)
    (local.set $s (i32.add (local.get $ctl) (i32.const 40)))
    (local.set $end (i32.add (local.get $s) (i32.shl (i32.load offset=36 (local.get $ctl)) (i32.const 5))))
    (loop $segs
      (if (i32.ge_u (local.get $s) (local.get $end)) (then (return (i32.const 0) (i32.const 0))))
      (local.set $nc (i32.shr_u (i32.add (i32.load offset=16 (local.get $s)) (i32.const 3)) (i32.const 2)))
      (if (i32.lt_u (local.get $i) (local.get $nc)) (then (return (local.get $s) (local.get $i))))
      (local.set $i (i32.sub (local.get $i) (local.get $nc)))
      (local.set $s (i32.add (local.get $s) (i32.const 32)))
      (br $segs))
    (unreachable))

  ;; blocks [b0, b1) of one matvec with the kernel of `mode`, then (colsum != 0) their dequantization ($dequant)
  (func $mv (param $mode i32) (param $w i32) (param $x i32) (param $y i32) (param $K i32) (param $b0 i32) (param $b1 i32)
    (param $colsum i32) (param $wscale i32) (param $info i32)
    (local $o i32)
    (if (i32.eq (local.get $mode) (i32.const 0))
      (then (call $mv_u8 (local.get $w) (local.get $x) (local.get $y) (local.get $K) (local.get $b0) (local.get $b1))))
    (if (i32.eq (local.get $mode) (i32.const 1))
      (then (call $mv_nib (local.get $w) (local.get $x) (local.get $y) (local.get $K) (local.get $b0) (local.get $b1))))
    (if (i32.eq (local.get $mode) (i32.const 2))
      (then (call $mv_i16 (local.get $w) (local.get $x) (local.get $y) (local.get $K) (local.get $b0) (local.get $b1))))
    (if (local.get $colsum)
      (then
        (local.set $o (i32.shl (local.get $b0) (i32.const 6)))
        (call $dequant (i32.add (local.get $y) (local.get $o)) (i32.add (local.get $colsum) (local.get $o))
          (i32.add (local.get $wscale) (local.get $o)) (i32.shl (i32.sub (local.get $b1) (local.get $b0)) (i32.const 4))
          (local.get $info)))))

  ;; Thread 0 only (it writes the job, so it reads it without a race): chunk i of the job at ctl, computed into y
  ;; (copy = 0), or thread t's outputs of it copied into y (copy = 1)
  (func $chunk (param $ctl i32) (param $i i32) (param $t i32) (param $copy i32)
    (local $s i32) (local $j i32) (local $b0 i32) (local $b1 i32) (local $y i32)
    (call $locate (local.get $ctl) (local.get $i))
    (local.set $j)
    (local.set $s)
    (if (i32.eqz (local.get $s)) (then (return)))
    (local.set $b0 (i32.shl (local.get $j) (i32.const 2)))
    (local.set $b1 (i32.add (local.get $b0) (i32.const 4)))
    (if (i32.gt_u (local.get $b1) (i32.load offset=16 (local.get $s))) (then (local.set $b1 (i32.load offset=16 (local.get $s)))))
    (local.set $y (i32.load offset=8 (local.get $s)))
    (if (local.get $copy)
      (then
        (memory.copy (i32.add (local.get $y) (i32.shl (local.get $b0) (i32.const 6)))
                     (i32.add (i32.add (local.get $y) (i32.mul (local.get $t) (i32.load offset=16 (local.get $ctl))))
                              (i32.shl (local.get $b0) (i32.const 6)))
                     (i32.shl (i32.sub (local.get $b1) (local.get $b0)) (i32.const 6))))
      (else
        (call $mv (i32.load offset=32 (local.get $ctl)) (i32.load (local.get $s)) (i32.load offset=4 (local.get $s))
          (local.get $y) (i32.load offset=12 (local.get $s)) (local.get $b0) (local.get $b1)
          (i32.load offset=20 (local.get $s)) (i32.load offset=24 (local.get $s)) (i32.load offset=28 (local.get $s))))))

  ;; Thread t claims and runs chunks until none is left, tagging each one done; returns the claim word seen last.
  ;; A chunk's parameters are read before its claim: the claim succeeds only if the claim word is still the one read
  ;; first, and thread 0 writes the next job's parameters only once this job has no chunk left to claim, so the
  ;; parameters of a successful claim are its job's.
  (func $work (param $ctl i32) (param $t i32) (result i64)
    (local $w i64) (local $next i32) (local $s i32) (local $j i32) (local $mode i32) (local $wp i32) (local $a i32)
    (local $y i32) (local $K i32) (local $b0 i32) (local $b1 i32) (local $colsum i32) (local $wscale i32) (local $info i32)
    (loop $claim
      (local.set $w (i64.atomic.load (local.get $ctl)))
      (local.set $next (i32.and (i32.wrap_i64 (local.get $w)) (i32.const 0xffff)))
      (if (i32.ge_u (local.get $next) (i32.shr_u (i32.wrap_i64 (local.get $w)) (i32.const 16)))
        (then (return (local.get $w))))
      (call $locate (local.get $ctl) (local.get $next))
      (local.set $j)
      (local.set $s)
      (if (local.get $s)
        (then
          (local.set $mode (i32.load offset=32 (local.get $ctl)))
          (local.set $wp (i32.load (local.get $s)))
          (local.set $a (i32.load offset=4 (local.get $s)))
          (local.set $y (i32.add (i32.load offset=8 (local.get $s)) (i32.mul (local.get $t) (i32.load offset=16 (local.get $ctl)))))
          (local.set $K (i32.load offset=12 (local.get $s)))
          (local.set $colsum (i32.load offset=20 (local.get $s)))
          (local.set $wscale (i32.load offset=24 (local.get $s)))
          (local.set $info (i32.load offset=28 (local.get $s)))
          (local.set $b0 (i32.shl (local.get $j) (i32.const 2)))
          (local.set $b1 (i32.add (local.get $b0) (i32.const 4)))
          (if (i32.gt_u (local.get $b1) (i32.load offset=16 (local.get $s))) (then (local.set $b1 (i32.load offset=16 (local.get $s)))))))
      (if (i64.eq (i64.atomic.rmw.cmpxchg (local.get $ctl) (local.get $w) (i64.add (local.get $w) (i64.const 1))) (local.get $w))
        (then
          (if (local.get $s)
            (then (call $mv (local.get $mode) (local.get $wp) (local.get $a) (local.get $y) (local.get $K) (local.get $b0)
                    (local.get $b1) (local.get $colsum) (local.get $wscale) (local.get $info))))
          (i32.atomic.store (i32.add (i32.load offset=20 (local.get $ctl)) (i32.shl (local.get $next) (i32.const 2)))
            (i32.or (i32.shl (i32.wrap_i64 (i64.shr_u (local.get $w) (i64.const 32))) (i32.const 3)) (local.get $t)))))
      (br $claim))
    (unreachable))

  ;; Thread 0: publish the job written at ctl (`chunks` chunks; its parameters are written before this call), wake the
  ;; helpers, work, then take in the helpers' chunks (copy) and do the ones not done yet (after `patience` polls).
  ;; Control words (i32): 0-1 claim word (i64), 3 quit, 4 span (bytes between two threads' output
  ;; copies), 5 address of the done tags (one i32 a chunk), 6 patience (polls thread 0 waits, all chunks of a job
  ;; together, for chunks that helpers are still computing before it computes them itself), 8 mode, 9 segment count, 10 + 8 s segment s: w, a, y, K,
  ;; blocks, colsum, wscale, info (the last three 0: y keeps the int32 sums; else each chunk is dequantized in place
  ;; by the thread that computed it, as $dequant).
  (func (export "run") (param $ctl i32) (param $chunks i32)
    (local $job i64) (local $i i32) (local $v i32) (local $tag i32) (local $done i32) (local $patience i32)
    (local.set $patience (i32.load offset=24 (local.get $ctl)))
    (local.set $job (i64.add (i64.shr_u (i64.atomic.load (local.get $ctl)) (i64.const 32)) (i64.const 1)))
    (local.set $tag (i32.shl (i32.wrap_i64 (local.get $job)) (i32.const 3)))
    (local.set $done (i32.load offset=20 (local.get $ctl)))
    (i64.atomic.store (local.get $ctl) (i64.or (i64.shl (local.get $job) (i64.const 32))
      (i64.extend_i32_u (i32.shl (local.get $chunks) (i32.const 16)))))
    (drop (memory.atomic.notify (local.get $ctl) (i32.const -1)))
    (drop (call $work (local.get $ctl) (i32.const 0)))
    (block $all
      (loop $scan
        (br_if $all (i32.ge_u (local.get $i) (local.get $chunks)))
        (local.set $v (i32.atomic.load (i32.add (local.get $done) (i32.shl (local.get $i) (i32.const 2)))))
        (block $ready ;; a chunk still running on a helper: wait for it while patience lasts (polls, for the whole job)
          (loop $wait
            (br_if $ready (i32.eq (i32.and (local.get $v) (i32.const -8)) (local.get $tag)))
            (br_if $ready (i32.le_s (local.get $patience) (i32.const 0)))
            (local.set $patience (i32.sub (local.get $patience) (i32.const 1)))
            (local.set $v (i32.atomic.load (i32.add (local.get $done) (i32.shl (local.get $i) (i32.const 2)))))
            (br $wait)))
        (if (i32.eq (i32.and (local.get $v) (i32.const -8)) (local.get $tag))
          (then (if (i32.and (local.get $v) (i32.const 7))
            (then (call $chunk (local.get $ctl) (local.get $i) (i32.and (local.get $v) (i32.const 7)) (i32.const 1)))))
          (else (call $chunk (local.get $ctl) (local.get $i) (i32.const 0) (i32.const 0))))
        (local.set $i (i32.add (local.get $i) (i32.const 1)))
        (br $scan))))

  ;; Helper thread t: work whenever the claim word changes (polling `spin` times, then memory.atomic.wait64);
  ;; returns once the quit word is set.
  (func (export "serve") (param $ctl i32) (param $spin i32) (param $t i32)
    (local $w i64) (local $i i32)
    (loop $jobs
      (if (i32.atomic.load offset=12 (local.get $ctl)) (then (return)))
      (local.set $w (call $work (local.get $ctl) (local.get $t)))
      (local.set $i (local.get $spin))
      (block $changed
        (loop $poll
          (br_if $changed (i64.ne (i64.atomic.load (local.get $ctl)) (local.get $w)))
          (local.set $i (i32.sub (local.get $i) (i32.const 1)))
          (br_if $poll (i32.gt_s (local.get $i) (i32.const 0))))
        (drop (memory.atomic.wait64 (local.get $ctl) (local.get $w) (i64.const -1))))
      (br $jobs)))
)
