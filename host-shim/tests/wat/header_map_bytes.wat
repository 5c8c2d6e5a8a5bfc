;; Checks the header-map byte layout from the guest side, byte by byte. On request headers it:
;;   1. reads the request map (proxy_get_header_map_pairs 0)          -> bytes1
;;   2. replaces it with HAND, a map built by hand below               -> status s_set
;;   3. tries to replace it with BAD (count 5, sizes missing)          -> status s_bad
;;   4. reads the request map again                                    -> bytes2 (must be HAND)
;;   5. reads the value of x-wat-a (proxy_get_header_map_value 0)      -> bytes3
;; and answers with a local 200 whose headers are RESP (another hand-built map) and whose body is
;;   u32 s_get1, s_set, s_bad, s_get2, s_val, then u32 len + bytes for bytes1, bytes2, bytes3
;; (all little-endian), so the test sees exactly what the host wrote into guest memory.
(module
  (import "env" "proxy_get_header_map_pairs" (func $get_pairs (param i32 i32 i32) (result i32)))
  (import "env" "proxy_set_header_map_pairs" (func $set_pairs (param i32 i32 i32) (result i32)))
  (import "env" "proxy_get_header_map_value" (func $get_value (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_send_local_response"
    (func $send_local_response (param i32 i32 i32 i32 i32 i32 i32 i32) (result i32)))

  (memory (export "memory") 16)

  ;; HAND (83 bytes): :method GET, :path /from-wat, x-wat-a 1, x-wat-b "".
  (data (i32.const 1024)
    "\04\00\00\00"
    "\07\00\00\00" "\03\00\00\00"
    "\05\00\00\00" "\09\00\00\00"
    "\07\00\00\00" "\01\00\00\00"
    "\07\00\00\00" "\00\00\00\00"
    ":method\00" "GET\00" ":path\00" "/from-wat\00" "x-wat-a\00" "1\00" "x-wat-b\00" "\00")
  ;; RESP (47 bytes): x-wat-resp yes, x-wat-two 2.
  (data (i32.const 1280)
    "\02\00\00\00"
    "\0a\00\00\00" "\03\00\00\00"
    "\09\00\00\00" "\01\00\00\00"
    "x-wat-resp\00" "yes\00" "x-wat-two\00" "2\00")
  ;; BAD (12 bytes): claims 5 pairs but carries the sizes of one.
  (data (i32.const 1536) "\05\00\00\00" "\01\00\00\00" "\01\00\00\00")
  (data (i32.const 1792) "x-wat-a")

  ;; A bump allocator from 64 KiB up: the host allocates returned bytes with it.
  (global $heap (mut i32) (i32.const 65536))
  (func $malloc (export "malloc") (param $size i32) (result i32)
    (local $ptr i32)
    (local.set $ptr (global.get $heap))
    (global.set $heap
      (i32.and (i32.add (i32.add (global.get $heap) (local.get $size)) (i32.const 7)) (i32.const -8)))
    (local.get $ptr))

  (func (export "proxy_abi_version_0_2_1"))
  (func (export "proxy_on_context_create") (param i32 i32))

  ;; Appends u32 `len` then `len` bytes from `src` at `pos`; returns the new position.
  (func $put (param $pos i32) (param $src i32) (param $len i32) (result i32)
    (i32.store (local.get $pos) (local.get $len))
    (memory.copy (i32.add (local.get $pos) (i32.const 4)) (local.get $src) (local.get $len))
    (i32.add (local.get $pos) (i32.add (i32.const 4) (local.get $len))))

  (func (export "proxy_on_request_headers") (param $ctx i32) (param $n i32) (param $eos i32) (result i32)
    (local $s_get1 i32) (local $s_set i32) (local $s_bad i32) (local $s_get2 i32) (local $s_val i32)
    (local $out i32) (local $pos i32) (local $total i32)
    (local.set $s_get1 (call $get_pairs (i32.const 0) (i32.const 16) (i32.const 20)))
    (local.set $s_set (call $set_pairs (i32.const 0) (i32.const 1024) (i32.const 83)))
    (local.set $s_bad (call $set_pairs (i32.const 0) (i32.const 1536) (i32.const 12)))
    (local.set $s_get2 (call $get_pairs (i32.const 0) (i32.const 24) (i32.const 28)))
    (local.set $s_val
      (call $get_value (i32.const 0) (i32.const 1792) (i32.const 7) (i32.const 32) (i32.const 36)))
    (local.set $total
      (i32.add (i32.const 32)
        (i32.add (i32.load (i32.const 20))
          (i32.add (i32.load (i32.const 28)) (i32.load (i32.const 36))))))
    (local.set $out (call $malloc (local.get $total)))
    (i32.store (local.get $out) (local.get $s_get1))
    (i32.store offset=4 (local.get $out) (local.get $s_set))
    (i32.store offset=8 (local.get $out) (local.get $s_bad))
    (i32.store offset=12 (local.get $out) (local.get $s_get2))
    (i32.store offset=16 (local.get $out) (local.get $s_val))
    (local.set $pos (i32.add (local.get $out) (i32.const 20)))
    (local.set $pos (call $put (local.get $pos) (i32.load (i32.const 16)) (i32.load (i32.const 20))))
    (local.set $pos (call $put (local.get $pos) (i32.load (i32.const 24)) (i32.load (i32.const 28))))
    (local.set $pos (call $put (local.get $pos) (i32.load (i32.const 32)) (i32.load (i32.const 36))))
    (drop (call $send_local_response
      (i32.const 200) (i32.const 0) (i32.const 0)
      (local.get $out) (local.get $total)
      (i32.const 1280) (i32.const 47)
      (i32.const -1)))
    (i32.const 1))
)
