;; A plugin declaring a known import with the wrong signature: loading must fail and name it.
(module
  (import "env" "proxy_log" (func (param i32) (result i32)))
  (memory (export "memory") 1)
  (func (export "proxy_abi_version_0_2_1"))
  (func (export "proxy_on_context_create") (param i32 i32)))
