;; rwkv4_int8.wat: the integer matrix-vector products of rt_wasm.js (wasm-native), hand-written WebAssembly SIMD.
;; Built with wabt's wat2wasm (features simd, relaxed-simd, threads): `node web_demo/build_wasm.mjs` writes
;; rwkv4_int8.wasm, and tests/test_wasm_native.py checks that rebuilding gives the same bytes.
;;
;; A matvec computes y[n] = sum_k a[k] * w[k, n] exactly in int32 for 16 outputs ("a block") at a time; rt_wasm.js
;; subtracts zp * colsum[n] and applies the scales. The weights of a block are one contiguous stream (rt_wasm.js packs
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
;; calls `run`, helpers (rt_wasm_worker.js) sit in `serve`, and all claim chunks of 4 blocks (see $work).
;; Control block at `ctl` (i32 words): 0 claim word (chunks << 16 | next), 1 quit, 2 chunks finished, 8 mode,
;; 9 segment count, then 5 words per segment at 10 + 5 s: w, a, y, K, blocks.
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
  (func (export "dequant") (param $y i32) (param $colsum i32) (param $wscale i32) (param $N i32) (param $info i32)
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

;; Work sharing: a job's blocks go in chunks of 4 (a chunk never spans two segments), claimed one at a time by
  ;; whichever thread comes first (compare-exchange on the claim word), so a helper that the OS does not schedule in
  ;; time costs nothing but its own chunk: thread 0 takes the rest. Claim word = chunks << 16 | next chunk.
  (func $chunk (param $ctl i32) (param $i i32)
    (local $mode i32) (local $s i32) (local $end i32) (local $nb i32) (local $nc i32) (local $b0 i32) (local $b1 i32)
    (local.set $mode (i32.load offset=32 (local.get $ctl)))
    (local.set $s (i32.add (local.get $ctl) (i32.const 40)))
    (local.set $end (i32.add (local.get $s) (i32.mul (i32.load offset=36 (local.get $ctl)) (i32.const 20))))
    (block $found
      (loop $segs
        (if (i32.ge_u (local.get $s) (local.get $end)) (then (return)))
        (local.set $nb (i32.load offset=16 (local.get $s)))
        (local.set $nc (i32.shr_u (i32.add (local.get $nb) (i32.const 3)) (i32.const 2)))
        (br_if $found (i32.lt_u (local.get $i) (local.get $nc)))
        (local.set $i (i32.sub (local.get $i) (local.get $nc)))
        (local.set $s (i32.add (local.get $s) (i32.const 20)))
        (br $segs)))
    (local.set $b0 (i32.shl (local.get $i) (i32.const 2)))
    (local.set $b1 (i32.add (local.get $b0) (i32.const 4)))
    (if (i32.gt_u (local.get $b1) (local.get $nb)) (then (local.set $b1 (local.get $nb))))
    (if (i32.eq (local.get $mode) (i32.const 0))
      (then (call $mv_u8 (i32.load (local.get $s)) (i32.load offset=4 (local.get $s)) (i32.load offset=8 (local.get $s))
              (i32.load offset=12 (local.get $s)) (local.get $b0) (local.get $b1))))
    (if (i32.eq (local.get $mode) (i32.const 1))
      (then (call $mv_nib (i32.load (local.get $s)) (i32.load offset=4 (local.get $s)) (i32.load offset=8 (local.get $s))
              (i32.load offset=12 (local.get $s)) (local.get $b0) (local.get $b1))))
    (if (i32.eq (local.get $mode) (i32.const 2))
      (then (call $mv_i16 (i32.load (local.get $s)) (i32.load offset=4 (local.get $s)) (i32.load offset=8 (local.get $s))
              (i32.load offset=12 (local.get $s)) (local.get $b0) (local.get $b1)))))

  ;; Claims and runs chunks until none is left; each one done adds 1 to the finished word. Returns the claim word seen.
  (func $work (param $ctl i32) (result i32)
    (local $w i32)
    (loop $claim
      (local.set $w (i32.atomic.load (local.get $ctl)))
      (if (i32.ge_u (i32.and (local.get $w) (i32.const 0xffff)) (i32.shr_u (local.get $w) (i32.const 16)))
        (then (return (local.get $w))))
      (if (i32.eq (i32.atomic.rmw.cmpxchg (local.get $ctl) (local.get $w) (i32.add (local.get $w) (i32.const 1))) (local.get $w))
        (then
          (call $chunk (local.get $ctl) (i32.and (local.get $w) (i32.const 0xffff)))
          (drop (i32.atomic.rmw.add offset=8 (local.get $ctl) (i32.const 1)))))
      (br $claim))
    (unreachable))

  ;; Thread 0: publish the job written at ctl (`chunks` chunks; the parameters are written before this call), wake the
  ;; helpers, work, then spin until every chunk is finished.
  (func (export "run") (param $ctl i32) (param $chunks i32)
    (i32.atomic.store offset=8 (local.get $ctl) (i32.const 0))
    (i32.atomic.store (local.get $ctl) (i32.shl (local.get $chunks) (i32.const 16)))
    (drop (memory.atomic.notify (local.get $ctl) (i32.const -1)))
    (drop (call $work (local.get $ctl)))
    (loop $spin
      (br_if $spin (i32.ne (i32.atomic.load offset=8 (local.get $ctl)) (local.get $chunks)))))

  ;; A helper thread: work whenever the claim word changes (polling `spin` times, then memory.atomic.wait32);
  ;; returns once the quit word is set.
  (func (export "serve") (param $ctl i32) (param $spin i32)
    (local $w i32) (local $i i32)
    (loop $jobs
      (if (i32.atomic.load offset=4 (local.get $ctl)) (then (return)))
      (local.set $w (call $work (local.get $ctl)))
      (local.set $i (local.get $spin))
      (block $changed
        (loop $poll
          (br_if $changed (i32.ne (i32.atomic.load (local.get $ctl)) (local.get $w)))
          (local.set $i (i32.sub (local.get $i) (i32.const 1)))
          (br_if $poll (i32.gt_s (local.get $i) (i32.const 0))))
        (drop (memory.atomic.wait32 (local.get $ctl) (local.get $w) (i64.const -1))))
      (br $jobs)))
)
