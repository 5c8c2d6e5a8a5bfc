;; A module of the old proxy-wasm ABI 0.1.0, which Envoy 1.40 loads with 0.1.0's own imports and
;; callbacks; host-shim implements 0.2.x only.
(module
  (memory (export "memory") 1)
  (func (export "proxy_abi_version_0_1_0"))
  (func (export "proxy_on_context_create") (param i32 i32)))
