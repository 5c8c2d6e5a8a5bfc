;; A wasm module that is not a proxy-wasm plugin: it exports no proxy_on_context_create.
(module
  (memory (export "memory") 1)
  (func (export "_initialize")))
