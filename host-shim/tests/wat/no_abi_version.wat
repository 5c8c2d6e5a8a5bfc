;; A plugin in every other respect that exports no `proxy_abi_version_*` function: Envoy refuses
;; it at load ("Missing or unknown Proxy-Wasm ABI version").
(module
  (memory (export "memory") 1)
  (func (export "proxy_on_memory_allocate") (param i32) (result i32) (i32.const 0))
  (func (export "proxy_on_context_create") (param i32 i32)))
