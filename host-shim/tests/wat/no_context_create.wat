;; A wasm module that is not a proxy-wasm plugin: it declares the ABI version but exports no
;; proxy_on_context_create.
(module
  (memory (export "memory") 1)
  (func (export "proxy_abi_version_0_2_1"))
  (func (export "_initialize")))
